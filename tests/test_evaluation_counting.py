"""Counting eval: number of parsed boxes vs GT count, per split and pooled."""

import pytest

from pr1_jax.evaluation import counting as c

REF = "<|object_ref_start|>bird<|object_ref_end|>"


def boxes(n):
    return "".join(f"<|box_start|>({i},{i}),({i + 5},{i + 5})<|box_end|>" for i in range(n))


def test_parse_count():
    assert c.parse_count(REF + boxes(3) + "<|im_end|><|endoftext|>") == 3
    assert c.parse_count(REF + "<|im_end|>") is None
    assert c.parse_count("There are 4 birds.") is None
    bad = REF + boxes(2) + "<|box_start|>(1,2)<|box_end|><|box_start|>( 1 , 2 ) , ( 3 , 4 )<|box_end|>"
    assert c.parse_count(bad) == 3  # the one-pair group is not a box; spaces are fine
    assert c.parse_count(bad, count_valid_only=False) == 4
    assert c.parse_count("<|box_start|>oops<|box_end|>") is None


def test_accuracy_and_splits():
    completions = [REF + boxes(2), REF + boxes(3), REF, REF + boxes(1), REF + boxes(5)]
    gt = [2, 2, 0, 1, 5]
    out = c.evaluate_counting(completions, gt, splits=["val", "val", "val", "test", "test"])
    assert out["val"]["accuracy"] == pytest.approx(100 / 3)  # None never equals GT, not even 0
    assert out["val"]["no_answer"] == pytest.approx(100 / 3)
    assert out["test"]["accuracy"] == 100.0
    assert out["all"]["accuracy"] == pytest.approx(60.0) and out["all"]["n"] == 5
    assert c.evaluate_counting(completions, gt)["all"]["accuracy"] == pytest.approx(60.0)
    assert c.counting_accuracy([None, 3], [0, 3]) == 50.0
