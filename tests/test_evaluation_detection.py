"""Detection eval: PR1's JSON parsing (quirks included), COCO stats vs a direct pycocotools run,
faster-coco-eval agreement, PR1's skipped last image, coordinate rescaling."""

import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pr1_jax.evaluation import detection as d

FENCED = ('```json\n[{"bbox_2d": [12, 30, 200, 310], "label": "person"}, '
          '{"bbox_2d": [5, 5, 40, 40], "label": "cup"}]\n```')


def test_coco_table():
    assert len(d.COCO_CLASSES) == 80 == len(set(d.COCO_IDS))
    assert d.COCO_NAME_TO_ID["person"] == 1 and d.COCO_NAME_TO_ID["stop sign"] == 13
    assert d.COCO_NAME_TO_ID["dining table"] == 67 and d.COCO_NAME_TO_ID["toothbrush"] == 90


def test_parse_fenced_json():
    assert d.parse_detections(FENCED) == [
        {"category_id": 1, "bbox": [12.0, 30.0, 188.0, 280.0], "score": 1.0},
        {"category_id": 47, "bbox": [5.0, 5.0, 35.0, 35.0], "score": 1.0}]
    assert d.parse_detections("<think>x</think><answer>" + FENCED + "</answer>") == d.parse_detections(FENCED)


def test_pr1_quirks_and_robust_mode():
    items = [{"bbox_2d": [0, 0, 10, 10], "label": "dog"}, {"bbox_2d": [1, 1, 5, 5], "label": "unicorn"},
             {"bbox_2d": [2, 2, 6, 6], "label": "cat"}, {"label": "cat"},
             {"bbox_2d": [3, 3, 9, 9], "label": "bird"}]
    text = json.dumps(items)
    # unknown labels are skipped; the item without bbox_2d stops the image: the bird is lost
    assert [x["category_id"] for x in d.parse_detections(text)] == [18, 17]
    assert [x["category_id"] for x in d.parse_detections(text, robust=True)] == [18, 17, 16]
    truncated = text[:text.index('{"label"')] + '{"bbox_2d": [4, 4'
    assert d.parse_detections(truncated) == []  # invalid JSON → nothing for this image
    assert [x["category_id"] for x in d.parse_detections(truncated, robust=True)] == [18, 17]
    odd = '[{"bbox_2d": [10, 10, 2, 2], "label": " Dog "}, {"bbox_2d": [1, 1, 1, 5], "label": "cat"}]'
    assert d.parse_detections(odd, robust=True) == [{"category_id": 18, "bbox": [2.0, 2.0, 8.0, 8.0], "score": 1.0}]
    assert d.parse_detections(odd) == [{"category_id": 17, "bbox": [1.0, 1.0, 0.0, 4.0], "score": 1.0}]
    single = '{"bbox_2d": [0, 0, 1, 1], "label": "dog"}'
    assert d.parse_detections(single) == [] and len(d.parse_detections(single, robust=True)) == 1
    three = '[{"bbox_2d": [0, 0, 1], "label": "dog"}, {"bbox_2d": [0, 0, 1, 1], "label": "dog"}]'
    assert d.parse_detections(three) == [] and len(d.parse_detections(three, robust=True)) == 1
    dets = d.detections_from_completions([FENCED, "junk"], [7, 8])
    assert [x["image_id"] for x in dets] == [7, 7]


def _direct_pycocotools(gt, dets, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.fixture(scope="module")
def synthetic():
    return d.synthetic_coco(num_images=50, num_categories=5, seed=0)


def test_coco_eval_equals_pycocotools_and_faster(synthetic, tmp_path):
    gt, dets = synthetic
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    ref = _direct_pycocotools(gt, dets, tmp_path)
    ours = d.coco_eval(gt, dets, backend="pycocotools")
    assert list(ours) == list(d.STAT_NAMES)
    np.testing.assert_array_equal(list(ours.values()), ref)  # identical, not just close
    assert 0.1 < ours["AP"] < 0.9 and min(ours.values()) >= 0  # a non-trivial set: all sizes present
    fast = d.coco_eval(gt, dets, backend="faster_coco_eval")
    np.testing.assert_allclose(list(fast.values()), ref, rtol=0, atol=1e-9)
    assert gt == gt_before and dets == dets_before  # inputs untouched
    path = tmp_path / "gt2.json"
    path.write_text(json.dumps(gt))
    assert d.coco_eval(str(path), dets) == ours


def test_perfect_empty_and_skip_last(synthetic):
    gt, _ = synthetic
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    for backend in d.BACKENDS:
        assert d.coco_eval(gt, perfect, backend=backend)["AP"] == pytest.approx(1.0)
        empty = d.coco_eval(gt, [], backend=backend)
        assert empty["AP"] == 0 and empty["AR100"] == 0
    last = gt["images"][-1]["id"]
    assert any(a["image_id"] == last for a in gt["annotations"])
    skipped = d.coco_eval(gt, perfect, pr1_skip_last_image=True)
    assert skipped["AR100"] < 1.0  # the last image's GT still counts, with no detection
    manual = d.coco_eval(gt, [p for p in perfect if p["image_id"] != last])
    assert skipped == manual
    assert d.pr1_inferred_image_ids(gt) == [im["id"] for im in gt["images"][:-1]]
    only_first = d.coco_eval(gt, perfect, img_ids=[1])
    assert only_first["AP"] == pytest.approx(1.0)


def test_rescale_to_original():
    # an image of 480 x 640 (h, w) resized to 476 x 644: boxes scale by 640/644 in x, 480/476 in y
    np.testing.assert_allclose(d.rescale_boxes([[644, 476, 322, 238]], (476, 644), (480, 640)),
                               [[640, 480, 320, 240]])
    gt = {"images": [{"id": 3, "height": 480, "width": 640}], "annotations": [], "categories": []}
    out = d.rescale_detections([{"image_id": 3, "category_id": 1, "bbox": [0, 0, 644, 476], "score": 1.0}],
                               gt, {3: (476, 644)})
    np.testing.assert_allclose(out[0]["bbox"], [0, 0, 640, 480])


def test_evaluate_detection_end_to_end():
    gt = {"images": [{"id": 1, "height": 100, "width": 200}, {"id": 2, "height": 100, "width": 200}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 10, 50, 40], "area": 2000,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 50], "area": 5000,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}
    completions = ['[{"bbox_2d": [20, 20, 120, 100], "label": "dog"}]',  # resized 2x: original [10,10,60,50]
                   '[{"bbox_2d": [0, 0, 200, 100], "label": "person"}]']
    resized = {1: (200, 400), 2: (200, 400)}
    fixed = d.evaluate_detection(completions, [1, 2], gt, resized_hw=resized)
    assert fixed["AP"] == pytest.approx(1.0)
    pr1 = d.evaluate_detection(completions, [1, 2], gt, pr1_skip_last_image=True)
    assert pr1["AP"] < 0.5  # boxes in resized coordinates and the last image dropped


def test_backends_are_lazy_and_errors_clear(monkeypatch, synthetic):
    code = ("import sys, pr1_jax.evaluation, pr1_jax.evaluation.detection; "
            "assert 'pycocotools' not in sys.modules and 'faster_coco_eval' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    for mod in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        d.coco_eval(synthetic[0], synthetic[1])
    with pytest.raises(ValueError, match="backend"):
        d.coco_eval(synthetic[0], synthetic[1], backend="detectron")
