"""Readers for PR1's data formats → lists of example dicts with normalised keys.

    examples, report = read("refcoco.json", "grounding", image_dir="/data/coco")
    print(report)   # read 4998 of 5000 rows; skipped 2 malformed (bad_solution: 2)

Every example has `image` (a resolved path, encoded bytes, or — from TFDS — a decoded
array), `problem` (str) and `solution` (the task's ground truth, parsed and typed), plus
the row's other columns unchanged. A value the reader replaced keeps its original under
`<key>_raw` when it differs (e.g. grounding's "[1, 2, 3, 4]" string).

| task            | file (PR1 §4)                         | solution                               |
|-----------------|---------------------------------------|----------------------------------------|
| `grounding`     | JSON list {image, problem, solution}  | [x1, y1, x2, y2] in Qwen2-VL [0, 1000] |
| `counting`      | JSONL {image, problem, clicks[, count]} | [[x, y], ...] in [0, 1000]; + `count` |
| `counting_eval` | JSONL {image_path, question, ground_truth} | int count                         |
| `detection`     | JSON {image, problem, solution: {target_id, target_box}} | same dict, ids/boxes typed |
| `ocr`           | JSON {image, conversations: [{value: q}, {value: gt}]} | gt text              |

Sources (`read` picks by path): `.json` (a list, or JSON Lines despite the name), `.jsonl`,
`.yaml`/`.yml` mixtures (`read_mixture`), HF `datasets` directories written by
`save_to_disk` and parquet files or directories of them (`read_hf`), TFDS array_record
directories or `tfds:NAME` (`read_tfds`).

Malformed rows (missing keys, unparsable or ill-typed ground truth, a non-dict row,
bad JSON lines) are skipped and counted in the returned `ReadReport` — never a crash and
never a silent drop; one warning per file summarises them. `check_images=True`
additionally decodes every image and skips missing or corrupt ones (slow on big data sets:
by default that is left to the pipeline, which skips them lazily and counts them too).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import glob
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

TASKS = ("grounding", "counting", "counting_eval", "detection", "ocr")

# Default column names per task (PR1's problem_key / answer_key / image_key; §3.12, §4).
DEFAULT_KEYS = {
    "grounding": ("image", "problem", "solution"),
    "counting": ("image", "problem", "clicks"),
    "counting_eval": ("image_path", "question", "ground_truth"),
    "detection": ("image", "problem", "solution"),
    "ocr": ("image", "conversations", "conversations"),
}

# The 80 COCO category ids (1..90 without the 10 unused ones).
COCO_IDS = frozenset(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})


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
    first_skips: list = dataclasses.field(default_factory=list)  # first few (row id, reason), for the log

    def skip(self, row: Any, reason: str) -> None:
        self.skipped_malformed += 1
        self.reasons[reason] += 1
        if len(self.first_skips) < 5:
            self.first_skips.append((row, reason))

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


# ----------------------------------------------------------------------------- row parsing


def _literal(value: Any, what: str) -> Any:
    """A JSON / Python-literal string parsed safely (PR1 uses eval; we never do)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise Malformed(f"bad_{what}", f"cannot parse {value[:60]!r}") from e


def _number(v: Any) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(type(v).__name__)
    v = v.item() if isinstance(v, np.generic) else v
    if not math.isfinite(v):
        raise ValueError("not finite")
    return int(v) if float(v).is_integer() else float(v)


def _numbers(seq: Any, n: int | None, what: str) -> list:
    if isinstance(seq, np.ndarray):
        seq = seq.tolist()
    if not isinstance(seq, (list, tuple)) or (n is not None and len(seq) != n):
        raise Malformed(f"bad_{what}", f"expected {n or 'a list of'} numbers, got {str(seq)[:60]}")
    try:
        return [_number(v) for v in seq]
    except (TypeError, ValueError) as e:
        raise Malformed(f"bad_{what}", f"non-numeric value in {str(seq)[:60]}") from e


def _box(value: Any, what: str, upper: float | None) -> list:
    x1, y1, x2, y2 = box = _numbers(value, 4, what)
    if x2 < x1 or y2 < y1 or min(box) < 0 or (upper is not None and max(box) > upper):
        raise Malformed("bad_box", f"{box}")
    return box


