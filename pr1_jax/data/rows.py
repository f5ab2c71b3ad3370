"""One raw row → a normalised example, or a counted reason why it cannot be used.

    report = ReadReport("refcoco.json")
    examples = normalize_rows(enumerate(raw_rows), "grounding", report, image_dir="/data/coco")

`normalize` checks every value a task needs and raises `Malformed(reason)`; `count_row`
turns that (and any other failure of one row) into a skip counted under the reason, so a
bad row never costs the file. The reasons:

| reason                 | the row                                                             |
|------------------------|---------------------------------------------------------------------|
| `not_a_dict`           | is not a JSON object                                                |
| `missing_key:K`        | lacks column K (or it is null)                                      |
| `bad_type:K`           | has a column K of the wrong type (e.g. a number for `problem`)      |
| `empty_problem`        | has an empty question where the prompt shows it (grounding, counting) |
| `bad_<column>`         | has a ground truth that does not parse or has the wrong shape       |
|                        | (also an OCR answer that is another task's box, points or detection) |
| `not_finite`           | has a coordinate or id that is NaN, ±inf or too large for a float   |
| `bad_box`              | has a box with x2 < x1 or y2 < y1, or outside the image: negative,  |
|                        | beyond 1000 (Qwen2-VL space), beyond the width/height (pixels)      |
| `outside_image`        | has a counting click outside Qwen2-VL's [0, 1000] square            |
| `unknown_category`     | has a detection id that is not one of the 80 COCO ids               |
| `too_many_objects`     | has more than MAX_OBJECTS clicks / boxes / a larger count           |
| `count_mismatch`       | has a `count` that differs from its number of clicks                |
| `bad_image_size`       | has `width`/`height` columns that are not positive numbers          |
| `too_deep`             | nests deeper than Python's recursion limit (the row, or a string in it) |
| `bad_encoding`         | holds bytes that are not UTF-8, or text with lone surrogates        |
| `bad_json`             | is a JSON Lines line / list item that does not parse                |
| `bad_image_entry`      | is a COCO image entry without an id or file_name                    |
| `missing_image`, `bad_image` | (check_images only) has an image file that is absent / does not decode |
| `bad_row:<Error>`      | failed in a way no check above foresaw                              |
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import logging
import math
import os
import reprlib
from typing import Any, Callable, Iterable

import numpy as np

from pr1_jax import coco

log = logging.getLogger("pr1_jax.data.readers")  # one logger for the readers and their rows

TASKS = ("grounding", "counting", "counting_eval", "detection", "ocr")

# Default column names per task (PR1's problem_key / answer_key / image_key; docs/method.md §4.1).
DEFAULT_KEYS = {
    "grounding": ("image", "problem", "solution"),
    "counting": ("image", "problem", "clicks"),
    "counting_eval": ("image_path", "question", "ground_truth"),
    "detection": ("image", "problem", "solution"),
    "ocr": ("image", "conversations", "conversations"),
}
# Tasks whose prompt template shows the problem ("Output the bounding box of the {question}"):
# an empty one makes a prompt without a target.
NEEDS_PROBLEM = ("grounding", "counting", "counting_eval")

COCO_IDS = frozenset(coco.COCO_IDS)  # the 80 COCO category ids (1..90 without 10 unused ones)
QWEN_MAX = 1000  # Qwen2-VL's box / point space is [0, 1000]
# Detection boxes are absolute pixels. Without the image's size a coordinate beyond 2^20 px
# is still absurd (COCO images are ≤ 640 px, the largest camera sensors ~20k px), and the
# bound keeps every matching cost finite in float32 and float64 (the rewards' matcher raised
# "cost matrix is infeasible" on a coordinate near the float64 maximum).
MAX_PIXEL = float(1 << 20)
# COCO's own boxes overrun their image by a fraction of a pixel (float rounding of the
# polygons' extent): boxes up to one pixel past the edge are kept.
EDGE_TOLERANCE = 1.0
# Objects of one image. PixMo-Count's largest counts are in the tens and COCO's ~90 boxes;
# `stats` takes n! of each count exactly (factorial of 10^4 is milliseconds, of 10^9 hours).
MAX_OBJECTS = 10_000

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxlevel = 60, 60, 6, 3


class Malformed(ValueError):
    """A row that cannot be used; `reason` is the short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class ReadReport:
    """What a reader kept and skipped. `rows` = rows considered (after sampling)."""

    source: str
    rows: int = 0
    read: int = 0
    skipped_malformed: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_skips: list = dataclasses.field(default_factory=list)  # first few (row id, why), for the log

    def skip(self, row: Any, reason: str, detail: str = "") -> None:
        self.skipped_malformed += 1
        self.reasons[reason] += 1
        if len(self.first_skips) < 5:
            self.first_skips.append((row, (detail or reason)[:120]))

    def as_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "read": self.read,
                "skipped_malformed": self.skipped_malformed, "reasons": dict(self.reasons)}

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
        return (f"{self.source}: read {self.read} of {self.rows} rows; skipped "
                f"{self.skipped_malformed} malformed" + (f" ({why})" if why else ""))

    def warn(self) -> None:
        if self.skipped_malformed:
            first = "; ".join(f"row {r}: {why}" for r, why in self.first_skips)
            log.warning("%s. First: %s", self, first)


