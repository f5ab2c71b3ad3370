"""Vectorised box math shared by the rewards (and evaluation): IoU, GIoU, L1 in cxcywh.

All functions broadcast over leading batch dimensions: `a [..., N, 4]`, `b [..., M, 4]`
(x1, y1, x2, y2) → `[..., N, M]`. No Python loop over boxes or pairs anywhere.
Shape letters: B completions, N predicted boxes, M ground-truth boxes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def box_area(b: np.ndarray) -> np.ndarray:
    """(x2 − x1)·(y2 − y1), negative for malformed boxes (as torchvision's box_area)."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def pairwise_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """IoU and union of every pair: `inter / (union + eps)`; PR1's detection uses eps=1e-8."""
    lt = np.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = np.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / (union + eps), union


def pairwise_giou(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Generalised IoU of every pair (DETR form, eps in both denominators); also returns IoU."""
    iou, union = pairwise_iou(a, b, eps)
    lt = np.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = np.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    hull = wh[..., 0] * wh[..., 1] + eps
    return iou - (hull - union) / hull, iou


def xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    return np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                     b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], axis=-1)


def pairwise_l1_cxcywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L1 distance between (cx, cy, w, h) vectors of every pair (DETR's box cost)."""
    return np.abs(xyxy_to_cxcywh(a)[..., :, None, :] - xyxy_to_cxcywh(b)[..., None, :, :]).sum(-1)


def pairwise_l2(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pair of points: `p [..., N, 2]`, `q [..., M, 2]` → `[..., N, M]`."""
    d = p[..., :, None, :] - q[..., None, :, :]
    return np.sqrt((d * d).sum(-1))


def elementwise_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of row i of `a [B, 4]` with row i of `b [B, 4]`, without epsilon: (inter, union).

    Same arithmetic as PR1's grounding `compute_iou` (Python floats): the caller divides.
    """
    iw = np.maximum(0.0, np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]))
    ih = np.maximum(0.0, np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]))
    inter = iw * ih
    return inter, box_area(a) + box_area(b) - inter


def pad_stack(rows: Sequence[np.ndarray], width: int, fill: float = 0.0,
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stacks ragged `[n_i, width]` arrays into `[B, max n_i, width]` (float64) and lengths `[B]`."""
    lengths = np.array([len(r) for r in rows], np.int64)
    n = int(lengths.max(initial=0)) if length is None else length
    out = np.full((len(rows), max(n, 1), width), fill, np.float64)
    if len(rows) and lengths.sum():
        flat = np.concatenate([np.asarray(r, np.float64).reshape(-1, width) for r in rows if len(r)])
        row_idx = np.repeat(np.arange(len(rows)), lengths)
        col_idx = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[row_idx, col_idx] = flat
    return out, lengths