def _text(v: Any, key: str) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        v = bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item(), key)
    if not isinstance(v, str):
        raise Malformed(f"bad_type:{key}", type(v).__name__)
    return v


def _get(row: dict, key: str) -> Any:
    if key not in row or row[key] is None:
        raise Malformed(f"missing_key:{key}")
    return row[key]


def _solution_grounding(v: Any) -> list:
    return _box(_literal(v, "solution"), "solution", upper=1000)


def _solution_counting(v: Any) -> list:
    v = _literal(v, "clicks")
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise Malformed("bad_clicks", f"expected a list of points, got {type(v).__name__}")
    points = []
    for p in v:
        if isinstance(p, dict) and "x" in p and "y" in p:  # PixMo's raw {x, y} points
            p = [p["x"], p["y"]]
        points.append(_numbers(p, 2, "clicks"))
    return points


def _solution_count(v: Any) -> int:
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    try:
        n = _number(v)
    except (TypeError, ValueError) as e:
        raise Malformed("bad_ground_truth", str(v)[:60]) from e
    if not isinstance(n, int) or n < 0:
        raise Malformed("bad_ground_truth", str(v)[:60])
    return n


def _solution_detection(v: Any) -> dict:
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
        raise Malformed("bad_solution", f"{len(ids)} target_id but target_box {str(boxes)[:60]}")
    if any(not isinstance(i, int) or i not in COCO_IDS for i in ids):
        raise Malformed("unknown_category", f"{ids}")
    return {**v, "target_id": ids, "target_box": [_box(b, "solution", upper=None) for b in boxes]}


def _solution_ocr(v: Any) -> tuple[str, str]:
    v = _literal(v, "conversations")
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or len(v) < 2 or not all(isinstance(t, dict) for t in v[:2]):
        raise Malformed("bad_conversations", "expected [{value: question}, {value: answer}, ...]")
    return _text(_get(v[0], "value"), "conversations"), _text(_get(v[1], "value"), "conversations")


def resolve_image(value: Any, image_dir: str | os.PathLike | None) -> Any:
    """A row's image → what `processing.image.load_image` takes: a path joined with
    `image_dir` when relative, bytes, or (from TFDS / in-memory data) an array / PIL image.
    HF Image dicts {"bytes", "path"} become their bytes, else their (joined) path."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return resolve_image(value["path"], image_dir)
        raise Malformed("bad_type:image", "image dict without bytes or path")
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not path:
            raise Malformed("bad_type:image", "empty path")
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
    """One raw row → a normalised example (see the module docstring). Raises `Malformed`."""
    if task not in DEFAULT_KEYS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not isinstance(row, dict):
        raise Malformed("not_a_dict", type(row).__name__)
    d_image, d_problem, d_answer = DEFAULT_KEYS[task]
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
    raw = _get(row, answer_key)
    if task == "grounding":
        out["solution"] = _solution_grounding(raw)
    elif task == "counting":
        out["solution"] = _solution_counting(raw)
        count = row.get("count")
        if count is not None and (not isinstance(count, (int, np.integer)) or int(count) != len(out["solution"])):
            raise Malformed("count_mismatch", f"count {count} but {len(out['solution'])} clicks")
        out["count"] = len(out["solution"])
    elif task == "counting_eval":
        out["solution"] = out["count"] = _solution_count(raw)
    elif task == "detection":
        out["solution"] = _solution_detection(raw)
    else:  # ocr with an explicit answer column
        out["solution"] = _text(raw, answer_key)
    if answer_key == "solution" and not _same(raw, out["solution"]):
        out["solution_raw"] = raw  # e.g. grounding's "[x1, y1, x2, y2]" string
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except ValueError:  # arrays
        return False


def _check_image(ex: dict) -> None:
    from pr1_jax.processing.image import ImageError, load_image
    src = ex["image"]
    if isinstance(src, str) and not os.path.exists(src):
        raise Malformed("missing_image", src)
    try:
        load_image(src)
    except ImageError as e:
        raise Malformed("bad_image", str(e)) from e


def _normalize_one(where: Any, row: Any, task: str, report: ReadReport, *, check_images: bool = False,
                   **keys) -> dict | None:
    """A normalised example, or None after counting why the row was skipped.

    `row` may be a `Malformed` placeholder (an unparsable JSONL line)."""
    report.rows += 1
    try:
        if isinstance(row, Malformed):
            raise row
        ex = normalize(row, task, **keys)
        if check_images:
            _check_image(ex)
    except Malformed as e:
        report.skip(where, e.reason)
        return None
    report.read += 1
    return ex


def _normalize_all(rows: Iterable[tuple[Any, Any]], task: str, report: ReadReport, **kw) -> list[dict]:
    """rows: (row id for messages, raw row) pairs."""
    return [ex for where, row in rows if (ex := _normalize_one(where, row, task, report, **kw)) is not None]


# ----------------------------------------------------------------------------- JSON / JSONL


def load_rows(path: str | os.PathLike) -> list[Any]:
    """Raw rows of a JSON list file or a JSON Lines file (by content, not by name).

    A JSONL line that does not parse becomes a `Malformed('bad_json')` placeholder so that
    the caller counts it; a top-level JSON that is not a list raises ValueError."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON list ({e})") from e
        return rows
    if stripped.startswith("{") and str(path).endswith(".json"):
        try:  # a single JSON object: a dict of columns is not PR1's format
            obj = json.loads(text)
            raise ValueError(f"{path}: expected a JSON list of rows (or JSON Lines), got an object "
                             f"with keys {sorted(obj)[:8]}")
        except json.JSONDecodeError:
            pass  # JSON Lines named .json (PR1's counting file)
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(Malformed("bad_json", f"line {i + 1}: {e}"))
    return rows


