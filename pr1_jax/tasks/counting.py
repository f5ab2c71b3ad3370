"""Counting (PixMo-Count): "Output all the bounding boxes of the {problem}"; the count is the
number of boxes in the answer. Training rows hold the clicked points (`solution`, one per
object), evaluation rows the count; PR1's metric is the share of exact counts. There is no
native-format SFT answer: the data has points, not boxes.
"""

from __future__ import annotations

from pr1_jax import viz
from pr1_jax.data import synthetic
from pr1_jax.evaluation import counting as counting_eval
from pr1_jax.processing import chat
from pr1_jax.rewards.parsing import parse_qwen_boxes
from pr1_jax.tasks.base import Scores, Task, register


def num_objects(example) -> int:
    """Clicks of a training row, or the count of an evaluation row."""
    sol = example["solution"]
    return int(sol) if isinstance(sol, (int, float)) else len(sol)


def true_count(example) -> int:
    """The ground-truth count: the `count` column of evaluation rows, else the number of clicks."""
    return int(example["count"]) if example.get("count") is not None else num_objects(example)


def score(answers, **_options) -> Scores:
    """accuracy (% exact counts), no_answer (% with no box), n (`evaluation.counting`); per row
    the answer's count; the gallery shows the answer's boxes."""
    texts = [a.text for a in answers]
    gts = [true_count(a.example) for a in answers]
    metrics = counting_eval.evaluate_counting(texts, gts)["all"]
    records, gallery = [], []
    for a, g in zip(answers, gts):
        answer = counting_eval.parse_count(a.text)
        records.append({"count": answer, "gt_count": g, "correct": answer == g})
        h, w = a.original_hw
        boxes = viz.qwen_norm_to_pixels(parse_qwen_boxes(a.text)[0], w, h)
        gallery.append({"pred": boxes, "caption": f"{answer or 0}/{g} {a.example.get('problem', '')}"})
    return Scores(metrics, records, gallery)


TASK = register(Task(
    name="counting", prompt=chat.QUESTION_TEMPLATES["pr1_counting"],
    question_key="problem", eval_prompt=chat.EVAL_TEMPLATES["pr1_counting"],
    default_rewards=("pr1_counting",), skip_special_tokens=False,
    eval_max_new_tokens=512, end_lengths="lognormal:120:0.8", headline="accuracy", headline_label="accuracy (%)",
    paper="PixMo-Count val/test accuracy 78.1/75.6 (Qwen2-VL-2B base 60.2/50.5)",
    score=score, num_objects=num_objects, write_synthetic=synthetic.write_counting,
    eval_formats=("counting_eval", "counting")))
