"""Detection rewards (COCO, Qwen2.5-VL JSON answers): PR1's and a robust twin.

Decode convention: special tokens SKIPPED (`skip_special_tokens=True`), e.g.
```json
[{"bbox_2d": [12, 40, 230, 310], "label": "person"}, {"bbox_2d": [250, 60, 400, 300], "label": "dog"}]
```
in absolute pixels of the resized image. Ground truth `solution[i]`:
`{"target_id": [COCO ids], "target_box": [[x1, y1, x2, y2], ...]}` or its JSON string.

Knobs are keyword arguments with PR1's CODE defaults (PR1 read them from environment
variables F1_SCALE, CLS_COE, IOU_COE, DO_PENAIlty, COVERAGE_SCALE, IS_SIZE_WEIGHT).
The released detection script sets DO_PENAIlty=False: pass `do_penalty=False` to train
exactly like it.
"""

from __future__ import annotations

import gc
import math

import numpy as np

from pr1_jax.rewards.boxes import elementwise_iou, pairwise_iou
from pr1_jax.rewards.matching import Ragged, match_batches, size_chunks
from pr1_jax.rewards.parsing import (as_text, box_array, parse_detection_items, parse_detection_solution,
                                     pr1_detection_items, solution_column)
from pr1_jax.rewards.registry import register

# DETR HungarianMatcher weights and PR1's keep threshold.
COST_CLASS, COST_BBOX, COST_GIOU = 1.0, 5.0, 2.0
IOU_THRESHOLD = 0.5
NUM_LOGITS = 90  # PR1's one-hot logit vector size (ids 1..90 index it directly: id 90 overflows)
# softmax of a one-hot (value 1.0) logit vector of size 90: e/(e+89) on the hot index, 1/(e+89) elsewhere
P_HOT, P_COLD = math.e / (math.e + NUM_LOGITS - 1), 1.0 / (math.e + NUM_LOGITS - 1)
TOOTHBRUSH_ID = 90
_F32_MAX = float(np.finfo(np.float32).max)
_KEY = 1 << 33  # (row, class id) → one int64 key; ids are bounded by |id| < 2^31
# Valid items of one answer that `detection_robust` dedupes and matches. Its duplicate check is
# pairwise (a megabyte answer of 20k items would need tens of GiB); COCO's evaluation keeps
# at most 100 detections per image, and 4096 generated tokens cannot write 1024 items.
MAX_ITEMS = 1024


def _row_of(r: Ragged) -> np.ndarray:
    return np.repeat(np.arange(len(r.n)), r.n)


def _any_per_row(r: Ragged, flags: np.ndarray) -> np.ndarray:
    return np.bincount(_row_of(r)[flags], minlength=len(r.n)) > 0


