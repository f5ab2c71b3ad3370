"""The curriculum's offline pass: how hard is each training example for the starting policy?

    python -m pr1_jax.data.curriculum --config=configs/detection.py --out=runs/detection_difficulty \\
        [--config.x=y ...] [--samples=8] [--buckets=3]

Perception-R1 trains COCO detection on a curriculum (§3.3 of the paper, after Kimi-1.5): an
offline pass scores every training example with the starting policy, the data is ordered by
that reward (easy = high reward) and training starts on the easy part, with harder parts
entering later. This module is that pass, for any task: the config's model samples `samples`
answers per training example (the rollout program on the device mesh, at the GRPO sampling
temperature, `batch.prompts_per_step` prompts at a time), the config's rewards score them, and
it writes into `--out`:

* `scores.jsonl` — one line per example: `index` (row of the training file as read),
  `mean` (mean total reward of its answers), `rewards` (mean per reward function),
  `mean_length` (mean answer tokens), `samples`.
  Appended after every batch, so a pass that is stopped (SIGTERM, Ctrl-C, a lost machine)
  resumes where it was when run again; each batch's sampling key is the seed folded with the
  batch number, so the resumed pass gives the same scores as an unbroken one.
* `difficulty.json` — `order` (indices, easiest first: mean reward descending, ties by index),
  `buckets` (`--buckets` parts of that order, as equal as can be), their reward ranges.
* `bucket_<i>.json` — the rows of bucket i in the format the readers read for the task
  (image paths made absolute), so a bucket can also be trained on as a file of its own.

Training reads `difficulty.json` through `data.curriculum` (`pr1_jax/data/schedule.py`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

log = logging.getLogger("pr1_jax.data.curriculum")

SCORES, DIFFICULTY = "scores.jsonl", "difficulty.json"


def read_scores(out_dir: str | os.PathLike) -> dict[int, dict]:
    """The scores written so far: index → line (a last line cut short by a kill is ignored)."""
    path = Path(out_dir) / SCORES
    done: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[int(row["index"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return done


def partition(scores: dict[int, dict], buckets: int) -> dict[str, Any]:
    """Difficulty order (easiest first: mean reward descending, ties by index) and `buckets`
    consecutive parts of it, sizes as equal as can be (the first ones take the remainder)."""
    if buckets < 1:
        raise ValueError(f"buckets must be ≥ 1, got {buckets}")
    order = sorted(scores, key=lambda i: (-scores[i]["mean"], i))
    parts = [part.tolist() for part in np.array_split(np.array(order, dtype=np.int64), buckets)]
    ranges = [[float(scores[p[-1]]["mean"]), float(scores[p[0]]["mean"])] if p else [] for p in parts]
    return {"order": order, "buckets": parts, "reward_range": ranges}


def _jsonable_row(row: dict) -> dict | None:
    """The reader's row as the readers read it back (None: its image is not a file path)."""
    if not isinstance(row.get("image"), str):
        return None
    out = {k: v for k, v in row.items() if k not in ("image_hwc", "solution_raw")}
    out["image"] = os.path.abspath(row["image"])
    try:
        json.dumps(out)
    except (TypeError, ValueError):
        return None
    return out


def write_partition(out_dir: Path, rows: Sequence[dict], scores: dict[int, dict], buckets: int, meta: dict) -> dict:
    """difficulty.json and bucket_<i>.json; returns the difficulty dict."""
    diff = partition(scores, buckets)
    diff.update(meta)
    written = []
    for b, part in enumerate(diff["buckets"]):
        kept = [r for r in (_jsonable_row(rows[i]) for i in part) if r is not None]
        if len(kept) == len(part):
            (out_dir / f"bucket_{b}.json").write_text(json.dumps(kept, ensure_ascii=False) + "\n")
            written.append(f"bucket_{b}.json")
    diff["bucket_files"] = written  # none when the rows' images are not files (in-memory data)
    (out_dir / DIFFICULTY).write_text(json.dumps(diff, indent=1) + "\n")
    return diff


