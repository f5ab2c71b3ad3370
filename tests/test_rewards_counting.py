"""Counting rewards: hand-computed values of PR1's Hungarian point reward and the strict twin."""

import json
import math

import numpy as np
import pytest

from pr1_jax import rewards
from pr1_jax.rewards.counting import SCALE

REF, BS, BE, END, PAD = "<|object_ref_start|>bird<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|im_end|>", "<|endoftext|>"


def ans(*boxes, tail=END):
    return REF + "".join(f"{BS}{b}{BE}" for b in boxes) + tail


def sq(cx, cy, h=10):
    return f"({cx - h},{cy - h}),({cx + h},{cy + h})"


GT3 = [[100, 100], [400, 400], [700, 700]]


def one(name, text, gt, key="solution", **kw):
    out = rewards.get(name)([text], **{key: [gt]}, **kw)
    assert out.dtype == np.float32 and out.shape == (1,)
    return float(out[0])


@pytest.mark.parametrize("text, gt, expected", [
    (ans(sq(100, 100), sq(400, 400), sq(700, 700)), GT3, 1.0),
    (ans("(0,0),(200,200)", "(600,600),(800,800)"), GT3, 2 / 3),              # n̂ < n, exact centres
    (ans(sq(100, 100), sq(400, 400), sq(700, 700)), [[100, 130], [700, 660]],  # n̂ > n, d = 30, 40
     2 / 3 * (1 - 35 / SCALE)),
    (ans(sq(200, 200)) + PAD * 4, [[100, 100], [300, 300]], 0.5 * (1 - 100 * math.sqrt(2) / SCALE)),
    (ans(sq(100, 100), sq(400, 400), tail=END + f"{BS}{sq(700, 700)}{BE}"), GT3, 1.0),  # boxes after <|im_end|> count
    (ans(sq(100, 100), "(a,b),(c,d)", sq(700, 700)), GT3, 2 / 3),              # unparsable group skipped
    (ans("(0x10, 1e1),(16, 10)"), [[16, 10]], 1.0),                             # eval: hex and floats
    (ans("[10,20],[30,40]"), [[20, 30]], 1.0),                                  # lists unpack too
    (ans("(1,2),(3,4),(5,6)"), [[2, 3]], 0.0),                                  # 3 pairs: skipped → no point
    (ans("(5000,5000),(5000,5000)"), [[0, 0]], 1 - 5000 * math.sqrt(2) / SCALE),  # = −4: PR1 does not clip
    (ans("(1j,0),(0,0)"), [[0, 0]], 0.0),                                       # complex centre: PR1 raises → 0
    (ans(sq(100, 100)), [], 0.0),                                               # empty GT
    (ans(sq(100, 100))[:-len(END)], GT3, 0.0),                                  # gate: no <|im_end|>
    (" " + ans(sq(100, 100)), GT3, 0.0),                                        # gate anchored at the start
    (f"{REF}{BS}(1,2)<x{BE}{END}", GT3, 0.0),                                   # gate: '<' inside a box
    ("", GT3, 0.0), ("<", GT3, 0.0),
])
def test_pr1_counting_values(text, gt, expected):
    assert one("pr1_counting", text, gt) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_pr1_counting_gt_columns():
    text = ans("(0,0),(200,200)", "(600,600),(800,800)")
    fn = rewards.get("pr1_counting")
    assert fn([text], clicks=[GT3])[0] == pytest.approx(2 / 3)
    assert fn([text], solution=[json.dumps(GT3)])[0] == pytest.approx(2 / 3)
    assert fn([text], solution=["3"], clicks=[GT3], problem=["bird"], image=[None])[0] == pytest.approx(2 / 3)
    assert fn([text], clicks=[[{"x": 100, "y": 100}, {"x": 700, "y": 700}]])[0] == pytest.approx(1.0)


@pytest.mark.parametrize("text, gt, expected", [
    (ans(sq(100, 100), sq(400, 400), sq(700, 700)), GT3, 1.0),
    (ans("(0,0),(200,200)", "(600,600),(800,800)"), GT3, 2 / 3),
    (ans(sq(200, 200), sq(200, 200), sq(200, 200)), [[100, 100], [200, 200], [300, 300]], 1 / 3),  # duplicates
    (ans(sq(200, 200), sq(201, 200)), [[200, 200], [210, 200]], 0.5),                        # near-duplicate (IoU .905)
    (ans(sq(100, 100), "(50,50),(40,40)"), [[100, 100], [45, 45]], 0.5),                      # malformed box: false pred
    (ans("(5000,5000),(5000,5000)"), [[0, 0]], 0.0),                                          # clipped, distance clipped
    (ans("(990,990),(2000,2000)"), [[995, 995]], 1.0),                                        # clipped to 1000
    (ans(sq(100, 100), sq(400, 400), tail=END + f"{BS}{sq(700, 700)}{BE}"), GT3, 0.0),        # trailing boxes: format
    (ans(sq(100, 100), sq(400, 400), sq(700, 700)) + PAD * 3 + "\n", GT3, 1.0),
    (ans("(0x10, 1e1),(16, 10)"), [[16, 10]], 0.0),                                           # no eval
    ("", GT3, 0.0), ("<", GT3, 0.0),
])
def test_counting_strict_values(text, gt, expected):
    assert one("counting_strict", text, gt) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_batched_matches_singles_with_varied_sizes():
    rng = np.random.default_rng(1)
    texts, gts = [], []
    for _ in range(150):
        n, m = rng.integers(1, 40), rng.integers(1, 25)
        pts = rng.integers(10, 990, (n, 2))
        texts.append(ans(*[sq(x, y, 5) for x, y in pts]))
        gts.append(rng.integers(0, 1000, (m, 2)).tolist())
    for name in ("pr1_counting", "counting_strict"):
        batch = rewards.get(name)(texts, clicks=gts)
        single = np.asarray([one(name, t, g, key="clicks") for t, g in zip(texts, gts)], np.float32)
        np.testing.assert_allclose(batch, single, rtol=0, atol=1e-6)
        assert (batch > 0).all()
