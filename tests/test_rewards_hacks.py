"""Known reward hacks: PR1's functions score them exactly as PR1 does (hand-computed), the
corrected twins score them low. One row per (hack, reward pair)."""

import json
import math

import numpy as np
import pytest

from pr1_jax import rewards
from pr1_jax.rewards.counting import SCALE

REF, BS, BE, END = "<|object_ref_start|>the dog<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|im_end|>"


def qwen(*boxes):
    return REF + "".join(f"{BS}({a},{b}),({c},{d}){BE}" for a, b, c, d in boxes) + END


# Grounding: GT box [100, 100, 200, 200] in Qwen2-VL's [0, 1000) space.
G_GT = "[100, 100, 200, 200]"
G_RIGHT = (100, 100, 200, 200)
G_MANY = [G_RIGHT] + [(300 + i, 300, 310 + i, 310) for i in range(299)]
# Counting: 3 birds.
C_GT = [[100, 100], [200, 200], [300, 300]]


def sq(cx, cy, h=10):
    return (cx - h, cy - h, cx + h, cy + h)


# Detection: 3 objects in a 640×480 image.
D_OBJS = [("person", [100, 100, 200, 200]), ("dog", [300, 300, 400, 400]), ("cat", [500, 100, 600, 200])]
D_GT = {"target_id": [1, 18, 17], "target_box": [b for _, b in D_OBJS]}


def det(pairs):
    return json.dumps([{"bbox_2d": b, "label": lab} for lab, b in pairs])


