"""Detection rewards: hand-computed values, PR1 quirks, the robust twin, and parity of the
batched implementation with a per-sample pure-Python transcription of PR1's rules."""

import json
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pr1_jax import rewards
from pr1_jax.rewards import COCO_CLASSES, COCO_NAME_TO_ID


def items(*pairs):
    return json.dumps([{"bbox_2d": b, "label": lab} for lab, b in pairs])


def gt(*pairs):
    return {"target_id": [COCO_NAME_TO_ID[lab] for lab, _ in pairs], "target_box": [list(b) for _, b in pairs]}


PERSON, DOG, CAT = ("person", [0, 0, 10, 10]), ("dog", [20, 20, 30, 30]), ("cat", [50, 50, 60, 60])
GT2 = gt(PERSON, ("dog", [20, 20, 30, 32]))
GT3 = gt(PERSON, ("dog", [20, 20, 30, 32]), CAT)
F1_23 = 2 * (2 / 3) / (1 + 2 / 3 + 1e-8)      # P = 1, R = 2/3
IOU_DOG = 100 / 120


def one(name, text, sol, **kw):
    out = rewards.get(name)([text], solution=[sol], **kw)
    assert out.dtype == np.float32 and out.shape == (1,)
    return float(out[0])


def test_coco_constants():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_NAME_TO_ID.values())) == 80
    assert COCO_NAME_TO_ID["person"] == 1 and COCO_NAME_TO_ID["stop sign"] == 13 and COCO_NAME_TO_ID["toothbrush"] == 90
    assert set(range(1, 91)) - set(COCO_NAME_TO_ID.values()) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert list(COCO_NAME_TO_ID.values()) == sorted(COCO_NAME_TO_ID.values())


