"""Fuzz: 10,000+ adversarial completions per reward against adversarial ground truths.

Every registered reward must return one finite float32 per completion, inside its documented
range, for ANY completion string and ANY ground truth — the training step calls them on raw
model output and on rows a reader accepted, and an exception there would stop the run. The
generator is seeded (failures reproduce): valid answers whose numbers are swapped for
non-finite or huge spellings, mutations of them (cuts, insertions, deletions, repeats), token
soup, deep nesting, unicode garbage, empty strings and a few megabyte-long strings; the ground
truths mix sane values with NaN/inf, numbers near the float64 maximum, huge integers and wrong
types inside the parsed JSON. Rewards are called in one batch per case, as training does.
"""

import json
import math
import time
import warnings

import numpy as np
import pytest

import pr1_jax.tasks  # noqa: F401  (tasks register rewards of their own: every one is fuzzed)
from pr1_jax import rewards
from pr1_jax.coco import COCO_ID_TO_NAME
from pr1_jax.rewards import parsing

N = 10_000  # adversarial completions per reward (the megabyte ones come on top)

# Spellings of numbers in completions: sane ones, and ones that parse to NaN/inf, overflow
# float32 or float64, exceed Python's int-string limit, or are not numbers JSON/Python agree on.
BAD_NUMBERS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-Infinity", "1e308", "-1e308",
               "1.7976931348623157e308", "1e309", "-1e309", "3.4028235e38", "3.5e38", "-3.5e38",
               "9" * 400, "-" + "9" * 400, "1" * 5000, "1e-320", "-0", "0x1f", "1_000", "1e3", "+5",
               "9**9**9", "10**400", "1/0", "٣", "１２", "True", "None", '"5"', "[1]", "", " "]
SPECIAL = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|im_end|>",
           "<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>"]
FRAGMENTS = SPECIAL * 2 + BAD_NUMBERS + list("0123456789()[]{},:-.\"'\n\t <>|`") + [
    "```json", "```", '"bbox_2d": ', '"label": ', '"person"', '"toothbrush"', "null", "true", "{}", "[]",
    "(10,20),(30,40)", "[1, 2, 3, 4]", '{"bbox_2d": [1, 2, 3, 4], "label": "cat"}', "\x00", "\ud800", "é", "字",
    "\u202e", "\ufeff", "🙂"]
LABELS = ["person", "dog", "cat", "car", "toothbrush", "Person", "unicorn", "", 5, None, ["person"]]
HUGE = 1.7976931348623157e308  # the float64 maximum


def number(rng) -> str:
    """A coordinate as the model might write it: usually sane, a quarter of the time not."""
    if rng.random() < 0.75:
        return str(int(rng.integers(-20, 1100)))
    return BAD_NUMBERS[rng.integers(len(BAD_NUMBERS))]