# ----------------------------------------------------------------------------- values


def _literal(value: Any, what: str) -> Any:
    """A JSON / Python-literal string parsed safely (PR1 uses eval; we never do)."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed("bad_encoding", f"{what} is not UTF-8") from e
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except RecursionError as e:  # json's C scanner recurses once per level
        raise Malformed("too_deep", f"{what} nests deeper than Python's recursion limit") from e
    except ValueError:
        pass
    try:
        return ast.literal_eval(value.strip())
    except (RecursionError, MemoryError) as e:  # the parser's own stack overflows
        raise Malformed("too_deep", f"{what} nests too deeply to parse") from e
    except (ValueError, SyntaxError, TypeError) as e:
        raise Malformed(f"bad_{what}", f"cannot parse {value[:60]!r}") from e


def _number(v: Any, what: str) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise Malformed(f"bad_{what}", f"non-numeric value {_short.repr(v)}")
    v = v.item() if isinstance(v, np.generic) else v
    try:
        f = float(v)
    except OverflowError as e:  # an int of 309+ digits
        raise Malformed("not_finite", f"{what}: an integer too large for a float") from e
    if not math.isfinite(f):
        raise Malformed("not_finite", f"{what}: {v!r}")
    if isinstance(v, int):
        return v
    return int(v) if v.is_integer() else v


def _numbers(seq: Any, n: int | None, what: str) -> list:
    if isinstance(seq, np.ndarray):
        seq = seq.tolist()
    if not isinstance(seq, (list, tuple)) or (n is not None and len(seq) != n):
        raise Malformed(f"bad_{what}", f"expected {n or 'a list of'} numbers, got {_short.repr(seq)}")
    return [_number(v, what) for v in seq]


def _box(value: Any, what: str, upper: tuple[float, float]) -> list:
    """[x1, y1, x2, y2] of finite numbers with 0 ≤ x1 ≤ x2 ≤ upper[0], 0 ≤ y1 ≤ y2 ≤ upper[1]."""
    x1, y1, x2, y2 = box = _numbers(value, 4, what)
    if x2 < x1 or y2 < y1 or min(box) < 0 or x2 > upper[0] or y2 > upper[1]:
        raise Malformed("bad_box", f"{_short.repr(box)} (allowed: 0 ≤ x1 ≤ x2 ≤ {upper[0]:.0f}, "
                                   f"0 ≤ y1 ≤ y2 ≤ {upper[1]:.0f})")
    return box


def _text(v: Any, key: str) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        v = bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item(), key)
    if not isinstance(v, str):
        raise Malformed(f"bad_type:{key}", type(v).__name__)
    try:  # a JSON "\udc80" escape gives a lone surrogate: the tokenizer cannot encode it
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Malformed("bad_encoding", f"{key} holds a lone surrogate") from e
    return v


def _get(row: dict, key: str) -> Any:
    if key not in row or row[key] is None:
        raise Malformed(f"missing_key:{key}")
    return row[key]


def _image_size(row: dict) -> tuple[float, float] | None:
    """(width, height) from the row's `width` / `height` columns (COCO rows have them), or None."""
    w, h = row.get("width"), row.get("height")
    if w is None and h is None:
        return None
    try:
        size = (_number(w, "image_size"), _number(h, "image_size"))
    except Malformed as e:
        raise Malformed("bad_image_size", f"width {_short.repr(w)}, height {_short.repr(h)}") from e
    if min(size) <= 0:
        raise Malformed("bad_image_size", f"width {w}, height {h}")
    return size


