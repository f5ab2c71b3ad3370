"""Host side of a GRPO step (NumPy): examples → prompts; samples → texts → rewards → `Rollouts`.

    prompts = encode_examples(examples, task, special, tokenizer, image_config, system_prompt)
    size = PromptSize.of(prompts)                          # the step's real sizes (max over processes)
    inputs = prompt_inputs(prompts, special, size.padded(shapes))
    texts = decode_completions(pre.tokenizer, out.tokens, skip_special_tokens)
    rewards_n, per_fn = score(texts, examples, reward_names, G)
    batch = assemble(prompts, special, prompt_shape, completions, mask, ..., micro_prompts, shapes)

Rows of a step are in PR1's order: the G completions of a prompt are consecutive. Shapes
come from the step's real sizes on the ladders of `pr1_jax.shapes`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from pr1_jax import rewards as rewards_lib
from pr1_jax.model.qwen2_vl import ModelInputs
from pr1_jax.processing import batch as batch_lib
from pr1_jax.processing import chat
from pr1_jax.processing import image as image_lib
from pr1_jax.shapes import StepShapes
from pr1_jax.train_step import Completions, Rollouts

# What the prompt's {question} is filled with, per task (PR1_REFERENCE §4.1).
_QUESTION_KEY = {"grounding": "problem", "counting": "problem", "detection": None, "ocr": None}


@dataclasses.dataclass
class EncodedPrompt:
    ids: np.ndarray  # [T] int32, image pads expanded
    image: tuple[np.ndarray, tuple[int, int, int]]  # (pixels [P, 1176], grid_thw)
    example: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class PromptShape:
    """Static prompt-side shapes of a program: prompt tokens, patches per packed image row."""

    seq_len: int
    row_len: int


@dataclasses.dataclass(frozen=True)
class PromptSize:
    """The real sizes of a set of prompts: the longest prompt, the largest image."""

    tokens: int
    patches: int

    @classmethod
    def of(cls, prompts: Sequence["EncodedPrompt"]) -> "PromptSize":
        return cls(tokens=max(len(p.ids) for p in prompts), patches=max(p.image[0].shape[0] for p in prompts))

    def padded(self, shapes: StepShapes) -> PromptShape:
        """The ladder's rungs for these sizes (a clear error when one is over its cap)."""
        try:
            return PromptShape(seq_len=shapes.prompt(self.tokens), row_len=shapes.patches(self.patches))
        except ValueError as e:
            raise ValueError(f"a prompt of {self.tokens} tokens / an image of {self.patches} patches does not fit "
                             f"batch.seq_len={shapes.prompt.cap} / batch.patch_row_len={shapes.patches.cap} "
                             f"({e}): raise them or lower data.max_pixels") from None


def encode_examples(examples: Sequence[Mapping[str, Any]], task: str, special: chat.SpecialTokens, tokenizer,
                    image_config: image_lib.ImageProcessorConfig, system_prompt: str | None) -> list[EncodedPrompt]:
    """PR1's training prompt for each example (system + user[image, question]); images already resized."""
    out = []
    key = _QUESTION_KEY[task]
    for ex in examples:
        pixels, grid = image_lib.patchify(ex["image_hwc"], image_config)
        question = chat.question_text(f"pr1_{task}", str(ex.get(key, "")) if key else "")
        messages = chat.pr1_messages(question, system_prompt)
        ids = chat.encode_prompt(tokenizer, messages, [grid], special)
        out.append(EncodedPrompt(ids, (pixels, tuple(int(g) for g in grid)), ex))
    return out


def prompt_inputs(prompts: Sequence[EncodedPrompt], special: chat.SpecialTokens, shape: PromptShape,
                  merge: int = 2) -> ModelInputs:
    """Left-padded ids to `shape.seq_len`, one image per packed row of `shape.row_len` patches."""
    return batch_lib.build_inputs([p.ids for p in prompts], [p.image for p in prompts],
                                  image_token_id=special.image_pad, pad_id=special.pad_id, seq_len=shape.seq_len,
                                  row_len=shape.row_len, num_rows=len(prompts), merge=merge)