def answer(task: str, rng) -> str:
    """A well-formed answer of the task, its numbers drawn by `number`."""
    if task == "pointing":
        return f"({number(rng)},{number(rng)})" + "<|im_end|>" * int(rng.integers(2))
    if task == "grounding_qwen3":  # Qwen3-VL's JSON box (x1 ≤ x2, y1 ≤ y2 where the numbers are sane)
        nums = [number(rng) for _ in range(4)]
        if all(n.lstrip("-").isdigit() and len(n) < 6 for n in nums):
            x1, x2 = sorted(int(n) for n in nums[0::2])
            y1, y2 = sorted(int(n) for n in nums[1::2])
            nums = [str(v) for v in (x1, y1, x2, y2)]
        item = f'{{"bbox_2d": [{", ".join(nums)}], "label": "the dog"}}'
        return (f"```json\n[{item}]\n```" if rng.random() < 0.5 else item) + "<|im_end|>"
    if task == "grounding":
        nums = [number(rng) for _ in range(4)]
        if rng.random() < 0.8:
            box = f"<|box_start|>({nums[0]},{nums[1]}),({nums[2]},{nums[3]})<|box_end|>"
        else:
            box = f"[{', '.join(nums)}]"
        return f"<|object_ref_start|>the dog<|object_ref_end|>{box}<|im_end|>" + "<|endoftext|>" * int(rng.integers(3))
    if task == "counting":
        boxes = "".join(f"<|box_start|>({number(rng)},{number(rng)}),({number(rng)},{number(rng)})<|box_end|>"
                        for _ in range(int(rng.integers(1, 15))))
        return f"<|object_ref_start|>birds<|object_ref_end|>{boxes}<|im_end|>" + "<|endoftext|>" * int(rng.integers(3))
    if task == "detection":
        items = []
        for _ in range(int(rng.integers(0, 15))):
            label = LABELS[rng.integers(len(LABELS))]
            box = ", ".join(number(rng) for _ in range(int(rng.choice([4, 4, 4, 3, 5]))))
            items.append(f'{{"bbox_2d": [{box}], "label": {json.dumps(label)}}}')
        text = "[" + ", ".join(items) + "]"
        return f"```json\n{text}\n```" if rng.random() < 0.5 else text
    words = ["the", "page", "text", "Ünïcödé", "字", "\n", "  ", "line", "<|im_end|>"]
    return " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(0, 40))))


def mutate(s: str, rng) -> str:
    """One to three random edits: cut, insert a fragment, delete a span, repeat a span."""
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, len(s) + 1))
        op = rng.integers(4)
        if op == 0:
            s = s[:k]
        elif op == 1:
            s = s[:k] + FRAGMENTS[rng.integers(len(FRAGMENTS))] + s[k:]
        elif op == 2:
            s = s[:k] + s[k + int(rng.integers(1, 20)):]
        else:
            s = s[:k] + s[k:k + int(rng.integers(1, 40))] * int(rng.integers(2, 20)) + s[k:]
    return s


def echo(task: str, sol, rng) -> str | None:
    """An answer built from the row's own ground truth (coordinates jittered by a few units,
    now and then a number swapped by `number`), so the matching and scoring code runs on
    near-correct answers too; None when the GT is not usable. Half of them swap no number
    (one bad number zeroes PR1's whole detection answer)."""
    p_swap = 0.1 if rng.random() < 0.5 else 0.0
    task = "grounding" if task == "grounding_qwen3" else task  # grounding's ground truths

    def jit(v):
        return str(int(round(v)) + int(rng.integers(-3, 4))) if rng.random() >= p_swap else number(rng)

    if task == "grounding":
        b = parsing.parse_box_value(sol)
        if b is None or not (np.abs(b) < 1e6).all():
            return None
        return (f"<|object_ref_start|>the dog<|object_ref_end|><|box_start|>({jit(b[0])},{jit(b[1])}),"
                f"({jit(b[2])},{jit(b[3])})<|box_end|><|im_end|>")
    if task == "pointing":
        b = parsing.parse_box_value(sol)
        if b is None or not (np.abs(b) < 1e6).all():
            return None
        return f"({jit((b[0] + b[2]) / 2)},{jit((b[1] + b[3]) / 2)})<|im_end|>"
    if task == "counting":
        p = parsing.parse_points(sol)
        if p is None or not len(p) or not (np.abs(p) < 1e6).all():
            return None
        boxes = "".join(f"<|box_start|>({jit(x - 8)},{jit(y - 8)}),({jit(x + 8)},{jit(y + 8)})<|box_end|>"
                        for x, y in p)
        return f"<|object_ref_start|>birds<|object_ref_end|>{boxes}<|im_end|><|endoftext|>"
    if task == "detection":
        parsed = parsing.parse_detection_solution(sol)
        if parsed is None or not (np.abs(parsed[1]) < 1e6).all():
            return None
        items = [f'{{"bbox_2d": [{", ".join(jit(v) for v in box)}], "label": "{COCO_ID_TO_NAME.get(int(i), "x")}"}}'
                 for i, box in zip(*parsed)]
        return "```json\n[" + ", ".join(items) + "]\n```"
    return sol if isinstance(sol, str) else None


