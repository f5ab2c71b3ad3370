"""Counting evaluation (PixMo-Count val540 / test540) with PR1's rule: count the boxes.

docs/method.md §4.3. The model is asked "Output all the bounding boxes of the {label}" and
answers, special tokens kept, e.g.

    <|object_ref_start|>bird<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|><|box_start|>(50,60),(70,80)<|box_end|><|im_end|>

The answer is the number of ``<|box_start|>…<|box_end|>`` groups that parse as
``(x1,y1),(x2,y2)`` (two here), or None when there are none; accuracy = % of rows whose answer
equals the integer ground truth exactly (None never does).

Resolved ambiguity: the eval script's exact box regex is not in the reference; we count a group
when its content parses as two coordinate pairs, the rule the training reward uses for the same
format (`count_valid_only=False` counts every group, parsable or not). "Pooled" (`all`) is
accuracy over all rows, which equals the mean of the two split accuracies because both splits
hold 540 items.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_GROUP = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIRS = re.compile(r"^\s*\({n},{n}\)\s*,\s*\({n},{n}\)\s*$".format(n=_NUM))


def parse_count(text: str, count_valid_only: bool = True) -> int | None:
    """Number of boxes in a completion, or None when it has none.

    >>> parse_count("<|box_start|>(1,2),(3,4)<|box_end|><|box_start|>oops<|box_end|>")
    1
    """
    groups = _GROUP.findall(text)
    n = sum(1 for g in groups if _PAIRS.match(g)) if count_valid_only else len(groups)
    return n or None


def counting_accuracy(answers: Sequence[int | None], ground_truth: Sequence[int]) -> float:
    """% of answers exactly equal to the ground-truth count (None counts as wrong)."""
    if len(answers) != len(ground_truth):
        raise ValueError("answers and ground_truth must have the same length")
    if not answers:
        return float("nan")
    pred = np.array([-1 if a is None else int(a) for a in answers], np.int64)
    return 100.0 * float(np.mean(pred == np.asarray(ground_truth, np.int64)))


def evaluate_counting(completions: Sequence[str], ground_truth: Sequence[int],
                      splits: Sequence[str] | None = None,
                      count_valid_only: bool = True) -> dict[str, dict[str, float]]:
    """{split: {"accuracy": %, "n": rows, "no_answer": % rows with no box}} plus pooled "all"."""
    answers = [parse_count(t, count_valid_only) for t in completions]
    names = ["all"] * len(answers) if splits is None else list(splits)
    if len(names) != len(answers):
        raise ValueError("splits must have one entry per completion")
    gt = list(ground_truth)
    out = {}
    for name in list(dict.fromkeys(names)) + ([] if splits is None else ["all"]):
        idx = [i for i, s in enumerate(names) if name == "all" or s == name]
        sel = [answers[i] for i in idx]
        out[name] = {"accuracy": counting_accuracy(sel, [gt[i] for i in idx]), "n": len(idx),
                     "no_answer": 100.0 * sum(a is None for a in sel) / max(len(sel), 1)}
    return out