# ----------------------------------------------------------------------------- ground truths


def _solution_grounding(v: Any) -> list:
    return _box(_literal(v, "solution"), "solution", upper=(QWEN_MAX, QWEN_MAX))


def solution_box(v: Any, row: Any = None) -> list:
    """A ground-truth box [x1, y1, x2, y2] in Qwen2-VL's [0, 1000) space (a list, or its JSON or
    Python string), checked as grounding's is; raises `Malformed`. For tasks of `pr1_jax/tasks`
    whose rows hold grounding's box (`Task.parse_solution`)."""
    del row
    return _solution_grounding(v)


def task_keys(task: str) -> tuple[str, str, str]:
    """(image, problem, answer) columns of `task`: PR1's for the tasks read here (`DEFAULT_KEYS`),
    else those a task of `pr1_jax/tasks` declares (`Task.columns`); ValueError for neither."""
    if task in DEFAULT_KEYS:
        return DEFAULT_KEYS[task]
    own = _own_task(task)
    if own is None:
        raise ValueError(f"unknown task {task!r}; expected one of {all_tasks()}")
    return own.columns


def all_tasks() -> tuple[str, ...]:
    """The reading formats here and every task of `pr1_jax/tasks` that brings its own reader."""
    from pr1_jax import tasks

    return TASKS + tuple(n for n in tasks.names() if n not in TASKS and tasks.get(n).columns is not None)


def _own_task(task: str):
    """The registered task `task` if it reads its rows itself (`columns` and `parse_solution`)."""
    from pr1_jax import tasks  # lazy: pr1_jax.tasks imports pr1_jax.data

    if task in DEFAULT_KEYS or task not in tasks.names():
        return None
    t = tasks.get(task)
    return t if t.columns is not None and t.parse_solution is not None else None


def _solution_counting(v: Any) -> list:
    v = _literal(v, "clicks")
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise Malformed("bad_clicks", f"expected a list of points, got {type(v).__name__}")
    if len(v) > MAX_OBJECTS:
        raise Malformed("too_many_objects", f"{len(v)} clicks (at most {MAX_OBJECTS})")
    points = []
    for p in v:
        if isinstance(p, dict) and "x" in p and "y" in p:  # PixMo's raw {x, y} points
            p = [p["x"], p["y"]]
        x, y = _numbers(p, 2, "clicks")
        if not (0 <= x <= QWEN_MAX and 0 <= y <= QWEN_MAX):
            raise Malformed("outside_image", f"click {[x, y]} outside [0, {QWEN_MAX}]²")
        points.append([x, y])
    return points


def _solution_count(v: Any) -> int:
    if isinstance(v, str) and v.strip().isascii() and v.strip().lstrip("-").isdigit() and len(v.strip()) < 20:
        v = int(v)
    try:
        n = _number(v, "ground_truth")
    except Malformed as e:
        raise Malformed("bad_ground_truth", _short.repr(v)) from e
    if not isinstance(n, int) or n < 0:
        raise Malformed("bad_ground_truth", _short.repr(v))
    if n > MAX_OBJECTS:
        raise Malformed("too_many_objects", f"count {n} (at most {MAX_OBJECTS})")
    return n


