"""Counting rewards (PixMo-Count, Qwen2-VL, "detect then count"): PR1's and a strict twin.

Decode convention: special tokens KEPT (`skip_special_tokens=False`), e.g.
`<|object_ref_start|>bird<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|><|box_start|>…<|box_end|><|im_end|>`.
Ground truth: PR1's `clicks` points `[[x, y], ...]` in the same [0, 1000) space, given under
`clicks` (PR1's answer_key) or `solution`; `clicks` wins when both are present.
"""

from __future__ import annotations

import math
import re

import numpy as np

from pr1_jax.rewards.boxes import pairwise_iou, pairwise_l2
from pr1_jax.rewards.matching import Ragged, match_batches
from pr1_jax.rewards.parsing import (ENDOFTEXT, as_text, parse_points, parse_qwen_boxes, pr1_box_centers,
                                     solution_column)
from pr1_jax.rewards.registry import register

SCALE = 1000.0 * math.sqrt(2.0)  # the diagonal of the [0, 1000]² coordinate square
_F32_MAX = float(np.finfo(np.float32).max)

PR1_COUNTING_FORMAT = re.compile(
    r"<\|object_ref_start\|>[^<]*<\|object_ref_end\|>(?:<\|box_start\|>[^<]*<\|box_end\|>)+<\|im_end\|>")

# Boxes of one answer that `counting_strict` dedupes and matches. The duplicate check is
# pairwise (memory ∝ boxes²: a megabyte answer of 28k boxes would need 12 GiB); no PixMo-Count
# image comes near 1024 objects, and 512 generated tokens (PR1's budget) cannot write that many.
MAX_BOXES = 1024

_N = r"\s*\d+(?:\.\d+)?\s*"
STRICT_COUNTING_FORMAT = re.compile(
    rf"<\|object_ref_start\|>[^<]*<\|object_ref_end\|>(?:<\|box_start\|>\({_N},{_N}\)\s*,\s*\({_N},{_N}\)"
    rf"<\|box_end\|>)+<\|im_end\|>", re.ASCII)


def _gt_points(columns: dict, n: int) -> list:
    col = solution_column(columns, n, "clicks", "solution")
    return list(col)


def _match_score(preds: list, gts: list, ok: np.ndarray) -> np.ndarray:
    """mean Hungarian-matched L2 distance per row (NaN where not ok), vectorised over the batch."""
    B = len(preds)
    P, G = Ragged(preds, 2), Ragged(gts, 2)
    b, r, c = match_batches(P.n, G.n, lambda rows: pairwise_l2(P.padded(rows), G.padded(rows)))
    d = np.linalg.norm(P.values[P.flat_index(b, r)] - G.values[G.flat_index(b, c)], axis=-1)
    cnt = np.bincount(b, minlength=B)
    with np.errstate(all="ignore"):
        mean = np.bincount(b, weights=d, minlength=B) / cnt
    return np.where(ok & (cnt > 0), mean, np.nan)


@register("pr1_counting")
def pr1_counting(completions: list[str], solution=None, clicks=None, **columns) -> np.ndarray:
    """PR1's `pr1_counting_reward`: count ratio × (1 − mean matched distance / (1000·√2)).

    1. Gate: `re.match` (anchored at the start only) of
       `<|object_ref_start|>[^<]*<|object_ref_end|>(<|box_start|>[^<]*<|box_end|>)+<|im_end|>`
       (pipes escaped) on the raw text; no match → 0. Anything may follow `<|im_end|>`.
    2. On the text with `<|endoftext|>` removed, every `<|box_start|>(.*?)<|box_end|>` group —
       also those after `<|im_end|>` — is evaluated as `(x1, y1), (x2, y2)` (PR1 uses eval;
       here a safe numeric evaluator, see `parsing.eval_numeric`); unparsable groups are
       skipped; each box gives its centre point.
    3. n̂ points vs n GT points: Hungarian matching on the L2 cost (min(n̂, n) pairs),
       r = min(n̂, n)/max(n̂, n) · (1 − mean_d/(1000·√2)). No point or no GT → 0.
    Range: [0, 1] when all coordinates lie in [0, 1000]; PR1 does not clip, so points far
    outside give NEGATIVE values (reproduced). Coordinates beyond float32 (PR1's tensors)
    or complex centres → 0, where PR1 raises or returns ±inf/NaN.
    PR1 computes distances in float32; this uses float64 (differences ~1e-7).

    Example: boxes (0,0),(200,200) and (600,600),(800,800) → centres (100,100), (700,700);
    GT [[100, 100], [400, 400], [700, 700]] → d = 0, 0; r = 2/3 · 1 = 0.6667.
    """
    raw = [as_text(x) for x in completions]
    gt_col = _gt_points({"solution": solution, "clicks": clicks, **columns}, len(raw))
    preds, gts = [], []
    ok = np.zeros(len(raw), bool)
    for i, (t, s) in enumerate(zip(raw, gt_col)):
        pts, g = (), ()
        if PR1_COUNTING_FORMAT.match(t):
            centers = pr1_box_centers(t.replace(ENDOFTEXT, ""))
            gp = parse_points(s)
            if centers and gp is not None and len(gp) and not any(isinstance(v, complex) for p in centers for v in p):
                p = np.asarray(centers, np.float64)
                if np.all(np.abs(p) <= _F32_MAX):  # GT points are within float32 (parse_points)
                    pts, g, ok[i] = p, gp, True
        preds.append(pts)
        gts.append(g)
    mean = _match_score(preds, gts, ok)
    n_p = np.array([len(p) for p in preds], np.float64)
    n_g = np.array([len(g) for g in gts], np.float64)
    with np.errstate(all="ignore"):
        r = np.minimum(n_p, n_g) / np.maximum(n_p, n_g) * (1.0 - mean / SCALE)
    return np.where(ok & np.isfinite(r), r, 0.0).astype(np.float32)


