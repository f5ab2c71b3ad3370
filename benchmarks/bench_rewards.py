"""Throughput of the batched `pr1_detection` reward vs per-sample pure-Python references.

    /work/main/.venv/bin/python benchmarks/bench_rewards.py [--n 10000] [--seed 0] [--repeats 3]
                                                           [--machine "CPU 2 cores"] [--no-record]

Workload: N realistic COCO detection completions (JSON `bbox_2d`/`label`, half in a ```json
fence), 1–30 GT boxes and 1–30 predicted boxes each (jittered GT boxes, relabels, random
boxes). "toothbrush" is left out of the sampled labels so every completion reaches the
Hungarian matcher (the expensive path; PR1 zeroes toothbrush answers before it).

Two per-sample pure-Python references, both must agree with ours to 1e-5 on every completion:
* `transcription` (THE reference of the acceptance ratio): what a torch-free port of PR1's
  code does — its helpers kept (cxcywh conversion, L1 `cdist`, `box_iou` and
  `generalized_box_iou` matrices, the matcher's cost sum, `calculate_reward`), each one a
  Python loop over prediction×GT pairs, then scipy's linear_sum_assignment;
* `fused`: a hand-optimised single pass over the pairs (shown for transparency: the
  speed-up over it is smaller).
Times are the best of interleaved repeats (load changes on a shared machine hit all alike).
Prints a table and appends one line to benchmarks/RESULTS_rewards.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from pr1_jax import rewards  # noqa: E402
from pr1_jax.rewards import COCO_CLASSES, COCO_NAME_TO_ID  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_rewards.md")
P_HOT, P_COLD = math.e / (math.e + 89), 1 / (math.e + 89)   # softmax of PR1's one-hot logits


def _parse(text):
    """PR1's parse: (ids, boxes, format) or None (reward 0)."""
    try:
        content = json.loads(text.replace("```json", "").replace("```", ""))
    except ValueError:
        return None
    if not isinstance(content, list):
        return None
    ids, boxes, wrong = [], [], 0
    for it in content:
        if isinstance(it, dict) and "bbox_2d" in it and it.get("label") in COCO_NAME_TO_ID:
            ids.append(COCO_NAME_TO_ID[it["label"]])
            boxes.append([float(v) for v in it["bbox_2d"]])
        else:
            wrong += 1
    return (ids, boxes, 1 - wrong / len(content)) if ids else None


def _finish(reward, kept, ious, ids, tids, n_p, n_g):
    """F1, class and IoU terms over the kept pairs, penalty on (PR1's code default), clamp."""
    k = len(kept)
    if k == 0:
        return reward
    p, r = k / n_p, k / n_g
    reward += 0.75 * 2 * p * r / (p + r + 1e-8)
    reward += sum(ids[i] == tids[j] for i, j in kept) / k + sum(ious) / k
    reward -= 0.5 * ((n_p - k) / n_p + (n_g - k) / n_g)
    return min(max(reward, 0.0), 3.0)


# ------------------------------------------------------------------------------------------
# Reference 1: a transcription of PR1's helpers with Python lists
# ------------------------------------------------------------------------------------------
def box_xyxy_to_cxcywh(boxes):
    return [[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]] for b in boxes]


def box_area(boxes):
    return [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]


def box_iou(boxes1, boxes2):
    area1, area2 = box_area(boxes1), box_area(boxes2)
    iou, union = [], []
    for a, a_area in zip(boxes1, area1):
        iou_row, union_row = [], []
        for b, b_area in zip(boxes2, area2):
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            u = a_area + b_area - w * h
            iou_row.append(w * h / (u + 1e-8))
            union_row.append(u)
        iou.append(iou_row)
        union.append(union_row)
    return iou, union


def generalized_box_iou(boxes1, boxes2):
    assert all(b[2] >= b[0] and b[3] >= b[1] for b in boxes1 + boxes2)
    iou, union = box_iou(boxes1, boxes2)
    out = []
    for i, a in enumerate(boxes1):
        row = []
        for j, b in enumerate(boxes2):
            w = max(0.0, max(a[2], b[2]) - min(a[0], b[0]))
            h = max(0.0, max(a[3], b[3]) - min(a[1], b[1]))
            hull = w * h + 1e-8
            row.append(iou[i][j] - (hull - union[i][j]) / hull)
        out.append(row)
    return out


def cdist_l1(x, y):
    return [[sum(abs(u - v) for u, v in zip(a, b)) for b in y] for a in x]


