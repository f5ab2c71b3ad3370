"""Answer lengths of the runs users make, for benchmarks on random weights.

A model with random weights never emits EOS, so every completion would run to
`max_new_tokens` and a benchmark would measure a run nobody makes. The sampler takes
`end_at` [B, G] (`Sampler.__call__`): the length at which EOS is forced. `pr1_jax.train`
draws it each step from `sampling.end_lengths` when that is set — a benchmark switch,
empty (off) in every recipe:

    --config.sampling.end_lengths=geometric:40          # mean 40 tokens (grounding answers)
    --config.sampling.end_lengths=lognormal:150:0.9     # median 150, σ of log 0.9 (detection)
    --config.sampling.end_lengths=task                  # the task's estimate (`Task.end_lengths`)

Lengths are clipped to [1, max_new_tokens]; a completion forced at max_new_tokens counts
as truncated, like a real one. The per-task defaults are estimates from the data sets'
public descriptions (one box ≈ 20–40 tokens; ≈ 15 per counted object; ≈ 20 per COCO object
with ≈ 7 objects per image and a long tail; a page of text ≈ hundreds to 2,000).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pr1_jax.errors import ConfigError

@dataclasses.dataclass(frozen=True)
class EndLengths:
    """A distribution of completion lengths: "geometric:MEAN" or "lognormal:MEDIAN:SIGMA"."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str, task: str = "") -> "EndLengths | None":
        """None for "" (off); a clear error for anything malformed."""
        if not spec:
            return None
        if spec == "task":
            from pr1_jax import tasks  # the task's own estimate

            spec = tasks.get(task).end_lengths
        kind, *rest = spec.split(":")
        try:
            params = tuple(float(x) for x in rest)
        except ValueError:
            params = ()
        want = {"geometric": 1, "lognormal": 2}.get(kind)
        if want is None or len(params) != want or any(not np.isfinite(p) or p <= 0 for p in params):
            raise ConfigError(f"sampling.end_lengths={spec!r}: expected 'geometric:MEAN', 'lognormal:MEDIAN:SIGMA' "
                             f"(positive numbers) or 'task'")
        return cls(kind, params)

    def draw(self, shape: tuple[int, ...], max_new_tokens: int, seed: int) -> np.ndarray:
        """int32 lengths in [1, max_new_tokens], reproducible from `seed`."""
        rng = np.random.default_rng(seed)
        if self.kind == "geometric":
            x = rng.geometric(1.0 / max(self.params[0], 1.0), size=shape)
        else:
            x = np.ceil(rng.lognormal(np.log(self.params[0]), self.params[1], size=shape))
        return np.clip(x, 1, max_new_tokens).astype(np.int32)

    def __str__(self) -> str:
        return ":".join([self.kind] + [f"{p:g}" for p in self.params])
