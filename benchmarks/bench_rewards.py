"""Throughput of the batched `pr1_detection` reward vs a per-sample pure-Python reference.

    /work/main/.venv/bin/python benchmarks/bench_rewards.py [--n 10000] [--seed 0] [--machine "CPU 2 cores"]

Workload: N realistic COCO detection completions (JSON `bbox_2d`/`label`, half in a ```json
fence), 1–30 GT boxes and 1–30 predicted boxes each (jittered GT boxes, relabels, random
boxes). "toothbrush" is left out of the sampled labels so every completion reaches the
Hungarian matcher (the expensive path; PR1 zeroes toothbrush answers before it).
The reference is what a straightforward torch-free port of PR1 would do: per completion,
Python loops over all prediction×GT pairs for L1/GIoU/IoU, then scipy's
linear_sum_assignment. Both must agree to 1e-5 on every completion. Prints a table and
appends one line to benchmarks/RESULTS_rewards.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from pr1_jax import rewards  # noqa: E402
from pr1_jax.rewards import COCO_CLASSES, COCO_NAME_TO_ID  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_rewards.md")
P_HOT, P_COLD = math.e / (math.e + 89), 1 / (math.e + 89)


# ------------------------------------------------------------------------------------------
# Per-sample pure-Python reference (PR1's rules, default knobs: penalty on, coverage off)
# ------------------------------------------------------------------------------------------
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / (union + 1e-8), union


def _giou(a, b):
    iou, union = _iou(a, b)
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1])) + 1e-8
    return iou - (hull - union) / hull


def _cxcywh(b):
    return ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1])


def reference_reward(text: str, sol: dict, do_penalty: bool = True) -> float:
    try:
        content = json.loads(text.replace("```json", "").replace("```", ""))
    except ValueError:
        return 0.0
    if not isinstance(content, list):
        return 0.0
    ids, boxes, wrong = [], [], 0
    for it in content:
        if isinstance(it, dict) and "bbox_2d" in it and it.get("label") in COCO_NAME_TO_ID:
            ids.append(COCO_NAME_TO_ID[it["label"]])
            boxes.append([float(v) for v in it["bbox_2d"]])
        else:
            wrong += 1
    if not ids:
        return 0.0
    reward = 0.25 * (1 - wrong / len(content))
    tids, tboxes = sol["target_id"], sol["target_box"]
    if not tids:
        return reward
    if max(ids) >= 90 or any(b[2] < b[0] or b[3] < b[1] for b in boxes + tboxes):
        return 0.0
    tc = [_cxcywh(t) for t in tboxes]
    cost = []
    for p, pid in zip(boxes, ids):
        pc = _cxcywh(p)
        row = []
        for t, tcc, tid in zip(tboxes, tc, tids):
            l1 = abs(pc[0] - tcc[0]) + abs(pc[1] - tcc[1]) + abs(pc[2] - tcc[2]) + abs(pc[3] - tcc[3])
            row.append(5 * l1 - (P_HOT if pid == tid - 1 else P_COLD) - 2 * _giou(p, t))
        cost.append(row)
    rows, cols = linear_sum_assignment(cost)
    kept = [(i, j) for i, j in zip(rows, cols) if _iou(boxes[i], tboxes[j])[0] > 0.5]
    k, n_p, n_g = len(kept), len(ids), len(tids)
    if k == 0:
        return reward
    p, r = k / n_p, k / n_g
    reward += 0.75 * 2 * p * r / (p + r + 1e-8)
    reward += sum(ids[i] == tids[j] for i, j in kept) / k + sum(_iou(boxes[i], tboxes[j])[0] for i, j in kept) / k
    if do_penalty:
        reward -= 0.5 * ((n_p - k) / n_p + (n_g - k) / n_g)
    return min(max(reward, 0.0), 3.0)


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
    """Best wall time of each function, runs interleaved so that load changes hit both alike."""
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
    n_pairs = sum(len(json.loads(t.replace("```json", "").replace("```", ""))) * len(s["target_id"])
                  for t, s in zip(texts, sols))
    fn = rewards.get("pr1_detection")
    fn(texts[:200], solution=sols[:200])  # warm-up (imports, allocator)
    times, out = interleaved(
        {"ours": lambda: fn(texts, solution=sols),
         "ref": lambda: np.asarray([reference_reward(t, s) for t, s in zip(texts, sols)])},
        {"ours": args.repeats, "ref": max(1, args.repeats - 1)})
    t_ours, t_ref, ours, ref = times["ours"], times["ref"], out["ours"], out["ref"]
    max_diff = float(np.abs(ours - ref).max())
    assert max_diff <= 1e-5, f"batched and reference rewards differ by {max_diff}"
    ratio = t_ref / t_ours
    # GRPO batches share one GT object per group of G = 8 completions: parsed once here.
    grouped = [sols[i - i % 8] for i in range(len(sols))]
    t_grouped, _ = interleaved({"g": lambda: fn(texts, solution=grouped)}, {"g": args.repeats})

    print(f"pr1_detection on {args.n} completions ({n_pairs / args.n:.0f} pred×GT pairs on average), "
          f"{args.machine}; max |ours − reference| = {max_diff:.1e}; mean reward {ours.mean():.4f}")
    print(f"| {'implementation':<46} | {'seconds':>8} | {'µs / completion':>15} | {'completions/s':>13} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 17}|{'-' * 15}|")
    for name, t in (("batched NumPy/SciPy (pr1_jax.rewards)", t_ours), ("per-sample pure-Python reference", t_ref),
                    ("batched, GT shared by groups of 8 (as GRPO)", t_grouped["g"])):
        print(f"| {name:<46} | {t:8.3f} | {1e6 * t / args.n:15.1f} | {args.n / t:13.0f} |")
    print(f"speed-up: {ratio:.1f}× (reference / batched, distinct GT per completion)")
    if not args.no_record:
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a") as f:
            if new:
                f.write("# Reward throughput (benchmarks/bench_rewards.py)\n\n"
                        "`pr1_detection` on realistic COCO completions (1–30 predicted and 1–30 GT boxes, JSON),\n"
                        "batched NumPy/SciPy vs a per-sample pure-Python reference; equal to 1e-5 on every completion.\n\n"
                        "Times are the best of interleaved repeats; the last column is ours with the GT shared by\n"
                        "groups of 8 completions (a GRPO batch), parsed once per group.\n\n"
                        "| date | machine | completions | ours (s) | reference (s) | speed-up | ours, grouped GT (s) |\n"
                        "|---|---|---|---|---|---|---|\n")
            f.write(f"| {datetime.date.today().isoformat()} | {args.machine} | {args.n} | {t_ours:.3f} | "
                    f"{t_ref:.3f} | {ratio:.1f}× | {t_grouped['g']:.3f} |\n")


if __name__ == "__main__":
    main()