def hungarian_match(ids, boxes, tids, tboxes, threshold=0.5):
    if max(ids) >= 90:                       # the one-hot at index = id: id 90 is out of 90 logits
        raise IndexError("index 90 is out of bounds for dimension 1 with size 90")
    # softmax(one-hot at the predicted id) read at the GT's id − 1
    cost_class = [[-(P_HOT if pid == t - 1 else P_COLD) for t in tids] for pid in ids]
    cost_bbox = cdist_l1(box_xyxy_to_cxcywh(boxes), box_xyxy_to_cxcywh(tboxes))
    cost_giou = [[-g for g in row] for row in generalized_box_iou(boxes, tboxes)]
    cost = [[5 * cb + 1 * cc + 2 * cg for cb, cc, cg in zip(rb, rc, rg)]
            for rb, rc, rg in zip(cost_bbox, cost_class, cost_giou)]
    rows, cols = linear_sum_assignment(cost)
    iou, _ = box_iou([boxes[i] for i in rows], [tboxes[j] for j in cols])
    return [(i, j) for k, (i, j) in enumerate(zip(rows, cols)) if iou[k][k] > threshold]


def transcription_reward(text, sol):
    parsed = _parse(text)
    if parsed is None:
        return 0.0
    ids, boxes, fmt = parsed
    tids, tboxes = sol["target_id"], sol["target_box"]
    if not tids:
        return 0.25 * fmt
    try:
        kept = hungarian_match(ids, boxes, tids, tboxes)
    except (IndexError, AssertionError, ValueError):   # toothbrush, GIoU assert, NaN costs
        return 0.0
    iou, _ = box_iou([boxes[i] for i, _ in kept], [tboxes[j] for _, j in kept])
    return _finish(0.25 * fmt, kept, [iou[k][k] for k in range(len(kept))], ids, tids, len(ids), len(tids))


# ------------------------------------------------------------------------------------------
# Reference 2: one fused pass over the pairs
# ------------------------------------------------------------------------------------------
def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / (union + 1e-8), union


def fused_reward(text, sol):
    parsed = _parse(text)
    if parsed is None:
        return 0.0
    ids, boxes, fmt = parsed
    tids, tboxes = sol["target_id"], sol["target_box"]
    if not tids:
        return 0.25 * fmt
    if max(ids) >= 90 or any(b[2] < b[0] or b[3] < b[1] for b in boxes + tboxes):
        return 0.0
    tc = [((t[0] + t[2]) / 2, (t[1] + t[3]) / 2, t[2] - t[0], t[3] - t[1]) for t in tboxes]
    cost = []
    for p, pid in zip(boxes, ids):
        pc = ((p[0] + p[2]) / 2, (p[1] + p[3]) / 2, p[2] - p[0], p[3] - p[1])
        row = []
        for t, c, tid in zip(tboxes, tc, tids):
            iou, union = _iou(p, t)
            hull = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1])) + 1e-8
            l1 = abs(pc[0] - c[0]) + abs(pc[1] - c[1]) + abs(pc[2] - c[2]) + abs(pc[3] - c[3])
            row.append(5 * l1 - (P_HOT if pid == tid - 1 else P_COLD) - 2 * (iou - (hull - union) / hull))
        cost.append(row)
    rows, cols = linear_sum_assignment(cost)
    kept, ious = [], []
    for i, j in zip(rows, cols):
        iou = _iou(boxes[i], tboxes[j])[0]
        if iou > 0.5:
            kept.append((i, j))
            ious.append(iou)
    return _finish(0.25 * fmt, kept, ious, ids, tids, len(ids), len(tids))


# ------------------------------------------------------------------------------------------
def make_batch(n: int, seed: int, max_boxes: int = 30):
    rng = np.random.default_rng(seed)
    labels = [c for c in COCO_CLASSES if c != "toothbrush"]
    texts, sols = [], []
    for _ in range(n):
        m = int(rng.integers(1, max_boxes + 1))
        xy = rng.uniform(0, 560, (m, 2))
        gboxes = np.round(np.concatenate([xy, np.minimum(xy + rng.uniform(4, 200, (m, 2)), 640)], 1), 2)
        glab = rng.choice(len(labels), m)
        sols.append({"target_id": [COCO_NAME_TO_ID[labels[i]] for i in glab], "target_box": gboxes.tolist()})
        k = int(rng.integers(1, max_boxes + 1))
        src = rng.integers(0, m, k)
        pb = gboxes[src] + rng.normal(0, rng.uniform(1, 25), (k, 4))
        rand = rng.random(k) < 0.25
        pxy = rng.uniform(0, 560, (k, 2))
        pb[rand] = np.concatenate([pxy, pxy + rng.uniform(4, 200, (k, 2))], 1)[rand]
        pb = np.round(np.concatenate([np.minimum(pb[:, :2], pb[:, 2:]), np.maximum(pb[:, :2], pb[:, 2:])], 1)).astype(int)
        plab = np.where(rng.random(k) < 0.8, glab[src], rng.choice(len(labels), k))
        text = json.dumps([{"bbox_2d": b.tolist(), "label": labels[j]} for b, j in zip(pb, plab)])
        texts.append(f"```json\n{text}\n```" if rng.random() < 0.5 else text)
    return texts, sols