@pytest.mark.parametrize("text, sol, kw, expected", [
    # 3 preds / 2 GT: K = 2, P = 2/3, R = 1, F1 = 0.8
    (items(PERSON, DOG, CAT), GT2, {"do_penalty": False}, 0.25 + 0.75 * 0.8 + 1 + (1 + IOU_DOG) / 2),
    (items(PERSON, DOG, CAT), GT2, {}, 0.25 + 0.75 * 0.8 + 1 + (1 + IOU_DOG) / 2 - 0.5 / 3),
    # 2 preds / 3 GT: K = 2, P = 1, R = 2/3
    (items(PERSON, DOG), GT3, {"do_penalty": False}, 0.25 + 0.75 * F1_23 + 1 + (1 + IOU_DOG) / 2),
    (items(PERSON, DOG), GT3, {"do_penalty": True}, 0.25 + 0.75 * F1_23 + 1 + (1 + IOU_DOG) / 2 - 0.5 / 3),
    # coverage on (after the clamp, so it can exceed 3): person 1/1, dog 1/1, cat 0/1
    (items(PERSON, DOG), GT3, {"coverage_scale": 1.0}, 0.25 + 0.75 * F1_23 + 1 + (1 + IOU_DOG) / 2 - 0.5 / 3 + 2 / 3),
    (items(PERSON, DOG, CAT), gt(PERSON, DOG, CAT), {"coverage_scale": 0.5}, 3.0 + 0.5),
    # knobs
    (items(PERSON, DOG), GT3, {"do_penalty": False, "f1_scale": 0.0, "cls_coe": 0.5, "iou_coe": 2.0},
     0.25 + 0.5 + 2.0 * (1 + IOU_DOG) / 2),
    # PR1's size weighting is Σw·IoU / (ΣIoU·K): 3·ΣIoU/(2·ΣIoU) = 1.5 for two small boxes → clamp 3
    (items(PERSON, DOG), GT2, {"is_size_weight": True}, 3.0),
    (items(PERSON, DOG), GT2, {"is_size_weight": True, "do_penalty": False, "f1_scale": 0.0, "cls_coe": 0.0},
     0.25 + 1.5),
    # format: 2 wrong items of 4 (unknown label, no bbox_2d) → 0.25·0.5
    (json.dumps([{"bbox_2d": PERSON[1], "label": "person"}, {"bbox_2d": DOG[1], "label": "dog"},
                 {"bbox_2d": [1, 1, 2, 2], "label": "unicorn"}, {"label": "cat"}]), GT2, {},
     0.125 + 0.75 * 2 / (2 + 1e-8) + 1 + (1 + IOU_DOG) / 2),   # n̂ counts valid items only: P = R = 1
    # class mismatch: IoU 1, cls 0
    (items(("cat", [0, 0, 10, 10])), gt(PERSON), {}, 0.25 + 0.75 * (2 / (2 + 1e-8)) + 0 + 1),
    # the one-hot off-by-one: "cat" (17) is 'hot' for GT dog (18) and wins the tie over "dog"
    (items(("dog", [20, 20, 30, 30]), ("cat", [20, 20, 30, 30])), gt(DOG), {"do_penalty": False},
     0.25 + 0.75 * 2 * 0.5 / (1.5 + 1e-8) + 0 + 1),
    (items(("cat", [20, 20, 30, 30]), ("dog", [20, 20, 30, 30])), gt(DOG), {"do_penalty": False},
     0.25 + 0.75 * 2 * 0.5 / (1.5 + 1e-8) + 0 + 1),
    # fences, Python-json extras
    ("```json\n" + items(PERSON) + "\n```", gt(PERSON), {}, 0.25 + 0.75 * 2 / (2 + 1e-8) + 1 + 1),
    # K = 0: 0.25·format, no penalty
    (items(("person", [100, 100, 110, 110])), gt(PERSON), {}, 0.25),
    # no GT object: 0.25·format
    (items(PERSON, ("unicorn", [0, 0, 1, 1])), {"target_id": [], "target_box": []}, {}, 0.125),
    # GT as a JSON string
    (items(PERSON), json.dumps(gt(PERSON)), {}, 0.25 + 0.75 * 2 / (2 + 1e-8) + 2),
    # quirks that zero the whole answer
    (items(PERSON, ("toothbrush", [50, 50, 60, 60])), gt(PERSON), {}, 0.0),        # id 90 out of the 90 logits
    (items(PERSON, ("dog", [30, 20, 20, 30])), gt(PERSON), {}, 0.0),               # x2 < x1: GIoU assert
    (items(PERSON), gt(("person", [10, 0, 0, 10])), {}, 0.0),                      # malformed GT box
    (items(("unicorn", [0, 0, 10, 10])), gt(PERSON), {}, 0.0),                     # no valid item: format lost
    ("[]", gt(PERSON), {}, 0.0),
    (items(PERSON, ("dog", [1, 2, 3])), gt(PERSON), {}, 0.0),                      # a 3-number box
    (items(PERSON, ("dog", "[1, 2, 3, 4]")), gt(PERSON), {}, 0.0),                 # a string box
    (json.dumps({"bbox_2d": [0, 0, 10, 10], "label": "person"}), gt(PERSON), {}, 0.0),  # a dict iterates keys
    ("Here: " + items(PERSON), gt(PERSON), {}, 0.0),                               # not JSON
    ("", gt(PERSON), {}, 0.0), ("<", gt(PERSON), {}, 0.0),
    # toothbrush with no GT objects: early return before the matcher
    (items(("toothbrush", [0, 0, 1, 1])), {"target_id": [], "target_box": []}, {}, 0.25),
    # non-finite coordinates: torch.tensor accepts them, the matcher's NaN costs make scipy raise
    ('[{"bbox_2d": [0, 0, 10, NaN], "label": "person"}]', gt(PERSON), {}, 0.0),
    ('[{"bbox_2d": [0, 0, 10, 1e39], "label": "person"}]', gt(PERSON), {}, 0.0),   # float32 overflow → inf
    ('[{"bbox_2d": [0, 0, 10, Infinity], "label": "person"}]', {"target_id": [], "target_box": []}, {}, 0.25),
    # a bad box shape fails torch.tensor inside the parser, even without GT objects
    (items(("person", [0, 0, 10])), {"target_id": [], "target_box": []}, {}, 0.0),
])
def test_pr1_detection_values(text, sol, kw, expected):
    assert one("pr1_detection", text, sol, **kw) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("text, sol, kw, expected", [
    (items(PERSON, DOG, CAT), GT2, {}, 0.25 + 0.75 * 0.8 + 2 / 3 + (1 + IOU_DOG) / 3 - 0.5 / 3),
    (items(PERSON, DOG), GT3, {"do_penalty": False}, 0.25 + 0.75 * 0.8 + 2 / 3 + (1 + IOU_DOG) / 3),
    (items(PERSON, DOG, CAT), gt(PERSON, DOG, CAT), {}, 3.0),
    (items(PERSON, DOG), GT3, {"coverage_scale": 1.0},
     0.25 + 0.75 * 0.8 + 2 / 3 + (1 + IOU_DOG) / 3 - 0.5 / 3 + 2 / 3),
    # a toothbrush, an unknown label and a malformed box are just wrong items (n̂ = 4)
    (items(PERSON, ("toothbrush", [70, 70, 80, 80]), ("unicorn", [1, 1, 2, 2]), ("dog", [30, 20, 20, 30])), gt(PERSON), {},
     0.25 * 0.5 + 0.75 * 2 * 0.25 / 1.25 + 0.25 + 0.25 - 0.5 * 0.75),
    (items(("Person ", [0, 0, 10, 10])), gt(PERSON), {}, 3.0),                     # case / spaces in labels
    (json.dumps({"bbox_2d": [0, 0, 10, 10], "label": "person"}), gt(PERSON), {}, 3.0),  # single object
    (items(("dog", [20, 20, 30, 30])), gt(DOG), {}, 3.0),                          # correct class cost
    (items(PERSON), gt(("person", [10, 10, 0, 0])), {}, 3.0),                      # GT box repaired
    ("[]", {"target_id": [], "target_box": []}, {}, 3.0),                          # nothing to find, nothing said
    ("[]", gt(PERSON), {}, 0.0),
    (items(PERSON), {"target_id": [], "target_box": []}, {}, 0.0),
    (items(("unicorn", [0, 0, 10, 10])), gt(PERSON), {}, 0.0),
    ("", gt(PERSON), {}, 0.0), ("<", gt(PERSON), {}, 0.0),
])
def test_detection_robust_values(text, sol, kw, expected):
    assert one("detection_robust", text, sol, **kw) == pytest.approx(expected, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------------------
# An independent, per-sample, pure-Python statement of PR1's detection rules.
# ------------------------------------------------------------------------------------------
P_HOT, P_COLD = math.e / (math.e + 89), 1 / (math.e + 89)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / (union + 1e-8), union


def _giou(a, b):
    iou, union = _iou(a, b)
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1])) + 1e-8
    return iou - (hull - union) / hull