def read_json(path, task: str, *, image_dir=None, train_sample_size: int | None = None,
              check_images: bool = False, **keys) -> tuple[list[dict], ReadReport]:
    """A PR1 JSON / JSONL annotation file. `train_sample_size`: the first N rows (PR1)."""
    rows = load_rows(path)
    if train_sample_size is not None:
        rows = rows[:train_sample_size]
    report = ReadReport(os.fspath(path))
    examples = _normalize_all(enumerate(rows), task, report, image_dir=image_dir,
                              check_images=check_images, **keys)
    report.warn()
    return examples, report


# ----------------------------------------------------------------------------- YAML mixtures


def sample_rows(rows: Sequence[Any], strategy: str | None, *, seed: int = 0) -> list[Any]:
    """PR1's mixture sampling: "all", "first:N", "end:N", "random:N"; N may be "10%".

    A percentage takes ceil(p·len/100) rows; N larger than the file takes all of it.
    "random" draws without replacement with `np.random.default_rng(seed)` and keeps the
    file order of the drawn rows.
    """
    rows = list(rows)
    if strategy is None or str(strategy).strip().lower() in ("", "all"):
        return rows
    kind, _, amount = str(strategy).strip().partition(":")
    kind, amount = kind.strip().lower(), amount.strip()
    try:
        if amount.endswith("%"):
            n = math.ceil(float(amount[:-1]) * len(rows) / 100)
        else:
            n = int(amount)
    except ValueError as e:
        raise ValueError(f"bad sampling strategy {strategy!r}: N must be an int or a percentage") from e
    if n < 0:
        raise ValueError(f"bad sampling strategy {strategy!r}: negative N")
    n = min(n, len(rows))
    if kind == "first":
        return rows[:n]
    if kind == "end":
        return rows[len(rows) - n:]
    if kind == "random":
        idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        return [rows[i] for i in idx]
    raise ValueError(f"bad sampling strategy {strategy!r}: expected all, first:N, end:N or random:N")