def _strict_points(text: str, dup_iou: float) -> tuple[np.ndarray, int]:
    """(centres of the valid, non-duplicate boxes [K, 2] among the first MAX_BOXES, clipped to
    [0, 1000], total boxes)."""
    boxes, _ = parse_qwen_boxes(text)
    total = len(boxes)
    boxes = boxes[:MAX_BOXES]
    ok = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    with np.errstate(all="ignore"):  # areas of boxes near the float64 maximum overflow: IoU NaN, not a duplicate
        iou, _ = pairwise_iou(boxes, boxes, eps=1e-9)
    same = np.all(boxes[:, None, :] == boxes[None, :, :], axis=-1)
    close = ((iou >= dup_iou) | same) & ok[:, None] & ok[None, :]
    dup = np.triu(close, k=1).any(axis=0)  # box j repeats an earlier box i < j
    keep = ok & ~dup
    b = np.clip(boxes[keep], 0.0, 1000.0)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=-1), total


@register("counting_strict")
def counting_strict(completions: list[str], solution=None, clicks=None, *, dup_iou: float = 0.9,
                    **columns) -> np.ndarray:
    """Strict twin of `pr1_counting`. Range [0, 1].

    Differences: the whole answer (after removing `<|endoftext|>` padding and trailing
    whitespace) must be `<|object_ref_start|>label<|object_ref_end|>` + ≥1
    `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` (decimal numbers) + `<|im_end|>` and nothing
    after — else 0; no eval. Boxes with x2 < x1 or y2 < y1, and boxes repeating an earlier
    box (IoU ≥ dup_iou, or identical) are false predictions: they count in n̂_total but are
    not matched; so are the boxes after the first MAX_BOXES (1024). Coordinates are clipped to
    [0, 1000]; GT points must be finite and within float32 range (`parsing.parse_points`).
    r = min(n̂_valid, n)/max(n̂_total, n) · max(0, 1 − mean_d/(1000·√2)).

    Example: the same box (190,190),(210,210) written 3 times, GT [[100,100],[200,200],[300,300]]:
    PR1 gives 1 · (1 − 94.28/1414.2) = 0.9333; here n̂_valid = 1, n̂_total = 3 →
    1/3 · (1 − 0/1414.2) = 0.3333.
    """
    raw = [as_text(x).replace(ENDOFTEXT, "").rstrip() for x in completions]
    gt_col = _gt_points({"solution": solution, "clicks": clicks, **columns}, len(raw))
    preds, gts = [], []
    n_total = np.zeros(len(raw))
    ok = np.zeros(len(raw), bool)
    for i, (t, s) in enumerate(zip(raw, gt_col)):
        pts, g = (), ()
        if STRICT_COUNTING_FORMAT.fullmatch(t):
            gp = parse_points(s)
            p, n_total[i] = _strict_points(t, dup_iou)
            if len(p) and gp is not None and len(gp):
                pts, g, ok[i] = p, gp, True
        preds.append(pts)
        gts.append(g)
    mean = _match_score(preds, gts, ok)
    n_p = np.array([len(p) for p in preds], np.float64)
    n_g = np.array([len(g) for g in gts], np.float64)
    with np.errstate(all="ignore"):
        r = np.minimum(n_p, n_g) / np.maximum(n_total, n_g) * np.clip(1.0 - mean / SCALE, 0.0, 1.0)
    return np.where(ok & np.isfinite(r), r, 0.0).astype(np.float32)