def _l1(a, b):
    ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2, a[2] - a[0], a[3] - a[1])
    cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1])
    return sum(abs(x - y) for x, y in zip(ca, cb))


def reference_pr1_detection(text, sol, do_penalty=True, coverage_scale=0.0):
    try:
        content = json.loads(text.replace("```json", "").replace("```", ""))
    except ValueError:
        return 0.0
    if not isinstance(content, list):
        return 0.0
    ids, boxes, wrong = [], [], 0
    for it in content:
        if isinstance(it, dict) and "bbox_2d" in it and it.get("label") in COCO_NAME_TO_ID:
            ids.append(COCO_NAME_TO_ID[it["label"]])
            boxes.append([float(v) for v in it["bbox_2d"]])
        else:
            wrong += 1
    if not ids:
        return 0.0
    reward = 0.25 * (1 - wrong / len(content))
    tids, tboxes = sol["target_id"], sol["target_box"]
    if not tids:
        return reward
    if max(ids) >= 90 or any(b[2] < b[0] or b[3] < b[1] for b in boxes + tboxes):
        return 0.0
    cost = [[5 * _l1(p, t) - (P_HOT if pid == tid - 1 else P_COLD) - 2 * _giou(p, t)
             for t, tid in zip(tboxes, tids)] for p, pid in zip(boxes, ids)]
    rows, cols = linear_sum_assignment(cost)
    kept = [(i, j) for i, j in zip(rows, cols) if _iou(boxes[i], tboxes[j])[0] > 0.5]
    k, n_p, n_g = len(kept), len(ids), len(tids)
    if k == 0:
        return reward
    p, r = k / n_p, k / n_g
    reward += 0.75 * 2 * p * r / (p + r + 1e-8)
    reward += sum(ids[i] == tids[j] for i, j in kept) / k + sum(_iou(boxes[i], tboxes[j])[0] for i, j in kept) / k
    if do_penalty:
        reward -= 0.5 * ((n_p - k) / n_p + (n_g - k) / n_g)
    reward = min(max(reward, 0.0), 3.0)
    if coverage_scale:
        cats = sorted(set(tids))
        reward += coverage_scale * sum(min(ids.count(c) / tids.count(c), 1.0) for c in cats) / len(cats)
    return reward


def random_detection_batch(n, seed, max_boxes=30, labels=COCO_CLASSES):
    """Realistic completions: GT 1..max_boxes objects; answers jitter, drop, relabel, add boxes."""
    rng = np.random.default_rng(seed)
    texts, sols = [], []
    for _ in range(n):
        m = int(rng.integers(1, max_boxes + 1))
        xy = rng.uniform(0, 560, (m, 2))
        wh = rng.uniform(4, 200, (m, 2))
        gboxes = np.round(np.concatenate([xy, np.minimum(xy + wh, 640)], 1), 2)
        glabels = rng.choice(len(labels), m)
        sols.append({"target_id": [COCO_NAME_TO_ID[labels[i]] for i in glabels], "target_box": gboxes.tolist()})
        k = int(rng.integers(1, max_boxes + 1))
        src = rng.integers(0, m, k)
        jitter = rng.normal(0, rng.uniform(1, 25), (k, 4))
        pb = gboxes[src] + jitter
        rand = rng.random(k) < 0.25
        pxy = rng.uniform(0, 560, (k, 2))
        pb[rand] = np.concatenate([pxy, pxy + rng.uniform(4, 200, (k, 2))], 1)[rand]
        pb = np.round(np.concatenate([np.minimum(pb[:, :2], pb[:, 2:]), np.maximum(pb[:, :2], pb[:, 2:])], 1)).astype(int)
        plab = np.where(rng.random(k) < 0.8, glabels[src], rng.choice(len(labels), k))
        out = [{"bbox_2d": b.tolist(), "label": labels[j]} for b, j in zip(pb, plab)]
        text = json.dumps(out)
        texts.append(f"```json\n{text}\n```" if rng.random() < 0.5 else text)
    return texts, sols