def read_mixture(path, task: str, *, image_dir=None, seed: int = 0, train_sample_size: int | None = None,
                 check_images: bool = False, **keys) -> tuple[list[dict], ReadReport]:
    """A PR1 YAML mixture:

        datasets:
          - json_path: refcoco.json        # relative paths: against the YAML's folder
            sampling_strategy: random:10%  # all | first:N | end:N | random:N, N or P%
            image_dir: /data/coco          # optional, overrides the `image_dir` argument

    The files are concatenated in order; `random` entry i uses seed (seed, i).
    `train_sample_size` then keeps the first N rows of the mixture.
    """
    import yaml

    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    entries = spec.get("datasets") if isinstance(spec, dict) else spec
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a 'datasets:' list of {{json_path, sampling_strategy}}")
    sampled: list[tuple[Any, Any, Any]] = []  # (where, row, image_dir)
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"json_path": entry}
        file = entry.get("json_path") or entry.get("path")
        if not file:
            raise ValueError(f"{path}: entry {i} has no json_path")
        file = Path(os.path.expanduser(file))
        if not file.is_absolute():
            file = path.parent / file
        rows = load_rows(file)
        strategy = entry.get("sampling_strategy", "all")
        entry_seed = int(np.random.SeedSequence((seed, i)).generate_state(1)[0])
        rows = sample_rows(rows, strategy, seed=entry_seed)
        entry_dir = entry.get("image_dir", image_dir)
        sampled.extend(((file.name, j), r, entry_dir) for j, r in enumerate(rows))
    if train_sample_size is not None:
        sampled = sampled[:train_sample_size]
    report = ReadReport(os.fspath(path))
    examples = [ex for where, row, entry_dir in sampled
                if (ex := _normalize_one(where, row, task, report, image_dir=entry_dir,
                                         check_images=check_images, **keys)) is not None]
    report.warn()
    return examples, report


# ----------------------------------------------------------------------------- HF datasets / parquet


def _hf_table(path: Path, split: str | None):
    """A pyarrow Table of an HF dataset directory / parquet file (no `datasets` needed)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading HF datasets / parquet needs the 'pyarrow' package "
                          "(pip install pyarrow), or the 'datasets' package") from e
    if path.is_file():
        if path.suffix == ".parquet":
            return pq.read_table(path)
        if path.suffix == ".arrow":
            return _read_arrow([path])
        raise ValueError(f"{path}: expected a .parquet or .arrow file")
    if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        split = split if split in splits else ("train" if "train" in splits else splits[0])
        return _hf_table(path / split, None)
    if (path / "state.json").exists():  # Dataset.save_to_disk
        state = json.loads((path / "state.json").read_text())
        return _read_arrow([path / f["filename"] for f in state["_data_files"]])
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        raise ValueError(f"{path}: no parquet files, state.json or dataset_dict.json found")
    if split is not None:  # hub layout: data/{split}-00000-of-0000N.parquet
        chosen = [f for f in files if os.path.basename(f).startswith(split) or f"/{split}/" in f]
        files = chosen or files
    return pa.concat_tables([pq.read_table(f) for f in files])


def _read_arrow(files: Sequence[Path]):
    import pyarrow as pa
    tables = []
    for f in files:
        with pa.memory_map(os.fspath(f)) as source:
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                tables.append(pa.ipc.open_file(source).read_all())
    return pa.concat_tables(tables)


def read_hf(path, task: str, *, image_dir=None, split: str | None = "train",
            train_sample_size: int | None = None, check_images: bool = False,
            **keys) -> tuple[list[dict], ReadReport]:
    """An HF dataset on disk: `save_to_disk` output (Dataset or DatasetDict: split `split`,
    else "train", else the first one), a parquet file, or a directory of parquet files (a
    hub snapshot; files whose names start with `split` when there are any).

    Read with pyarrow directly (the `datasets` package is not needed); HF Image columns
    ({bytes, path} structs) become bytes or joined paths. `train_sample_size` slices the
    first N rows *before* they are turned into Python objects.
    """
    path = Path(path)
    table = _hf_table(path, split)
    if train_sample_size is not None:
        table = table.slice(0, train_sample_size)
    report = ReadReport(os.fspath(path))
    examples = _normalize_all(enumerate(table.to_pylist()), task, report, image_dir=image_dir,
                              check_images=check_images, **keys)
    report.warn()
    return examples, report


# ----------------------------------------------------------------------------- TFDS


class LazyExamples(Sequence):
    """Random-access view of a record source: examples normalised on access.

    Only valid record indices are kept (found by one validating pass), so the images
    stay on disk until the pipeline reads them. Picklable when the source is (TFDS
    array_record data sources are), so grain worker processes can use it.
    """

    def __init__(self, source, indices: np.ndarray, convert: Callable[[Any], dict]):
        self.source, self.indices, self.convert = source, indices, convert

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.convert(self.source[int(self.indices[i])])


@dataclasses.dataclass(frozen=True)
class _TfdsConvert:
    task: str
    image_dir: Any
    keys: tuple  # sorted (name, column) pairs of image_key / problem_key / answer_key

    def __call__(self, record: Any) -> dict:
        keys = dict(self.keys)
        image_key = keys.get("image_key") or DEFAULT_KEYS[self.task][0]
        if isinstance(record, dict):
            record = {k: _plain(v, is_image=(k == image_key)) for k, v in record.items()}
        return normalize(record, self.task, image_dir=self.image_dir, **keys)


def _plain(v: Any, is_image: bool = False) -> Any:
    """A TFDS record value → Python: UTF-8 bytes → str, 0-d arrays → items, object arrays
    → lists. An image column keeps its bytes unless they are a short NUL-free UTF-8 string
    (a path); encoded PNG/JPEG/WebP data is never valid UTF-8 that way."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bytes, np.bytes_)):
        v = bytes(v)
        if is_image and (len(v) > 4096 or b"\0" in v):
            return v
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    if isinstance(v, np.ndarray) and v.dtype == object:
        return [_plain(x) for x in v.tolist()]
    return v


