"""COCO detection evaluation (Qwen2.5-VL JSON boxes → COCO bbox mAP), PR1's rules.

docs/method.md §4.4. The model (decoded without special tokens) answers e.g.

    ```json
    [{"bbox_2d": [12, 30, 200, 310], "label": "person"}, {"bbox_2d": [5, 5, 40, 40], "label": "cup"}]
    ```

PR1's parsing (`parse_detections`, `robust=False`): take the text between ``<answer>`` and
``</answer>`` when both are present, delete every ``` ```json ``` and ``` ``` ``` fence, `json.loads`,
then for each item in order read ``bbox_2d`` and ``label``; labels outside the 80 COCO names are
skipped, ``[x1, y1, x2, y2]`` (through float(), neither clipped nor reordered) becomes
``[x, y, w, h]`` with score 1.0. Any error (invalid JSON, truncated output, a missing key, a box
without 4 numbers) drops that item *and every item after it* in the same image — reproduced as
PR1 has it. Resolved ambiguity: both keys are read before the label test, so an unknown-label item
without ``bbox_2d`` also stops the image, while an unknown-label item with a malformed box does
not. On the example above both items are kept: ``[12, 30, 188, 280]`` person (id 1) and
``[5, 5, 35, 35]`` cup (id 47).

`robust=True` is what we would recommend: it also recovers the complete objects of a truncated
or otherwise invalid list, skips bad items one by one, matches labels case-insensitively, orders
the corners and drops empty boxes.

Quirks of PR1's evaluation (§8.8), both off by default here:
  * ``pr1_skip_last_image``: PR1 infers ``getImgIds()[:-1]``, so the last GT image gets no
    detection while its GT objects still count. `coco_eval(..., pr1_skip_last_image=True)`
    drops the detections of that image to reproduce the number.
  * Coordinates: Qwen2.5-VL prints pixels of the *resized* image (smart_resize to multiples of
    28) while COCO GT is in original pixels; PR1 compares them as they are. `rescale_detections`
    maps predictions back to original pixels (the recommended setting).

`coco_eval` runs COCOeval('bbox') with pycocotools or faster-coco-eval (the same 12 stats; the
latter 6–12× faster, benchmarks/RESULTS_eval.md); both are imported only when called.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pr1_jax.coco import COCO_CLASSES, COCO_IDS, COCO_NAME_TO_ID  # noqa: F401  (re-exported)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _answer_text(text: str) -> str:
    m = _ANSWER.search(text)
    if m:
        text = m.group(1)
    return text.replace("```json", "").replace("```", "")


def _robust_items(text: str) -> list:
    """The JSON value if it parses, else every complete top-level-looking {...} object in order."""
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except (ValueError, RecursionError):
        pass
    decoder, items, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
            items.append(obj)
            i = text.find("{", end)
        except ValueError:
            i = text.find("{", i + 1)
    return items


def parse_detections(text: str, *, robust: bool = False,
                     name_to_id: Mapping[str, int] = COCO_NAME_TO_ID) -> list[dict]:
    """One completion → [{"category_id", "bbox": [x, y, w, h], "score": 1.0}, ...] (no image_id)."""
    text = _answer_text(text)
    out = []
    if not robust:
        try:
            for item in json.loads(text):
                bbox, label = item["bbox_2d"], item["label"]
                if label not in name_to_id:
                    continue
                x1, y1, x2, y2 = (float(v) for v in bbox)
                out.append({"category_id": name_to_id[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": 1.0})
        except Exception:  # noqa: BLE001 — PR1: an error drops the rest of this image
            pass
        return out
    lowered = {k.lower(): v for k, v in name_to_id.items()}
    for item in _robust_items(text):
        if not isinstance(item, dict) or not isinstance(item.get("label"), str):
            continue
        cat = lowered.get(item["label"].strip().lower())
        bbox = item.get("bbox_2d")
        if cat is None or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in bbox)
        except (TypeError, ValueError):
            continue
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        if not all(map(math.isfinite, (x1, y1, x2, y2))) or x2 <= x1 or y2 <= y1:
            continue
        out.append({"category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})
    return out


def detections_from_completions(completions: Sequence[str], image_ids: Sequence[int], *,
                                robust: bool = False) -> list[dict]:
    """COCO results list (image_id, category_id, bbox xywh, score) for one completion per image."""
    if len(completions) != len(image_ids):
        raise ValueError("one completion per image id expected")
    return [{"image_id": int(img), **d} for text, img in zip(completions, image_ids)
            for d in parse_detections(text, robust=robust)]


def rescale_boxes(boxes: np.ndarray, resized_hw: Sequence[float], original_hw: Sequence[float]) -> np.ndarray:
    """Scale [..., 4] boxes from resized-image pixels to original-image pixels.

    Works for x1,y1,x2,y2 and for x,y,w,h alike (x and w scale by W_orig/W_resized, y and h by
    H_orig/H_resized). Example: (644, 476) resized from (640, 480) → x · 480/476, y · 640/644.
    """
    (rh, rw), (oh, ow) = resized_hw, original_hw
    scale = np.array([ow / rw, oh / rh, ow / rw, oh / rh], np.float64)
    return np.asarray(boxes, np.float64) * scale


def rescale_detections(detections: Iterable[dict], gt: str | os.PathLike | Mapping,
                       resized_hw: Mapping[int, Sequence[float]]) -> list[dict]:
    """Copies of `detections` with bbox mapped from the resized image (per image id) to the GT size.

    resized_hw: image id → (height, width) the model saw, e.g. from
    `pr1_jax.processing.image.smart_resize(h, w, min_pixels=3136, max_pixels=12845056,
    qwen_vl_utils=True)` for PR1's eval preprocessing (process_vision_info defaults).
    """
    images = {img["id"]: (img["height"], img["width"]) for img in _load_gt_dict(gt)["images"]}
    out = []
    for d in detections:
        img = d["image_id"]
        out.append({**d, "bbox": rescale_boxes(d["bbox"], resized_hw[img], images[img]).tolist()})
    return out


def pr1_inferred_image_ids(gt: str | os.PathLike | Mapping) -> list[int]:
    """The image ids PR1's script runs the model on: every GT image but the last (§8.8)."""
    return [img["id"] for img in _load_gt_dict(gt)["images"]][:-1]


