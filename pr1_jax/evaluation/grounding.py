"""Grounding evaluation (RefCOCO / RefCOCO+ / RefCOCOg) with PR1's parsing and metrics.

docs/method.md §4.2. A completion is decoded with special tokens kept, e.g.

    <|object_ref_start|>the man<|object_ref_end|><|box_start|>(102,47),(380,996)<|box_end|><|im_end|>

Parsing (`parse_box`): the first match of, in this order,
  1. ``[a, b, c, d]``                      (square brackets, four numbers)
  2. ``(a, b, c, d)``                      (parentheses, four numbers)
  3. ``(x1,y1),(x2,y2)``                   (Qwen2-VL's native form)
with a number being ``-?\\d+\\.?\\d*`` (the eval variant of the training regex); no match →
``[0, 0, 0, 0]`` (IoU 0, and its "centre" (0, 0) still counts for centre accuracy when the GT box
touches the origin — reproduced as PR1 has it).

Which ground truth (`eval_boxes`): if the text contains ``<|box_start|>`` the numbers are taken as
Qwen2-VL [0, 1000) integers and compared with the row's ``normalized_solution``; otherwise they are
assumed to be [0, 1] floats, mapped with ``int(1000 * v)`` (truncation toward zero) and compared
with ``solution``. That second branch is quirk §8.9: it is wrong for models that print absolute
pixel coordinates without the special tokens (Qwen2.5-VL).

Metrics (`grounding_metrics`, ×100): mean IoU with ``inter / (union + 1e-10)``, Acc@τ = % of
IoU ≥ τ for τ ∈ {0.1, 0.3, 0.5, 0.75, 0.95}, centre accuracy = % of predicted box centres inside
the GT box (borders inclusive), and the paper's "Avg" = mean of Acc@0.5/0.75/0.95
(e.g. RefCOCO val (89.1 + 79.5 + 35.0) / 3 = 67.9).

Worked example: pred (0,0),(10,10) vs GT [5, 0, 15, 10] → inter 50, union 150, IoU 1/3 →
counts for Acc@0.1 and Acc@0.3; its centre (5, 5) lies on the GT's left edge → centre hit.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Sequence

import numpy as np

_NUM = r"(-?\d+\.?\d*)"
_BOX_PATTERNS = (
    re.compile(r"\[\s*{n},\s*{n},\s*{n},\s*{n}\s*\]".format(n=_NUM)),
    re.compile(r"\(\s*{n},\s*{n},\s*{n},\s*{n}\s*\)".format(n=_NUM)),
    re.compile(r"\(\s*{n},\s*{n}\),\s*\(\s*{n},\s*{n}\)".format(n=_NUM)),
)
BOX_START = "<|box_start|>"
THRESHOLDS = (0.1, 0.3, 0.5, 0.75, 0.95)
IOU_EPS = 1e-10


def parse_box(text: str) -> tuple[np.ndarray, bool]:
    """First box in `text` by PR1's eval regexes → (float64 [4] x1,y1,x2,y2, matched).

    >>> parse_box("<|box_start|>(1,2),(3,4)<|box_end|>")[0].tolist()
    [1.0, 2.0, 3.0, 4.0]
    """
    for pattern in _BOX_PATTERNS:
        m = pattern.search(text)
        if m:
            return np.array([float(g) for g in m.groups()], np.float64), True
    return np.zeros(4, np.float64), False


def _as_box(value: Any) -> np.ndarray:
    """A GT box given as a list/array or as the string of a Python list (PR1 uses eval())."""
    if isinstance(value, str):
        value = ast.literal_eval(value.strip())
    box = np.asarray(value, np.float64).reshape(-1)
    if box.shape != (4,):
        raise ValueError(f"expected a box of 4 numbers, got {value!r}")
    return box


def eval_boxes(completions: Sequence[str], solutions: Sequence[Any],
               normalized_solutions: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PR1's per-sample branch → (pred [N, 4], gt [N, 4], parsed [N] bool), all float64 but `parsed`.

    `normalized_solutions` (the [0, 1000) GT) is needed only for completions that contain
    ``<|box_start|>``; pass None when every row's `solution` is already in that space.
    """
    n = len(completions)
    if len(solutions) != n or (normalized_solutions is not None and len(normalized_solutions) != n):
        raise ValueError("completions, solutions and normalized_solutions must have the same length")
    pred = np.zeros((n, 4), np.float64)
    gt = np.zeros((n, 4), np.float64)
    parsed = np.zeros(n, bool)
    for i, text in enumerate(completions):
        box, parsed[i] = parse_box(text)
        if BOX_START in text:
            pred[i] = box
            gt[i] = _as_box(normalized_solutions[i] if normalized_solutions is not None else solutions[i])
        else:  # quirk §8.9: numbers assumed in [0, 1]
            pred[i] = [int(1000 * v) for v in box]
            gt[i] = _as_box(solutions[i])
    return pred, gt, parsed


