"""The one predict-and-score loop: training's periodic evaluation and `python -m pr1_jax.evaluate`.

    ev = Evaluator(pre, "grounding", sample=sampler, mesh=mesh, batch_size=8, max_new_tokens=512)
    result = ev(params, [Example(i, row) for i, row in enumerate(rows)])
    result.scores.metrics["acc@0.5"]; result.answers; result.skipped

Greedy answers to a task's held-out rows, scored by the task's paper metric (`Task.score`):
grounding Acc@0.5 and IoU, counting accuracy, detection COCO AP, OCR edit distance. Both
entry points build an `Evaluator` and differ only in which sampler decodes (training: the
rollout program on the run's mesh; the CLI: the same sharded sampler on this process's
devices, or the plain one on one device) and in where rows come from.

* Prompts: `prompt="paper"` sends what PR1's evaluation scripts send (the task's
  `eval_prompt`, no system message, so Qwen's template adds its default one);
  `prompt="training"` sends the training prompt with the run's system prompt.
* Shapes: every batch has the same prompt length, packed image row length and row count,
  fixed from the largest example (image headers and prompt token counts are read before any
  decoding) and the last batch is padded with text-only rows, so decoding compiles once.
* Mesh: each process builds and decodes its block of every batch (`multihost.local_slice`),
  the answers are gathered, and every process scores the whole. Images that cannot be
  used are skipped and counted by reason, never stop the loop.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image

from pr1_jax import multihost, tasks
from pr1_jax.errors import ConfigError
from pr1_jax.processing import batch as batch_lib
from pr1_jax.processing import chat
from pr1_jax.processing import image as image_lib
from pr1_jax.tasks.base import Answer, Scores

PROMPT_STYLES = ("paper", "training")
PAD_TEXT = "."  # the text-only prompt that fills the last batch


@dataclasses.dataclass(frozen=True)
class Example:
    index: int  # position among the rows read
    row: Mapping[str, Any]  # the reader's row: image, problem, solution, ... (COCO detection: image, image_id)

    @property
    def image(self) -> Any:
        return self.row["image"]


class Completion(NamedTuple):
    text: str  # decoded without the stop token
    num_tokens: int  # generated tokens, stop token included
    stopped: bool  # a stop token was produced (else max_new_tokens was reached)


@dataclasses.dataclass
class Plan:
    seq_len: int  # prompt tokens per row (left padded)
    row_len: int  # patches per packed image row
    num_rows: int  # packed image rows per process block of a batch
    images_per_row: int  # the most images one packed row holds (`batch.pack_images`)
    batches: list[list[Example]]
    skipped: list[tuple[Example, str, str]]  # (example, reason, message)


@dataclasses.dataclass
class EvalResult:
    scores: Scores  # metrics, per-answer records, gallery items (`Task.score`)
    evaluated: list[Example]  # in order, one per answer
    answers: list[Answer]
    completions: list[Completion]
    skipped: list[tuple[Example, str, str]]  # (example, reason, message), in order of index
    plan: Plan
    decode_seconds: float
    generated_tokens: int


def image_name(src: Any) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _peek_hw(src: Any) -> tuple[int, int]:
    """(height, width) from the image header only; `_Skip` for a missing or unreadable file."""
    if isinstance(src, np.ndarray):
        return int(src.shape[0]), int(src.shape[1])
    if isinstance(src, Image.Image):
        return src.height, src.width
    if isinstance(src, (str, os.PathLike)):
        if not os.path.isfile(src):
            raise _Skip("missing_image", f"{os.fspath(src)}: image file not found")
        opener = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        opener = io.BytesIO(bytes(src))
    else:
        raise _Skip("bad_image", f"cannot load an image from {type(src).__name__}")
    try:
        with Image.open(opener) as im:
            return im.height, im.width
    except Exception as e:  # noqa: BLE001 - any failure to identify the image skips the row
        raise _Skip("bad_image", f"{image_name(src)}: not an image file ({type(e).__name__})") from e


class Evaluator:
    """Greedy answers on the mesh, scored by the task (see the module docstring).

    `sample(params, inputs, rng, sampling_config) → SampleOutput`: a `sampler.Sampler`, a
    `sharded_sampler.ShardedSampler` or `Programs.rollout`; with `mesh`, inputs are placed
    on it (each process its block of the batch), else put on the default device.
    """

    def __init__(self, pre, task: str, *, sample: Callable, batch_size: int, max_new_tokens: int, mesh=None,
                 prompt: str = "paper", system_prompt: str | None = None):
        if prompt not in PROMPT_STYLES:
            raise ConfigError(f"the evaluation prompt must be one of {PROMPT_STYLES}, got {prompt!r}")
        if batch_size <= 0 or max_new_tokens <= 0:
            raise ConfigError(f"batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}")
        self.pre, self.task, self.sample, self.mesh = pre, tasks.get(task), sample, mesh
        self.batch_size, self.max_new_tokens, self.prompt = batch_size, int(max_new_tokens), prompt
        self.system_prompt = system_prompt
        self.local = multihost.local_slice(batch_size) if mesh is not None else slice(0, batch_size)

    # ------------------------------------------------------------------ prompts
    def user_text(self, row: Mapping[str, Any]) -> str:
        return self.task.question(row, paper_eval=self.prompt == "paper")

    def messages(self, text: str, image: bool = True) -> list[dict]:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        if self.prompt == "paper":  # PR1's eval scripts: user message only
            return [{"role": "user", "content": content}]
        system = chat.pr1_messages(text, self.system_prompt)[0]
        return [system, {"role": "user", "content": content}]

    # ------------------------------------------------------------------ shapes
    def plan(self, examples: Sequence[Example]) -> Plan:
        """Reads every image header, skips unusable images, and fixes one set of batch shapes."""
        cfg = self.pre.image_config
        unit = cfg.merge_size ** 2
        good, patches, skipped = [], [], []
        for ex in examples:
            try:
                h, w = _peek_hw(ex.image)
                rh, rw = image_lib.smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels,
                                                qwen_vl_utils=cfg.qwen_vl_utils_resize)
            except _Skip as e:
                skipped.append((ex, e.reason, str(e)))
                continue
            except image_lib.ImageError as e:
                skipped.append((ex, "bad_image", f"{image_name(ex.image)}: {' '.join(str(e).split())}"))
                continue
            good.append(ex)
            patches.append((rh // cfg.patch_size) * (rw // cfg.patch_size))
        # Prompt length = the prompt with one image token + the image's tokens − 1.
        one_token_grid = [1, cfg.merge_size, cfg.merge_size]
        texts = [self.user_text(ex.row) for ex in good]
        base = {t: len(chat.encode_prompt(self.pre.tokenizer, self.messages(t), [one_token_grid], self.pre.special,
                                          merge_size=cfg.merge_size)) for t in set(texts)}
        pad_len = len(chat.encode_prompt(self.pre.tokenizer, self.messages(PAD_TEXT, image=False), [],
                                         self.pre.special))
        lengths = [base[t] + p // unit - 1 for t, p in zip(texts, patches)]
        seq_len = batch_lib.bucket(max(lengths + [pad_len]))
        row_len = batch_lib.bucket(max(patches, default=unit), minimum=64)
        bs = self.batch_size
        batches = [good[i:i + bs] for i in range(0, len(good), bs)]
        blocks = [patches[i:i + bs][self.local] for i in range(0, len(good), bs)]  # this process's share
        placements = [batch_lib.first_fit(s, row_len) for s in blocks]  # the packer's own rule
        num_rows = max([max(r, default=0) + 1 for r in placements] + [1])
        per_row = max([int(np.bincount(r).max()) for r in placements if r] + [1])
        # every process: the same shapes (gather concatenates the processes' [rows, per_row])
        num_rows, per_row = (int(x) for x in multihost.gather(np.array([[num_rows, per_row]])).max(axis=0))
        return Plan(seq_len, row_len, num_rows, per_row, batches, skipped)

    # ------------------------------------------------------------------ the loop
    def __call__(self, params, examples: Sequence[Example], *, score_options: Mapping[str, Any] | None = None,
                 progress: bool = False, desc: str = "eval") -> EvalResult:
        from tqdm.auto import tqdm

        plan = self.plan(examples)
        skipped = list(plan.skipped)
        evaluated, answers, completions = [], [], []
        decode_seconds, tokens = 0.0, 0
        bar = tqdm(total=sum(len(b) for b in plan.batches), desc=desc, unit="ex",
                   disable=not progress or not multihost.is_main_process())
        for chunk in plan.batches:
            live, images = [], []
            for ex in chunk:
                try:
                    images.append(image_lib.load_image(ex.image))
                    live.append(ex)
                except image_lib.ImageError as e:  # e.g. truncated: only a full decode tells
                    skipped.append((ex, "bad_image", " ".join(str(e).split())))
            if live:
                pad = self.batch_size - len(live)
                texts = [self.user_text(ex.row) for ex in live] + [PAD_TEXT] * pad
                images = images + [None] * pad
                block = range(self.batch_size)[self.local]
                batch = self.pre.prompt_batch(
                    [images[i] for i in block], [texts[i] for i in block],
                    messages=[self.messages(texts[i], images[i] is not None) for i in block],
                    seq_len=plan.seq_len, row_len=plan.row_len, num_rows=plan.num_rows,
                    images_per_row=plan.images_per_row)
                t = time.perf_counter()
                done = greedy_decode(self, params, batch, (live + [None] * pad)[self.local])[:len(live)]
                decode_seconds += time.perf_counter() - t
                hw = multihost.gather({"orig": np.array([h or (0, 0) for h in batch.original_hw], np.int64),
                                       "resized": np.array([h or (0, 0) for h in batch.resized_hw], np.int64)})
                for k, (ex, c) in enumerate(zip(live, done)):
                    tokens += c.num_tokens
                    evaluated.append(ex)
                    completions.append(c)
                    answers.append(Answer(ex.row, c.text, tuple(int(v) for v in hw["orig"][k]),
                                          tuple(int(v) for v in hw["resized"][k])))
            bar.update(len(chunk))
            bar.set_postfix(skipped=len(skipped))
        bar.close()
        # The model family says how answers write boxes (Qwen3-VL: JSON in [0, 1000]; docs/qwen3_vl.md).
        options = {"model_type": self.pre.config.model_type, **dict(score_options or {})}
        scores = self.task.score(answers, **options) if answers else Scores({}, [], [])
        skipped.sort(key=lambda s: s[0].index)
        return EvalResult(scores, evaluated, answers, completions, skipped, plan, decode_seconds, tokens)


def greedy_decode(evaluator: Evaluator, params, batch, examples: Sequence[Any]) -> list[Completion]:
    """Greedy completions of this process's block of a batch → every row of the batch, in order
    (`examples`: the block's rows, None for padding; not needed to decode, there so that tests
    can substitute known answers)."""
    import jax
    import jax.numpy as jnp

    from pr1_jax import sharding
    from pr1_jax.structs import SamplingConfig

    key = jax.random.PRNGKey(0)  # greedy: unused
    if evaluator.mesh is not None:
        inputs = sharding.shard_batch(batch.inputs, evaluator.mesh, process_local=True)
        key = sharding.replicate(key, evaluator.mesh)
    else:
        inputs = jax.tree.map(jnp.asarray, batch.inputs)
    cfg = SamplingConfig(num_samples=1, max_new_tokens=evaluator.max_new_tokens, temperature=0.0)
    out = evaluator.sample(params, inputs, key, cfg)
    if evaluator.mesh is not None:  # every process's block, in order
        out = multihost.gather(multihost.host_local({"tokens": out.tokens, "lengths": out.lengths}))
    else:
        out = {"tokens": np.asarray(out.tokens), "lengths": np.asarray(out.lengths)}
    pre = evaluator.pre
    eos = set(pre.special.eos_ids)
    rows, stopped = [], []
    lengths = out["lengths"][:, 0]
    for t, n in zip(out["tokens"][:, 0], lengths):
        ids = t[:int(n)]
        stop = len(ids) > 0 and int(ids[-1]) in eos
        rows.append(ids[:-1] if stop else ids)
        stopped.append(stop)
    texts = chat.decode_batch(pre.tokenizer, rows, skip_special_tokens=evaluator.task.skip_special_tokens)
    return [Completion(text, int(n), s) for text, n, s in zip(texts, lengths, stopped)]


def gallery_items(result: EvalResult, size: int) -> list[dict]:
    """The first `size` answers' gallery items with their images (an image changed on disk
    since the evaluation is left out)."""
    items = []
    for ex, item in zip(result.evaluated[:size], result.scores.gallery):
        try:
            items.append({**item, "image": image_lib.load_image(ex.image)})
        except image_lib.ImageError:
            continue
    return items


def local_mesh(devices: int, batch_size: int):
    """The mesh of `devices` of this process's devices (0 = all) on the batch; None for one."""
    import jax

    from pr1_jax import sharding

    local = jax.local_devices()
    if devices < 0 or devices > len(local):
        raise ConfigError(f"devices must be in 0..{len(local)} (0 = all {len(local)} of this process), got {devices}")
    n = devices or len(local)
    if n == 1:
        return None
    if batch_size % n:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of the {n} devices that decode it "
                          f"(--batch_size={-(-batch_size // n) * n}, or --devices=1)")
    return sharding.make_mesh(fsdp=n, devices=local[:n])


def local_sampler(pre, mesh) -> Callable:
    """The CLI's sampler: the training rollout's sharded sampler on `mesh`, else the plain one."""
    from pr1_jax.sampler import Sampler
    from pr1_jax.sharded_sampler import ShardedSampler

    eos, pad = pre.special.eos_ids, pre.special.pad_id
    if mesh is not None:
        return ShardedSampler(pre.model(), eos, pad, mesh)
    return Sampler(pre.model(), eos_ids=eos, pad_id=pad)
