"""Grounding rewards (RefCOCO/+/g, Qwen2-VL): PR1's IoU² and format rewards, and strict twins.

Decode convention: special tokens KEPT (`skip_special_tokens=False`), e.g.
`<|object_ref_start|>the man<|object_ref_end|><|box_start|>(120,45),(380,990)<|box_end|><|im_end|><|endoftext|>…`.
Ground truth `solution[i]`: the box in Qwen2-VL's [0, 1000) space, as "[x1, y1, x2, y2]" or a list.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from pr1_jax.rewards.boxes import elementwise_iou
from pr1_jax.rewards.parsing import (BOX_START, ENDOFTEXT, as_text, parse_box_value, parse_qwen_boxes,
                                     pr1_grounding_box, solution_column)
from pr1_jax.rewards.registry import register


def _iou_batch(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Elementwise IoU without epsilon; rows where PR1 would divide by zero (union 0) or that
    produce a non-finite value (>308-digit numbers) give 0."""
    with np.errstate(all="ignore"):  # coordinates near the float64 maximum overflow: NaN/inf, scored 0 below
        inter, union = elementwise_iou(pred, gt)
        iou = inter / np.where(union == 0, 1.0, union)
    return np.where(valid & (union != 0) & np.isfinite(iou), iou, 0.0)


@register("pr1_grounding")
def pr1_grounding(completions: list[str], solution=None, **columns) -> np.ndarray:
    """PR1's `pr1_grounding_reward`: IoU² of the first parsed box with the GT box. Range [0, 1].

    Parsing (PR1 quirks reproduced): `<|endoftext|>` is removed; the box is the first match of
    `[a, b, c, d]`, else `(a, b, c, d)`, else `(a,b),(c,d)` anywhere in the text (so a list in
    the referring phrase wins, and extra boxes are ignored); no match → [0, 0, 0, 0]. If
    `<|box_start|>` is absent the numbers are taken as [0, 1] floats and mapped to
    `int(1000·v)`. IoU = inter/union with no epsilon and no check of box validity.
    Deviation: where PR1 raises (zero union, e.g. two degenerate boxes; `int(inf)`) or gets
    NaN, this returns 0 — PR1 would crash the training step.

    Example: "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|><|im_end|>"
    with solution "[50, 0, 150, 100]": IoU = 5000/15000 = 1/3 → 0.1111.
    """
    texts = [as_text(c).replace(ENDOFTEXT, "") for c in completions]
    sols = solution_column({"solution": solution, **columns}, len(texts), "solution")
    pred, gt = np.zeros((len(texts), 4)), np.zeros((len(texts), 4))
    valid = np.zeros(len(texts), bool)
    for i, (t, s) in enumerate(zip(texts, sols)):
        box, _ = pr1_grounding_box(t)
        g = parse_box_value(s)
        if box is not None and g is not None:
            pred[i], gt[i], valid[i] = box, g, True
    return (_iou_batch(pred, gt, valid) ** 2).astype(np.float32)


# Unescaped pipes: an alternation of "^<", "object_ref_start", ">.*?<", …, ">" — it matches
# any text that starts with "<" or ">" (or one of the bare token words).
PR1_GROUNDING_FORMAT = re.compile(r"^<|object_ref_start|>.*?<|object_ref_end|><|box_start|>.*?<|box_end|><|im_end|>")


@register("pr1_grounding_format")
def pr1_grounding_format(completions: list[str], **columns) -> np.ndarray:
    """PR1's `pr1_grounding_format_reward`, quirk included: {0, 1}.

    `re.match` of PR1's regex, whose `|` are not escaped, on the text with `<|endoftext|>`
    removed: it is 1 for ANY text starting with "<" or ">" (or with the words
    object_ref_start, object_ref_end, box_start, box_end, im_end), so with special tokens
    kept essentially every Qwen2-VL answer gets 1: no learning signal.
    Examples: "<" → 1.0; "(10,20),(30,40)" → 0.0; "" → 0.0.
    """
    return np.array([1.0 if PR1_GROUNDING_FORMAT.match(as_text(c).replace(ENDOFTEXT, "")) else 0.0
                     for c in completions], np.float32)


_STRICT_NUM = r"\s*\d+(?:\.\d+)?\s*"
STRICT_GROUNDING_FORMAT = re.compile(
    rf"<\|object_ref_start\|>[^<]*<\|object_ref_end\|><\|box_start\|>\({_STRICT_NUM},{_STRICT_NUM}\)\s*,"
    rf"\s*\({_STRICT_NUM},{_STRICT_NUM}\)<\|box_end\|><\|im_end\|>", re.ASCII)