def nested(task: str, rng) -> str:
    """Deep nesting: JSON lists/objects, Python tuples, and box groups holding them. 5,000
    levels is far past Python's recursion limit (1,000) and json's; the megabyte strings
    cover length."""
    depth = int(rng.integers(50, 5_000))
    kind = rng.integers(4)
    if kind == 0:
        return "[" * depth + "1" + "]" * depth * int(rng.integers(0, 2))
    if kind == 1:
        return '{"bbox_2d": ' * depth + "[1, 2, 3, 4]" + "}" * depth
    if kind == 2:
        return f'[{{"bbox_2d": {"[" * depth}1{"]" * depth}, "label": "person"}}]'
    inner = "(" * depth + "1,2),(3,4" + ")" * depth
    return f"<|object_ref_start|>x<|object_ref_end|><|box_start|>{inner}<|box_end|><|im_end|>"


def garbage(rng) -> str:
    """Random code points: control characters, lone surrogates, right-to-left marks, emoji."""
    points = rng.integers(0, 0x110000, int(rng.integers(1, 200)))
    return "".join(map(chr, points))


def completions(task: str, sols: list, seed: int) -> list[str]:
    """One adversarial completion per ground truth in `sols`."""
    rng = np.random.default_rng(seed)
    others = [t for t in ("grounding", "counting", "detection", "ocr") if t != task]
    out = []
    for sol in sols:
        u = rng.random()
        s = None
        if u < 0.15:
            s = echo(task, sol, rng)
        elif u < 0.20:
            s = echo(task, sol, rng)
            s = None if s is None else mutate(s, rng)
        elif u < 0.35:
            s = answer(task, rng)
        elif u < 0.55:
            s = mutate(answer(task, rng), rng)
        elif u < 0.68:
            s = "".join(FRAGMENTS[i] for i in rng.integers(0, len(FRAGMENTS), int(rng.integers(0, 60))))
        elif u < 0.76:
            s = nested(task, rng)
        elif u < 0.86:
            s = garbage(rng)
        elif u < 0.92:
            s = ["", " ", "\n", "<|endoftext|>" * 5, "<|im_end|>"][rng.integers(5)]
        else:
            s = answer(others[rng.integers(len(others))], rng)
        out.append(answer(task, rng) if s is None else s)
    return out


MEGABYTE = 1 << 20


