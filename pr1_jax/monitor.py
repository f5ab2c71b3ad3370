"""Where a run's numbers and pictures go: JSON-lines logs, TensorBoard, W&B, PNG curves, console.

    quiet_console(verbose=c.verbose)                 # third-party INFO logs off; logs above the bars
    mon = Monitor(workdir, c, enabled=multihost.is_main_process(), score_name="Acc@0.5")
    mon.resume_at(start)                             # logs back to the resumed step (None: fresh)
    mon.log_sft(step, metrics)                       # an SFT warm-up step
    mon.log_step(step, metrics)                      # a GRPO step
    mon.log_eval(phase, step, metrics, samples=[(example, completion), ...], gallery=png_path)
    mon.curves(history)                              # reward.png, eval.png, refreshed during the run
    mon.summary(final)                               # summary.json
    mon.close()

Only process 0 writes (`enabled`); elsewhere every method does nothing. In the workdir:
  metrics.jsonl          one row per GRPO step: every metric of the step (accounting.py lists
                         the timings and token counts; train.py the rest);
  eval.jsonl             one row per evaluation ({"phase": "sft" | "grpo", "step", metrics});
  events.out.tfevents.*  TensorBoard, flushed at every step: `tensorboard --logdir WORKDIR`
                         (or the parent of several workdirs, one run each); none with
                         monitor.tensorboard=False, or (after one warning) without the
                         tensorboard package, which is imported only when used;
  reward.png, eval.png   the curves, redrawn at each evaluation and checkpoint;
  summary.json           strict JSON: a non-finite number is written as null.

The workdir may be a URI such as gs://bucket/run (any path etils.epath supports; docs/storage.md).
Every file goes through epath. An object store cannot append, so for a remote workdir the
append-only files (metrics.jsonl, eval.jsonl, the event file) are appended to in a local
staging directory and each changed one is copied whole to the workdir: at most every
`monitor.sync_every_s` seconds (30) after a step, and always at each evaluation and
checkpoint (`curves`), `summary` and `close`. A failed copy is retried at the next one. A
run killed between copies loses only rows that a resume drops anyway (those after its last
checkpoint). PNGs and summary.json are written whole, straight to the workdir.

TensorBoard holds every number of both logs plus the SFT warm-up's (docs/monitoring.md):
  grpo/<key> for a metrics.jsonl key without a "/", the key itself otherwise (time/decode_s,
  tokens/…, reward/<fn>, reward/<fn>/std); sft/<key> per warm-up step; eval/<metric> per
  evaluation; images eval/gallery (grounding's prediction gallery); text eval/completions
  (the first `monitor.eval_texts` greedy completions with their question and ground truth).
One step axis, as in eval.png: GRPO step N at N, SFT step k of S at k − S (≤ 0; the GRPO
start is 0). A resumed run writes a SessionLog START at its first step, which makes
TensorBoard drop what a killed run logged after its last checkpoint (the JSON-lines logs are
trimmed the same way); a fresh start removes the old event files with the old logs and
writes the run's first START (which TensorBoard's server ignores).

Weights & Biases (`monitor.wandb=True`, when `wandb` is importable) gets the same scalars and
images, with the step above as the `step` field.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath
from tqdm import tqdm

from pr1_jax import checkpoint, multihost, viz

log = logging.getLogger(__name__)

# Loggers whose INFO lines flood the console (orbax logs ~40 per checkpoint through absl).
THIRD_PARTY_LOGGERS = ("absl", "orbax", "jax", "etils", "grain", "tensorstore")


# ------------------------------------------------------------------ console
class _AboveTheBars:
    """A console stream whose writes go above the tqdm bars (`tqdm.write`): a log line printed
    while a bar is drawn would otherwise be glued to the bar's line."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        tqdm.write(text, file=self._stream, end="")
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, …
        return getattr(self._stream, name)


