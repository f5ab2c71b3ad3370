"""Property test: 12,000 seeded random strings (Qwen special tokens, digits, brackets, JSON
fragments, valid and mutated answers) through every reward: no exception, float32, finite,
values inside each reward's documented range."""

import json
import time

import numpy as np
import pytest

from pr1_jax import rewards

SPECIAL = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|im_end|>",
           "<|endoftext|>", "<|im_start|>", "<|quad_start|>", "<|vision_start|>", "<|image_pad|>"]
FRAGMENTS = SPECIAL * 3 + list("0123456789" * 2) + [
    "(", ")", "[", "]", ",", ", ", " ", "-", ".", "{", "}", ":", '"', "\n", "\t", "```json", "```", "<", ">", "|",
    '"bbox_2d": ', '"label": ', '"person"', '"dog"', '"toothbrush"', '"Person"', "NaN", "Infinity", "-Infinity",
    "1e400", "9" * 40, "0x1f", "1_0", "**", "true", "null", "é", "字", "\x00", "(10,20),(30,40)", "[1, 2, 3, 4]",
    '{"bbox_2d": [1, 2, 3, 4], "label": "cat"}', "[]", "{}", "'a'", "j", "+"]
LABELS = ["person", "dog", "cat", "toothbrush", "unicorn", "car", "Person"]


def valid_answer(rng):
    kind = rng.integers(4)
    if kind == 0:   # grounding
        a = np.sort(rng.integers(0, 1000, (2, 2)), axis=0)
        return f"<|object_ref_start|>x<|object_ref_end|><|box_start|>({a[0, 0]},{a[0, 1]}),({a[1, 0]},{a[1, 1]})<|box_end|><|im_end|>"
    if kind == 1:   # counting
        boxes = "".join(f"<|box_start|>({x},{y}),({x + 9},{y + 9})<|box_end|>" for x, y in rng.integers(-50, 1100, (rng.integers(1, 12), 2)))
        return f"<|object_ref_start|>bird<|object_ref_end|>{boxes}<|im_end|>" + "<|endoftext|>" * int(rng.integers(3))
    if kind == 2:   # detection
        items = []
        for _ in range(rng.integers(0, 12)):
            x, y = rng.integers(-20, 600, 2)
            w, h = rng.integers(-5, 200, 2)
            items.append({"bbox_2d": [int(x), int(y), int(x + w), int(y + h)], "label": LABELS[rng.integers(len(LABELS))]})
        text = json.dumps(items)
        return f"```json\n{text}\n```" if rng.random() < 0.5 else text
    return "".join(rng.choice(list("abc de\nfg"), rng.integers(0, 60)))   # OCR


def random_strings(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.4:
            s = "".join(FRAGMENTS[i] for i in rng.integers(0, len(FRAGMENTS), rng.integers(0, 40)))
        else:
            s = valid_answer(rng)
            if u > 0.7:  # mutate: cut, insert a fragment, or both
                if rng.random() < 0.5:
                    s = s[: rng.integers(0, len(s) + 1)]
                k = rng.integers(0, len(s) + 1)
                s = s[:k] + FRAGMENTS[rng.integers(len(FRAGMENTS))] + s[k:]
        out.append(s)
    return out


GTS = {
    "grounding": ["[100, 200, 300, 400]", [0, 0, 999, 999], "[5, 5, 5, 5]", "bad gt"],
    "counting": [[[100, 100], [500, 500]], [[10, 20]], [], "[[1, 2], [3, 4]]"],
    "detection": [{"target_id": [1, 18], "target_box": [[0, 0, 100, 100], [200, 200, 300, 300]]},
                  json.dumps({"target_id": [90], "target_box": [[10, 10, 50, 50]]}),
                  {"target_id": [], "target_box": []},
                  {"target_id": [1], "target_box": [[50, 50, 10, 10]]}],
    "ocr": ["abc de", "", "The quick brown fox jumps", "字é"],
}
# name → (task, knobs, documented range (lo, hi), values must be in {0, 1})
CASES = {
    "pr1_grounding": ("grounding", {}, (0.0, 1.0)),
    "grounding_iou": ("grounding", {}, (0.0, 1.0)),
    "pr1_grounding_format": ("grounding", {}, (0.0, 1.0)),
    "grounding_format_strict": ("grounding", {}, (0.0, 1.0)),
    "pr1_counting": ("counting", {}, (-np.inf, 1.0)),    # PR1 does not clip far-away points (documented)
    "counting_strict": ("counting", {}, (0.0, 1.0)),
    "pr1_detection": ("detection", {}, (0.0, 3.0)),
    "detection_robust": ("detection", {}, (0.0, 3.0)),
    "pr1_detection:knobs": ("detection", {"do_penalty": False, "coverage_scale": 0.5, "is_size_weight": True}, (0.0, 3.5)),
    "detection_robust:knobs": ("detection", {"do_penalty": False, "coverage_scale": 0.5, "is_size_weight": True}, (0.0, 3.5)),
    "pr1_ocr": ("ocr", {}, (0.0, 1.0)),
    "ocr_edit_distance": ("ocr", {}, (0.0, 1.0)),
}
N = 12_000


@pytest.fixture(scope="module")
def strings():
    return random_strings(N, seed=1234)


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_strings(strings, case):
    task, knobs, (lo, hi) = CASES[case]
    name = case.split(":")[0]
    sols = [GTS[task][i % len(GTS[task])] for i in range(N)]
    t0 = time.perf_counter()
    out = rewards.get(name, **knobs)(strings, solution=sols, problem=["x"] * N, current_step=3)
    elapsed = time.perf_counter() - t0
    assert out.dtype == np.float32 and out.shape == (N,)
    assert np.isfinite(out).all()
    assert (out >= lo).all() and (out <= hi + 1e-6).all(), (out.min(), out.max())
    if "format" in name:
        assert set(np.unique(out)) <= {0.0, 1.0}
    assert (out > 0).sum() > 10, "the generator should produce some answers that score"
    assert elapsed < 5.0, f"{case} took {elapsed:.1f}s for {N} strings"


def test_pr1_counting_is_in_unit_range_for_in_range_coordinates(strings):
    sols = [[[100, 100], [500, 500]]] * N
    keep = [s for s in strings if "-" not in s and "1e400" not in s and "9" * 40 not in s and "0x" not in s]
    out = rewards.get("pr1_counting")(keep, solution=sols[: len(keep)])
    # in-range boxes can still have centres outside [0, 1000] (e.g. 1099 + 9): just check no NaN and ≤ 1
    assert np.isfinite(out).all() and (out <= 1.0).all()
