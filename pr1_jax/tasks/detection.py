"""COCO detection (Qwen2.5-VL-3B): every object of the 80 categories as a JSON list of
`{"bbox_2d": [x1, y1, x2, y2], "label": name}`, in pixels of the image as the model saw it
(resized). Training rows hold `solution` = {target_id: COCO ids, target_box: pixel boxes of
the original image}. PR1's metric: COCO box AP (pycocotools).
"""

from __future__ import annotations

import collections
import json

from pr1_jax import coco
from pr1_jax.data import synthetic
from pr1_jax.evaluation import detection as detection_eval
from pr1_jax.processing import chat
from pr1_jax.tasks.base import Scores, Task, register


def sft_target(example) -> str:
    sol = example["solution"]
    items = [{"bbox_2d": [int(round(v)) for v in box], "label": coco.COCO_ID_TO_NAME[int(i)]}
             for i, box in zip(sol["target_id"], sol["target_box"])]
    return "```json\n" + json.dumps(items) + "\n```<|im_end|>"


def coco_ground_truth(answers) -> dict:
    """A COCO instances dict of the answers' rows (`solution` boxes, pixels of the image as
    given); the i-th answer is image id i."""
    images, annotations = [], []
    for i, a in enumerate(answers):
        h, w = a.original_hw
        images.append({"id": i, "height": int(h), "width": int(w)})
        sol = a.example["solution"]
        for cid, (x1, y1, x2, y2) in zip(sol["target_id"], sol["target_box"]):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cid), "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1))})
    names = coco.COCO_ID_TO_NAME
    categories = [{"id": c, "name": names[c]} for c in coco.COCO_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def _xyxy(xywh) -> list[float]:
    x, y, w, h = xywh
    return [x, y, x + w, y + h]


def score(answers, *, coco_gt: dict | None = None, backend: str = "pycocotools", robust: bool = False,
          rescale: bool = True, pr1_exact: bool = False, model_type: str = "qwen2_5_vl") -> Scores:
    """COCO AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l (fractions in [0, 1], -1 where a size
    range has no object), n, detections.

    The ground truth is `coco_gt` (a COCO instances JSON; each row's `image_id`) or, without it,
    the rows' own boxes. Answers are in pixels of the resized image: `rescale` maps them to the
    original image (the correct evaluation; PR1 compares them unscaled and skips the last image,
    `rescale=False, pr1_exact=True`). Parsing is PR1's unless `robust`. Qwen3-VL
    (`model_type="qwen3_vl"`) answers in [0, 1000] of the image: mapped to its pixels.
    """
    if coco_gt is None:
        coco_gt, image_ids = coco_ground_truth(answers), list(range(len(answers)))
    else:
        image_ids = [int(a.example["image_id"]) for a in answers]
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt["categories"]}
    by_image = collections.defaultdict(list)
    for ann in coco_gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    dets, records, gallery = [], [], []
    for a, image_id in zip(answers, image_ids):
        found = detection_eval.parse_detections(a.text, robust=robust)
        for det in found:
            if rescale:
                answer_hw = (1000, 1000) if model_type == "qwen3_vl" else a.resized_hw
                det["bbox"] = detection_eval.rescale_boxes(det["bbox"], answer_hw, a.original_hw).tolist()
            det["image_id"] = image_id
        dets.extend(found)
        records.append({"image_id": image_id, "detections": [{k: det[k] for k in ("category_id", "bbox")}
                                                             for det in found]})
        gt_anns = by_image.get(image_id, [])
        gallery.append({"pred": [_xyxy(det["bbox"]) for det in found] or None,
                        "pred_labels": [names.get(det["category_id"], "") for det in found],
                        "gt": [_xyxy(ann["bbox"]) for ann in gt_anns] or None,
                        "caption": f"{len(found)} pred / {len(gt_anns)} gt"})
    metrics = detection_eval.coco_eval(coco_gt, dets, backend=backend, img_ids=image_ids,
                                       pr1_skip_last_image=pr1_exact)
    return Scores(dict(metrics, n=len(answers), detections=len(dets)), records, gallery)


TASK = register(Task(
    name="detection", prompt=chat.QUESTION_TEMPLATES["pr1_detection"],
    question_key=None, eval_prompt=chat.EVAL_TEMPLATES["pr1_detection"],
    default_rewards=("pr1_detection",), skip_special_tokens=True,
    eval_max_new_tokens=4096, end_lengths="lognormal:110:0.8", headline="AP", headline_label="COCO AP",
    paper="COCO val2017 AP/AP50/AP75 31.9/46.7/33.4 (Qwen2.5-VL-3B base 16.1/23.7/16.7)",
    score=score, num_objects=lambda example: len(example["solution"]["target_id"]),
    write_synthetic=synthetic.write_detection, sft_target=sft_target, eval_formats=("coco", "detection")))