def _load_gt_dict(gt: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(gt, (str, os.PathLike)):
        with open(gt) as f:
            return json.load(f)
    return gt


def _fresh_gt(gt: Mapping) -> dict:
    """Shallow copies down to each annotation: COCOeval writes 'ignore'/'area' into them."""
    out = dict(gt)
    out["annotations"] = [dict(a) for a in gt.get("annotations", [])]
    out["images"] = [dict(i) for i in gt["images"]]
    out["categories"] = [dict(c) for c in gt["categories"]]
    out.setdefault("info", {})
    return out


def coco_eval(gt: str | os.PathLike | Mapping, detections: Sequence[dict], *,
              backend: str = "pycocotools", pr1_skip_last_image: bool = False,
              img_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, float]:
    """COCO bbox evaluation → {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
    "ARs", "ARm", "ARl"} as fractions in [0, 1] (-1 where a size range has no GT), i.e. COCOeval's
    `stats` in order.

    gt: a COCO instances JSON path or the loaded dict (not modified). detections: COCO results
    dicts (image_id, category_id, bbox [x, y, w, h], score), not modified. backend: "pycocotools"
    or "faster_coco_eval" (same numbers; the latter is much faster). pr1_skip_last_image: drop the
    detections of the last GT image as PR1's script does (§8.8; off = the correct evaluation).
    img_ids: restrict the evaluation to these images (default: all GT images, as PR1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gt_dict = _fresh_gt(_load_gt_dict(gt))
    dets = [{**d, "bbox": [float(v) for v in d["bbox"]]} for d in detections]
    if pr1_skip_last_image and gt_dict["images"]:
        last = gt_dict["images"][-1]["id"]
        dets = [d for d in dets if d["image_id"] != last]
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if backend == "pycocotools":
            try:
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval
            except ImportError as e:
                raise ImportError("coco_eval(backend='pycocotools') needs `pip install pycocotools`") from e
            coco_gt = COCO()
            coco_gt.dataset = gt_dict
            coco_gt.createIndex()
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # pycocotools' loadRes fails on an empty list; an empty result set is valid
                coco_dt = COCO()
                coco_dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"],
                                   "annotations": []}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        else:
            try:
                from faster_coco_eval import COCO, COCOeval_faster
            except ImportError as e:
                raise ImportError("coco_eval(backend='faster_coco_eval') needs "
                                  "`pip install faster-coco-eval`") from e
            coco_gt = COCO(gt_dict)
            coco_dt = coco_gt.loadRes(dets)
            evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=print)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, np.asarray(evaluator.stats)[:12])}


def evaluate_detection(completions: Sequence[str], image_ids: Sequence[int],
                       gt: str | os.PathLike | Mapping, *, robust: bool = False,
                       resized_hw: Mapping[int, Sequence[float]] | None = None,
                       **coco_kwargs: Any) -> dict[str, float]:
    """Parse one completion per image, optionally rescale to original pixels, and run `coco_eval`.

    PR1's number: robust=False, resized_hw=None, pr1_skip_last_image=True.
    """
    gt = _load_gt_dict(gt)
    dets = detections_from_completions(completions, image_ids, robust=robust)
    if resized_hw is not None:
        dets = rescale_detections(dets, gt, resized_hw)
    return coco_eval(gt, dets, **coco_kwargs)


def synthetic_coco(num_images: int = 50, num_categories: int = 5, seed: int = 0,
                   objects_per_image: float = 7.0, false_positives_per_image: float = 4.0,
                   miss_rate: float = 0.15, wrong_class_rate: float = 0.05) -> tuple[dict, list[dict]]:
    """A random COCO instances dict and detections for it, for tests and benchmarks.

    GT: images of 320–640 px, Poisson(objects_per_image) boxes per image with log-uniform sizes
    (small, medium and large objects all occur), categories from the first `num_categories`
    COCO ids. Detections: each GT box detected with probability 1 − miss_rate, jittered by ~10%
    of its size, sometimes with a wrong class and sometimes twice; plus
    Poisson(false_positives_per_image) random boxes; scores uniform, FPs lower on average.
    """
    rng = np.random.default_rng(seed)
    cat_ids = list(COCO_IDS[:num_categories])
    images, anns, dets = [], [], []
    for img_id in range(1, num_images + 1):
        w, h = (int(v) for v in rng.integers(320, 641, size=2))
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id:012d}.jpg"})
        for _ in range(rng.poisson(objects_per_image)):
            bw, bh = np.exp(rng.uniform(np.log(6), np.log([w * 0.9, h * 0.9])))
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.choice(cat_ids))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh)})
            for _ in range(int(rng.random() > miss_rate) + int(rng.random() < 0.1)):
                jx, jy, jw, jh = rng.normal(0, 0.1, size=4) * [bw, bh, bw, bh]
                dcat = int(rng.choice(cat_ids)) if rng.random() < wrong_class_rate else cat
                dets.append({"image_id": img_id, "category_id": dcat, "score": float(rng.uniform(0.2, 1.0)),
                             "bbox": [float(x + jx), float(y + jy), float(max(1.0, bw + jw)),
                                      float(max(1.0, bh + jh))]})
        for _ in range(rng.poisson(false_positives_per_image)):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            dets.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)),
                         "score": float(rng.uniform(0.0, 0.6)),
                         "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)]})
    gt = {"info": {"description": "synthetic"}, "images": images, "annotations": anns,
          "categories": [{"id": c, "name": COCO_CLASSES[COCO_IDS.index(c)]} for c in cat_ids]}
    return gt, dets