def box_iou(pred_n4: np.ndarray, gt_n4: np.ndarray, eps: float = IOU_EPS) -> np.ndarray:
    """Element-wise IoU of paired x1,y1,x2,y2 boxes [N, 4] → [N] float64, inter / (union + eps).

    Areas are not clipped (as in PR1); a box with x2 < x1 or y2 < y1 has no intersection, so its
    IoU is 0 whatever its signed area.
    """
    p = np.asarray(pred_n4, np.float64).reshape(-1, 4)
    g = np.asarray(gt_n4, np.float64).reshape(-1, 4)
    iw = np.maximum(0.0, np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]))
    ih = np.maximum(0.0, np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]))
    inter = iw * ih
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    return inter / (area_p + area_g - inter + eps)


def grounding_metrics(pred_n4: np.ndarray, gt_n4: np.ndarray) -> dict[str, float]:
    """Metrics ×100 over N paired boxes: iou, acc@τ, center_acc, avg (= mean acc@0.5/0.75/0.95), n."""
    p = np.asarray(pred_n4, np.float64).reshape(-1, 4)
    g = np.asarray(gt_n4, np.float64).reshape(-1, 4)
    n = len(p)
    if n == 0:
        return {"n": 0}
    iou = box_iou(p, g)
    cx, cy = (p[:, 0] + p[:, 2]) / 2, (p[:, 1] + p[:, 3]) / 2
    center = (g[:, 0] <= cx) & (cx <= g[:, 2]) & (g[:, 1] <= cy) & (cy <= g[:, 3])
    out = {"n": n, "iou": 100.0 * float(iou.mean())}
    for t in THRESHOLDS:
        out[f"acc@{t}"] = 100.0 * float(np.mean(iou >= t))
    out["center_acc"] = 100.0 * float(center.mean())
    out["avg"] = float(np.mean([out["acc@0.5"], out["acc@0.75"], out["acc@0.95"]]))
    return out


def evaluate_grounding(completions: Sequence[str], solutions: Sequence[Any],
                       normalized_solutions: Sequence[Any] | None = None,
                       splits: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Parse + score; returns {split: metrics} (one "all" entry when `splits` is None).

    With `splits` (one name per row, e.g. "refcoco_val") each split is scored on its own rows, as
    PR1 reports them; an extra "all" entry pools every row. Each metrics dict also holds
    "parse_fail" (% of rows with no box found).
    """
    pred, gt, parsed = eval_boxes(completions, solutions, normalized_solutions)
    names = np.asarray(["all"] * len(pred) if splits is None else list(splits), dtype=object)
    if len(names) != len(pred):
        raise ValueError("splits must have one entry per completion")
    out = {}
    for name in list(dict.fromkeys(names.tolist())) + ([] if splits is None else ["all"]):
        sel = np.ones(len(pred), bool) if name == "all" else names == name
        metrics = grounding_metrics(pred[sel], gt[sel])
        if metrics["n"]:
            metrics["parse_fail"] = 100.0 * float(np.mean(~parsed[sel]))
        out[name] = metrics
    return out
