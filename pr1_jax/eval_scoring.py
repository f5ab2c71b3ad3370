"""`pr1_jax.evaluate`'s scoring: the evaluated rows of one task → (metrics, one record per
row for the report, gallery items). The metrics themselves live in `pr1_jax/evaluation/`
(PR1's definitions, see `pr1_jax.evaluate`'s table); this module only wires them to rows.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Sequence

from pr1_jax import viz
from pr1_jax.evaluation import counting as counting_eval
from pr1_jax.evaluation import detection as detection_eval
from pr1_jax.evaluation import grounding as grounding_eval
from pr1_jax.evaluation import ocr as ocr_eval
from pr1_jax.rewards.parsing import parse_qwen_boxes

if TYPE_CHECKING:
    from pr1_jax.eval_decoding import Completion
    from pr1_jax.evaluate import Example


@dataclasses.dataclass
class Scored:
    example: Example
    completion: Completion
    original_hw: tuple[int, int]  # (height, width) of the image as given
    resized_hw: tuple[int, int]  # ... and as the model saw it


def _xyxy(xywh: Sequence[float]) -> list[float]:
    x, y, w, h = xywh
    return [x, y, x + w, y + h]


def _score_grounding(done: Sequence[Scored]):
    texts = [d.completion.text for d in done]
    sols = [d.example.gt[0] for d in done]
    norms = [d.example.gt[1] for d in done]
    metrics = grounding_eval.evaluate_grounding(texts, sols, norms)["all"]
    pred, gt, parsed = grounding_eval.eval_boxes(texts, sols, norms)
    iou = grounding_eval.box_iou(pred, gt)
    records, gallery = [], []
    for d, p, g, ok, v in zip(done, pred, gt, parsed, iou):
        records.append({"pred_box": p.tolist(), "gt_box": g.tolist(), "parsed": bool(ok), "iou": float(v)})
        h, w = d.original_hw  # both boxes are in Qwen2-VL's [0, 1000) space of the image
        gallery.append({"pred": viz.qwen_norm_to_pixels(p, w, h)[None], "gt": viz.qwen_norm_to_pixels(g, w, h)[None],
                        "caption": f"IoU {v:.2f} {d.example.problem}"})
    return metrics, records, gallery


def _score_counting(done: Sequence[Scored]):
    texts = [d.completion.text for d in done]
    gts = [d.example.gt for d in done]
    metrics = counting_eval.evaluate_counting(texts, gts)["all"]
    records, gallery = [], []
    for d, text, g in zip(done, texts, gts):
        answer = counting_eval.parse_count(text)
        records.append({"count": answer, "gt_count": g, "correct": answer == g})
        h, w = d.original_hw
        boxes = viz.qwen_norm_to_pixels(parse_qwen_boxes(text)[0], w, h)
        gallery.append({"pred": boxes, "caption": f"{answer or 0}/{g} {d.example.problem}"})
    return metrics, records, gallery


def _score_detection(done: Sequence[Scored], *, coco_gt: dict, backend: str, robust: bool, rescale: bool,
                     pr1_exact: bool):
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt["categories"]}
    by_image = collections.defaultdict(list)
    for a in coco_gt["annotations"]:
        by_image[a["image_id"]].append(a)
    dets, records, gallery = [], [], []
    for d in done:
        image_id = d.example.gt
        found = detection_eval.parse_detections(d.completion.text, robust=robust)
        for det in found:
            if rescale:
                det["bbox"] = detection_eval.rescale_boxes(det["bbox"], d.resized_hw, d.original_hw).tolist()
            det["image_id"] = image_id
        dets.extend(found)
        records.append({"image_id": image_id, "detections": [{k: det[k] for k in ("category_id", "bbox")}
                                                             for det in found]})
        gt_anns = by_image.get(image_id, [])
        gallery.append({"pred": [_xyxy(det["bbox"]) for det in found] or None,
                        "pred_labels": [names.get(det["category_id"], "") for det in found],
                        "gt": [_xyxy(a["bbox"]) for a in gt_anns] or None,
                        "caption": f"{len(found)} pred / {len(gt_anns)} gt"})
    img_ids = [d.example.gt for d in done]
    metrics = detection_eval.coco_eval(coco_gt, dets, backend=backend, img_ids=img_ids,
                                       pr1_skip_last_image=pr1_exact)
    metrics["n"] = len(done)
    metrics["detections"] = len(dets)
    return metrics, records, gallery


def _score_ocr(done: Sequence[Scored]):
    texts = [d.completion.text for d in done]
    gts = [d.example.gt for d in done]
    metrics = ocr_eval.evaluate_ocr(texts, gts)["all"]
    records = [{"gt": g, **ocr_eval.ocr_sample_metrics(t, g)} for t, g in zip(texts, gts)]
    return metrics, records, []


# task → scorer(done, **task options) → (metrics, records, gallery items)
SCORERS = {"grounding": _score_grounding, "counting": _score_counting, "detection": _score_detection,
           "ocr": _score_ocr}