def read_tfds(name_or_dir, task: str, *, split: str = "train", data_dir=None, image_dir=None,
              train_sample_size: int | None = None, check_images: bool = False,
              **keys) -> tuple[LazyExamples, ReadReport]:
    """A TFDS dataset in array_record format, read without TensorFlow.

    `name_or_dir`: a prepared builder directory (`.../name/config/version`, read with
    `tfds.builder_from_directory`) or a registered name (`tfds.data_source(name, data_dir=)`).
    Image features come back decoded (uint8 arrays) for `tfds.features.Image`, or as
    encoded bytes for a bytes/Text feature (the cheaper choice when writing a data set).
    Returns a lazy sequence: one pass validates every record (count + reasons in the
    report); examples are re-read and normalised on access.
    """
    import tensorflow_datasets as tfds

    p = Path(os.fspath(name_or_dir))
    if p.is_dir():
        source = tfds.builder_from_directory(os.fspath(p)).as_data_source(split=split)
    else:
        source = tfds.data_source(os.fspath(name_or_dir), split=split, data_dir=data_dir)
    n = len(source) if train_sample_size is None else min(len(source), train_sample_size)
    convert = _TfdsConvert(task, image_dir, tuple(sorted(keys.items())))
    report = ReadReport(f"tfds:{name_or_dir}[{split}]")
    keep = []
    for i in range(n):
        report.rows += 1
        try:
            ex = convert(source[i])
            if check_images:
                _check_image(ex)
        except Malformed as e:
            report.skip(i, e.reason)
            continue
        keep.append(i)
        report.read += 1
    report.warn()
    return LazyExamples(source, np.asarray(keep, np.int64), convert), report


# ----------------------------------------------------------------------------- dispatch


def read(path, task: str, *, image_dir=None, train_sample_size: int | None = None, seed: int = 0,
         split: str = "train", check_images: bool = False, image_key: str | None = None,
         problem_key: str | None = None, answer_key: str | None = None) -> tuple[Sequence[dict], ReadReport]:
    """Reads any supported source (picked by path; see the module docstring).

    `tfds:NAME` or a directory with `features.json` → TFDS; `.yaml`/`.yml` → mixture;
    `.json`/`.jsonl` → PR1 JSON; `.parquet`, `.arrow` or another directory → HF on disk.
    `seed` only matters for `random:` mixture entries.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    keys = {k: v for k, v in (("image_key", image_key), ("problem_key", problem_key),
                              ("answer_key", answer_key)) if v}
    common = dict(image_dir=image_dir, train_sample_size=train_sample_size, check_images=check_images, **keys)
    s = os.fspath(path)
    if s.startswith("tfds:"):
        return read_tfds(s[len("tfds:"):], task, split=split, **common)
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        if (p / "features.json").exists() or (p / "dataset_info.json").exists() and glob.glob(
                os.path.join(p, "*.array_record*")):
            return read_tfds(p, task, split=split, **common)
        return read_hf(p, task, split=split, **common)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such data file or directory")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return read_mixture(p, task, seed=seed, **common)
    if suffix in (".json", ".jsonl"):
        return read_json(p, task, **common)
    if suffix in (".parquet", ".arrow"):
        return read_hf(p, task, split=split, **common)
    raise ValueError(f"{p}: unknown data format {suffix!r} (expected .json, .jsonl, .yaml, .parquet, "
                     f".arrow, an HF dataset directory, a TFDS directory or tfds:NAME)")
