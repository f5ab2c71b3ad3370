"""Visual grounding (RefCOCO / RefCOCO+ / RefCOCOg): one box for a referring expression.

Prompt "Output the bounding box of the {problem} in the image."; the answer is Qwen2-VL's native
box, `<|object_ref_start|>…<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, with
coordinates in the [0, 1000) space of the image (so they do not depend on the resize). PR1's
metric: Acc@0.5, the share of answers whose box has IoU ≥ 0.5 with the ground truth.
"""

from __future__ import annotations

from pr1_jax import viz
from pr1_jax.data import synthetic
from pr1_jax.evaluation import grounding as grounding_eval
from pr1_jax.processing import chat
from pr1_jax.tasks.base import Task, register


def sft_target(example) -> str:
    x1, y1, x2, y2 = (int(round(v)) for v in example["solution"])
    return (f"<|object_ref_start|>{example['problem']}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|><|im_end|>")


def metrics(texts, examples) -> dict[str, float]:
    """Acc@0.5 / 0.75 / 0.9, mean IoU, parse failures (%), `n` (`evaluation.grounding`)."""
    return grounding_eval.evaluate_grounding(texts, [ex["solution"] for ex in examples])["all"]


def gallery(examples, texts) -> list[dict]:
    """The first 16: predicted box (red) and ground truth (green) in pixels of the image."""
    items = []
    for ex, text in list(zip(examples, texts))[:16]:
        h, w = ex["orig_hw"]
        pred, ok = grounding_eval.parse_box(text)
        items.append({"image": ex["image"], "pred": viz.qwen_norm_to_pixels([pred], w, h) if ok else [],
                      "gt": viz.qwen_norm_to_pixels([ex["solution"]], w, h), "caption": ex["problem"]})
    return items


TASK = register(Task(
    name="grounding", prompt=chat.QUESTION_TEMPLATES["pr1_grounding"],
    question_key="problem", default_rewards=("pr1_grounding", "pr1_grounding_format"),
    skip_special_tokens=False, eval_max_new_tokens=512, end_lengths="geometric:40",
    headline="acc@0.5", headline_label="Acc@0.5",
    paper="RefCOCO val/testA/testB Acc@0.5 89.1/91.4/84.5 (Qwen2-VL-2B base 86.8/89.6/82.0)",
    metrics=metrics, num_objects=lambda example: 1, write_synthetic=synthetic.write_grounding,
    sft_target=sft_target, gallery=gallery))
