"""Grounding eval: PR1's parsing branches and hand-computed metrics."""

import numpy as np
import pytest

from pr1_jax.evaluation import grounding as g

BS, BE = "<|box_start|>", "<|box_end|>"


@pytest.mark.parametrize("text,box", [
    (f"<|object_ref_start|>man<|object_ref_end|>{BS}(10,20),(30,40){BE}<|im_end|>", [10, 20, 30, 40]),
    ("[1, 2.5, 3, 4]", [1, 2.5, 3, 4]),
    ("(5,6,7,8)", [5, 6, 7, 8]),
    ("( -5 , 6),( 7,8)", None),  # pattern 3 needs the comma right after the first number
    ("(-5, 6),( 7,8)", [-5, 6, 7, 8]),
    ("at (1,2),(3,4) or [9,9,9,9]", [9, 9, 9, 9]),  # square brackets win over pairs
    ("[0.1,0.2,0.3]", None),
    ("no box here", None),
    ("[1., 2., 3., 4.]", [1, 2, 3, 4]),  # eval regex -?\d+\.?\d* accepts a bare trailing dot
])
def test_parse_box(text, box):
    parsed, ok = g.parse_box(text)
    assert ok == (box is not None)
    np.testing.assert_array_equal(parsed, box if box is not None else [0, 0, 0, 0])


def test_eval_boxes_branches():
    completions = [
        f"{BS}(100,200),(300,400){BE}<|im_end|>",  # special tokens → normalized_solution
        "[0.1234, 0.5, 0.75, 0.999]",  # no <|box_start|> → int(1000 v) vs solution
        "nothing",  # parse failure → [0, 0, 0, 0]
    ]
    solutions = ["[1, 1, 2, 2]", [123, 500, 750, 999], "[0, 0, 10, 10]"]
    normalized = ["[100, 200, 300, 400]", None, None]
    pred, gt, parsed = g.eval_boxes(completions, solutions, normalized)
    np.testing.assert_array_equal(pred, [[100, 200, 300, 400], [123, 500, 750, 999], [0, 0, 0, 0]])
    np.testing.assert_array_equal(gt, [[100, 200, 300, 400], [123, 500, 750, 999], [0, 0, 10, 10]])
    assert parsed.tolist() == [True, True, False]


def test_box_iou_hand_computed():
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 10, 10], [0, 0, 0, 0]])
    gt = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 30, 10], [0, 0, 0, 0]])
    iou = g.box_iou(pred, gt)
    np.testing.assert_allclose(iou, [100 / (100 + 1e-10), 50 / 150, 0, 0, 0], rtol=1e-12)


def test_grounding_metrics_hand_computed():
    gt = np.array([[0, 0, 10, 10]] * 5, float)
    pred = np.array([
        [0, 0, 10, 10],  # IoU ≈ 1
        [0, 0, 10, 8],  # IoU 0.8
        [5, 0, 15, 10],  # IoU 1/3, centre (10, 5) on the edge → inside
        [0, 0, 2, 1],  # IoU 0.02, centre inside
        [0, 0, 0, 0],  # failed parse: IoU 0, centre (0, 0) on the GT corner → counts (PR1 as is)
    ], float)
    m = g.grounding_metrics(pred, gt)
    assert m["n"] == 5
    assert m["iou"] == pytest.approx(100 * (1 + 0.8 + 1 / 3 + 0.02) / 5, rel=1e-9)
    assert m["acc@0.1"] == pytest.approx(60.0)
    assert m["acc@0.3"] == pytest.approx(60.0)
    assert m["acc@0.5"] == pytest.approx(40.0)
    assert m["acc@0.75"] == pytest.approx(40.0)
    assert m["acc@0.95"] == pytest.approx(20.0)  # 1 − 1e-12 ≥ 0.95; 0.8 is not
    assert m["center_acc"] == pytest.approx(100.0)
    assert m["avg"] == pytest.approx((40 + 40 + 20) / 3)


def test_paper_avg_definition():
    # RefCOCO val of the paper: (89.1 + 79.5 + 35.0) / 3 = 67.9
    assert round(np.mean([89.1, 79.5, 35.0]), 1) == 67.9


def test_evaluate_grounding_splits():
    completions = [f"{BS}(0,0),(10,10){BE}", f"{BS}(0,0),(5,5){BE}", "garbage", "[0.0, 0.0, 0.01, 0.01]"]
    solutions = [[0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 200, 200], [0, 0, 10, 10]]
    out = g.evaluate_grounding(completions, solutions, None, splits=["a", "a", "b", "b"])
    assert set(out) == {"a", "b", "all"}
    assert out["a"]["acc@0.5"] == pytest.approx(50.0)  # IoU 1 and 0.25
    assert out["b"]["acc@0.5"] == pytest.approx(50.0)  # parse failure 0, [0,0,10,10] exact
    assert out["b"]["parse_fail"] == pytest.approx(50.0)
    assert out["all"]["n"] == 4 and out["all"]["acc@0.5"] == pytest.approx(50.0)
    assert g.evaluate_grounding(completions[:1], solutions[:1])["all"]["acc@0.95"] == 100.0


def _random_boxes(rng, n):
    x = np.sort(rng.uniform(0, 1000, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, 1000, (n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)


def test_vectorised_matches_scalar_loop():
    rng = np.random.default_rng(0)
    p, q = _random_boxes(rng, 500), _random_boxes(rng, 500)
    iou = g.box_iou(p, q)
    for k in range(0, 500, 7):
        (a1, b1, a2, b2), (c1, d1, c2, d2) = p[k], q[k]
        inter = max(0, min(a2, c2) - max(a1, c1)) * max(0, min(b2, d2) - max(b1, d1))
        union = (a2 - a1) * (b2 - b1) + (c2 - c1) * (d2 - d1) - inter
        assert iou[k] == pytest.approx(inter / (union + 1e-10), rel=1e-12)