def _solution_detection(v: Any, size: tuple[float, float] | None) -> dict:
    v = _literal(v, "solution")
    if not isinstance(v, dict):
        raise Malformed("bad_solution", f"expected a dict, got {type(v).__name__}")
    ids, boxes = v.get("target_id"), v.get("target_box")
    if ids is None or boxes is None:
        raise Malformed("bad_solution", "needs target_id and target_box")
    ids = _numbers(ids, None, "solution")
    if isinstance(boxes, np.ndarray):
        boxes = boxes.tolist()
    if not isinstance(boxes, (list, tuple)) or len(boxes) != len(ids):
        raise Malformed("bad_solution", f"{len(ids)} target_id but target_box {_short.repr(boxes)}")
    if len(ids) > MAX_OBJECTS:
        raise Malformed("too_many_objects", f"{len(ids)} boxes (at most {MAX_OBJECTS})")
    if any(not isinstance(i, int) or i not in COCO_IDS for i in ids):
        raise Malformed("unknown_category", _short.repr(ids))
    upper = (MAX_PIXEL, MAX_PIXEL) if size is None else (size[0] + EDGE_TOLERANCE, size[1] + EDGE_TOLERANCE)
    return {**v, "target_id": ids, "target_box": [_box(b, "solution", upper) for b in boxes]}


def _solution_ocr(v: Any) -> tuple[str, str]:
    v = _literal(v, "conversations")
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or len(v) < 2 or not all(isinstance(t, dict) for t in v[:2]):
        raise Malformed("bad_conversations", "expected [{value: question}, {value: answer}, ...]")
    return _text(_get(v[0], "value"), "conversations"), _text(_get(v[1], "value"), "conversations")


def _ocr_text(v: Any, key: str) -> str:
    """An OCR answer from a plain {image, problem, solution} row: text, and not another task's
    structured ground truth (a grounding box "[x1, y1, x2, y2]", counting clicks, a detection
    {target_id, target_box}), which would make a file of another task read as OCR rows."""
    text = _text(v, key)
    stripped = text.strip()
    if stripped[:1] in ("[", "{") and len(stripped) < 100_000:
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError):
            parsed = None
        if _structured_truth(parsed):
            raise Malformed(f"bad_{key}", f"{stripped[:60]!r} is a box/point/detection ground truth, "
                                          "not OCR text (a file of another task?)")
    return text


def _structured_truth(v: Any) -> bool:
    """A list of numbers (a box), a list of such lists (points, boxes), or a detection dict."""
    if isinstance(v, dict):
        return "target_id" in v or "target_box" in v
    if not isinstance(v, list) or not v:
        return False
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return all(number(x) for x in v) or all(
        isinstance(p, list) and p and all(number(x) for x in p) for p in v)


# ----------------------------------------------------------------------------- rows


