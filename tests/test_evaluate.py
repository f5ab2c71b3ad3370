"""evaluate: end to end per task on the tiny model and synthetic data (metric keys, counts that
add up, report and gallery files, bad images skipped, one compile), and perfect scores when the
decoder returns the ground truth (the metric wiring, including detection's rescaling)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pr1_jax import evaluate as ev
from pr1_jax import evaluator
from pr1_jax.data import synthetic

N = 5
TASKS = ("grounding", "counting", "detection", "ocr")  # PR1's four, with their own evaluation files
METRIC_KEYS = {
    "grounding": {"n", "iou", "acc@0.1", "acc@0.3", "acc@0.5", "acc@0.75", "acc@0.95", "center_acc", "avg",
                  "parse_fail"},
    "counting": {"n", "accuracy", "no_answer"},
    "detection": {"n", "detections", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                  "ARm", "ARl"},
    "ocr": {"n", "edit_distance", "precision", "recall", "f1", "bleu", "meteor"},
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """N rows per task; image 2 of every task is not an image. Grounding also has a truncated
    image (found only when decoded) and a malformed row; counting a missing image file."""
    root = tmp_path_factory.mktemp("eval_data")
    out = {}
    for task in TASKS:
        files = synthetic.WRITERS[task](root / task, N, seed=7)
        data = files.eval_path
        (root / task / "images" / f"{task}_000002.png").write_bytes(b"definitely not a PNG")
        if task == "grounding":
            png = root / task / "images" / "grounding_000004.png"
            png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
            rows = json.loads(data.read_text())
            rows.append({"image": "images/grounding_000000.png", "problem": "x", "solution": "oops"})
            data.write_text(json.dumps(rows))
        if task == "counting":
            (root / task / "images" / "counting_000003.png").unlink()
        out[task] = (data, files.image_dir)
    return out


EXPECTED_SKIPS = {"grounding": {"bad_image": 2}, "counting": {"bad_image": 1, "missing_image": 1},
                  "detection": {"bad_image": 1}, "ocr": {"bad_image": 1}}


@pytest.mark.parametrize("task", TASKS)
def test_end_to_end(task, datasets, tiny_dir, tmp_path):
    data, image_dir = datasets[task]
    report = ev.evaluate(task, tiny_dir, data, image_dir=image_dir, batch_size=2, max_new_tokens=4,
                         out_dir=tmp_path, progress=False)
    counts = report["counts"]
    skips = EXPECTED_SKIPS[task]
    assert counts["skip_reasons"] == skips
    assert counts["examples"] == N and counts["skipped"] == sum(skips.values())
    assert counts["evaluated"] + counts["skipped"] == counts["examples"]
    assert counts["rows"] == counts["examples"] + counts["malformed"]
    assert counts["malformed"] == (1 if task == "grounding" else 0)
    assert set(report["metrics"]) == METRIC_KEYS[task]
    assert report["metrics"]["n"] == counts["evaluated"] == len(report["predictions"])
    assert sorted(s["index"] for s in report["skipped"]) == {
        "grounding": [2, 4], "counting": [2, 3], "detection": [2], "ocr": [2]}[task]
    assert report["num_compiled"] == 2  # fixed shapes: one prefill and one decode program for every batch
    assert all(p["num_tokens"] == 4 or p["stopped"] for p in report["predictions"])

    saved = json.loads((tmp_path / f"{task}.json").read_text())
    assert saved["counts"] == counts and len(saved["predictions"]) == counts["evaluated"]
    gallery = tmp_path / f"{task}_gallery.png"
    if task == "ocr":
        assert not gallery.exists() and "gallery" not in report["files"]
    else:
        assert Image.open(gallery).format == "PNG" and report["files"]["gallery"] == str(gallery)


def _truth(task, coco):
    """A stand-in for `greedy_decode` that answers each row with its ground truth."""
    anns = {}
    if coco is not None:
        names = {c["id"]: c["name"] for c in coco["categories"]}
        for a in coco["annotations"]:
            anns.setdefault(a["image_id"], []).append((names[a["category_id"]], a["bbox"]))

    def decode(_evaluator, _params, batch, examples):
        texts = []
        for k, ex in enumerate(examples):
            row = None if ex is None else ex.row
            if ex is None:
                texts.append("")
            elif task == "grounding":
                x1, y1, x2, y2 = row.get("normalized_solution", row["solution"])
                texts.append(f"<|object_ref_start|>{row['problem']}<|object_ref_end|>"
                             f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
            elif task == "counting":
                texts.append(f"<|object_ref_start|>{row['problem']}<|object_ref_end|>"
                             + "<|box_start|>(10,10),(20,20)<|box_end|>" * row["count"])
            elif task == "detection":  # Qwen2.5-VL style: pixels of the resized image
                (oh, ow), (rh, rw) = batch.original_hw[k], batch.resized_hw[k]
                items = [{"bbox_2d": [x * rw / ow, y * rh / oh, (x + w) * rw / ow, (y + h) * rh / oh], "label": name}
                         for name, (x, y, w, h) in anns[row["image_id"]]]
                texts.append("```json\n" + json.dumps(items) + "\n```")
            else:
                texts.append(row["solution"])
        return [evaluator.Completion(t, 1, True) for t in texts]

    return decode


@pytest.mark.parametrize("task", TASKS)
def test_ground_truth_answers_score_perfectly(task, datasets, tiny_dir, monkeypatch):
    data, image_dir = datasets[task]
    coco = json.loads(data.read_text()) if task == "detection" else None
    monkeypatch.setattr(evaluator, "greedy_decode", _truth(task, coco))
    report = ev.evaluate(task, tiny_dir, data, image_dir=image_dir, batch_size=3, progress=False)
    m = report["metrics"]
    assert report["counts"]["evaluated"] == N - sum(EXPECTED_SKIPS[task].values())
    if task == "grounding":
        assert m["acc@0.5"] == m["acc@0.95"] == m["center_acc"] == 100.0 and m["parse_fail"] == 0.0
        assert m["iou"] == pytest.approx(100.0) and all(p["iou"] == pytest.approx(1.0) for p in report["predictions"])
    elif task == "counting":
        assert m["accuracy"] == 100.0 and m["no_answer"] == 0.0
    elif task == "detection":
        assert m["AP"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
        # PR1's quirk (no rescaling) compares resized-image pixels with original GT: worse.
        quirk = ev.evaluate(task, tiny_dir, data, image_dir=image_dir, batch_size=3, progress=False, pr1_exact=True)
        assert quirk["metrics"]["AP"] < 0.9
    else:
        assert m["edit_distance"] == 0.0 and m["f1"] == 100.0 and m["meteor"] > 99.0


def test_limit_and_bad_arguments(datasets, tiny_dir, monkeypatch):
    data, image_dir = datasets["ocr"]
    monkeypatch.setattr(evaluator, "greedy_decode", _truth("ocr", None))
    report = ev.evaluate("ocr", tiny_dir, data, image_dir=image_dir, limit=2, progress=False)
    assert report["counts"]["examples"] == 2 and report["counts"]["evaluated"] == 2
    for kwargs, message in [(dict(task="nope"), "task must be one of"), (dict(batch_size=0), "batch_size"),
                            (dict(max_new_tokens=0), "max_new_tokens"), (dict(data="/no/such.json"), "no such data"),
                            (dict(limit=0), "limit must be positive"), (dict(gallery_size=-1), "gallery_size"),
                            (dict(out_dir=data), "--out_dir: cannot write")]:
        kw = {**dict(task="ocr", model_dir=tiny_dir, data=data), **kwargs}
        with pytest.raises(ev.EvalError, match=message):
            ev.evaluate(kw.pop("task"), kw.pop("model_dir"), kw.pop("data"), progress=False, **kw)
    # Counting also reads PR1's training rows (count = number of clicks).
    counting_data, counting_dir = datasets["counting"]
    monkeypatch.setattr(evaluator, "greedy_decode", _truth("counting", None))
    report = ev.evaluate("counting", tiny_dir, counting_data.parent / "counting.jsonl", image_dir=counting_dir,
                         progress=False)
    assert report["counts"]["evaluated"] == N - 2 and report["metrics"]["accuracy"] == 100.0
    # Detection also reads PR1's training rows, scored against their own boxes (the ground-truth
    # stand-in answers a COCO image id, which training rows do not have: the model decodes here).
    coco_data, coco_dir = datasets["detection"]
    monkeypatch.undo()
    rows = ev.evaluate("detection", tiny_dir, coco_data.parent / "detection.json", image_dir=coco_dir,
                       max_new_tokens=2, progress=False)
    assert rows["counts"]["evaluated"] == N - 1 and set(rows["metrics"]) == METRIC_KEYS["detection"]
    with pytest.raises(ev.EvalError, match="COCO instances JSON.*or training rows"):
        ev.evaluate("detection", tiny_dir, datasets["ocr"][0], progress=False)


def test_no_usable_row_is_refused(datasets, tiny_dir, caplog, tmp_path):
    """Another task's file, or images that are all missing: one EvalError (the CLI's one line),
    and none of the reader's per-row warnings, which would make the error more than one line.
    A file that is read keeps its warnings (the grounding file has one malformed row)."""
    grounding, grounding_dir = datasets["grounding"]
    with caplog.at_level("WARNING"):
        other_task = r"none of its 6 rows is a usable counting_eval row .*\(or training rows "
        with pytest.raises(ev.EvalError, match=other_task):
            ev.read_examples("counting", grounding)  # tried as PR1's eval JSONL, then as training rows
        with pytest.raises(ev.EvalError, match=r"none of its 5 rows is a usable grounding row"):
            ev.read_examples("grounding", datasets["ocr"][0])
        assert not [r for r in caplog.records if r.name.startswith("pr1_jax.data")], caplog.text
        examples, report, _ = ev.read_examples("grounding", grounding, image_dir=grounding_dir)
    assert len(examples) == N and report["skipped_malformed"] == 1
    assert [r for r in caplog.records if r.name.startswith("pr1_jax.data")], "the malformed row's warning is kept"
    with pytest.raises(ev.EvalError, match=r"none of its 5 grounding rows has a usable image .*check --image_dir"):
        ev.evaluate("grounding", tiny_dir, grounding, image_dir=tmp_path / "nowhere", progress=False)


def test_command_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pr1_jax.evaluate", "--task=ocr", f"--model_dir={tmp_path}",
                           f"--data={tmp_path / 'none.json'}"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"pr1_jax.evaluate: error: {tmp_path / 'none.json'}: no such data file or directory"


@pytest.mark.parametrize("task", TASKS)
def test_sharded_over_8_devices_equals_one(task, datasets, tiny_dir):
    """--devices: each batch's prompts split over the 8 fake CPU devices by the training
    rollout's sharded sampler; the same completions and metrics as on one device."""
    data, image_dir = datasets[task]
    kw = dict(image_dir=image_dir, batch_size=8, max_new_tokens=6, progress=False)
    one = ev.evaluate(task, tiny_dir, data, devices=1, **kw)
    eight = ev.evaluate(task, tiny_dir, data, devices=8, **kw)
    assert (one["config"]["devices"], eight["config"]["devices"]) == (1, 8)
    assert [p["completion"] for p in eight["predictions"]] == [p["completion"] for p in one["predictions"]]
    assert eight["metrics"] == one["metrics"] and eight["counts"] == one["counts"]
    with pytest.raises(ev.EvalError, match="batch_size=2 must be a multiple of the 8 devices"):
        ev.evaluate(task, tiny_dir, data, devices=8, **dict(kw, batch_size=2))
