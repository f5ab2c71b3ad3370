"""Counting (PixMo-Count): "Output all the bounding boxes of the {problem}"; the count is the
number of boxes in the answer. Training rows hold the clicked points (`solution`, one per
object), evaluation rows the count; PR1's metric is the share of exact counts. There is no
native-format SFT answer: the data has points, not boxes.
"""

from __future__ import annotations

from pr1_jax.data import synthetic
from pr1_jax.evaluation import counting as counting_eval
from pr1_jax.processing import chat
from pr1_jax.tasks.base import Task, register


def num_objects(example) -> int:
    """Clicks of a training row, or the count of an evaluation row."""
    sol = example["solution"]
    return int(sol) if isinstance(sol, (int, float)) else len(sol)


def metrics(texts, examples) -> dict[str, float]:
    """accuracy (%), no_answer (% with no box), n (`evaluation.counting`)."""
    return counting_eval.evaluate_counting(texts, [num_objects(ex) for ex in examples])["all"]


TASK = register(Task(
    name="counting", prompt=chat.QUESTION_TEMPLATES["pr1_counting"],
    question_key="problem", default_rewards=("pr1_counting",), skip_special_tokens=False,
    eval_max_new_tokens=512, end_lengths="lognormal:120:0.8", headline="accuracy", headline_label="accuracy (%)",
    paper="PixMo-Count val/test accuracy 78.1/75.6 (Qwen2-VL-2B base 60.2/50.5)",
    metrics=metrics, num_objects=num_objects, write_synthetic=synthetic.write_counting))