def quiet_console(verbose: bool = False) -> None:
    """Third-party INFO logs (orbax, absl, jax, …) off the console unless `verbose` (their
    warnings stay); every console log line is printed above the progress bars."""
    if not verbose:
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        target = getattr(handler, "python_handler", handler)  # absl's handler wraps a StreamHandler
        if isinstance(target, logging.StreamHandler) and target.stream in (sys.stderr, sys.stdout):
            target.setStream(_AboveTheBars(target.stream))


# ------------------------------------------------------------------ JSON
def finite_or_none(x: Any) -> Any:
    """`x` with every non-finite float (also inside dicts, lists, tuples) replaced by None."""
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def numbers(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a log row by name (nested dicts joined with "/"); strings and bools left out."""
    out = {}
    for k, v in row.items():
        if isinstance(v, Mapping):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


# ------------------------------------------------------------------ the monitor
class Monitor:
    """The run's outputs (see the module docstring). `c`: the run config (`monitor.*`, `sft.steps`,
    `task`); `score_name`: what the held-out score is (the title of eval.png)."""

    def __init__(self, workdir, c, *, enabled: bool = True, score_name: str = "score"):
        self.workdir = multihost.storage_path(workdir)  # local, or a URI (gs://…)
        self.enabled = enabled
        cfg = dict(c.get("monitor", {}))
        # Where the append-only files are written: the workdir, or a local staging directory
        # copied to a remote workdir by `_sync` (module docstring).
        self._remote = enabled and not multihost.is_local(self.workdir)
        self._local = epath.Path(tempfile.mkdtemp(prefix="pr1_jax_logs_")) if self._remote else self.workdir
        self._sync_every_s = float(cfg.get("sync_every_s", 30.0))
        self._synced: dict[str, tuple[int, int]] = {}  # file name → (size, mtime) last copied
        self._last_sync = time.monotonic()
        self.eval_texts = int(cfg.get("eval_texts", 4))
        self.no_signal_steps = int(cfg.get("no_signal_steps", 10))
        self._tensorboard = bool(cfg.get("tensorboard", True)) and enabled and _tensorboard_installed()
        self._sft_steps = int(c.sft.steps)
        self._task = c.task
        self._score_name = score_name
        self._writer = None  # opened on the first write: `resume_at` may first remove old files
        self._no_signal = 0  # GRPO steps in a row in which every group's rewards were equal
        self._wandb = self._start_wandb(c, cfg) if enabled and cfg.get("wandb", False) else None

    # ---------------------------------------------------------------- the run's steps
    def resume_at(self, step: int | None) -> None:
        """The logs keep what the run did up to GRPO step `step` (a killed run may have logged past
        its last checkpoint); None (a fresh start) keeps nothing."""
        if not self.enabled:
            return
        kept = lambda row: step is not None and (row.get("phase") == "sft" or row["step"] <= step)  # noqa: E731
        for name in ("metrics.jsonl", "eval.jsonl"):
            if self._remote and (self.workdir / name).exists():  # the staging copy starts as the workdir's
                (self._local / name).write_bytes((self.workdir / name).read_bytes())
            checkpoint.trim_jsonl(self._local / name, kept)
        if step is None:
            for f in self.workdir.glob("events.out.tfevents.*"):
                f.unlink()
        self._sync(force=True)
        if self._tensorboard:
            # Readers take a run's event files in name order: "…tfevents.<second>.<host>.<pid>.<n>"
            # with n unpadded (".9" sorts after ".10"). A new file must come after the old ones,
            # so it is started in a later second than theirs (only a resume within a second waits).
            stamps = [int(f.name.split(".")[3]) for f in self._local.glob("events.out.tfevents.*")
                      if f.name.split(".")[3].isdigit()]
            while stamps and time.time() < max(stamps) + 1:
                time.sleep(0.05)
            # TensorBoard drops every event at or after a START's step seen before it; its server
            # ignores a run's first START, so a fresh run writes one (before all of its steps).
            from tensorboard.compat.proto import event_pb2
            at = -self._sft_steps if step is None else step + 1
            self._add(event_pb2.Event(step=at, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def log_sft(self, step: int, metrics: Mapping[str, float]) -> None:
        """SFT warm-up step `step` (1 … sft.steps): TensorBoard and W&B only."""
        if self.enabled:
            self._emit(step - self._sft_steps, {f"sft/{k}": v for k, v in numbers(metrics).items()})
            self._sync()

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """GRPO step `step` (1-based): a metrics.jsonl row and its numbers; after `no_signal_steps`
        steps in a row in which every group's G rewards were equal, a warning."""
        if not self.enabled:
            return
        self._append("metrics.jsonl", {"step": step, **metrics})
        self._emit(step, {k if "/" in k else f"grpo/{k}": v for k, v in numbers(metrics).items()})
        if self.no_signal_steps > 0 and "frac_reward_zero_std" in metrics:
            self._no_signal = self._no_signal + 1 if metrics["frac_reward_zero_std"] >= 1.0 else 0
            if self._no_signal == self.no_signal_steps:
                log.warning("no learning signal for %d GRPO steps (steps %d-%d): every group's completions got "
                            "equal rewards, so every advantage is 0 (frac_reward_zero_std = 1); check the rewards "
                            "and the answer format, or raise grpo.temperature / grpo.num_generations",
                            self._no_signal, step - self._no_signal + 1, step)
        self._sync()

    def log_eval(self, phase: str, step: int, metrics: Mapping[str, Any],
                 samples: Sequence[tuple[Mapping[str, Any], str]] = (), gallery=None) -> None:
        """One evaluation (`phase` "sft" at SFT step `step`, "grpo" at GRPO step `step`): an
        eval.jsonl row, its numbers, the gallery PNG `gallery` (a path) as an image and the first
        `eval_texts` (example, completion) pairs of `samples` as text."""
        if not self.enabled:
            return
        self._append("eval.jsonl", {"phase": phase, "step": step, **metrics})
        at = step - self._sft_steps if phase == "sft" else step
        self._emit(at, {f"eval/{k}": v for k, v in numbers(metrics).items()}, gallery=gallery,
                   samples=list(samples)[:self.eval_texts])
        self._sync()

    # ---------------------------------------------------------------- pictures and the summary
    def curves(self, history: Mapping[str, list]) -> None:
        """reward.png and eval.png from the run's history (steps ≤ 0 of the evaluations are SFT)."""
        if not self.enabled:
            return
        viz.plot_curves({"reward": (history["step"], history["reward"])}, self.workdir / "reward.png",
                        title="GRPO reward (mean over the step's completions)", smooth=5)
        viz.plot_curves({"held-out score": (history["eval_step"], history["eval_score"])}, self.workdir / "eval.png",
                        title=f"held-out score ({self._task}: {self._score_name}; steps ≤ 0 are SFT)")
        self._sync(force=True)  # at each evaluation and checkpoint: the logs as far as the run got

    def summary(self, final: Mapping[str, Any]) -> None:
        """summary.json, valid JSON: a non-finite number (no evaluation: NaN) is written as null."""
        if self.enabled:
            text = json.dumps(finite_or_none(final), indent=2, default=str, allow_nan=False)
            (self.workdir / "summary.json").write_text(text + "\n")
            self._sync(force=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._remote and self._local.exists():
            if self._sync(force=True):
                shutil.rmtree(self._local, ignore_errors=True)
            else:
                log.warning("the logs in %s could not all be copied to %s: copy them by hand", self._local,
                            self.workdir)

    # ---------------------------------------------------------------- internals
    def _append(self, name: str, row: Mapping[str, Any]) -> None:
        with (self._local / name).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _sync(self, force: bool = False) -> bool:
        """A remote workdir: copies each staged file that changed since its last copy, whole (at
        most every `sync_every_s` unless `force`). Returns whether everything is copied; a failure
        is a warning, not the end of the run: the next call tries again."""
        if not self._remote or not self._local.exists():  # local, or closed
            return True
        if not force and time.monotonic() - self._last_sync < self._sync_every_s:
            return True
        self._last_sync = time.monotonic()
        if self._writer is not None:
            self._writer.flush()
        done = True
        for f in self._local.iterdir():
            if not f.is_file():  # W&B's own directory
                continue
            st = os.stat(f)  # a local file
            key = (st.st_size, st.st_mtime_ns)
            if self._synced.get(f.name) == key:
                continue
            try:
                (self.workdir / f.name).write_bytes(f.read_bytes())
                self._synced[f.name] = key
            except Exception as e:  # noqa: BLE001 (each storage backend raises its own types)
                done = False
                log.warning("could not copy %s to %s (%s: %s); trying again later", f.name, self.workdir,
                            type(e).__name__, e)
        return done

    def _emit(self, step: int, scalars: Mapping[str, float], gallery=None,
              samples: Sequence[tuple[Mapping[str, Any], str]] = ()) -> None:
        if self._tensorboard:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
            if gallery is not None:
                values.append(summary_pb2.Summary.Value(tag="eval/gallery", image=_png(gallery)))
            if samples:
                values.append(_text("eval/completions", [_sample_markdown(ex, text) for ex, text in samples]))
            self._add(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)))
        if self._wandb is not None:
            import wandb
            extra = {}
            if gallery is not None:
                extra["eval/gallery"] = wandb.Image(str(gallery) if multihost.is_local(gallery) else _pil(gallery))
            self._wandb.log({**scalars, **extra, "step": step})

    def _add(self, event) -> None:
        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self._writer = EventFileWriter(str(self._local))
        event.wall_time = time.time()
        self._writer.add_event(event)
        self._writer.flush()  # watchable now, not after the writer's 2-minute flush period

    def _start_wandb(self, c, cfg: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            log.warning("monitor.wandb=True but wandb is not installed (pip install wandb): TensorBoard only")
            return None
        return wandb.init(project=cfg.get("wandb_project", "pr1_jax"), name=self.workdir.name, dir=str(self._local),
                          config=json.loads(c.to_json_best_effort()))


def _tensorboard_installed() -> bool:
    """Whether the `tensorboard` package can be imported; if not, one warning and the run goes on
    without event files (the GPU benchmark machines have no tensorboard: it is imported only here
    and where the writer is used, never at module import)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning("monitor.tensorboard=True but the tensorboard package is not installed (pip install "
                    "tensorboard): no event files, the JSON-lines logs and PNG curves only")
        return False
    return True


def _png(path):
    """A TensorBoard image summary of a PNG file (local or a URI), its bytes as they are (no
    re-encoding)."""
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2

    data = multihost.storage_path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return summary_pb2.Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)


def _pil(path):
    """The image of a PNG file anywhere epath reaches (W&B reads only local paths itself)."""
    from PIL import Image

    with Image.open(io.BytesIO(multihost.storage_path(path).read_bytes())) as img:
        return img.copy()


def _text(tag: str, rows: Sequence[str]):
    """A text-plugin summary value: a 1-D string tensor, one table row per entry (markdown)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.text import metadata
    from tensorboard.util import tensor_util

    return summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(display_name=tag,
                                                                                        description=""),
                                     tensor=tensor_util.make_tensor_proto(np.array(rows, dtype=object)))


def _sample_markdown(example: Mapping[str, Any], completion: str) -> str:
    """The question and ground truth in words, the completion verbatim (an indented code block
    survives the markdown renderer: <|im_end|>, backticks and all)."""
    question = str(example.get("problem", "")).replace("\n", " ")
    truth = json.dumps(example.get("solution"), default=str)[:300]
    code = "\n".join("    " + line for line in (completion.splitlines() or [""]))
    return f"**{question}** — ground truth: `{truth}`\n\n{code}"
