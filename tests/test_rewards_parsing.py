"""Parsing helpers shared by rewards and evaluation, including the safe stand-in for eval()."""

import json
import warnings

import numpy as np
import pytest

from pr1_jax.rewards import parsing as P


def eval_center(group):
    """PR1's per-group rule with the real eval (only used on harmless alphabets here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (x1, y1), (x2, y2) = eval(group, {"__builtins__": {}}, {})  # noqa: S307 - test oracle
        return ((x1 + x2) / 2, (y1 + y2) / 2)
    except Exception:  # noqa: BLE001 — test oracle: any failure of eval means "no centre"
        return None


def test_box_center_matches_eval_on_random_groups():
    rng = np.random.default_rng(0)
    pieces = list("0123456789") + ["(", ")", ",", " ", "-", "+", ".", "[", "]", "\t", "e", "j", "x", "_",
                                   "(10,20),(30,40)", "(1, 2), (3, 4)", "0x1f", "1e3", "--", "00", "01"]
    n_ok = 0
    for _ in range(6000):
        s = "".join(rng.choice(pieces, rng.integers(0, 14)))
        if rng.random() < 0.3:
            s = f"({rng.integers(-50, 999)},{rng.integers(0, 999)}),({rng.integers(0, 999)}, {s or 0})"
        ours, ref = P.pr1_box_center(s), eval_center(s)
        assert ours == ref or (ours is not None and ref is not None and np.allclose(ours, ref)), s
        n_ok += ref is not None
    assert n_ok > 200  # the oracle accepted a fair share, so both paths were exercised


@pytest.mark.parametrize("group, center", [
    ("(10,20),(30,40)", (20.0, 30.0)), (" (10, 20) , (30, 40) ", (20.0, 30.0)), ("\t(0,0),(1,1)", (0.5, 0.5)),
    ("[10,20],[30,40]", (20.0, 30.0)), ("((10,20),(30,40))", (20.0, 30.0)), ("(10,20),(30,40),", (20.0, 30.0)),
    ("(0x10,2),(0,2)", (8.0, 2.0)), ("(1_000,0),(0,0)", (500.0, 0.0)), ("(2**3,0),(0,0)", (4.0, 0.0)),
    ("(-5,+3),(5,3)", (0.0, 3.0)), ("(1+1,0),(0,0)", (1.0, 0.0)), ("(True,0),(1,0)", (1.0, 0.0)),
    ("(01,2),(3,4)", None), ("(1,2),(3,4),(5,6)", None), ("(1,2,3,4)", None), ("(a,b),(c,d)", None),
    ("('1','2'),('3','4')", None), ("(1/0,0),(0,0)", None), ("(10**400,0),(0,0)", None), ("", None),
    ("(1,2),\r(3,4)", None), ("(" * 300 + ")" * 300, None), ("(1,2),(3,4)\x00", None),
    ("(9**9**9,0),(0,0)", None),   # eval would hang; we refuse the huge power
])
def test_box_center_cases(group, center):
    assert P.pr1_box_center(group) == center


def test_eval_numeric_refuses_code():
    for src in ["__import__('os')", "len('ab')", "x", "{1, 2}", "{1: 2}", "[i for i in (1, 2)]", "(1,2)*2", "'a'"]:
        with pytest.raises(Exception):
            P.eval_numeric(src)


def test_find_box_pr1_order_and_variants():
    assert P.find_box_pr1("a (1,2),(3,4) b (5, 6, 7, 8) c [9, 10, 11, 12]") == [9, 10, 11, 12]
    assert P.find_box_pr1("a (1,2),(3,4) b (5, 6, 7, 8)") == [5, 6, 7, 8]
    assert P.find_box_pr1("(1.5,2),(3,-4)") == [1.5, 2, 3, -4]
    assert P.find_box_pr1("(1 ,2),(3,4)") is None            # no space before the comma in PR1's regex
    assert P.find_box_pr1("(1,2 ),(3,4)") is None            # nor before ')'
    assert P.find_box_pr1("[1., 2, 3, 4]") is None
    assert P.find_box_pr1("[1., 2, 3, 4]", number=P.PR1_EVAL_NUMBER) == [1, 2, 3, 4]
    assert P.pr1_grounding_box("nothing") == ([0, 0, 0, 0], False)
    assert P.pr1_grounding_box("<|box_start|>(1,2),(3,4)") == ([1, 2, 3, 4], True)


def test_qwen_boxes():
    boxes, bad = P.parse_qwen_boxes("<|box_start|>(1,2),(3,4)<|box_end|><|box_start|>(x)<|box_end|>"
                                    "<|box_start|>(5, 6),( 7,8 )<|box_end|>")
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bad == 1
    assert P.parse_qwen_boxes("none")[0].shape == (0, 4)


def test_ground_truth_parsers():
    np.testing.assert_array_equal(P.parse_box_value("[1, 2, 3, 4]"), [1, 2, 3, 4])
    np.testing.assert_array_equal(P.parse_box_value((1, 2, 3, 4.5)), [1, 2, 3, 4.5])
    np.testing.assert_array_equal(P.parse_box_value(np.arange(4)), [0, 1, 2, 3])
    for bad in ["[1, 2, 3]", "abc", None, [1, 2, "3", 4], [[1, 2], [3, 4]], [1, 2, 3, float("inf")]]:
        assert P.parse_box_value(bad) is None
    for good in ([[1, 2], [3, 4]], "[[1, 2], [3, 4]]", [{"x": 1, "y": 2}, {"x": 3, "y": 4}], np.array([[1, 2], [3, 4]])):
        np.testing.assert_array_equal(P.parse_points(good), [[1, 2], [3, 4]])
    assert P.parse_points([]).shape == (0, 2)
    for bad in ([[1, 2, 3]], "x", [["a", 1]], 5):
        assert P.parse_points(bad) is None
    ids, boxes = P.parse_detection_solution(json.dumps({"target_id": [1, 3], "target_box": [[0, 0, 1, 1], [1, 1, 2, 2]]}))
    assert ids.tolist() == [1, 3] and boxes.shape == (2, 4)
    assert P.parse_detection_solution({"target_id": [1], "target_box": []}) is None
    assert P.parse_detection_solution({"target_id": [1.5], "target_box": [[0, 0, 1, 1]]}) is None
    assert P.parse_detection_solution({"target_id": [], "target_box": []})[0].shape == (0,)


def test_detection_parsers():
    text = json.dumps([{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"label": "cat"}, {"bbox_2d": [0, 0, 1, 1], "label": "Cat"},
                       "str", [1], {"bbox_2d": [0, 0, 1, 1], "label": ["cat"]}])
    ids, boxes, fmt = P.pr1_parse_detection(text)
    assert ids == [17] and boxes.tolist() == [[1, 2, 3, 4]] and fmt == pytest.approx(1 - 5 / 6)
    assert P.pr1_parse_detection("```json\n" + text + "\n```")[0] == [17]
    for bad_box in ["[1, 2, 3]", '"1, 2, 3, 4"', "[1, 2, 3, null]", "[1, 2, 3, [4]]", "[[1, 2], [3, 4]]",
                    "[1, 2, 3, 18446744073709551616]", '[1, 2, 3, "4"]']:
        assert P.pr1_parse_detection(f'[{{"bbox_2d": {bad_box}, "label": "cat"}}]') is None, bad_box
    # non-finite values parse (PR1's torch.tensor accepts them); the reward fails them at the matcher
    assert np.isnan(P.pr1_parse_detection('[{"bbox_2d": [1, 2, 3, NaN], "label": "cat"}]')[1]).any()
    assert P.pr1_parse_detection('[{"bbox_2d": [true, 2, 3, 4], "label": "cat"}]')[1].tolist() == [[1, 2, 3, 4]]
    assert P.pr1_parse_detection("[" * 100000) is None
    assert P.pr1_detection_items('[{"bbox_2d": "x", "label": "dog"}, 3]') == ([18], ["x"], 2)
    ids, boxes, n = P.parse_detection_items(text)
    assert ids == [17, 17] and n == 6
    assert P.parse_detection_items("nope") is None and P.parse_detection_items("3") is None
    assert P.parse_detection_items("[]") == ([], [], 0)


def test_load_json_equals_json_loads():
    rng = np.random.default_rng(3)
    pieces = ["[", "]", "{", "}", ",", ":", '"a"', "1", "-2.5", "NaN", "true", " ", "\n", "\t", "\x0c", "\ufeff", "x", '"']
    for _ in range(5000):
        t = "".join(rng.choice(pieces, rng.integers(0, 12)))
        try:
            ref = (True, json.loads(t))
        except Exception:  # noqa: BLE001 — test oracle: any json.loads failure means "not JSON"
            ref = (False, None)
        ok, val = P.load_json(t)
        assert ok == ref[0], t
        assert not ok or json.dumps(val) == json.dumps(ref[1]), t
