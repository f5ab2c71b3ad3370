"""Synthetic generators: byte-determinism by seed, and ground truth that matches the pixels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pr1_jax.data import synthetic

REPO = Path(__file__).resolve().parents[1]
REAL_COCO_NAMES = {1: "person", 3: "car", 17: "cat", 18: "dog", 44: "bottle"}


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", sorted(synthetic.WRITERS))
def test_deterministic_by_seed(tmp_path, task):
    write = synthetic.WRITERS[task]
    write(tmp_path / "a", 5, seed=3)
    write(tmp_path / "b", 5, seed=3)
    write(tmp_path / "c", 5, seed=4)
    a, b, c = (_tree(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    # Image i depends only on (seed, i): a longer data set starts with the same images.
    write(tmp_path / "d", 7, seed=3)
    d = _tree(tmp_path / "d")
    assert all(d[k] == v for k, v in a.items() if k.endswith(".png"))


def _components(image: np.ndarray, color: str):
    """(pixel-edge box, kind) of every connected blob of exactly this colour."""
    mask = np.all(image == np.array(synthetic.COLORS[color], np.uint8), axis=-1)
    labels, n = ndimage.label(mask)
    out = []
    for sl in ndimage.find_objects(labels):
        ys, xs = sl
        box = (xs.start, ys.start, xs.stop, ys.stop)
        fill = mask[sl].mean()
        kind = "square" if fill > 0.97 else "circle" if fill > 0.68 else "triangle"
        out.append((box, kind, mask[sl].sum()))
    return out


def test_grounding_ground_truth(tmp_path):
    files = synthetic.write_grounding(tmp_path, 40, seed=0)
    rows = json.loads(files.path.read_text())
    assert len(rows) == 40 and files.eval_path == files.path
    spatial = 0
    for row in rows:
        assert set(row) == {"image", "problem", "solution", "normalized_solution"}
        image = np.asarray(Image.open(files.image_dir / row["image"]).convert("RGB"))
        h, w = image.shape[:2]
        assert 112 <= h <= 224 and 112 <= w <= 224
        box = row["normalized_solution"]
        assert row["solution"] == str(box) and all(isinstance(v, int) and 0 <= v < 1000 for v in box)
        words = row["problem"].split()  # "the red circle" / "the red circle on the left"
        color, kind = words[1], words[2]
        same = [c for c in _components(image, color) if c[1] == kind]
        matches = [c for c in same if synthetic.qwen_box(c[0], w, h) == box]
        assert len(matches) == 1, row
        (x1, y1, x2, y2), _, _ = matches[0]
        # The box, mapped back to pixels, encloses every pixel of the shape.
        assert box[0] * w / 1000 <= x1 and box[1] * h / 1000 <= y1
        assert x2 <= (box[2] + 1) * w / 1000 and y2 <= (box[3] + 1) * h / 1000
        if len(words) == 3:
            assert len(same) == 1  # "the red circle" is unique
        else:
            spatial += 1
            assert len(same) == 2 and words[-1] in ("left", "right")
            other = [c for c in same if c is not matches[0]][0]
            cx, ox = (x1 + x2) / 2, (other[0][0] + other[0][2]) / 2
            assert (cx < ox) == (words[-1] == "left")
    assert 0 < spatial < 40


def test_counting_ground_truth(tmp_path):
    files = synthetic.write_counting(tmp_path, 30, seed=1)
    train = [json.loads(line) for line in files.path.read_text().splitlines()]
    evals = [json.loads(line) for line in files.eval_path.read_text().splitlines()]
    assert len(train) == len(evals) == 30
    for row, ev in zip(train, evals):
        # the training row plus PR1's eval columns: one file that both `counting` and `counting_eval` read
        assert ev == {**row, "image_path": row["image"], "question": row["problem"], "ground_truth": row["count"]}
        assert row["count"] == len(row["clicks"]) >= 1
        image = np.asarray(Image.open(files.image_dir / row["image"]).convert("RGB"))
        h, w = image.shape[:2]
        color, kind = row["problem"].split()
        objs = [c for c in _components(image, color) if c[1] == kind.rstrip("s")]
        assert len(objs) == row["count"]
        hit = set()
        for x, y in row["clicks"]:
            assert 0 <= x < 1000 and 0 <= y < 1000
            px, py = x * w / 1000, y * h / 1000
            inside = [i for i, ((a, b, c, d), _, _) in enumerate(objs) if a <= px <= c and b <= py <= d]
            assert len(inside) == 1
            hit.add(inside[0])
        assert len(hit) == row["count"]


def test_detection_ground_truth_and_coco(tmp_path):
    files = synthetic.write_detection(tmp_path, 20, seed=2)
    rows = json.loads(files.path.read_text())
    coco = json.loads(files.eval_path.read_text())
    assert {c["id"]: c["name"] for c in coco["categories"]} == REAL_COCO_NAMES
    assert len(coco["images"]) == len(rows) == 20
    draw = {cid: (color, kind) for cid, _, color, kind in synthetic.COCO_SUBSET}
    anns = iter(coco["annotations"])
    for row, img in zip(rows, coco["images"]):
        sol = row["solution"]
        assert img["file_name"] == row["image"] and len(sol["target_id"]) == len(sol["target_box"]) >= 1
        image = np.asarray(Image.open(files.image_dir / row["image"]).convert("RGB"))
        assert (img["height"], img["width"]) == image.shape[:2]
        for cid, box in zip(sol["target_id"], sol["target_box"]):
            ann = next(anns)
            x1, y1, x2, y2 = box
            assert ann["image_id"] == img["id"] and ann["category_id"] == cid and ann["iscrowd"] == 0
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            color, kind = draw[cid]
            comp = [c for c in _components(image, color) if tuple(c[0]) == tuple(box)]
            assert len(comp) == 1 and comp[0][1] == kind and comp[0][2] == ann["area"]
    # The GT, scored as detections, is perfect under pycocotools.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = COCO(str(files.eval_path))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_ocr_format(tmp_path):
    files = synthetic.write_ocr(tmp_path, 10, seed=0)
    rows = json.loads(files.path.read_text())
    for row in rows:
        question, answer = (t["value"] for t in row["conversations"])
        assert "OCR" in question
        lines = answer.split("\n")
        assert 1 <= len(lines) <= 3 and all(w in synthetic.OCR_WORDS for ln in lines for w in ln.split())
        ink = (np.asarray(Image.open(files.image_dir / row["image"]).convert("L")) < 128).any(axis=1)
        bands = np.count_nonzero(np.diff(ink.astype(int)) == 1) + int(ink[0])
        assert bands == len(lines)  # one band of dark rows per rendered line


def test_grounding_on_a_grid(tmp_path):
    """grid=2: each shape centred (±2 px) in its own quadrant, size relative to the cell."""
    files = synthetic.write_grounding(tmp_path, 24, seed=3, min_side=112, max_side=112, min_shapes=1,
                                      max_shapes=1, size_frac=(0.7, 0.9), background="coords", grid=2)
    cells = set()
    for row in json.loads(files.path.read_text()):
        x1, y1, x2, y2 = (v * 112 / 1000 for v in row["normalized_solution"])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        col, r = int(cx // 56), int(cy // 56)
        assert abs(cx - (col + 0.5) * 56) <= 3.5 and abs(cy - (r + 0.5) * 56) <= 3.5, row
        assert 0.7 * 56 - 2 <= x2 - x1 <= 0.9 * 56 + 1, row
        cells.add((col, r))
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 1)}


# ----------------------------------------------------------------------------- command line
def _cli(module, *args, cwd):
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.returncode, out.stdout, out.stderr


def test_cli_writes_both_files(tmp_path):
    code, out, err = _cli("pr1_jax.data.synthetic", "--task=counting", f"--out={tmp_path / 'c'}", "--n=3",
                          cwd=tmp_path)
    assert code == 0, err
    assert out.startswith("wrote 3 counting examples") and (tmp_path / "c" / "counting_eval.jsonl").is_file()


@pytest.mark.parametrize("args, says", [
    (["--task=segmentation", "--out=x"], "argument --task: invalid choice: 'segmentation'"),
    (["--task=ocr"], "the following arguments are required: --out"),
    (["--task=ocr", "--out=x", "--n=many"], "argument --n: invalid int value: 'many'"),
    (["--task=ocr", "--out=x", "--n=0"], "--n=0: the number of examples must be ≥ 1"),
    (["--task=ocr", "--out=x", "--name=a/b"], "--name='a/b': must be a plain file-name prefix"),
    (["--task=ocr", "--out=a_file/sub"], "--out: cannot write to a_file/sub"),
    (["--task=ocr", "--out=/proc/pr1_jax_no_such_dir"], "--out: cannot write to /proc/pr1_jax_no_such_dir"),
    (["--task=ocr", "--out=x", "--tsak=ocr"], "unrecognized arguments: --tsak=ocr"),
])
def test_cli_expected_failures_are_one_line(tmp_path, args, says):
    (tmp_path / "a_file").write_text("a file, not a directory\n")
    code, out, err = _cli("pr1_jax.data.synthetic", *args, cwd=tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pr1_jax.data.synthetic: error: ") and says in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing written