def detr_cost(pb: np.ndarray, gb: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """DETR matching cost of every pair, fused: `pb [b, N, 4]`, `gb [b, M, 4]` (well-formed
    xyxy), `hot [b, N, M]` (class match) → `[b, N, M]` float64 equal, up to the constant
    2 − P_COLD (which no assignment can see), to 5·L1(cxcywh) − 1·p_class − 2·GIoU with
    GIoU = IoU − (hull − union)/hull = IoU − 1 + union/hull, IoU = inter/(union + 1e-8),
    hull area + 1e-8 (DETR/PR1)."""
    ax1, ay1, ax2, ay2 = (pb[:, :, k, None] for k in range(4))
    bx1, by1, bx2, by2 = (gb[:, None, :, k] for k in range(4))
    iw = np.minimum(ax2, bx2)
    iw -= np.maximum(ax1, bx1)
    np.maximum(iw, 0.0, out=iw)
    ih = np.minimum(ay2, by2)
    ih -= np.maximum(ay1, by1)
    np.maximum(ih, 0.0, out=ih)
    inter = np.multiply(iw, ih, out=iw)
    aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    union = (aw * ah + bw * bh) - inter
    iou = np.divide(inter, union + 1e-8, out=inter)
    hull = np.maximum(ax2, bx2)              # boxes are well-formed: hull sides are ≥ 0
    hull -= np.minimum(ax1, bx1)
    hh = np.maximum(ay2, by2)
    hh -= np.minimum(ay1, by1)
    hull *= hh
    hull += 1e-8
    giou_part = np.divide(union, hull, out=union)  # GIoU + 1 = IoU + union/hull
    giou_part += iou
    acx, acy, bcx, bcy = (ax1 + ax2) / 2, (ay1 + ay2) / 2, (bx1 + bx2) / 2, (by1 + by2) / 2
    cost = np.abs(acx - bcx)
    cost += np.abs(np.subtract(acy, bcy, out=hh))
    cost += np.abs(np.subtract(aw, bw, out=hh))
    cost += np.abs(np.subtract(ah, bh, out=hh))
    cost *= COST_BBOX
    giou_part *= COST_GIOU
    cost -= giou_part
    np.subtract(cost, COST_CLASS * (P_HOT - P_COLD), out=cost, where=hot)
    return cost


def _match(P: Ragged, Pc: Ragged, G: Ragged, Gc: Ragged, active: np.ndarray):
    """DETR-Hungarian matching of predictions to GT for every row (vectorised costs).

    The class cost is −P_HOT where a prediction's class index `Pc` equals the GT's class
    index `Gc`, else −P_COLD. Only `active` rows are matched. Returns flat (row, pred index,
    gt index, pair IoU with eps 1e-8).
    """
    def cost(rows):
        hot = Pc.padded(rows)[:, :, None] == Gc.padded(rows)[:, None, :]
        return detr_cost(P.padded(rows), G.padded(rows), hot)

    b, r, c = match_batches(np.where(active, P.n, 0), np.where(active, G.n, 0), cost)
    inter, union = elementwise_iou(P.values[P.flat_index(b, r)], G.values[G.flat_index(b, c)])
    return b, r, c, inter / (union + 1e-8)


def _flat_boxes(flat: list, raws: list, n: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """`flat` = the ok rows' raw boxes concatenated → float64 [Σn, 4]; one NumPy call when
    every row is well-formed, else row by row (rows whose boxes fail get ok = False, n = 0)."""
    arr = box_array(flat) if flat else np.zeros((0, 4))
    if arr is not None:
        return arr
    parts = []
    for i in np.flatnonzero(ok):
        a = box_array(raws[i])
        if a is None:
            ok[i], n[i] = False, 0
        else:
            parts.append(a)
    return np.concatenate(parts) if parts else np.zeros((0, 4))


def _solutions(sols, B: int):
    """Parses the detection GT column: (ok [B], ids Ragged, boxes Ragged).

    Each distinct GT object is parsed once (a GRPO group's G completions share one), in one
    NumPy conversion for the whole column when every entry is a well-formed dict of lists
    (the usual case), with `parse_detection_solution` one by one otherwise.
    """
    uniq: list = []                       # distinct GT objects, in order of appearance
    index: dict[int, int] = {}
    u_of_row = np.empty(B, np.int64)
    for i, s in enumerate(sols):
        u = index.get(id(s))
        if u is None:
            u = index[id(s)] = len(uniq)
            uniq.append(s)
        u_of_row[i] = u
    U = len(uniq)
    ok_u = np.zeros(U, bool)
    n_u = np.zeros(U, np.int64)
    ids_l, boxes_l = [], []
    for u, s in enumerate(uniq):
        if type(s) is dict:
            ir, br = s.get("target_id"), s.get("target_box")
            if type(ir) is list and type(br) is list and len(ir) == len(br):
                ok_u[u], n_u[u] = True, len(ir)
                ids_l += ir
                boxes_l += br
                continue
        parsed = parse_detection_solution(s)
        if parsed is not None:
            ok_u[u], n_u[u] = True, len(parsed[0])
            ids_l += parsed[0].tolist()
            boxes_l += parsed[1].tolist()
    try:  # ids mixing numbers and lists make NumPy raise: then one by one
        ids = np.asarray(ids_l) if ids_l else np.zeros(0, np.int64)
        boxes = box_array(boxes_l) if boxes_l else np.zeros((0, 4))
    except (ValueError, TypeError, OverflowError):
        ids, boxes = np.zeros((0, 0)), None
    if boxes is None or ids.ndim != 1 or ids.dtype.kind not in "iuf":
        parsed = [parse_detection_solution(s) for s in uniq]   # some entry is malformed: one by one
        ok_u = np.array([p is not None for p in parsed], bool)
        n_u = np.array([len(p[0]) if p is not None else 0 for p in parsed], np.int64)
        ids = np.concatenate([p[0] for p in parsed if p is not None] + [np.zeros(0, np.int64)])
        boxes = np.concatenate([p[1] for p in parsed if p is not None] + [np.zeros((0, 4))])
    # A GT object is unusable with an id outside (−2³¹, 2³¹) or not integral, or a coordinate
    # that is NaN, ±inf or beyond float32: PR1's float32 tensors turn those into inf, its
    # matcher then raises (PR1 scores 0), and in float64 a coordinate near the float64 maximum
    # overflows the costs and makes scipy's assignment raise ("cost matrix is infeasible").
    bad = (np.abs(ids) >= 2 ** 31) | (ids != np.round(ids)) | ~(np.abs(boxes) <= _F32_MAX).all(1)
    if bad.any():                                              # drop the GT objects with bad values
        bad_u = np.bincount(np.repeat(np.arange(U), n_u)[bad], minlength=U) > 0
        keep = ~np.repeat(bad_u, n_u)
        ids, boxes = ids[keep], boxes[keep]
        ok_u &= ~bad_u
        n_u[bad_u] = 0
    # rows → their GT object's slice of the flat arrays
    n = n_u[u_of_row]
    off_u = np.cumsum(n_u) - n_u
    flat = np.repeat(off_u[u_of_row] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    return ok_u[u_of_row], Ragged.from_flat(ids[flat].astype(np.int64), n), Ragged.from_flat(boxes[flat], n)


def _size_weight(boxes: np.ndarray) -> np.ndarray:
    """PR1's size weights of GT boxes: 3 if area < 32², 2 if < 96², else 1."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.where(area < 32 * 32, 3.0, np.where(area < 96 * 96, 2.0, 1.0))


def _coverage(pred_ids: Ragged, gt_ids: Ragged) -> np.ndarray:
    """Per row: mean over the GT categories of min(#pred of the category / #GT of it, 1)."""
    B = len(gt_ids.n)
    gk = _row_of(gt_ids) * _KEY + (gt_ids.values + (1 << 32))
    pk = np.sort(_row_of(pred_ids) * _KEY + (pred_ids.values + (1 << 32)))
    keys, g_count = np.unique(gk, return_counts=True)
    p_count = np.searchsorted(pk, keys, "right") - np.searchsorted(pk, keys, "left")
    rows = keys // _KEY
    with np.errstate(all="ignore"):
        return np.bincount(rows, np.minimum(p_count / g_count, 1.0), B) / np.bincount(rows, minlength=B)


class _NoGC:
    """Pauses the cyclic garbage collector while a batch of JSON answers is parsed and kept:
    the parsed lists are acyclic, and collections triggered by them cost more than the parse."""

    def __enter__(self):
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()


@register("pr1_detection")
def pr1_detection(completions: list[str], solution=None, *, f1_scale: float = 0.75, cls_coe: float = 1.0,
                  iou_coe: float = 1.0, do_penalty: bool = True, coverage_scale: float = 0.0,
                  is_size_weight: bool = False, **columns) -> np.ndarray:
    """PR1's `pr1_detection_reward`, value for value. Range [0, 3] (+ coverage_scale when on).

    1. Parse (`parsing.pr1_detection_items` + `parsing.box_array`): remove "```json"/"```",
       json.loads; an item is valid iff a dict with `bbox_2d` and a known COCO `label` (exact
       name); format = 1 − wrong/len(items); reward = 0.25·format. → 0 (format credit lost)
       when: not a JSON list; no valid item (PR1's helper returns 2 values instead of 3); a
       valid item's `bbox_2d` is not 4 numbers (torch.tensor raises); a malformed solution
       (also a GT coordinate that is not finite or beyond float32: PR1's matcher raises).
    2. No GT object → 0.25·format.
    3. DETR matching, cost = 5·L1(cxcywh, pixels) − 1·p_class − 2·GIoU, Hungarian, then keep
       the pairs with IoU > 0.5 (IoU = inter/(union + 1e-8)); K = #kept.
       Quirks reproduced (each → reward 0, PR1's matcher raises): p_class is softmax of a
       one-hot logit at index = COCO id, read at the GT's index id − 1 (off by one: "hot"
       only when pred id = GT id − 1), so a predicted "toothbrush" (id 90) is out of the 90
       logits → 0; any predicted or GT box with x2 < x1 or y2 < y1 fails GIoU's assert → 0;
       NaN/inf or beyond-float32 coordinates give NaN costs, on which scipy raises → 0.
    4. K = 0 → 0.25·format (no penalty, no clamp).
    5. + f1_scale·F1, F1 = 2PR/(P + R + 1e-8), P = K/n̂, R = K/n.
    6. + cls_coe·mean[pred id == GT id] + iou_coe·mean IoU over kept pairs (is_size_weight:
       PR1's formula Σ w·IoU / (Σ IoU · K + 1e-8), w = 3/2/1 for GT area < 32²/96²/else —
       not a weighted mean; reproduced).
    7. do_penalty: − 0.5·((n̂ − K)/n̂ + (n − K)/n); then clamp to [0, 3].
    8. + coverage_scale · mean over GT categories of min(#pred of cat/#GT of cat, 1).
    PR1 computes in float32 torch; this uses float64 (values agree to ~1e-6; the Hungarian
    assignment could differ only on float32 near-ties).

    Example: preds person [0,0,10,10], dog [20,20,30,30], cat [50,50,60,60] (format 1);
    GT person [0,0,10,10], dog [20,20,30,32]: K = 2 (IoU 1 and 100/120), P = 2/3, R = 1,
    F1 = 0.8; reward = 0.25 + 0.6 + 1 + (1 + 5/6)/2 = 2.7667 without penalty, 2.6 with
    (penalty 0.5·(1/3 + 0)).
    """
    texts = [as_text(c) for c in completions]
    sols = solution_column({"solution": solution, **columns}, len(texts), "solution")
    B = len(texts)
    g_ok, Gi, G = _solutions(sols, B)
    raws, ids_flat, boxes_flat = [()] * B, [], []
    n_items, n_valid = [1] * B, [0] * B
    with _NoGC():
        for i in np.flatnonzero(g_ok).tolist():
            items = pr1_detection_items(texts[i])
            if items is not None:
                ids, raws[i], n_items[i] = items
                n_valid[i] = len(ids)
                ids_flat += ids
                boxes_flat += raws[i]
        n_p = np.array(n_valid, np.int64)
        ok = n_p > 0           # ≥ 1 valid item and a usable GT
        p_ids = np.array(ids_flat, np.int64)
        P = Ragged.from_flat(_flat_boxes(boxes_flat, raws, n_p, ok), n_p)  # non-4-number boxes: PR1 raises → 0
        del raws, boxes_flat
    if len(P.values) != len(p_ids):   # some rows failed their boxes: drop their ids too
        p_ids = p_ids[np.repeat(np.array(n_valid) == n_p, n_valid)]
    fmt = np.where(ok, 1.0 - (np.asarray(n_items) - n_p) / np.asarray(n_items), 0.0)
    Pi = Ragged.from_flat(p_ids, n_p)
    base = 0.25 * fmt        # the reward wherever the matcher is not reached (0 for failures)

    # Rows that reach PR1's matcher, minus those where it raises (→ 0): a toothbrush (logit
    # index 90 of 90), a GT index id − 1 outside the 90 logits, GIoU's x2 ≥ x1 / y2 ≥ y1
    # assert on either side, non-finite costs (NaN/inf or beyond-float32 coordinates).
    active = ok & (G.n > 0)
    g_cls = Gi.values - 1
    pv, gv = P.values, G.values
    crash = (_any_per_row(Pi, Pi.values >= NUM_LOGITS)
             | _any_per_row(Gi, (g_cls < -NUM_LOGITS) | (g_cls >= NUM_LOGITS))
             | _any_per_row(P, (pv[:, 2] < pv[:, 0]) | (pv[:, 3] < pv[:, 1]) | ~(np.abs(pv) <= _F32_MAX).all(1))
             | _any_per_row(G, (gv[:, 2] < gv[:, 0]) | (gv[:, 3] < gv[:, 1])))
    crash &= active
    base[crash] = 0.0
    active &= ~crash
    Gc = Ragged.from_flat(np.mod(g_cls, NUM_LOGITS), G.n)

    b, r, c, iou = _match(P, Pi, G, Gc, active)
    keep = iou > IOU_THRESHOLD
    bk = b[keep]
    K = np.bincount(bk, minlength=B).astype(np.float64)
    same = Pi.values[Pi.flat_index(b, r)] == Gi.values[Gi.flat_index(b, c)]
    cls_sum = np.bincount(bk, same[keep].astype(np.float64), B)
    n_pf, n_gf = P.n.astype(np.float64), G.n.astype(np.float64)
    with np.errstate(all="ignore"):
        prec, rec = K / n_pf, K / n_gf
        f1 = 2 * prec * rec / (prec + rec + 1e-8)
        cls = cls_sum / K
        if is_size_weight:
            w = _size_weight(G.values[G.flat_index(b, c)])[keep]
            iou_term = np.bincount(bk, w * iou[keep], B) / (np.bincount(bk, iou[keep], B) * K + 1e-8)
        else:
            iou_term = np.bincount(bk, iou[keep], B) / K
        reward = 0.25 * fmt + f1_scale * f1 + cls_coe * cls + iou_coe * iou_term
        if do_penalty:
            reward -= 0.5 * ((n_pf - K) / n_pf + (n_gf - K) / n_gf)
        reward = np.clip(reward, 0.0, 3.0)
        if coverage_scale:
            reward += coverage_scale * _coverage(Pi, Gi)
    out = np.where(active & (K > 0), reward, base)
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)


def _dedupe(P: Ragged, Pi: Ragged, dup_iou: float) -> np.ndarray:
    """Flat mask of predictions that repeat an earlier one of the same row (same class and
    IoU ≥ dup_iou, or identical box). Vectorised per size chunk."""
    dup = np.zeros(len(P.values), bool)
    for rows in size_chunks(P.n, P.n):
        pb, pc = P.padded(rows), Pi.padded(rows)
        iou, _ = pairwise_iou(pb, pb, eps=1e-9)
        same_box = np.all(pb[:, :, None, :] == pb[:, None, :, :], axis=-1)
        close = ((iou >= dup_iou) | same_box) & (pc[:, :, None] == pc[:, None, :])
        d = np.triu(close, k=1).any(axis=1)  # [b, N]: box j repeats some box i < j
        n = P.n[rows]
        j = np.arange(d.shape[1])[None, :]
        sel = j < n[:, None]
        dup[(P.offsets[rows][:, None] + j)[sel]] = d[sel]
    return dup


@register("detection_robust")
def detection_robust(completions: list[str], solution=None, *, f1_scale: float = 0.75, cls_coe: float = 1.0,
                     iou_coe: float = 1.0, do_penalty: bool = True, coverage_scale: float = 0.0,
                     is_size_weight: bool = False, dup_iou: float = 0.95, **columns) -> np.ndarray:
    """Robust twin of `pr1_detection` (same terms and knobs). Range [0, 3] (+ coverage_scale).

    Differences from PR1:
    * per-item parsing (`parsing.parse_detection_items`): an unknown label, a "toothbrush",
      a malformed box (x2 < x1, not 4 numbers) or a non-dict item only makes THAT item
      wrong (dropped, counted against format) instead of zeroing the answer; labels are
      matched case-insensitively; a single JSON object counts as a one-item list;
    * duplicates (same class, IoU ≥ dup_iou with an earlier item) are wrong in format and
      are not matched; every item (wrong ones included) counts in n̂ = len(items);
    * correct class cost (hot index = GT id, no off-by-one);
    * cls and IoU terms are summed over kept pairs and divided by max(n̂, n) (the paper's
      "aggregate over subjects"), so spamming boxes cannot keep them at 1;
    * the penalty (on by default, as PR1's code) also applies when nothing matched;
    * an empty answer `[]` on an image without objects is perfect (3.0); `[]` on an image
      with objects, or no GT and some items, scores 0 after the penalty;
    * malformed GT boxes are repaired (coordinates sorted) instead of zeroing the row;
    * size weighting, when on, is a real weighted mean over kept pairs;
    * only an answer's first MAX_ITEMS (1024) valid items are deduplicated and matched; later
      ones are wrong items (the pairwise duplicate check needs memory ∝ items²).

    Example: the PR1 example (person, dog, cat vs GT person, dog): K = 2, n̂ = 3, n = 2;
    0.25 + 0.75·0.8 + 2/3 + (1 + 5/6)/3 − 0.5·(1/3) = 1.9611.
    """
    texts = [as_text(c) for c in completions]
    sols = solution_column({"solution": solution, **columns}, len(texts), "solution")
    B = len(texts)
    ok, Gi, G = _solutions(sols, B)
    G.values = np.concatenate([np.minimum(G.values[:, :2], G.values[:, 2:]),
                               np.maximum(G.values[:, :2], G.values[:, 2:])], axis=1)  # repair GT
    n_items = np.zeros(B)
    p_ids, p_boxes = [[] for _ in range(B)], [[] for _ in range(B)]
    for i, t in enumerate(texts):
        parsed = parse_detection_items(t) if ok[i] else None
        if parsed is None:
            ok[i] = False
            continue
        ids, boxes, n_items[i] = parsed
        p_ids[i], p_boxes[i] = ids[:MAX_ITEMS], boxes[:MAX_ITEMS]

    P, Pi = Ragged(p_boxes, 4), Ragged(p_ids, 0, np.int64)
    n_valid = P.n.astype(np.float64)
    dup = _dedupe(P, Pi, dup_iou)
    n_dup = np.bincount(_row_of(P)[dup], minlength=B).astype(np.float64)
    n_kept = np.bincount(_row_of(P)[~dup], minlength=B)
    Pk, Pki = Ragged.from_flat(P.values[~dup], n_kept), Ragged.from_flat(Pi.values[~dup], n_kept)

    b, r, c, iou = _match(Pk, Pki, G, Gi, ok)
    keep = iou > IOU_THRESHOLD
    bk = b[keep]
    K = np.bincount(bk, minlength=B).astype(np.float64)
    same = (Pki.values[Pki.flat_index(b, r)] == Gi.values[Gi.flat_index(b, c)])[keep]
    n_p, n_g = n_items, G.n.astype(np.float64)
    both_empty = (n_p == 0) & (n_g == 0)
    denom = np.maximum(np.maximum(n_p, n_g), 1.0)
    with np.errstate(all="ignore"):
        fmt = np.where(n_p > 0, (n_valid - n_dup) / np.maximum(n_p, 1.0), np.where(n_g == 0, 1.0, 0.0))
        prec = np.where(n_p > 0, K / np.maximum(n_p, 1.0), 0.0)
        rec = np.where(n_g > 0, K / np.maximum(n_g, 1.0), 0.0)
        f1 = np.where(both_empty, 1.0, np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0))
        cls = np.where(both_empty, 1.0, np.bincount(bk, same.astype(np.float64), B) / denom)
        if is_size_weight:
            w = _size_weight(G.values[G.flat_index(b, c)])[keep]
            wmean = np.bincount(bk, w * iou[keep], B) / np.bincount(bk, w, B)
            iou_term = np.where(K > 0, wmean * K / denom, 0.0)
        else:
            iou_term = np.bincount(bk, iou[keep], B) / denom
        iou_term = np.where(both_empty, 1.0, iou_term)
        reward = 0.25 * fmt + f1_scale * f1 + cls_coe * cls + iou_coe * iou_term
        if do_penalty:
            fp = np.where(n_p > 0, (n_p - K) / np.maximum(n_p, 1.0), 0.0)
            fn = np.where(n_g > 0, (n_g - K) / np.maximum(n_g, 1.0), 0.0)
            reward -= 0.5 * (fp + fn)
        reward = np.clip(reward, 0.0, 3.0)
        if coverage_scale:
            cov = _coverage(Pki, Gi)
            reward += coverage_scale * np.where(n_g > 0, cov, 0.0)
    out = np.where(ok, reward, 0.0)
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)