def decode_completions(tokenizer, tokens_ngt: np.ndarray, skip_special_tokens: bool) -> list[str]:
    """Decodes [N, G, Tc] ids row by row in PR1's order (pads kept unless skipping specials)."""
    rows = tokens_ngt.reshape(-1, tokens_ngt.shape[-1])
    return chat.decode_batch(tokenizer, [r.tolist() for r in rows], skip_special_tokens=skip_special_tokens)


def reward_columns(examples: Sequence[Mapping[str, Any]], repeat: int) -> dict[str, list]:
    """Every dataset column except images, one entry per completion (as PR1 passes them)."""
    skip = {"image", "image_hwc", "image_bytes"}
    keys = [k for k in examples[0] if k not in skip]
    return {k: [ex.get(k) for ex in examples for _ in range(repeat)] for k in keys}


def score(texts: Sequence[str], examples: Sequence[Mapping[str, Any]], names: Sequence[str], repeat: int,
          reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PR1's total reward: the unweighted sum of the reward functions, [N·G] float32."""
    columns = reward_columns(examples, repeat)
    per_fn = {}
    for name in names:
        kwargs = dict((reward_kwargs or {}).get(name, {}))
        per_fn[name] = np.asarray(rewards_lib.get(name)(list(texts), **columns, **kwargs), np.float32)
    total = np.sum(list(per_fn.values()), axis=0).astype(np.float32)
    return total, per_fn


def completion_extents(mask_ngt: np.ndarray) -> np.ndarray:
    """[N, G]: positions a completion needs in the update: up to its last loss token.
    Later positions never reach the loss and, the model being causal, never change it."""
    t = mask_ngt.shape[-1]
    last = t - np.argmax(mask_ngt[..., ::-1], axis=-1)
    return np.where(mask_ngt.any(-1), last, 0).astype(np.int32)


def pack_completions(tokens_ngt: np.ndarray, extents_ng: np.ndarray, length: int, packed_len: int,
                     pad_id: int) -> Completions:
    """Each prompt's G completions back to back by extent: tokens/sample/offset [N, C],
    unpack [N, G, T] (T = `length`, C = `packed_len`)."""
    n, g, _ = tokens_ngt.shape
    if extents_ng.max(initial=0) > length or extents_ng.sum(-1).max(initial=0) > packed_len:
        raise ValueError(f"completions of {extents_ng.max()} / {extents_ng.sum(-1).max()} tokens do not fit "
                         f"T={length} / C={packed_len}")
    t_idx = np.arange(length)
    valid = t_idx < extents_ng[..., None]  # [N, G, T]
    start = np.cumsum(extents_ng, axis=-1) - extents_ng  # [N, G]
    dest = start[..., None] + t_idx  # [N, G, T]
    rows = np.broadcast_to(np.arange(n)[:, None, None], valid.shape)
    tokens = np.full((n, packed_len), pad_id, np.int32)
    sample = np.full((n, packed_len), -1, np.int32)
    offset = np.zeros((n, packed_len), np.int32)
    src = tokens_ngt[..., :length]
    if src.shape[-1] < length:  # a rung past the sampled length: those positions are never valid
        src = np.pad(src, [(0, 0), (0, 0), (0, length - src.shape[-1])], constant_values=pad_id)
    tokens[rows[valid], dest[valid]] = src[valid]
    sample[rows[valid], dest[valid]] = np.broadcast_to(np.arange(g)[None, :, None], valid.shape)[valid]
    offset[rows[valid], dest[valid]] = np.broadcast_to(t_idx, valid.shape)[valid]
    unpack = np.where(valid, dest, 0).astype(np.int32)
    return Completions(tokens=tokens, sample=sample, offset=offset, unpack=unpack)


@dataclasses.dataclass(frozen=True)
class CompletionShape:
    """Static completion shapes of an update program: loss positions T, packed tokens C."""

    length: int
    packed_len: int

    @classmethod
    def from_sizes(cls, longest: int, group: int, shapes: StepShapes) -> "CompletionShape":
        """Rungs for the longest completion extent and the largest group total of extents."""
        return cls(length=shapes.completion(max(1, longest)), packed_len=shapes.packed(max(1, group)))

    @classmethod
    def of(cls, extents_ng: np.ndarray, shapes: StepShapes) -> "CompletionShape":
        return cls.from_sizes(int(extents_ng.max(initial=1)), int(extents_ng.sum(-1).max(initial=1)), shapes)


def assemble(prompts: Sequence[EncodedPrompt], special: chat.SpecialTokens, prompt_shape: PromptShape,
             completion_shape: CompletionShape, completions: np.ndarray, mask: np.ndarray, advantages: np.ndarray,
             old_logp: np.ndarray, group_weight: np.ndarray, prompts_per_micro: int) -> Rollouts:
    """Splits a step's P prompts × G completions into M = P / prompts_per_micro micro-batches,
    the completions packed by length (`pack_completions`) and the loss tensors cut to T."""
    p = len(prompts)
    if p % prompts_per_micro:
        raise ValueError(f"{p} prompts per step is not a multiple of prompts_per_micro={prompts_per_micro}")
    m, b = p // prompts_per_micro, prompts_per_micro
    micro = [prompt_inputs(prompts[i * b:(i + 1) * b], special, prompt_shape) for i in range(m)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *micro)
    g, t = completions.shape[1], completion_shape.length
    mask = mask[..., :t]
    packed = pack_completions(completions, completion_extents(mask), t, completion_shape.packed_len, special.pad_id)
    split = lambda a: a.reshape(m, b, *a.shape[1:])  # noqa: E731
    return Rollouts(prompts=stacked, completions=jax.tree.map(split, packed), mask=split(mask),
                    advantages=advantages.reshape(m, b, g).astype(np.float32),
                    old_logp=split(old_logp[..., :t]).astype(np.float32), group_weight=group_weight.reshape(m, b, g))


def rollouts_from_padded(prompts: ModelInputs, completions: np.ndarray, mask: np.ndarray, advantages: np.ndarray,
                         old_logp: np.ndarray, group_weight: np.ndarray, pad_id: int, *, trim: bool = True) -> Rollouts:
    """`Rollouts` from padded [M, B, G, Tc] arrays (tests, benchmarks). trim=True packs each
    completion by its mask's extent (T, C exact, no ladder); trim=False keeps all Tc positions
    of every completion (C = G·Tc): the padded computation, for equality tests."""
    m, b, g, tc = completions.shape
    flat = lambda a: np.asarray(a).reshape(m * b, *np.shape(a)[2:])  # noqa: E731
    ext = completion_extents(flat(mask)) if trim else np.full((m * b, g), tc, np.int32)
    t, c = (max(1, int(ext.max())), max(1, int(ext.sum(-1).max()))) if trim else (tc, g * tc)
    packed = pack_completions(flat(completions), ext, t, c, pad_id)
    split = lambda a: a.reshape(m, b, *a.shape[1:])  # noqa: E731
    return Rollouts(prompts=prompts, completions=jax.tree.map(split, packed), mask=np.asarray(mask)[..., :t],
                    advantages=np.asarray(advantages, np.float32), old_logp=np.asarray(old_logp, np.float32)[..., :t],
                    group_weight=np.asarray(group_weight, np.float32))


# ------------------------------------------------------------------ SFT targets
def sft_target(example: Mapping[str, Any], task: str, special: chat.SpecialTokens) -> str:
    """The answer in the model's native format (PR1_REFERENCE §4.2–4.5), ending with <|im_end|>."""
    if task == "grounding":
        x1, y1, x2, y2 = (int(round(v)) for v in example["solution"])
        return (f"<|object_ref_start|>{example['problem']}<|object_ref_end|>"
                f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|><|im_end|>")
    if task == "detection":
        sol = example["solution"]
        names = rewards_lib.COCO_ID_TO_NAME
        items = [{"bbox_2d": [int(round(v)) for v in box], "label": names[int(i)]}
                 for i, box in zip(sol["target_id"], sol["target_box"])]
        return "```json\n" + json.dumps(items) + "\n```<|im_end|>"
    if task == "ocr":
        return f"{example['solution']}<|im_end|>"
    raise ValueError(f"no SFT target format for task {task!r} (PR1's counting data holds points, not boxes)")


def encode_targets(tokenizer, texts: Sequence[str], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Target ids right-padded to `length`: [N, 1, length] ids and mask."""
    ids = np.full((len(texts), 1, length), pad_id, np.int32)
    mask = np.zeros((len(texts), 1, length), bool)
    for i, t in enumerate(texts):
        row = chat.encode_text(tokenizer, t)[:length]
        ids[i, 0, :len(row)] = row
        mask[i, 0, :len(row)] = True
    return ids, mask
