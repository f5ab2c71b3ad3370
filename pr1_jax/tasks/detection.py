"""COCO detection (Qwen2.5-VL-3B): every object of the 80 categories as a JSON list of
`{"bbox_2d": [x1, y1, x2, y2], "label": name}`, in pixels of the image as the model saw it
(resized). Training rows hold `solution` = {target_id: COCO ids, target_box: pixel boxes of
the original image}. PR1's metric: COCO box AP (pycocotools).
"""

from __future__ import annotations

import json

from pr1_jax import coco
from pr1_jax.data import synthetic
from pr1_jax.evaluation import detection as detection_eval
from pr1_jax.processing import chat
from pr1_jax.tasks.base import Task, register


def sft_target(example) -> str:
    sol = example["solution"]
    items = [{"bbox_2d": [int(round(v)) for v in box], "label": coco.COCO_ID_TO_NAME[int(i)]}
             for i, box in zip(sol["target_id"], sol["target_box"])]
    return "```json\n" + json.dumps(items) + "\n```<|im_end|>"


def metrics(texts, examples) -> dict[str, float]:
    """COCO AP, AP50, … (fractions, -1 where a size range has no object) of the answers, each
    rescaled from the resized image to the original one (the correct evaluation; `pr1_jax.evaluate
    --pr1_exact` keeps PR1's unscaled boxes), against the rows' boxes as a COCO ground truth."""
    images, annotations, detections = [], [], []
    for i, (text, ex) in enumerate(zip(texts, examples)):
        h, w = ex["orig_hw"]
        images.append({"id": i, "height": int(h), "width": int(w)})
        for cid, (x1, y1, x2, y2) in zip(ex["solution"]["target_id"], ex["solution"]["target_box"]):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cid), "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1))})
        for det in detection_eval.parse_detections(text):
            det["bbox"] = detection_eval.rescale_boxes(det["bbox"], ex["resized_hw"], ex["orig_hw"]).tolist()
            detections.append({"image_id": i, **det})
    gt = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in coco.COCO_IDS]}
    return dict(detection_eval.coco_eval(gt, detections), n=len(images), detections=len(detections))


TASK = register(Task(
    name="detection", prompt=chat.QUESTION_TEMPLATES["pr1_detection"],
    question_key=None, default_rewards=("pr1_detection",), skip_special_tokens=True,
    eval_max_new_tokens=4096, end_lengths="lognormal:110:0.8", headline="AP", headline_label="COCO AP",
    paper="COCO val2017 AP/AP50/AP75 31.9/46.7/33.4 (Qwen2.5-VL-3B base 16.1/23.7/16.7)",
    metrics=metrics, num_objects=lambda example: len(example["solution"]["target_id"]),
    write_synthetic=synthetic.write_detection, sft_target=sft_target))