def megabyte_strings(task: str, seed: int) -> list[str]:
    """A few completions of about a megabyte each (far beyond any max_new_tokens)."""
    rng = np.random.default_rng(seed)
    good = answer(task, rng)
    one_box = "<|box_start|>(1,2),(30,40)<|box_end|>"
    return [good * (MEGABYTE // max(len(good), 1) + 1),
            "<|object_ref_start|>x<|object_ref_end|>" + one_box * (MEGABYTE // len(one_box)) + "<|im_end|>",
            "[" + ", ".join(['{"bbox_2d": [1, 2, 30, 40], "label": "person"}'] * (MEGABYTE // 48)) + "]",
            "9" * MEGABYTE, "[" * MEGABYTE, garbage(rng) * (MEGABYTE // 200)]


# ----------------------------------------------------------------------------- ground truths
def gt_value(rng):
    """One ground-truth number: usually sane, else non-finite, near the float64 maximum,
    a huge integer, or of the wrong type."""
    if rng.random() < 0.7:
        return int(rng.integers(0, 1000))
    bad = [math.nan, math.inf, -math.inf, HUGE, -HUGE, 1e308, 3.5e38, 10 ** 400, 2 ** 63, -1,
           True, "12", None, [1], {"x": 1}, 1.5, -0.0]
    return bad[rng.integers(len(bad))]


def gt_box(rng, p_bad: float = 0.15) -> list:
    """A GT box [x1, y1, x2, y2], each coordinate replaced by `gt_value` with probability p_bad."""
    x1, y1 = rng.integers(0, 500, 2)
    w, h = rng.integers(1, 400, 2)
    box = [int(x1), int(y1), int(x1 + w), int(y1 + h)]
    for k in np.flatnonzero(rng.random(4) < p_bad):
        box[k] = gt_value(rng)
    return box


def wrong_type(rng):
    return [None, "", "garbage", 5, math.nan, [], {}, [[[[]]]], "[" * 5000, {"a": 1}, b"\xff\xfe"][rng.integers(11)]


def ground_truth(task: str, rng):
    task = "grounding" if task == "grounding_qwen3" else task
    u = rng.random()
    if u < 0.1:
        return wrong_type(rng)
    if task in ("grounding", "pointing"):
        box = gt_box(rng)
        return str(box) if u < 0.5 else box
    if task == "counting":
        points = [[gt_value(rng) if rng.random() < 0.1 else int(v) for v in rng.integers(0, 1000, 2)]
                  for _ in range(int(rng.integers(0, 12)))]
        if u < 0.3:
            return [{"x": x, "y": y} for x, y in points]
        return json.dumps(points) if u < 0.5 and all(isinstance(v, int) for p in points for v in p) else points
    if task == "detection":
        m = int(rng.integers(0, 10))
        # one bad value spoils the whole GT object (PR1 scores it 0): keep them rarer per value
        ids = [int(rng.choice([1, 3, 17, 18, 44])) if rng.random() < 0.97 else gt_value(rng) for _ in range(m)]
        sol = {"target_id": ids, "target_box": [gt_box(rng, 0.03) for _ in range(m + (rng.random() < 0.05))]}
        if u < 0.15:
            del sol["target_box"]
        try:
            return json.dumps(sol) if u < 0.4 else sol
        except (TypeError, ValueError):  # a value JSON cannot write (a huge int is fine; None too)
            return sol
    return [answer("ocr", rng), "", "字é" * 50, "The quick brown fox", "x" * 3000][rng.integers(5)]


# name → (task, knobs, documented range)
CASES = {
    "pr1_grounding": ("grounding", {}, (0.0, 1.0)),
    "grounding_iou": ("grounding", {}, (0.0, 1.0)),
    "pr1_grounding_format": ("grounding", {}, (0.0, 1.0)),
    "grounding_format_strict": ("grounding", {}, (0.0, 1.0)),
    "qwen3_grounding_format": ("grounding_qwen3", {}, (0.0, 1.0)),  # Qwen3-VL's JSON boxes, grounding's GTs
    "pr1_counting": ("counting", {}, (-np.inf, 1.0)),  # PR1 does not clip far-away points (documented)
    "counting_strict": ("counting", {}, (0.0, 1.0)),
    "pr1_detection": ("detection", {}, (0.0, 3.0)),
    "pr1_detection:released": ("detection", {"do_penalty": False}, (0.0, 3.0)),
    "pr1_detection:knobs": ("detection", {"coverage_scale": 0.5, "is_size_weight": True}, (0.0, 3.5)),
    "detection_robust": ("detection", {}, (0.0, 3.0)),
    "detection_robust:knobs": ("detection", {"do_penalty": False, "coverage_scale": 0.5, "is_size_weight": True},
                               (0.0, 3.5)),
    "pr1_ocr": ("ocr", {}, (0.0, 1.0)),
    "ocr_edit_distance": ("ocr", {}, (0.0, 1.0)),
    # pr1_jax/tasks/pointing.py: grounding's boxes are its ground truths
    "point_in_box": ("pointing", {}, (0.0, 1.0)),
    "point_format": ("pointing", {}, (0.0, 1.0)),
}


def test_every_registered_reward_is_fuzzed():
    assert {c.split(":")[0] for c in CASES} == set(rewards.names())


_DATA: dict = {}


def data(task: str):
    """(completions, solutions) of a task, built once per session (seeded by the task)."""
    if task not in _DATA:
        seed = sum(map(ord, task))
        rng = np.random.default_rng(seed + 1)
        pool = [ground_truth(task, rng) for _ in range(500)]
        # GRPO groups share one GT object; rows also get GTs of their own
        sols = [pool[i] for i in rng.integers(0, len(pool), N)]
        texts = completions(task, sols, seed) + megabyte_strings(task, seed)
        sols += [pool[i] for i in rng.integers(0, len(pool), len(texts) - N)]
        # a megabyte answer to a megabyte OCR page would be a minute of edit distance: one row
        if task == "ocr":
            sols[-1] = "page text " * (MEGABYTE // 10)
        _DATA[task] = texts, sols
    return _DATA[task]


@pytest.mark.parametrize("case", sorted(CASES))
def test_adversarial_batch(case):
    task, knobs, (lo, hi) = CASES[case]
    texts, sols = data(task)
    fn = rewards.get(case.split(":")[0], **knobs)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(texts, solution=sols, problem=["x"] * len(texts), current_step=1)
    elapsed = time.perf_counter() - t0
    assert out.dtype == np.float32 and out.shape == (len(texts),)
    assert np.isfinite(out).all()
    assert (out >= lo).all() and (out <= hi + 1e-6).all(), (out.min(), out.max())
    # the generator must also reach the scoring code: near-correct answers score high (for
    # detection 0.9 needs matched pairs; the format credit alone is 0.25)
    assert (out > 0.3 * min(hi, 3.0)).sum() > N // 25, "the generator should produce answers that score"
    # overflow in box arithmetic is expected and handled: it must not flood the training log
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught][:3]
    # a guard against quadratic blow-ups, with room for a shared, loaded machine (OCR: ~8 s,
    # the edit distance of 60k-character answers to 3k-character pages; the rest: < 2 s)
    assert elapsed < 20.0, f"{case}: {elapsed:.1f}s for {len(texts)} completions"


# ----------------------------------------------------------------------------- the battery's cases
VALID = {
    "pr1_detection": '[{"bbox_2d": [0, 0, 10, 10], "label": "person"}]',
    "detection_robust": '[{"bbox_2d": [0, 0, 10, 10], "label": "person"}]',
    "pr1_counting": "<|object_ref_start|>x<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|><|im_end|>",
    "counting_strict": "<|object_ref_start|>x<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|><|im_end|>",
    "pr1_grounding": "<|object_ref_start|>x<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|><|im_end|>",
    "grounding_iou": "<|object_ref_start|>x<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|><|im_end|>",
}


@pytest.mark.parametrize("big", [HUGE, -HUGE, 1e308, 3.5e38, math.inf, math.nan])
@pytest.mark.parametrize("name", sorted(VALID))
def test_ground_truth_near_the_float64_maximum(name, big):
    """The outside battery's `ValueError: cost matrix is infeasible`: a GT coordinate near the
    float64 maximum. Such a GT cannot be scored (PR1's float32 tensors turn it into inf and its
    matcher raises), so the row scores 0 — and the other rows of the batch keep their scores."""
    if "detection" in name:
        bad = {"target_id": [1], "target_box": [[0, 0, big, 10] if big > 0 else [big, 0, 10, 10]]}
        good = {"target_id": [1], "target_box": [[0, 0, 10, 10]]}
    elif "counting" in name:
        bad, good = [[5, 5], [big, big]], [[5, 5]]
    else:
        bad, good = [0, 0, big, 10] if big > 0 else [big, 0, 10, 10], [0, 0, 10, 10]
    out = rewards.get(name)([VALID[name]] * 3, solution=[good, bad, json.dumps(bad)])
    assert out[1] == out[2] == 0.0
    assert out[0] == pytest.approx(3.0 if "detection" in name else 1.0, abs=1e-6)


GOOD_DET = {"target_id": [1], "target_box": [[0, 0, 10, 10]]}
MALFORMED_DET = [
    {"target_id": [1, [2]], "target_box": [[0, 0, 10, 10], [0, 0, 5, 5]]},  # an id that is a list: NumPy raises
    {"target_id": [1], "target_box": [[0, 0, 10 ** 400, 10]]},  # an int no float holds
    {"target_id": [10 ** 400], "target_box": [[0, 0, 10, 10]]},
    {"target_id": [2 ** 31], "target_box": [[0, 0, 10, 10]]},
    {"target_id": ["1"], "target_box": [[0, 0, 10, 10]]},
    {"target_id": [None], "target_box": [[0, 0, 10, 10]]},
    {"target_id": [1.5], "target_box": [[0, 0, 10, 10]]},
    {"target_id": [1], "target_box": [{"x": 1}]},
    {"target_id": [1], "target_box": [[0, 0, 10]]},
    {"target_id": [1], "target_box": [[[0, 0, 10, 10]]]},
    {"target_id": [1, 1], "target_box": [[0, 0, 10, 10]]},  # lengths differ
    {"target_id": 1, "target_box": [0, 0, 10, 10]},
    {"target_id": [1], "target_box": "[" * 5000},
    {"target_box": [[0, 0, 10, 10]]},
    "[" * 100_000, '{"target_id": ' * 5000, b"\xff\xfe", None, 5, [], {},
]


@pytest.mark.parametrize("name", ["pr1_detection", "detection_robust"])
def test_malformed_detection_ground_truths_in_one_batch(name):
    """`_solutions` parses the whole GT column in one NumPy call when it can; one malformed GT
    (an id that is a list, a huge int, a string, ...) sends it down the one-by-one path, which
    must give the malformed rows 0 and leave the well-formed ones their score (= alone)."""
    fn = rewards.get(name)
    sols = [GOOD_DET, *MALFORMED_DET, json.dumps(GOOD_DET), GOOD_DET]
    out = fn([VALID[name]] * len(sols), solution=sols)
    assert out[0] == out[-2] == out[-1] == pytest.approx(3.0)
    assert (out[1:-2] == 0).all(), out
    for i, s in enumerate(sols):  # a batch scores each row as a batch of one would
        assert fn([VALID[name]], solution=[s])[0] == out[i]


def test_detection_robust_matches_only_the_first_max_items():
    """The pairwise duplicate check is quadratic in items: past MAX_ITEMS valid items the
    rest are wrong items (in n̂ and the format's denominator, never matched)."""
    from pr1_jax.rewards.detection import MAX_ITEMS
    n = 2 * MAX_ITEMS
    boxes = [[0, 0, 10, 10]] + [[(i % 50) * 20, 100 + (i // 50) * 20, (i % 50) * 20 + 10, 110 + (i // 50) * 20]
                                for i in range(n - 1)]  # disjoint: no duplicates
    text = json.dumps([{"bbox_2d": b, "label": "person"} for b in boxes])
    t0 = time.perf_counter()
    out = rewards.get("detection_robust", do_penalty=False)([text], solution=[GOOD_DET])
    assert time.perf_counter() - t0 < 5.0
    prec = 1 / n  # K = 1 of n̂ = n items; recall 1
    expected = 0.25 * MAX_ITEMS / n + 0.75 * 2 * prec / (prec + 1) + 1 / n + 1 / n
    assert out[0] == pytest.approx(expected, rel=1e-6)


def test_counting_strict_dedupes_only_the_first_max_boxes():
    """Boxes past MAX_BOXES count in n̂_total (so they cost what they would) but are not
    deduplicated or matched: r = 1/(n̂_total) · 1 for one exact box among many."""
    from pr1_jax.rewards.counting import MAX_BOXES
    n = MAX_BOXES + 500
    boxes = "".join(f"<|box_start|>({(i % 40) * 25},{(i // 40) * 25}),({(i % 40) * 25 + 10},{(i // 40) * 25 + 10})"
                    "<|box_end|>" for i in range(n))
    text = f"<|object_ref_start|>x<|object_ref_end|>{boxes}<|im_end|>"
    out = rewards.get("counting_strict")([text], solution=[[[5, 5]]])
    assert out[0] == pytest.approx(1 / n, rel=1e-6)