D_DUP = det(D_OBJS * 3)
D_MANY = det(D_OBJS + [("person", [600 + i % 40, 400, 601 + i % 40, 401 + i // 40]) for i in range(297)])
F1_DUP = 2 * (1 / 3) / (4 / 3 + 1e-8)          # P = 3/9, R = 1
F1_MANY = 2 * 0.01 / (1.01 + 1e-8)             # P = 3/300, R = 1
# OCR
O_GT = "The quick brown fox"

HACKS = [
    # hack, completion, solution, pr1 name, pr1 value (exact), corrected name, corrected upper bound
    ("empty", "", G_GT, "pr1_grounding", 0.0, "grounding_iou", 0.0),
    ("empty", "", None, "pr1_grounding_format", 0.0, "grounding_format_strict", 0.0),
    ("starts with <", "<", G_GT, "pr1_grounding", 0.0, "grounding_iou", 0.0),
    ("starts with <", "<", None, "pr1_grounding_format", 1.0, "grounding_format_strict", 0.0),
    ("starts with >", ">junk", None, "pr1_grounding_format", 1.0, "grounding_format_strict", 0.0),
    ("duplicated boxes", qwen(G_RIGHT, G_RIGHT), G_GT, "pr1_grounding", 1.0, "grounding_iou", 0.0),
    ("duplicated boxes", qwen(G_RIGHT, G_RIGHT), None, "pr1_grounding_format", 1.0, "grounding_format_strict", 0.0),
    ("giant box", qwen((0, 0, 1000, 1000)), G_GT, "pr1_grounding", (10000 / 1e6) ** 2, "grounding_iou", 1e-4),
    ("hundreds of boxes", qwen(*G_MANY), G_GT, "pr1_grounding", 1.0, "grounding_iou", 0.0),
    ("hundreds of boxes", qwen(*G_MANY), None, "pr1_grounding_format", 1.0, "grounding_format_strict", 0.0),
    ("box list in the phrase", f"[100, 100, 200, 200] {BS}(0,0),(1,1){BE}", G_GT, "pr1_grounding", 1.0, "grounding_iou", 0.0),

    ("empty", "", C_GT, "pr1_counting", 0.0, "counting_strict", 0.0),
    ("starts with <", "<", C_GT, "pr1_counting", 0.0, "counting_strict", 0.0),
    ("duplicated boxes", qwen(sq(200, 200), sq(200, 200), sq(200, 200)), C_GT, "pr1_counting",
     1 - (2 * 100 * math.sqrt(2) / 3) / SCALE, "counting_strict", 1 / 3 + 1e-6),
    ("giant box", qwen((0, 0, 1000, 1000)), C_GT, "pr1_counting",
     1 / 3 * (1 - 200 * math.sqrt(2) / SCALE), "counting_strict", 0.27),
    ("hundreds of boxes", qwen(*([sq(x, x) for x, _ in C_GT] + [sq(100, 100)] * 297)), C_GT, "pr1_counting",
     3 / 300, "counting_strict", 0.01 + 1e-6),
    ("boxes after <|im_end|>", qwen(sq(100, 100)) + f"{BS}({190},{190}),({210},{210}){BE}" * 2, C_GT, "pr1_counting",
     1 - (100 * math.sqrt(2) / 3) / SCALE, "counting_strict", 0.0),

    ("empty", "", D_GT, "pr1_detection", 0.0, "detection_robust", 0.0),
    ("starts with <", "<", D_GT, "pr1_detection", 0.0, "detection_robust", 0.0),
    ("duplicated boxes", D_DUP, D_GT, "pr1_detection",
     0.25 + 0.75 * F1_DUP + 2 - 0.5 * (6 / 9), "detection_robust", 0.8),
    ("giant box", det([("person", [0, 0, 640, 480])]), D_GT, "pr1_detection", 0.25, "detection_robust", 0.0),
    ("hundreds of boxes", D_MANY, D_GT, "pr1_detection",
     0.25 + 0.75 * F1_MANY + 2 - 0.5 * (297 / 300), "detection_robust", 0.0),
    ("empty list", "[]", D_GT, "pr1_detection", 0.0, "detection_robust", 0.0),

    ("empty", "", O_GT, "pr1_ocr", 0.0, "ocr_edit_distance", 0.0),
    ("starts with <", "<", O_GT, "pr1_ocr", 0.0, "ocr_edit_distance", 0.0),
    ("duplicated text", O_GT + " " + O_GT, O_GT, "pr1_ocr", 1 - 20 / 39, "ocr_edit_distance", 1 - 20 / 39 + 1e-6),
    ("hundreds of copies", " ".join([O_GT] * 300), O_GT, "pr1_ocr", 19 / 5999, "ocr_edit_distance", 0.01),
]


@pytest.mark.parametrize("hack, text, sol, pr1_name, pr1_value, fixed_name, fixed_max", HACKS,
                         ids=[f"{h[3]}:{h[0]}" for h in HACKS])
def test_hack(hack, text, sol, pr1_name, pr1_value, fixed_name, fixed_max):
    pr1 = float(rewards.get(pr1_name)([text], solution=[sol])[0])
    fixed = float(rewards.get(fixed_name)([text], solution=[sol])[0])
    assert pr1 == pytest.approx(pr1_value, rel=1e-6, abs=1e-6), (hack, pr1)
    assert fixed <= fixed_max + 1e-7, (hack, fixed)


def test_released_detection_script_without_penalty_rewards_spam():
    """With DO_PENAIlty=False (the released script) spamming 300 boxes keeps cls and IoU at 1."""
    spam = float(rewards.get("pr1_detection", do_penalty=False)([D_MANY], solution=[D_GT])[0])
    assert spam == pytest.approx(0.25 + 0.75 * F1_MANY + 2, rel=1e-6)
    assert float(rewards.get("detection_robust", do_penalty=False)([D_MANY], solution=[D_GT])[0]) < 0.3


def test_honest_answers_still_score_high():
    assert rewards.get("grounding_iou")([qwen(G_RIGHT)], solution=[G_GT])[0] == 1.0
    assert rewards.get("counting_strict")([qwen(*[sq(x, y) for x, y in C_GT])], solution=[C_GT])[0] == 1.0
    assert rewards.get("detection_robust")([det(D_OBJS)], solution=[D_GT])[0] == pytest.approx(3.0)
    assert rewards.get("ocr_edit_distance")([O_GT], solution=[O_GT])[0] == 1.0
    assert np.all(rewards.get("grounding_format_strict")([qwen(G_RIGHT)]) == 1.0)
