"""Grounding rewards: hand-computed values of PR1's IoU²/format rewards and the strict twins."""

import numpy as np
import pytest

from pr1_jax import rewards

REF, BS, BE, END, PAD = "<|object_ref_start|>", "<|box_start|>", "<|box_end|>", "<|im_end|>", "<|endoftext|>"


def qwen(box, phrase="the dog", extra=""):
    (x1, y1), (x2, y2) = box
    return f"{REF}{phrase}<|object_ref_end|>{BS}({x1},{y1}),({x2},{y2}){BE}{extra}{END}"


def one(name, text, sol, **kw):
    out = rewards.get(name)([text], solution=[sol], **kw)
    assert out.dtype == np.float32 and out.shape == (1,)
    return float(out[0])


@pytest.mark.parametrize("text, sol, expected", [
    (qwen(((0, 0), (100, 100))), "[0, 0, 100, 100]", 1.0),                      # exact
    (qwen(((0, 0), (100, 100))), "[50, 0, 150, 100]", (5000 / 15000) ** 2),     # partial, 1-D shift
    (qwen(((0, 0), (100, 100))), [50, 50, 150, 150], (2500 / 17500) ** 2),      # partial, 2-D, GT as list
    (qwen(((0, 0), (100, 100))) + PAD * 5, "[0, 0, 100, 100]", 1.0),            # padding stripped
    (f"{BS}(0,0),(10{PAD}0,100){BE}", "[0, 0, 100, 100]", 1.0),                 # <|endoftext|> stripped anywhere
    ("[0.1, 0.2, 0.3, 0.4]", "[100, 200, 300, 400]", 1.0),                      # no <|box_start|>: int(1000·v)
    ("[0.1239, 0.2, 0.3, 0.4]", "[123, 200, 300, 400]", 1.0),                   # truncation: int(123.9) = 123
    ("[100, 200, 300, 400]", "[100, 200, 300, 400]", 0.0),                      # ints ×1000 → far away
    (qwen(((0, 0), (100, 100)), phrase="[0, 0, 10, 10]"), "[0, 0, 100, 100]", 1e-4),  # a list in the phrase wins
    (f"{BS}(0, 0, 100, 100),(0,0),(50,50){BE}", "[0, 0, 100, 100]", 1.0),       # (a,b,c,d) before (a,b),(c,d)
    (qwen(((0, 0), (100, 100)), extra=f"{BS}(500,500),(600,600){BE}"), "[0, 0, 100, 100]", 1.0),  # first box only
    ("no box here", "[0, 0, 100, 100]", 0.0),                                   # → [0,0,0,0]
    (f"{BS}(5,5),(5,5){BE}", "[5, 5, 5, 5]", 0.0),                              # zero union: PR1 raises, we give 0
    (f"{BS}(20,0),(10,10){BE}", "[0, 0, 100, 100]", 0.0),                       # malformed pred: inter 0
    ("[" + "9" * 400 + ", 0, 1, 1]", "[0, 0, 100, 100]", 0.0),                  # int(inf): PR1 raises, we give 0
    (qwen(((0, 0), (100, 100))), "not a box", 0.0),                             # malformed GT → 0
])
def test_pr1_grounding_values(text, sol, expected):
    assert one("pr1_grounding", text, sol) == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("text, expected", [
    (qwen(((0, 0), (100, 100))), 1.0),
    ("<", 1.0), (">", 1.0), ("<anything at all", 1.0), ("object_ref_start", 1.0), ("box_end junk", 1.0),
    ("im_end", 1.0), (PAD + "<", 1.0),          # padding removed first, then "<" matches
    ("", 0.0), (" <", 0.0), ("(10,20),(30,40)", 0.0), ("[1, 2, 3, 4]", 0.0), (PAD + "x", 0.0),
])
def test_pr1_grounding_format_values(text, expected):
    assert one("pr1_grounding_format", text, None) == expected


@pytest.mark.parametrize("text, expected", [
    (qwen(((0, 0), (100, 100))), 1.0),
    (qwen(((0, 0), (100, 100))) + PAD * 3 + "\n", 1.0),
    (qwen(((0.5, 0), (100, 100))), 1.0),
    (qwen(((0, 0), (100, 100)), extra=f"{BS}(0,0),(100,100){BE}"), 0.0),   # two boxes
    (qwen(((0, 0), (100, 100)))[:-len(END)], 0.0),                         # no <|im_end|>
    (qwen(((0, 0), (100, 100))) + "more text", 0.0),                       # text after <|im_end|>
    (f"{BS}(0,0),(100,100){BE}{END}", 0.0),                                # no object ref
    (qwen((("a", 0), (100, 100))), 0.0),
    ("<", 0.0), ("", 0.0),
])
def test_grounding_format_strict_values(text, expected):
    assert one("grounding_format_strict", text, None) == expected