@register("grounding_format_strict")
def grounding_format_strict(completions: list[str], **columns) -> np.ndarray:
    """What PR1's format reward meant (twin of `pr1_grounding_format`): {0, 1}.

    1 iff the whole answer (after removing `<|endoftext|>` padding and trailing whitespace)
    is `<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|><|im_end|>`
    with the pipes escaped, exactly one box of non-negative decimal numbers, and nothing
    after `<|im_end|>`. Examples: "<" → 0.0; the PR1 example answer → 1.0; the same with two
    boxes → 0.0.
    """
    return np.array([1.0 if STRICT_GROUNDING_FORMAT.fullmatch(as_text(c).replace(ENDOFTEXT, "").rstrip()) else 0.0
                     for c in completions], np.float32)


_PLAIN_LIST = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                         r"\s*(-?\d+(?:\.\d+)?)\s*\]", re.ASCII)


def strict_grounding_box(text: str) -> np.ndarray | None:
    """The single box of a grounding answer, or None (the `grounding_iou` parse).

    With `<|box_start|>`: every box group must parse as `(x1,y1),(x2,y2)` and there must be
    exactly one. Without: exactly one `[x1, y1, x2, y2]` list; if all four values are in
    [0, 1] and one has a decimal point they are normalised floats and are scaled by 1000
    (no truncation). The box must have x2 > x1 and y2 > y1.
    """
    if BOX_START in text:
        boxes, bad = parse_qwen_boxes(text)
        if bad or len(boxes) != 1:
            return None
        box = boxes[0]
    else:
        found = _PLAIN_LIST.findall(text)
        if len(found) != 1:
            return None
        box = np.asarray([float(v) for v in found[0]])
        if (box >= 0).all() and (box <= 1).all() and any("." in v for v in found[0]):
            box = box * 1000.0
    if not (np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]):
        return None
    return box


@register("grounding_iou")
def grounding_iou(completions: list[str], solution=None, *, power: float = 2.0, **columns) -> np.ndarray:
    """Strict IoU reward (twin of `pr1_grounding`): IoU**power, default power 2 as PR1. Range [0, 1].

    Differences from PR1: the answer must contain exactly one box (duplicated or extra boxes
    → 0 instead of scoring the first); a `[..]` list inside the phrase no longer overrides
    the `<|box_start|>` box; the [0, 1]→1000 rescale applies only to values that really are
    normalised floats (not to integer answers lacking `<|box_start|>`); malformed boxes
    (x2 ≤ x1 or y2 ≤ y1) → 0; zero union → 0.

    Example: "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|><|im_end|>"
    with solution "[50, 0, 150, 100]" → (1/3)² = 0.1111; the same box written twice → 0.0.
    """
    texts = [as_text(c).replace(ENDOFTEXT, "") for c in completions]
    sols = solution_column({"solution": solution, **columns}, len(texts), "solution")
    pred, gt = np.zeros((len(texts), 4)), np.zeros((len(texts), 4))
    valid = np.zeros(len(texts), bool)
    for i, (t, s) in enumerate(zip(texts, sols)):
        box, g = strict_grounding_box(t), parse_box_value(s)
        if box is not None and g is not None:
            pred[i], gt[i], valid[i] = box, g, True
    iou = np.clip(_iou_batch(pred, gt, valid), 0.0, 1.0)
    return (iou ** power).astype(np.float32)


def qwen3_grounding_answer(text: str) -> list[float] | None:
    """Qwen3-VL's grounding answer (docs/qwen3_vl.md): a JSON object `{"bbox_2d": [x1, y1, x2, y2],
    "label": ...}` — alone or as the one item of a list, optionally in a ```json fence, then
    `<|im_end|>` — with four finite numbers in [0, 1000] and x1 ≤ x2, y1 ≤ y2; else None."""
    t = text.replace(ENDOFTEXT, "").strip().removesuffix("<|im_end|>").strip()
    if t.startswith("```"):
        t = t.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if len(t) > 10_000:
        return None
    try:
        v = json.loads(t)
    except (ValueError, RecursionError):
        return None
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    box = v.get("bbox_2d") if isinstance(v, dict) else None
    if not isinstance(box, list) or len(box) != 4 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in box):
        return None
    try:
        x1, y1, x2, y2 = (float(x) for x in box)  # a 400-digit integer overflows: not a box
    except OverflowError:
        return None
    ok = all(math.isfinite(v) for v in (x1, y1, x2, y2)) and 0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000
    return [x1, y1, x2, y2] if ok else None


@register("qwen3_grounding_format")
def qwen3_grounding_format(completions: list[str], **columns) -> np.ndarray:
    """1 when the answer is exactly one Qwen3-VL JSON box (`qwen3_grounding_answer`), else 0:
    the format reward of the Qwen3-VL grounding recipe (configs/grounding_qwen3_vl.py), whose
    IoU reward is `grounding_iou` (it reads the one `[x1, y1, x2, y2]` of such an answer)."""
    return np.array([float(qwen3_grounding_answer(as_text(c)) is not None) for c in completions], np.float32)
