"""Host-side evaluation speed: COCO bbox eval with pycocotools vs faster-coco-eval, plus the
parsing/metric code of the other tasks at 10k completions. CPU only.

    python benchmarks/bench_coco_eval.py [--images 500] [--categories 80] [--fp 13] [--repeats 3]

Prints a table (best of `repeats` wall-clock runs, end to end: GT indexing, loadRes, evaluate,
accumulate, summarize) and checks that both backends give the same 12 stats. Results are kept
in benchmarks/RESULTS_eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


from pr1_jax.evaluation import counting, detection, grounding, ocr  # noqa: E402


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--categories", type=int, default=80)
    ap.add_argument("--fp", type=float, default=13.0, help="false positives per image")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    gt, dets = detection.synthetic_coco(args.images, args.categories, seed=0, objects_per_image=7.0,
                                        false_positives_per_image=args.fp)
    print(f"synthetic COCO: {len(gt['images'])} images, {len(gt['categories'])} categories, "
          f"{len(gt['annotations'])} GT boxes, {len(dets)} detections; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}")

    rows = []
    t_py, s_py = best_of(lambda: detection.coco_eval(gt, dets, backend="pycocotools"), args.repeats)
    t_fast, s_fast = best_of(lambda: detection.coco_eval(gt, dets, backend="faster_coco_eval"), args.repeats)
    diff = max(abs(s_py[k] - s_fast[k]) for k in detection.STAT_NAMES)
    rows.append(("COCO eval, pycocotools", t_py, "1.0×"))
    rows.append(("COCO eval, faster-coco-eval", t_fast, f"{t_py / t_fast:.1f}×"))

    # Parsing one JSON completion per image (PR1's and the robust parser).
    by_img = {}
    for d in dets:
        x, y, w, h = d["bbox"]
        name = detection.COCO_CLASSES[detection.COCO_IDS.index(d["category_id"])]
        by_img.setdefault(d["image_id"], []).append({"bbox_2d": [round(x), round(y), round(x + w), round(y + h)],
                                                     "label": name})
    ids = [im["id"] for im in gt["images"]]
    texts = ["```json\n" + json.dumps(by_img.get(i, [])) + "\n```" for i in ids]
    t_parse, parsed = best_of(lambda: detection.detections_from_completions(texts, ids), args.repeats)
    t_robust, _ = best_of(lambda: detection.detections_from_completions(texts, ids, robust=True), args.repeats)
    rows.append((f"detection parse, {len(texts)} completions (PR1)", t_parse, ""))
    rows.append((f"detection parse, {len(texts)} completions (robust)", t_robust, ""))

    n = 10_000
    rng = np.random.default_rng(0)
    boxes = rng.integers(0, 1000, (n, 4))
    comp = [f"<|object_ref_start|>x<|object_ref_end|><|box_start|>({a},{b}),({c},{d})<|box_end|><|im_end|>"
            for a, b, c, d in boxes]
    sols = [[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in boxes]
    t_g, _ = best_of(lambda: grounding.evaluate_grounding(comp, sols), args.repeats)
    rows.append((f"grounding eval, {n} completions", t_g, ""))
    comp_c = ["<|object_ref_start|>x<|object_ref_end|>" + "<|box_start|>(1,2),(3,4)<|box_end|>" * int(k) + "<|im_end|>"
              for k in rng.integers(0, 30, n)]
    t_c, _ = best_of(lambda: counting.evaluate_counting(comp_c, [5] * n), args.repeats)
    rows.append((f"counting eval, {n} completions", t_c, ""))
    words = "the of and to in is that for it as with was on be by this are from at or".split()
    page = " ".join(rng.choice(words, 500))
    noisy = page.replace(" is ", " iz ").replace("the", "teh", 5)
    t_o, _ = best_of(lambda: ocr.evaluate_ocr([noisy] * 20, [page] * 20), 1)
    rows.append((f"OCR eval, 20 pages of {len(page)} chars", t_o, ""))

    print(f"\n| task | seconds (best of {args.repeats}) | speed-up |\n|---|---|---|")
    for name, t, ratio in rows:
        print(f"| {name} | {t:.3f} | {ratio} |")
    print(f"\nmax |pycocotools − faster-coco-eval| over the 12 stats: {diff:.2e}")
    print("stats:", ", ".join(f"{k} {v:.4f}" for k, v in s_py.items()))
    if diff > 1e-9:
        raise SystemExit("backends disagree")


if __name__ == "__main__":
    main()