def test_fused_cost_equals_detr_cost():
    from pr1_jax.rewards.boxes import pairwise_giou, pairwise_l1_cxcywh
    from pr1_jax.rewards.detection import COST_GIOU, P_COLD, P_HOT, detr_cost
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (3, 7, 2))
    pb = np.concatenate([xy, xy + rng.uniform(0, 100, (3, 7, 2))], -1)
    xy = rng.uniform(0, 500, (3, 5, 2))
    gb = np.concatenate([xy, xy + rng.uniform(0, 100, (3, 5, 2))], -1)
    gb[0, 0] = pb[0, 0]                                   # an exact match
    hot = rng.random((3, 7, 5)) < 0.3
    giou, _ = pairwise_giou(pb, gb)
    expected = 5 * pairwise_l1_cxcywh(pb, gb) - np.where(hot, P_HOT, P_COLD) - 2 * giou
    np.testing.assert_allclose(detr_cost(pb, gb, hot), expected - (COST_GIOU - P_COLD), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kw", [{}, {"do_penalty": False}, {"coverage_scale": 0.5}])
def test_pr1_detection_matches_per_sample_reference(kw):
    no_brush = tuple(c for c in COCO_CLASSES if c != "toothbrush")
    texts, sols = random_detection_batch(300, seed=3, labels=no_brush)
    texts2, sols2 = random_detection_batch(100, seed=4)          # with toothbrushes (→ 0)
    texts, sols = texts + texts2, sols + sols2
    ours = rewards.get("pr1_detection", **kw)(texts, solution=sols)
    ref = np.asarray([reference_pr1_detection(t, s, **kw) for t, s in zip(texts, sols)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    assert (ours[:300] > 0.25).mean() > 0.8 and (ours[300:] == 0).any()


def test_detection_batch_equals_singles():
    texts, sols = random_detection_batch(60, seed=5)
    junk = [items(PERSON, ("dog", [1, 2, 3])), items(("dog", "[1, 2, 3, 4]")), "", "<", "[]", items(("unicorn", [0, 0, 1, 1])),
            '[{"bbox_2d": [0, 0, 10, NaN], "label": "person"}]', items(PERSON, ("toothbrush", [1, 1, 2, 2]))]
    for k, j in enumerate(junk):  # failing rows interleaved with good ones
        texts.insert(5 * k + 1, j)
        sols.insert(5 * k + 1, gt(PERSON))
    for name in ("pr1_detection", "detection_robust"):
        batch = rewards.get(name)(texts, solution=sols)
        single = np.asarray([one(name, t, s) for t, s in zip(texts, sols)], np.float32)
        np.testing.assert_array_equal(batch, single)


def test_shared_and_malformed_solutions():
    """GT objects shared by a group (parsed once), equal copies, JSON strings and malformed
    entries in one column give the same values as scoring each row alone."""
    texts, sols = random_detection_batch(24, seed=6)
    shared = [sols[i - i % 8] for i in range(24)]                       # groups of 8 share one object
    shared[3] = json.loads(json.dumps(shared[3]))                      # an equal copy
    shared[5] = json.dumps(shared[5])                                  # a JSON string
    shared[9] = {"target_id": [1], "target_box": [[0, 0, float("nan"), 1]]}   # malformed
    shared[10] = {"target_id": [1, 2], "target_box": [[0, 0, 1, 1]]}          # length mismatch
    shared[11] = "not a solution"
    shared[12] = {"target_id": [1], "target_box": [["0", 0, 1, 1]]}           # a string coordinate
    for name in ("pr1_detection", "detection_robust"):
        batch = rewards.get(name)(texts, solution=shared)
        single = np.asarray([one(name, t, s) for t, s in zip(texts, shared)], np.float32)
        np.testing.assert_array_equal(batch, single)
        assert (batch[9:13] == 0).all() and (batch[:8] > 0).any()
