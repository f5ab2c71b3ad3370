"""Synthetic perception data sets in PR1's file formats (docs/method.md §4.2–4.5).

    files = write_grounding("/tmp/syn", n=256, seed=0)   # -> SyntheticFiles
    examples, report = readers.read(files.path, "grounding", image_dir=files.image_dir)

Every generator draws small scenes of coloured shapes (circle / square / triangle ×
red / green / blue / yellow / purple) with NumPy + PIL, writes the images as PNG files
under `out_dir/images/` and the annotation file(s) into `out_dir`; image paths in the
rows are relative to `out_dir` (= `image_dir`). Output is a pure function of the
arguments: image `i` is drawn from `np.random.default_rng((seed, i))`, so the same seed
gives byte-identical files and the first k images do not depend on `n`.

Shapes are drawn without anti-aliasing and never overlap; every box is the exact pixel
extent of the drawn shape, as pixel edges `[x1, y1, x2, y2]` (x2, y2 exclusive).

Coordinate spaces (W, H = image width, height):
  * Qwen2-VL space = integers in [0, 1000): `int(1000·x/W)`, `int(1000·y/H)`. Used by
    grounding `solution` / `normalized_solution` and counting `clicks` (§4.2, §4.3).
  * absolute pixels of the image as written: detection `target_box` and the COCO file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pr1_jax import cli
from pr1_jax.errors import ConfigError

COLORS = {  # name -> RGB; far apart so a tiny model (and the tests) tell them apart exactly
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)

# A small subset of COCO with the real category ids; each is drawn as one kind of shape.
COCO_SUBSET = (  # (coco id, name, colour, shape)
    (1, "person", "red", "circle"),
    (3, "car", "blue", "square"),
    (17, "cat", "green", "triangle"),
    (18, "dog", "yellow", "square"),
    (44, "bottle", "purple", "circle"),
)

OCR_WORDS = (
    "the quick brown fox jumps over lazy dog page text line model data image paper "
    "table figure result method train test value score point box count read write "
    "north south east west river stone cloud green light small large first second"
).split()


@dataclasses.dataclass(frozen=True)
class SyntheticFiles:
    path: Path  # training-format annotation file
    # The held-out file, in the one format that both training (`data.eval` → `readers.read`)
    # and `python -m pr1_jax.evaluate` read: the training file itself for grounding and OCR,
    # training rows with PR1's eval columns for counting, COCO instances for detection.
    eval_path: Path
    image_dir: Path  # root that the rows' relative image paths are joined with


@dataclasses.dataclass(frozen=True)
class Shape:
    color: str
    kind: str  # one of SHAPES
    box: tuple[int, int, int, int]  # drawn pixel extent, x2/y2 exclusive
    area: int  # number of drawn pixels

    @property
    def label(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


# ----------------------------------------------------------------------------- drawing


def _draw(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, s: int, fill) -> None:
    x1, y1 = x0 + s - 1, y0 + s - 1
    if kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _place(rng: np.random.Generator, w: int, h: int, sizes: Sequence[int], taken: list, gap: int = 3):
    """Top-left corners for squares of the given sides, not overlapping `taken` (+gap)."""
    out = []
    for s in sizes:
        for _ in range(200):
            x0 = int(rng.integers(gap, w - s - gap + 1))
            y0 = int(rng.integers(gap, h - s - gap + 1))
            box = (x0 - gap, y0 - gap, x0 + s + gap, y0 + s + gap)
            if all(box[0] >= t[2] or box[2] <= t[0] or box[1] >= t[3] or box[3] <= t[1] for t in taken):
                taken.append((x0, y0, x0 + s, y0 + s))
                out.append((x0, y0))
                break
        else:
            return None
    return out


def _background(w: int, h: int, kind: str) -> Image.Image:
    """"plain": one colour. "coords": red grows left→right, green top→bottom (CoordConv-style),
    so every patch shows where it is — a tiny model trained from scratch has no other
    absolute-position signal (Qwen2-VL's RoPE is relative); real checkpoints don't need it."""
    if kind == "plain":
        return Image.new("RGB", (w, h), BACKGROUND)
    if kind != "coords":
        raise ValueError(f"unknown background {kind!r} (plain | coords)")
    x = np.broadcast_to(np.linspace(40, 215, w, dtype=np.float32)[None, :], (h, w))
    y = np.broadcast_to(np.linspace(40, 215, h, dtype=np.float32)[:, None], (h, w))
    rgb = np.stack([x, y, np.full((h, w), 128, np.float32)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def _place_on_grid(rng: np.random.Generator, w: int, h: int, sizes: Sequence[int], grid: int):
    """Top-left corners of squares centred in distinct cells of a grid × grid layout (±2 px)."""
    cells = rng.choice(grid * grid, size=len(sizes), replace=False)
    out = []
    for cell, s in zip(cells, sizes):
        cx, cy = (cell % grid + 0.5) * w / grid, (cell // grid + 0.5) * h / grid
        out.append((int(np.clip(round(cx - s / 2) + rng.integers(-2, 3), 0, w - s)),
                    int(np.clip(round(cy - s / 2) + rng.integers(-2, 3), 0, h - s))))
    return out


def _render(rng: np.random.Generator, w: int, h: int, kinds: Sequence[tuple[str, str]],
            size_frac: tuple[float, float], background: str = "plain",
            grid: int = 0) -> tuple[Image.Image, list[Shape]] | None:
    """Draws shapes of the given (colour, kind) at random non-overlapping places.

    grid > 0: each shape is centred in its own cell of a grid × grid layout and
    `size_frac` is relative to the cell's side (an easier task: few distinct positions).
    Returns None when they do not fit (the caller re-draws the scene)."""
    side = min(w, h) / grid if grid else min(w, h)
    lo, hi = max(6, int(size_frac[0] * side)), max(7, int(size_frac[1] * side))
    sizes = [int(rng.integers(lo, hi + 1)) for _ in kinds]
    corners = _place_on_grid(rng, w, h, sizes, grid) if grid else _place(rng, w, h, sizes, [])
    if corners is None:
        return None
    image = _background(w, h, background)
    draw = ImageDraw.Draw(image)
    shapes = []
    for (color, kind), (x0, y0), s in zip(kinds, corners, sizes):
        mask = Image.new("L", (w, h), 0)
        _draw(ImageDraw.Draw(mask), kind, x0, y0, s, 255)
        box = mask.getbbox()  # exact drawn extent, right/lower exclusive
        area = int(np.count_nonzero(np.asarray(mask)))
        if background == "coords":  # half-transparent: the gradient (position) shows through the shape
            image = Image.composite(Image.blend(image, Image.new("RGB", (w, h), COLORS[color]), 0.5), image, mask)
            draw = ImageDraw.Draw(image)
        else:
            _draw(draw, kind, x0, y0, s, COLORS[color])
        shapes.append(Shape(color, kind, tuple(int(v) for v in box), area))
    return image, shapes


def _image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    return w, h


def to_qwen(v: float, extent: int) -> int:
    """Pixel coordinate → Qwen2-VL [0, 1000) integer space: int(1000·v/extent), clipped to 999."""
    return min(999, int(1000 * v / extent))


def qwen_box(box: Sequence[float], w: int, h: int) -> list[int]:
    x1, y1, x2, y2 = box
    return [to_qwen(x1, w), to_qwen(y1, h), to_qwen(x2, w), to_qwen(y2, h)]


def _save_png(image: Image.Image, out_dir: Path, rel: str) -> None:
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _kinds(colors: Sequence[str], shapes: Sequence[str]) -> list[tuple[str, str]]:
    return [(c, s) for c in colors for s in shapes]


# ----------------------------------------------------------------------------- grounding


def grounding_scene(rng: np.random.Generator, w: int, h: int, *, max_shapes: int = 4, min_shapes: int = 2,
                    colors: Sequence[str] = ("red", "green", "blue", "yellow"),
                    shapes: Sequence[str] = SHAPES, p_spatial: float = 0.3,
                    size_frac: tuple[float, float] = (0.16, 0.28), background: str = "plain", grid: int = 0):
    """One grounding scene: (image, target Shape, referring expression).

    The expression identifies the target uniquely: either "the red circle" (no other red
    circle in the image) or "the red circle on the left/right" (exactly one other red
    circle, clearly on the other side)."""
    kinds = _kinds(colors, shapes)
    while True:
        target = kinds[int(rng.integers(len(kinds)))]
        others = [k for k in kinds if k != target]
        n = int(rng.integers(min_shapes, max_shapes + 1))
        spatial = n >= 2 and rng.random() < p_spatial
        scene = [target] + ([target] if spatial else []) + [
            others[int(rng.integers(len(others)))] for _ in range(n - 1 - spatial)]
        drawn = _render(rng, w, h, scene, tuple(size_frac), background, grid)
        if drawn is None:
            continue
        image, objs = drawn
        if not spatial:
            return image, objs[0], f"the {objs[0].label}"
        a, b = objs[0], objs[1]
        if abs(a.center[0] - b.center[0]) < 0.25 * min(w, h):
            continue  # too close horizontally for "left"/"right" to be clear
        side = "left" if a.center[0] < b.center[0] else "right"
        return image, a, f"the {a.label} on the {side}"


def write_grounding(out_dir, n: int, *, seed: int = 0, min_side: int = 112, max_side: int = 224,
                    name: str = "grounding", **scene_kw) -> SyntheticFiles:
    """RefCOCO-style rows `{image, problem, solution, normalized_solution}` (JSON list).

    `problem` is the referring expression; `solution` is the *string* "[x1, y1, x2, y2]"
    (the training format, PR1 parses it with eval) and `normalized_solution` the same box
    as a list of ints (the eval format's key for Qwen2-VL box-token outputs). Both are in
    Qwen2-VL's [0, 1000) space: int(1000·x/W), int(1000·y/H) of the drawn pixel extent.
    """
    out_dir = Path(out_dir)
    rows = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        w, h = _image_size(rng, min_side, max_side)
        image, target, expression = grounding_scene(rng, w, h, **scene_kw)
        rel = f"images/{name}_{i:06d}.png"
        _save_png(image, out_dir, rel)
        box = qwen_box(target.box, w, h)
        rows.append({"image": rel, "problem": expression, "solution": str(box), "normalized_solution": box})
    path = out_dir / f"{name}.json"
    _write_json(path, rows)
    return SyntheticFiles(path, path, out_dir)


# ----------------------------------------------------------------------------- counting


def write_counting(out_dir, n: int, *, seed: int = 0, min_side: int = 112, max_side: int = 224,
                   max_count: int = 6, max_distractors: int = 4, name: str = "counting",
                   colors: Sequence[str] = ("red", "green", "blue", "yellow"),
                   shapes: Sequence[str] = SHAPES) -> SyntheticFiles:
    """PixMo-Count-style data: k ∈ [1, max_count] shapes of one kind among distractors.

    Training file `{name}.jsonl`: `{image, problem, clicks, count}` with `problem` the
    plural label ("red circles") and `clicks` the shape centres `[[x, y], ...]` in Qwen2-VL
    [0, 1000) space. Eval file `{name}_eval.jsonl`: the same rows plus PR1's eval columns
    `{image_path, question, ground_truth}` (pixmo_count_{val,test}540.jsonl), so that training
    reads it as `counting` (its rewards need the clicks) and `evaluate` / PR1's script as
    `counting_eval`.
    """
    out_dir = Path(out_dir)
    kinds = _kinds(colors, shapes)
    train, evals = [], []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        w, h = _image_size(rng, min_side, max_side)
        while True:
            target = kinds[int(rng.integers(len(kinds)))]
            others = [k for k in kinds if k != target]
            k = int(rng.integers(1, max_count + 1))
            d = int(rng.integers(0, max_distractors + 1))
            scene = [target] * k + [others[int(rng.integers(len(others)))] for _ in range(d)]
            drawn = _render(rng, w, h, scene, (0.09, 0.15))
            if drawn is not None:
                break
        image, objs = drawn
        rel = f"images/{name}_{i:06d}.png"
        _save_png(image, out_dir, rel)
        clicks = [[to_qwen(o.center[0], w), to_qwen(o.center[1], h)] for o in objs[:k]]
        label = f"{target[0]} {target[1]}s"
        train.append({"image": rel, "problem": label, "clicks": clicks, "count": k})
        evals.append({**train[-1], "image_path": rel, "question": label, "ground_truth": k})
    path, eval_path = out_dir / f"{name}.jsonl", out_dir / f"{name}_eval.jsonl"
    _write_jsonl(path, train)
    _write_jsonl(eval_path, evals)
    return SyntheticFiles(path, eval_path, out_dir)


# ----------------------------------------------------------------------------- detection


def write_detection(out_dir, n: int, *, seed: int = 0, min_side: int = 112, max_side: int = 224,
                    max_objects: int = 6, name: str = "detection",
                    categories: Sequence[tuple[int, str, str, str]] = COCO_SUBSET) -> SyntheticFiles:
    """COCO-style detection over a few real COCO categories (each drawn as one shape kind).

    Training file `{name}.json` (PR1's detection rows): `{image, problem, solution:
    {target_id: [coco ids], target_box: [[x1, y1, x2, y2], ...]}}`, boxes in absolute pixels
    of the written image; `problem` lists the category names (PR1's template ignores it).
    Eval file `{name}_coco.json`: COCO annotation format (images / annotations /
    categories with the real COCO ids; bbox [x, y, w, h]; area = drawn pixels; iscrowd 0),
    which `evaluate` scores with pycocotools and `readers.read(..., "detection")` turns back
    into the training rows (training's `data.eval`).
    """
    out_dir = Path(out_dir)
    kinds = [(c, s) for _, _, c, s in categories]
    rows, images, annotations = [], [], []
    problem = ", ".join(nm for _, nm, _, _ in categories)
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        w, h = _image_size(rng, min_side, max_side)
        while True:
            m = int(rng.integers(1, max_objects + 1))
            cats = [int(rng.integers(len(categories))) for _ in range(m)]
            drawn = _render(rng, w, h, [kinds[c] for c in cats], (0.12, 0.24))
            if drawn is not None:
                break
        image, objs = drawn
        rel = f"images/{name}_{i:06d}.png"
        _save_png(image, out_dir, rel)
        ids = [categories[c][0] for c in cats]
        rows.append({"image": rel, "problem": problem,
                     "solution": {"target_id": ids, "target_box": [list(o.box) for o in objs]}})
        image_id = i + 1
        images.append({"id": image_id, "file_name": rel, "width": w, "height": h})
        for cid, o in zip(ids, objs):
            x1, y1, x2, y2 = o.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cid,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o.area, "iscrowd": 0})
    coco = {"info": {"description": f"pr1_jax synthetic detection (seed {seed})"}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": nm, "supercategory": "synthetic"} for cid, nm, _, _ in categories]}
    path, eval_path = out_dir / f"{name}.json", out_dir / f"{name}_coco.json"
    _write_json(path, rows)
    _write_json(eval_path, coco)
    return SyntheticFiles(path, eval_path, out_dir)


# ----------------------------------------------------------------------------- OCR


def write_ocr(out_dir, n: int, *, seed: int = 0, width: int = 224, height: int = 112,
              max_lines: int = 3, font_size: int = 14, name: str = "ocr") -> SyntheticFiles:
    """PageOCR-style pages of 1..max_lines rendered text lines (Pillow's default font).

    Rows `{image, conversations: [{from: human, value: question}, {from: gpt, value: text}]}`
    (PR1's OCR eval format); the ground truth is the lines joined with "\\n".
    """
    out_dir = Path(out_dir)
    font = ImageFont.load_default(size=font_size)
    rows = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        image = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        line_h = font_size + 4
        n_lines = max(1, min(max_lines, int(rng.integers(1, max_lines + 1)), (height - 8) // line_h))
        lines = []
        for j in range(n_lines):
            words = [OCR_WORDS[int(rng.integers(len(OCR_WORDS)))] for _ in range(int(rng.integers(1, 6)))]
            while len(words) > 1 and draw.textlength(" ".join(words), font=font) > width - 12:
                words.pop()
            line = " ".join(words)
            draw.text((6, 4 + j * line_h), line, fill=(0, 0, 0), font=font)
            lines.append(line)
        rel = f"images/{name}_{i:06d}.png"
        _save_png(image, out_dir, rel)
        rows.append({"image": rel, "conversations": [
            {"from": "human", "value": "<image>\nOCR this image: "},
            {"from": "gpt", "value": "\n".join(lines)}]})
    path = out_dir / f"{name}.json"
    _write_json(path, rows)
    return SyntheticFiles(path, path, out_dir)


WRITERS = {"grounding": write_grounding, "counting": write_counting,
           "detection": write_detection, "ocr": write_ocr}


NAME = "pr1_jax.data.synthetic"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pr1_jax.data.synthetic --task=counting --out=/tmp/counting --n=256`. Expected
    failures (bad flags, an unwritable --out, ...) print one line and exit 2 (`pr1_jax.cli`)."""
    return cli.run(NAME, _main, argv)


def _main(argv: Sequence[str] | None) -> None:
    parser = cli.ArgumentParser(NAME, description="Write a synthetic PR1-format data set (train and eval files).")
    parser.add_argument("--task", choices=sorted(WRITERS), required=True)
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--n", type=int, default=256, help="number of examples (≥ 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="file-name prefix (default: the task)")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise ConfigError(f"--n={args.n}: the number of examples must be ≥ 1")
    if args.name is not None and (not args.name.strip() or "/" in args.name or os.sep in args.name
                                  or args.name in (".", "..")):
        raise ConfigError(f"--name={args.name!r}: must be a plain file-name prefix such as 'train' (no '/')")
    out = cli.writable_dir(args.out, "--out")
    kw = {"name": args.name} if args.name else {}
    files = WRITERS[args.task](out, args.n, seed=args.seed, **kw)
    print(f"wrote {args.n} {args.task} examples: {files.path} (eval: {files.eval_path})")


if __name__ == "__main__":
    sys.exit(main())