def interleaved(fns: dict, repeats: dict):
    """Best wall time of each function, runs interleaved so that load changes hit all alike."""
    best = {k: float("inf") for k in fns}
    out = {}
    for i in range(max(repeats.values())):
        for k, fn in fns.items():
            if i < repeats[k]:
                t0 = time.perf_counter()
                out[k] = fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--machine", default=f"CPU {os.cpu_count()} cores")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS_rewards.md")
    args = ap.parse_args()

    texts, sols = make_batch(args.n, args.seed)
    grouped = [sols[i - i % 8] for i in range(len(sols))]   # a GRPO batch: G = 8 completions per GT
    n_pairs = sum(len(json.loads(t.replace("```json", "").replace("```", ""))) * len(s["target_id"])
                  for t, s in zip(texts, sols))
    fn = rewards.get("pr1_detection")
    fn(texts[:200], solution=sols[:200])  # warm-up (imports, allocator)
    ref_repeats = max(1, args.repeats - 1)
    times, out = interleaved(
        {"ours": lambda: fn(texts, solution=sols),
         "grouped": lambda: fn(texts, solution=grouped),
         "transcription": lambda: np.asarray([transcription_reward(t, s) for t, s in zip(texts, sols)]),
         "fused": lambda: np.asarray([fused_reward(t, s) for t, s in zip(texts, sols)])},
        {"ours": args.repeats, "grouped": args.repeats, "transcription": ref_repeats, "fused": ref_repeats})
    diffs = {k: float(np.abs(out["ours"] - out[k]).max()) for k in ("transcription", "fused")}
    assert max(diffs.values()) <= 1e-5, f"batched and reference rewards differ: {diffs}"
    ratio, ratio_fused = times["transcription"] / times["ours"], times["fused"] / times["ours"]

    print(f"pr1_detection on {args.n} completions ({n_pairs / args.n:.0f} pred×GT pairs on average), {args.machine}; "
          f"max |ours − reference| = {max(diffs.values()):.1e}; mean reward {out['ours'].mean():.4f}")
    rows = (("batched NumPy/SciPy (pr1_jax.rewards)", times["ours"]),
            ("  same, GT shared by groups of 8 (GRPO)", times["grouped"]),
            ("reference: PR1 transcription, pure Python", times["transcription"]),
            ("reference: fused pure-Python loop", times["fused"]))
    print(f"| {'implementation':<42} | {'seconds':>8} | {'µs / completion':>15} | {'completions/s':>13} "
          f"| {'time / ours':>11} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 17}|{'-' * 15}|{'-' * 13}|")
    for name, t in rows:
        print(f"| {name:<42} | {t:8.3f} | {1e6 * t / args.n:15.1f} | {args.n / t:13.0f} | {t / times['ours']:10.2f}× |")
    print(f"speed-up: {ratio:.1f}× over the PR1 transcription ({ratio_fused:.1f}× over the fused loop)")
    if not args.no_record:
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a") as f:
            if new:
                f.write("# Reward throughput (benchmarks/bench_rewards.py)\n\n"
                        "`pr1_detection` on realistic COCO completions (1–30 predicted and 1–30 GT boxes, JSON):\n"
                        "batched NumPy/SciPy vs per-sample pure-Python references (a transcription of PR1's\n"
                        "helpers, and a hand-fused loop), equal to 1e-5 on every completion. Best of interleaved\n"
                        "repeats; \"grouped\" = ours with the GT shared by groups of 8 completions (a GRPO batch).\n\n"
                        "| date | machine | completions | ours (s) | grouped (s) | transcription (s) | fused (s) "
                        "| speed-up vs transcription | vs fused |\n"
                        "|---|---|---|---|---|---|---|---|---|\n")
            f.write(f"| {datetime.date.today().isoformat()} | {args.machine} | {args.n} | {times['ours']:.3f} | "
                    f"{times['grouped']:.3f} | {times['transcription']:.3f} | {times['fused']:.3f} | "
                    f"{ratio:.1f}× | {ratio_fused:.1f}× |\n")


if __name__ == "__main__":
    main()
