"""Pointing: "Point to the {problem} in the image." answered with one point "(x,y)" in
Qwen2-VL's [0, 1000) space of the image — referring-expression pointing, as robot and GUI
agents use it (not one of Perception-R1's tasks). The rows are grounding's (a referring
expression and its box, `data.synthetic.write_grounding` writes them); a point is right when
it falls inside the box, which is both the reward (`point_in_box`) and the metric (point
accuracy, %). The format reward (`point_format`) pays 1 for an answer that is exactly one point.

This file is the whole task: the package registers every module of `pr1_jax/tasks`, the
readers read rows through `columns` and `parse_solution`, the rewards register here.
    python -m pr1_jax.train --config=configs/pointing.py
"""

from __future__ import annotations

import math
import re

import numpy as np

from pr1_jax import rewards, viz
from pr1_jax.data import rows, synthetic
from pr1_jax.rewards.parsing import ENDOFTEXT, as_text, parse_box_value, solution_column
from pr1_jax.tasks.base import Scores, Task, register

# "(x,y)" with integer or decimal coordinates, spaces allowed.
_POINT = re.compile(r"\(\s*([-+]?\d+(?:\.\d+)?)\s*,\s*([-+]?\d+(?:\.\d+)?)\s*\)")
_ONLY_A_POINT = re.compile(r"\s*" + _POINT.pattern + r"\s*(?:<\|im_end\|>)?\s*")


def parse_point(text: str) -> tuple[float, float] | None:
    """The first "(x, y)" of an answer, or None (none, or not finite)."""
    m = _POINT.search(text) if isinstance(text, str) else None
    if m is None:
        return None
    x, y = float(m.group(1)), float(m.group(2))
    return (x, y) if math.isfinite(x) and math.isfinite(y) else None


def inside(point: tuple[float, float] | None, box) -> bool:
    """Whether `point` lies in the box [x1, y1, x2, y2] (edges included; a list or its string);
    False for no point or a box that is not four finite numbers (`rewards.parsing`)."""
    b = parse_box_value(box)
    return point is not None and b is not None and b[0] <= point[0] <= b[2] and b[1] <= point[1] <= b[3]


@rewards.register("point_in_box")
def point_in_box(completions, solution=None, **columns) -> np.ndarray:
    """1 when the answer's first point falls in the ground-truth box, else 0. A bad answer or
    box scores 0; a `solution` column of another length than the completions is a caller's
    mistake and raises, as for PR1's rewards."""
    boxes = solution_column({"solution": solution, **columns}, len(completions), "solution")
    return np.array([float(inside(parse_point(as_text(t)), box)) for t, box in zip(completions, boxes)], np.float32)


@rewards.register("point_format")
def point_format(completions, **_) -> np.ndarray:
    """1 when the answer is exactly one point (then <|im_end|>), else 0; `<|endoftext|>`
    padding (kept by the decoding, as grounding's) is removed first, as PR1's rewards do."""
    texts = [as_text(c).replace(ENDOFTEXT, "") for c in completions]
    return np.array([float(_ONLY_A_POINT.fullmatch(t) is not None) for t in texts], np.float32)


def sft_target(example) -> str:
    x1, y1, x2, y2 = example["solution"]
    return f"({int(round((x1 + x2) / 2))},{int(round((y1 + y2) / 2))})<|im_end|>"


def score(answers, **_options) -> Scores:
    """accuracy: % of answers whose point is in the box; parse_fail: % with no point; n. Per row
    the point and whether it hit; the gallery shows the point as a small red square, the box in green."""
    points = [parse_point(a.text) for a in answers]
    hits = [inside(p, a.example["solution"]) for p, a in zip(points, answers)]
    n = len(hits)
    metrics = {"accuracy": 100.0 * sum(hits) / max(n, 1),
               "parse_fail": 100.0 * sum(p is None for p in points) / max(n, 1), "n": n}
    records, gallery = [], []
    for a, p, hit in zip(answers, points, hits):
        records.append({"point": p, "hit": hit})
        h, w = a.original_hw
        pred = None if p is None else viz.qwen_norm_to_pixels([[p[0] - 8, p[1] - 8, p[0] + 8, p[1] + 8]], w, h)
        box = parse_box_value(a.example["solution"])
        gallery.append({"pred": pred, "gt": None if box is None else viz.qwen_norm_to_pixels([box], w, h),
                        "caption": a.example.get("problem", "")})
    return Scores(metrics, records, gallery)


TASK = register(Task(
    name="pointing", prompt="Point to the {question} in the image.", question_key="problem",
    eval_prompt="Point to the {question} in the image.",
    default_rewards=("point_in_box", "point_format"), skip_special_tokens=False, eval_max_new_tokens=32,
    end_lengths="geometric:10", headline="accuracy", headline_label="point accuracy (%)",
    paper="not a Perception-R1 task (no paper number)", score=score, num_objects=lambda example: 1,
    write_synthetic=synthetic.write_grounding, sft_target=sft_target,
    columns=("image", "problem", "solution"), parse_solution=rows.solution_box))
