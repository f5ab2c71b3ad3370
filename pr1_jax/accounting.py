"""Where a step's time and tokens go: per-phase wall time, real and padded token counts.

Every GRPO step's row of `metrics.jsonl` carries (`StepAccount.as_metrics`):
  time/{data,prefill,decode,rewards,update,eval,checkpoint,step}_s   wall seconds (the device
      work of a phase is waited for at its end; prefill = vision tower + prompt prefill);
  tokens/{prompt,patches,completion}_{real,padded}   what the programs computed on vs. what
      was real: prompt tokens (prefill and update), image patches (vision, rollout and update
      each), completion positions of the update (packed rows);
  decode_steps, completion_length_{min,mean,max}, truncated_fraction (hit max_new_tokens
  without EOS), compiled (programs compiled during the step; their time is in the phase),
  compiled_ahead (programs the step started compiling on a background thread, for later steps).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np


class StepAccount:
    """Phase timer and counters of one step; with `programs` (a `pr1_jax.programs.Programs`)
    also what the step compiled."""

    def __init__(self, programs=None):
        self.times: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._programs = programs
        self._compiled0 = programs.num_compiled() if programs else 0
        self._events0 = len(programs.compile_events) if programs else 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(name, time.perf_counter() - t)

    def add_time(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def count(self, **values: float) -> None:
        for k, v in values.items():
            self.counts[k] = self.counts.get(k, 0.0) + float(v)

    def completions(self, lengths_ng: np.ndarray, truncated_ng: np.ndarray, decode_steps: int) -> None:
        """Lengths [N, G] of every completion of the step (all processes)."""
        self.counts.update(decode_steps=float(decode_steps), completion_length_min=float(lengths_ng.min()),
                           completion_length_mean=float(lengths_ng.mean()),
                           completion_length_max=float(lengths_ng.max()),
                           truncated_fraction=float(np.mean(truncated_ng)))

    def as_metrics(self) -> dict[str, float]:
        out = {f"time/{k}_s": round(v, 4) for k, v in self.times.items()}
        out["time/step_s"] = round(time.perf_counter() - self._t0, 4)
        if self._programs is not None:
            events = self._programs.compile_events[self._events0:]
            # programs kept, plus the update candidates compiled to measure their memory and dropped
            dropped = sum(e["count"] - 1 for e in events if e["program"] == "update")
            out["compiled"] = self._programs.num_compiled() - self._compiled0 + dropped
            out["compiled_rollout"] = sum(e["count"] for e in events if e["program"] == "rollout")
            out["compiled_ahead"] = sum(e["count"] for e in events if e["program"] == "rollout_ahead")
            out["time/update_compile_s"] = round(sum(e["seconds"] for e in events if e["program"] == "update"), 3)
        for k, v in self.counts.items():
            out[k if not k.endswith(("_real", "_padded")) else f"tokens/{k}"] = v
        return out
