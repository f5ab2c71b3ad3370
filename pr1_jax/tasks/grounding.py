"""Visual grounding (RefCOCO / RefCOCO+ / RefCOCOg): one box for a referring expression.

Prompt "Output the bounding box of the {problem} in the image."; the answer is Qwen2-VL's native
box, `<|object_ref_start|>…<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, with
coordinates in the [0, 1000) space of the image (so they do not depend on the resize). PR1's
metric: Acc@0.5, the share of answers whose box has IoU ≥ 0.5 with the ground truth.
"""

from __future__ import annotations

import numpy as np

from pr1_jax import viz
from pr1_jax.data import synthetic
from pr1_jax.evaluation import grounding as grounding_eval
from pr1_jax.processing import chat
from pr1_jax.rewards.grounding import strict_grounding_box
from pr1_jax.rewards.parsing import ENDOFTEXT, parse_box_value
from pr1_jax.tasks.base import Scores, Task, register


def sft_target(example) -> str:
    x1, y1, x2, y2 = (int(round(v)) for v in example["solution"])
    return (f"<|object_ref_start|>{example['problem']}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|><|im_end|>")


def qwen3_boxes(texts, norms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Qwen3-VL's answers: one `[x1, y1, x2, y2]` in [0, 1000] of the image (its JSON
    `{"bbox_2d": [...], "label": ...}`), parsed strictly (`rewards.grounding.strict_grounding_box`)
    → (pred [N, 4], gt [N, 4], parsed [N]) as `evaluation.grounding.eval_boxes` returns them."""
    pred, parsed = np.zeros((len(texts), 4)), np.zeros(len(texts), bool)
    for i, text in enumerate(texts):
        box = strict_grounding_box(text.replace(ENDOFTEXT, ""))
        if box is not None:
            pred[i], parsed[i] = box, True
    gt = np.array([parse_box_value(n) if parse_box_value(n) is not None else [0.0] * 4 for n in norms], np.float64)
    return pred, gt.reshape(-1, 4), parsed


def score(answers, *, model_type: str = "qwen2_vl", **_options) -> Scores:
    """Acc@0.1/0.3/0.5/0.75/0.95, center_acc, avg, mean IoU (×100), parse_fail (%), n
    (`evaluation.grounding`); per row the parsed box and its IoU; the gallery shows the
    predicted box (red) over the ground truth (green), in pixels of the image as given.
    Qwen2-VL / Qwen2.5-VL answers are parsed as PR1's evaluation does; `model_type="qwen3_vl"`
    reads Qwen3-VL's JSON boxes (`qwen3_boxes`, docs/qwen3_vl.md)."""
    texts = [a.text for a in answers]
    sols = [a.example["solution"] for a in answers]
    norms = [a.example.get("normalized_solution", a.example["solution"]) for a in answers]
    if model_type == "qwen3_vl":
        pred, gt, parsed = qwen3_boxes(texts, norms)
        metrics = grounding_eval.grounding_metrics(pred, gt)
        if metrics["n"]:
            metrics["parse_fail"] = 100.0 * float(np.mean(~parsed))
    else:
        metrics = grounding_eval.evaluate_grounding(texts, sols, norms)["all"]
        pred, gt, parsed = grounding_eval.eval_boxes(texts, sols, norms)
    iou = grounding_eval.box_iou(pred, gt)
    records, gallery = [], []
    for a, p, g, ok, v in zip(answers, pred, gt, parsed, iou):
        records.append({"pred_box": p.tolist(), "gt_box": g.tolist(), "parsed": bool(ok), "iou": float(v)})
        h, w = a.original_hw  # both boxes are in Qwen2-VL's [0, 1000) space of the image
        gallery.append({"pred": viz.qwen_norm_to_pixels(p, w, h)[None] if ok else None,
                        "gt": viz.qwen_norm_to_pixels(g, w, h)[None],
                        "caption": f"IoU {v:.2f} {a.example.get('problem', '')}"})
    return Scores(metrics, records, gallery)


TASK = register(Task(
    name="grounding", prompt=chat.QUESTION_TEMPLATES["pr1_grounding"],
    question_key="problem", eval_prompt=chat.EVAL_TEMPLATES["pr1_grounding"],
    default_rewards=("pr1_grounding", "pr1_grounding_format"),
    skip_special_tokens=False, eval_max_new_tokens=512, end_lengths="geometric:40",
    headline="acc@0.5", headline_label="Acc@0.5",
    paper="RefCOCO val/testA/testB Acc@0.5 89.1/91.4/84.5 (Qwen2-VL-2B base 86.8/89.6/82.0)",
    score=score, num_objects=lambda example: 1, write_synthetic=synthetic.write_grounding,
    sft_target=sft_target))
