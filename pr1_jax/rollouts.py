"""Host side of a GRPO step (NumPy): examples → prompts; samples → texts → rewards → `Rollouts`.

    prompts = encode_examples(examples, task, pre, system_prompt)
    texts = decode_completions(pre.tokenizer, out.tokens, skip_special_tokens)
    rewards_n, per_fn = score(texts, examples, reward_names, G)
    batch = assemble(prompts, out, advantages_n, mask, micro_prompts, buckets)

Rows of a step are in PR1's order: the G completions of a prompt are consecutive.
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
from pr1_jax.train_step import Rollouts

# What the prompt's {question} is filled with, per task (PR1_REFERENCE §4.1).
_QUESTION_KEY = {"grounding": "problem", "counting": "problem", "detection": None, "ocr": None}


@dataclasses.dataclass
class EncodedPrompt:
    ids: np.ndarray  # [T] int32, image pads expanded
    image: tuple[np.ndarray, tuple[int, int, int]]  # (pixels [P, 1176], grid_thw)
    example: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Static shapes: prompt tokens, patches per packed image row, packed rows per prompt batch."""

    seq_len: int
    row_len: int
    rows_per_prompt: float = 1.0  # packed rows = ceil(prompts · this); 1 row per image is always enough

    def num_rows(self, prompts: int) -> int:
        return max(1, int(np.ceil(prompts * self.rows_per_prompt)))


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


def prompt_inputs(prompts: Sequence[EncodedPrompt], special: chat.SpecialTokens, buckets: Buckets,
                  merge: int = 2) -> ModelInputs:
    return batch_lib.build_inputs([p.ids for p in prompts], [p.image for p in prompts],
                                  image_token_id=special.image_pad, pad_id=special.pad_id, seq_len=buckets.seq_len,
                                  row_len=buckets.row_len, num_rows=buckets.num_rows(len(prompts)), merge=merge)


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


def assemble(prompts: Sequence[EncodedPrompt], special: chat.SpecialTokens, buckets: Buckets,
             completions: np.ndarray, mask: np.ndarray, advantages: np.ndarray, old_logp: np.ndarray,
             group_weight: np.ndarray, prompts_per_micro: int) -> Rollouts:
    """Splits a step's P prompts × G completions into M = P / prompts_per_micro micro-batches."""
    p = len(prompts)
    if p % prompts_per_micro:
        raise ValueError(f"{p} prompts per step is not a multiple of prompts_per_micro={prompts_per_micro}")
    m, b = p // prompts_per_micro, prompts_per_micro
    micro = [prompt_inputs(prompts[i * b:(i + 1) * b], special, buckets) for i in range(m)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *micro)
    g = completions.shape[1]
    split = lambda a: a.reshape(m, b, g, *a.shape[2:])  # noqa: E731
    return Rollouts(prompts=stacked, completions=split(completions), mask=split(mask),
                    advantages=advantages.reshape(m, b, g).astype(np.float32),
                    old_logp=split(old_logp).astype(np.float32), group_weight=group_weight.reshape(m, b, g))


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