@pytest.mark.parametrize("text, sol, kw, expected", [
    (qwen(((0, 0), (100, 100))), "[50, 0, 150, 100]", {}, 1 / 9),
    (qwen(((0, 0), (100, 100))), "[50, 0, 150, 100]", {"power": 1.0}, 1 / 3),
    (qwen(((0, 0), (100, 100)), extra=f"{BS}(0,0),(100,100){BE}"), "[0, 0, 100, 100]", {}, 0.0),  # duplicated
    (qwen(((0, 0), (100, 100)), phrase="[0, 0, 10, 10]"), "[0, 0, 100, 100]", {}, 1.0),  # phrase list ignored
    ("[0.1, 0.2, 0.3, 0.4]", "[100, 200, 300, 400]", {}, 1.0),             # normalised floats scaled
    ("[100, 200, 300, 400]", "[100, 200, 300, 400]", {}, 1.0),             # ints kept (PR1: 0)
    ("[1, 2, 3, 4] and [1, 2, 3, 4]", "[1, 2, 3, 4]", {}, 0.0),            # two lists
    (f"{BS}(20,0),(10,10){BE}", "[0, 0, 100, 100]", {}, 0.0),              # malformed
    (f"{BS}(x,0),(10,10){BE}", "[0, 0, 100, 100]", {}, 0.0),
    (f"{BS}(5,5),(5,5){BE}", "[5, 5, 5, 5]", {}, 0.0),
    ("", "[0, 0, 100, 100]", {}, 0.0),
])
def test_grounding_iou_values(text, sol, kw, expected):
    assert one("grounding_iou", text, sol, **kw) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_batched_equals_single():
    rng = np.random.default_rng(0)
    texts, sols = [], []
    for _ in range(200):
        a = np.sort(rng.integers(0, 1000, (2, 2)), axis=0)
        g = np.sort(rng.integers(0, 1000, (2, 2)), axis=0)
        texts.append(qwen(((a[0, 0], a[0, 1]), (a[1, 0], a[1, 1]))))
        sols.append(f"[{g[0, 0]}, {g[0, 1]}, {g[1, 0]}, {g[1, 1]}]")
    for name in ("pr1_grounding", "grounding_iou"):
        batch = rewards.get(name)(texts, solution=sols)
        single = [one(name, t, s) for t, s in zip(texts, sols)]
        np.testing.assert_array_equal(batch, np.asarray(single, np.float32))


def _spec_reference(text, sol):
    """PR1's grounding reward transcribed from the spec, one sample at a time, Python floats."""
    import re
    t = text.replace(PAD, "")
    n = r"(-?\d+(?:\.\d+)?)"
    box = [0, 0, 0, 0]
    for pat in (rf"\[\s*{n},\s*{n},\s*{n},\s*{n}\s*\]", rf"\(\s*{n},\s*{n},\s*{n},\s*{n}\s*\)",
                rf"\(\s*{n},\s*{n}\),\s*\(\s*{n},\s*{n}\)"):
        m = re.search(pat, t)
        if m:
            box = [float(g) for g in m.groups()]
            break
    if BS not in t:
        box = [int(v * 1000) for v in box]
    g = sol
    inter = max(0, min(box[2], g[2]) - max(box[0], g[0])) * max(0, min(box[3], g[3]) - max(box[1], g[1]))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    return (inter / union) ** 2 if union else 0.0


def test_pr1_grounding_matches_spec_reference_on_fuzz():
    rng = np.random.default_rng(7)
    pieces = [BS, BE, REF, END, PAD, "(", ")", "[", "]", ",", ", ", " ", "-", ".", "0.", "1", "5", "12", "250", "999"]
    texts = ["".join(rng.choice(pieces, rng.integers(0, 30))) for _ in range(3000)]
    texts += [f"{BS}({a},{b}),({c},{d}){BE}" for a, b, c, d in rng.integers(-10, 1000, (500, 4))]
    sols = [[int(v) for v in np.sort(rng.integers(0, 1000, (2, 2)), axis=0).ravel()] for _ in texts]
    sols = [[s[0], s[1], s[2], s[3]] for s in sols]
    ours = rewards.get("pr1_grounding")(texts, solution=sols)
    ref = np.asarray([_spec_reference(t, s) for t, s in zip(texts, sols)], np.float32)
    np.testing.assert_array_equal(ours, ref)
    assert (ours > 0).sum() > 20


def test_qwen3_grounding_answers():
    """Qwen3-VL answers a JSON box in [0, 1000]: `grounding_iou` scores it at that scale (PR1's
    reward would multiply it by 1000), `qwen3_grounding_format` pays for exactly one such box."""
    from pr1_jax.rewards.grounding import grounding_iou, qwen3_grounding_format

    good = ['```json\n[{"bbox_2d": [50, 0, 150, 100], "label": "dog"}]\n```<|im_end|>',
            '{"bbox_2d": [50, 0, 150, 100], "label": "dog"}']
    bad = ['[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]', '{"bbox_2d": [150, 0, 50, 100]}',
           '{"bbox_2d": [0, 0, 1001, 5]}', "<|box_start|>(50,0),(150,100)<|box_end|>", "[" * 100_000, "no box"]
    np.testing.assert_array_equal(qwen3_grounding_format(good + bad), [1, 1] + [0] * len(bad))
    np.testing.assert_allclose(grounding_iou(good, solution=["[0, 0, 100, 100]"] * 2), [(1 / 3) ** 2] * 2, rtol=1e-6)