class _Stop:
    """SIGTERM / Ctrl-C: finish the batch in flight, write it, then stop (resumable)."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        del frame
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: stopping after this batch (rerun the command to resume)", signum)

    def close(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def score_pass(c, out_dir: str | os.PathLike, *, samples: int = 8, buckets: int = 3,
               devices: Sequence[jax.Device] | None = None, progress: bool = True,
               stop_after_batches: int | None = None) -> dict:
    """The offline pass (see the module docstring); returns the difficulty dict, or
    {"stopped": True, "scored": n} when stopped early. `stop_after_batches` (tests) stops
    as a signal would after that many new batches."""
    from tqdm.auto import tqdm

    from pr1_jax import multihost, rollouts, sharding, tasks, tiny
    from pr1_jax.data import readers
    from pr1_jax.data.pipeline import load_and_resize
    from pr1_jax.errors import ConfigError
    from pr1_jax.pretrained import Pretrained
    from pr1_jax.processing import chat
    from pr1_jax.programs import Programs
    from pr1_jax.shapes import StepShapes
    from pr1_jax.structs import SamplingConfig

    if samples < 2:
        raise ConfigError(f"--samples must be ≥ 2 (answers per example), got {samples}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = sharding.mesh_from_config(c.mesh, devices)
    p_step = c.batch.prompts_per_step
    sharding.check_batch_sizes({"batch.prompts_per_step": p_step}, mesh)

    # The model and the training rows, as `pr1_jax.train` reads them (synthetic data: same seed, same rows).
    model_dir = c.model_dir
    if model_dir.startswith("tiny"):
        model_dir = tiny.write_tiny_checkpoint(multihost.process_path(out / "base_model"), **dict(c.get("tiny", {})))
    pre = Pretrained.load(model_dir, mesh=mesh, dtype=jax.numpy.dtype(c.dtype), min_pixels=c.data.min_pixels,
                          max_pixels=c.data.max_pixels)
    train_path, image_dir = c.data.train, c.data.image_dir or None
    if c.data.synthetic:
        files = tasks.get(c.task).write_synthetic(multihost.process_path(out / "data"), c.data.synthetic, seed=c.seed,
                                                  name="train", **dict(c.data.get("synthetic_kwargs", {})))
        train_path, image_dir = files.path, files.image_dir
    size = c.data.train_sample_size if c.data.train_sample_size > 0 else None
    rows, _ = readers.read(train_path, c.task, image_dir=image_dir, train_sample_size=size)
    rows = list(rows)

    shapes = StepShapes.from_config(c)
    programs = Programs.from_config(c, pre.config, mesh, pre.special.eos_ids, pre.special.pad_id, total_steps=1)
    system_prompt = chat.SYSTEM_PROMPTS.get(c.prompt.system, c.prompt.system)
    sampling = SamplingConfig(num_samples=samples, max_new_tokens=c.sampling.max_new_tokens,
                              temperature=c.grpo.temperature, top_p=c.sampling.top_p, top_k=c.sampling.top_k)
    base_key = jax.random.PRNGKey(c.seed)
    done = read_scores(out)
    batches = [list(range(i, min(i + p_step, len(rows)))) for i in range(0, len(rows), p_step)]
    todo = [b for b, idx in enumerate(batches) if not all(i in done for i in idx)]
    stop, new = _Stop(), 0
    local = multihost.local_slice(p_step)
    bar = tqdm(total=len(rows), initial=len(rows) - sum(len(batches[b]) for b in todo), desc="difficulty",
               unit="ex", disable=not progress or not multihost.is_main_process())
    try:
        for b in todo:
            idx = batches[b]
            padded = idx + [idx[-1]] * (p_step - len(idx))  # the last batch: one compiled shape
            examples = [load_and_resize(rows[i], pre.image_config) for i in padded[local]]
            prompts = rollouts.encode_examples(examples, c.task, pre.special, pre.tokenizer, pre.image_config,
                                               system_prompt)
            size = rollouts.PromptSize.of(prompts)  # the largest over every process: one shape for all
            n_tokens, n_patches = multihost.gather((np.array([size.tokens]), np.array([size.patches])))
            pshape = rollouts.PromptSize(int(n_tokens.max()), int(n_patches.max())).padded(shapes)
            inputs = sharding.shard_batch(rollouts.prompt_inputs(prompts, pre.special, pshape), mesh,
                                          process_local=True)
            key = sharding.replicate(jax.random.fold_in(base_key, b), mesh)
            result = programs.rollout(pre.params, inputs, key, sampling)
            tokens, lengths = multihost.host_local((result.tokens, result.lengths))
            texts = rollouts.decode_completions(pre.tokenizer, tokens, c.skip_special_tokens)
            total, per_fn = rollouts.score(texts, examples, c.rewards, samples, c.reward_kwargs.to_dict())
            total, per_fn, lengths = multihost.gather((total.reshape(-1, samples), {k: v.reshape(-1, samples)
                                                                                    for k, v in per_fn.items()},
                                                       np.asarray(lengths)))
            lines = [json.dumps({"index": i, "mean": float(total[k].mean()),
                                 "rewards": {f: float(v[k].mean()) for f, v in per_fn.items()},
                                 "mean_length": float(lengths[k].mean()), "samples": samples})
                     for k, i in enumerate(idx)]
            if multihost.is_main_process():
                with open(out / SCORES, "a") as f:
                    f.write("\n".join(lines) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            bar.update(len(idx))
            new += 1
            if stop.requested or (stop_after_batches is not None and new >= stop_after_batches):
                return {"stopped": True, "scored": len(read_scores(out))}
    finally:
        stop.close()
        bar.close()
    scores = read_scores(out)
    meta = {"task": c.task, "samples": samples, "rewards": list(c.rewards), "model_dir": str(c.model_dir),
            "train": str(train_path), "num_examples": len(rows), "seed": c.seed}
    return write_partition(out, rows, scores, buckets, meta) if multihost.is_main_process() else partition(scores,
                                                                                                          buckets)


# ----------------------------------------------------------------------------- command line
def main(argv) -> None:
    from pr1_jax import cli, monitor
    from pr1_jax.errors import ConfigError

    c = _CONFIG.value
    if c is None:
        raise ConfigError("--config is required, e.g. --config=configs/detection.py")
    if not _OUT.value:
        raise ConfigError("--out is required: the directory to write scores.jsonl and difficulty.json to")
    logging.basicConfig(level=logging.INFO)
    monitor.quiet_console(verbose=c.get("verbose", False))
    if not c.model_dir.startswith("tiny"):
        cli.model_dir(c.model_dir, "--config.model_dir")
    cli.writable_dir(_OUT.value, "--out")
    result = score_pass(c, _OUT.value, samples=_SAMPLES.value, buckets=_BUCKETS.value)
    if result.get("stopped"):
        print(f"stopped after {result['scored']} examples; run the same command again to resume", file=sys.stderr)
        return
    print(json.dumps({"examples": len(result["order"]), "buckets": [len(b) for b in result["buckets"]],
                      "reward_range": result["reward_range"], "out": _OUT.value}, indent=1))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from pr1_jax import cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "a training config (configs/*.py)")
    _OUT = flags.DEFINE_string("out", None, "directory for scores.jsonl, difficulty.json, bucket_<i>.json")
    _SAMPLES = flags.DEFINE_integer("samples", 8, "answers sampled per training example")
    _BUCKETS = flags.DEFINE_integer("buckets", 3, "difficulty buckets (equal parts of the order)")
    sys.exit(cli.run("pr1_jax.data.curriculum", app.run, main,
                     flags_parser=cli.absl_flags("pr1_jax.data.curriculum", help_config="configs/detection.py")))