def resolve_image(value: Any, image_dir: str | os.PathLike | None) -> Any:
    """A row's image → what `processing.image.load_image` takes: a path joined with
    `image_dir` when relative, bytes, or (from TFDS / in-memory data) an array / PIL image.
    HF Image dicts {"bytes", "path"} become their bytes, else their (joined) path."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):  # bytes(5) = 5 NULs
                raise Malformed("bad_type:image", f"image bytes of type {type(data).__name__}")
            return bytes(data)
        if value.get("path"):
            return resolve_image(value["path"], image_dir)
        raise Malformed("bad_type:image", "image dict without bytes or path")
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not isinstance(path, str) or not path or "\0" in path:  # open() raises on a NUL
            raise Malformed("bad_type:image", "empty path or a path with a NUL character")
        if image_dir is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_dir), path)
        return path
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return value
    if type(value).__module__.startswith("PIL."):
        return value
    raise Malformed("bad_type:image", type(value).__name__)


def normalize(row: Any, task: str, *, image_dir=None, image_key: str | None = None,
              problem_key: str | None = None, answer_key: str | None = None) -> dict:
    """One raw row → a normalised example (see `readers`). Raises `Malformed`."""
    own = _own_task(task)  # a task of pr1_jax/tasks with its own columns and solution parser
    if task not in DEFAULT_KEYS and own is None:
        raise ValueError(f"unknown task {task!r}; expected one of {all_tasks()}")
    if isinstance(row, Malformed):  # a placeholder for a line / item that did not parse
        raise row
    if not isinstance(row, dict):
        raise Malformed("not_a_dict", type(row).__name__)
    d_image, d_problem, d_answer = task_keys(task)
    image_key, problem_key, answer_key = image_key or d_image, problem_key or d_problem, answer_key or d_answer
    out = dict(row)
    out["image"] = resolve_image(_get(row, image_key), image_dir)
    if task == "ocr" and answer_key == "conversations" and "conversations" not in row \
            and "problem" in row and "solution" in row:
        problem_key, answer_key = "problem", "solution"  # plain {image, problem, solution} OCR rows
    if task == "ocr" and answer_key == "conversations":
        out["problem"], out["solution"] = _solution_ocr(_get(row, "conversations"))
        return out
    if task == "detection":  # PR1's detection template does not use the problem
        out["problem"] = _text(row.get(problem_key) or "", problem_key)
    else:
        out["problem"] = _text(_get(row, problem_key), problem_key)
    if (task in NEEDS_PROBLEM or own is not None and own.question_key) and not out["problem"].strip():
        raise Malformed("empty_problem", f"column {problem_key!r} is empty")
    raw = _get(row, answer_key)
    if own is not None:
        out["solution"] = own.parse_solution(raw, row)
    elif task == "grounding":
        out["solution"] = _solution_grounding(raw)
    elif task == "counting":
        out["solution"] = _solution_counting(raw)
        count = row.get("count")
        if count is not None and (not isinstance(count, (int, np.integer)) or int(count) != len(out["solution"])):
            raise Malformed("count_mismatch", f"count {_short.repr(count)} but {len(out['solution'])} clicks")
        out["count"] = len(out["solution"])
    elif task == "counting_eval":
        out["solution"] = out["count"] = _solution_count(raw)
    elif task == "detection":
        out["solution"] = _solution_detection(raw, _image_size(row))
    else:  # ocr with an explicit answer column
        out["solution"] = _ocr_text(raw, answer_key)
    if answer_key == "solution" and not _same(raw, out["solution"]):
        out["solution_raw"] = raw  # e.g. grounding's "[x1, y1, x2, y2]" string
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except ValueError:  # arrays
        return False


def check_image(ex: dict, task: str) -> None:
    """Decodes the example's image: Malformed if it is missing, does not decode, or (detection)
    a box lies outside it."""
    from pr1_jax.processing.image import ImageError, load_image
    src = ex["image"]
    if isinstance(src, str) and not os.path.exists(src):
        raise Malformed("missing_image", src)
    try:
        img = load_image(src)
    except ImageError as e:
        raise Malformed("bad_image", str(e)) from e
    if task == "detection":
        w, h = img.width + EDGE_TOLERANCE, img.height + EDGE_TOLERANCE
        for box in ex["solution"]["target_box"]:
            if box[2] > w or box[3] > h:
                raise Malformed("bad_box", f"{box} outside the {img.width}×{img.height} image")


def count_row(report: ReadReport, where: Any, make: Callable[[], dict]) -> dict | None:
    """`make()` (one row's example), or None after counting why the row was skipped."""
    report.rows += 1
    try:
        ex = make()
    except Malformed as e:
        report.skip(where, e.reason, str(e))
        return None
    except RecursionError:  # a check walked a structure nested near the recursion limit
        report.skip(where, "too_deep")
        return None
    except (TypeError, ValueError, OverflowError, MemoryError, UnicodeError) as e:
        # A value no check foresaw (e.g. a column whose comparison raises): the row is
        # unusable, and one such row must not cost the rest of the file.
        report.skip(where, f"bad_row:{type(e).__name__}", f"{type(e).__name__}: {e}")
        return None
    report.read += 1
    return ex


def normalize_rows(rows: Iterable[tuple[Any, Any]], task: str, report: ReadReport, *,
                   check_images: bool = False, **kw) -> list[dict]:
    """rows: (row id for messages, raw row) pairs → the usable examples (the rest counted)."""
    def make(row):
        ex = normalize(row, task, **kw)
        if check_images:
            check_image(ex, task)
        return ex

    return [ex for where, row in rows if (ex := count_row(report, where, lambda: make(row))) is not None]
