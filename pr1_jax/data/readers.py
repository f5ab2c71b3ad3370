"""Readers for PR1's data formats → lists of example dicts with normalised keys.

    examples, report = read("refcoco.json", "grounding", image_dir="/data/coco")
    print(report)   # read 4998 of 5000 rows; skipped 2 malformed (bad_solution: 2)

Every example has `image` (a resolved path, encoded bytes, or — from TFDS — a decoded
array), `problem` (str) and `solution` (the task's ground truth, parsed and typed), plus
the row's other columns unchanged. A value the reader replaced keeps its original under
`<key>_raw` when it differs (e.g. grounding's "[1, 2, 3, 4]" string).

| task            | file (docs/method.md §4)                         | solution                               |
|-----------------|---------------------------------------|----------------------------------------|
| `grounding`     | JSON list {image, problem, solution}  | [x1, y1, x2, y2] in Qwen2-VL [0, 1000] |
| `counting`      | JSONL {image, problem, clicks[, count]} | [[x, y], ...] in [0, 1000]; + `count` |
| `counting_eval` | JSONL {image_path, question, ground_truth} | int count                         |
| `detection`     | JSON {image, problem, solution: {target_id, target_box}}; or COCO instances | same dict, typed (pixels) |
| `ocr`           | JSON {image, conversations: [{value: q}, {value: gt}]} | gt text              |

Sources (`read` picks by path): `.json` (a list, JSON Lines despite the name, or COCO
instances), `.jsonl`, `.yaml`/`.yml` mixtures (`read_mixture`), HF `datasets` directories
written by `save_to_disk` and parquet files or directories of them (`read_hf`), TFDS
array_record directories or `tfds:NAME` (`read_tfds`).

Bad data never stops a run: a row unusable for any reason (see the table of reasons in
`pr1_jax/data/rows.py`: missing or ill-typed columns, unparsable ground truth, coordinates
that are non-finite or outside the image, an empty problem, nesting past the recursion
limit, bytes that are not UTF-8, a bad JSON line) is skipped and counted in the returned
`ReadReport` — never a crash and never a silent drop; `read` logs one warning per file
that summarises them (the `read_*` functions leave that to their caller: `report.warn()`).
What `read` refuses, with a `ConfigError` of one line naming the file and the fix: a source
that does not exist (`MissingDataError`, also a FileNotFoundError) or cannot be read as any
format, and one with zero usable rows of the task. `check_images=True` additionally decodes
every image and skips missing or corrupt ones (slow on big data sets: by default that is
left to the pipeline, which skips them lazily and counts them too).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pr1_jax.data.files import load_rows
from pr1_jax.data.rows import (DEFAULT_KEYS, TASKS, Malformed, ReadReport, all_tasks, check_image, count_row, log,
                               normalize, normalize_rows, resolve_image, task_keys)
from pr1_jax.errors import ConfigError

__all__ = ["TASKS", "DEFAULT_KEYS", "Malformed", "ReadReport", "MissingDataError", "read", "read_json",
           "read_mixture", "read_hf", "read_tfds", "sample_rows", "load_rows", "normalize", "resolve_image",
           "LazyExamples", "log"]

# What a usable row of each task looks like, for the message when a file has none.
ROW_FORMATS = {
    "grounding": '{"image", "problem", "solution": "[x1, y1, x2, y2]" in [0, 1000]}',
    "counting": '{"image", "problem", "clicks": [[x, y], ...] in [0, 1000]}',
    "counting_eval": '{"image_path", "question", "ground_truth": count}',
    "detection": '{"image", "solution": {"target_id": [COCO ids], "target_box": [[x1, y1, x2, y2], ...]}} '
                 'or a COCO instances file',
    "ocr": '{"image", "conversations": [{"value": question}, {"value": text}]}',
}


class MissingDataError(ConfigError, FileNotFoundError):
    """A data file or directory that does not exist (a ConfigError: one line, exit 2)."""


def _missing(path: Any, what: str = "no such data file or directory") -> MissingDataError:
    return MissingDataError(f"{path}: {what} (check the path; relative paths start at {Path.cwd()})")


def _read_rows(path: Path) -> list[Any]:
    """`files.load_rows`, with a missing or unreadable file as a one-line ConfigError."""
    try:
        return load_rows(path)
    except FileNotFoundError:
        raise _missing(path) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a .json / .jsonl file") from None
    except PermissionError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}): fix its permissions") from None


def require_rows(examples: Sequence[Any], report: ReadReport, task: str) -> None:
    """ConfigError (one line: the file, what was skipped, the fix) when no row is usable."""
    if len(examples):
        return
    if not report.rows:
        raise ConfigError(f"{report.source}: no rows to read; point to a non-empty {task} data file")
    why = ", ".join(f"{k}: {v}" for k, v in report.reasons.most_common(4))
    first = report.first_skips[0][1] if report.first_skips else ""
    first = f"; first: {first}" if first and first not in report.reasons else ""  # only if it says more
    raise ConfigError(f"{report.source}: none of its {report.rows} rows is a usable {task} row (skipped {why}"
                      f"{first}); is it a file of another task, or the wrong image_dir? A {task} row is "
                      f"{ROW_FORMATS[task]}")


def read_json(path, task: str, *, image_dir=None, train_sample_size: int | None = None,
              check_images: bool = False, **keys) -> tuple[list[dict], ReadReport]:
    """A PR1 JSON / JSONL / COCO annotation file. `train_sample_size`: the first N rows (PR1)."""
    rows = _read_rows(Path(path))
    if train_sample_size is not None:
        rows = rows[:train_sample_size]
    report = ReadReport(os.fspath(path))
    examples = normalize_rows(enumerate(rows), task, report, image_dir=image_dir,
                              check_images=check_images, **keys)
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
        raise ConfigError(f"bad sampling strategy {strategy!r}: N must be an int or a percentage") from e
    if n < 0:
        raise ConfigError(f"bad sampling strategy {strategy!r}: negative N")
    n = min(n, len(rows))
    if kind == "first":
        return rows[:n]
    if kind == "end":
        return rows[len(rows) - n:]
    if kind == "random":
        idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        return [rows[i] for i in idx]
    raise ConfigError(f"bad sampling strategy {strategy!r}: expected all, first:N, end:N or random:N")


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
    form = "a 'datasets:' list of {json_path, sampling_strategy}"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable YAML mixture ({' '.join(str(e).split())[:120]}); "
                          f"expected {form}") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else spec
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected {form}")
    sampled: list[tuple[Any, Any, Any]] = []  # (where, row, image_dir)
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"json_path": entry}
        file = entry.get("json_path") or entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(file, str) or not file:
            raise ConfigError(f"{path}: entry {i} has no json_path; expected {form}")
        file = Path(os.path.expanduser(file))
        if not file.is_absolute():
            file = path.parent / file
        if not file.is_file():
            raise _missing(file, f"no such data file (entry {i} of {path}; relative json_paths start at "
                                 f"the YAML's folder)")
        rows = _read_rows(file)
        strategy = entry.get("sampling_strategy", "all")
        entry_seed = int(np.random.SeedSequence((seed, i)).generate_state(1)[0])
        try:
            rows = sample_rows(rows, strategy, seed=entry_seed)
        except ConfigError as e:
            raise ConfigError(f"{path}: entry {i}: {e}") from None
        entry_dir = entry.get("image_dir", image_dir)
        sampled.extend(((file.name, j), r, entry_dir) for j, r in enumerate(rows))
    if train_sample_size is not None:
        sampled = sampled[:train_sample_size]
    report = ReadReport(os.fspath(path))
    examples = []
    for where, row, entry_dir in sampled:  # each entry has its own image_dir
        examples += normalize_rows([(where, row)], task, report, image_dir=entry_dir, check_images=check_images,
                                   **keys)
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
    try:
        import pyarrow as pa
        arrow_errors: tuple = (pa.ArrowException,)
    except ImportError:  # `_hf_table` says what to install
        arrow_errors = ()
    path = Path(path)
    try:
        table = _hf_table(path, split)
    except (ValueError, KeyError, IndexError, OSError, *arrow_errors) as e:  # not a data set, or corrupt
        if isinstance(e, FileNotFoundError):
            raise _missing(e.filename or path) from None
        raise ConfigError(f"{path}: cannot read it as an HF dataset or parquet ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]})") from None
    if train_sample_size is not None:
        table = table.slice(0, train_sample_size)
    report = ReadReport(os.fspath(path))
    examples = normalize_rows(enumerate(table.to_pylist()), task, report, image_dir=image_dir,
                              check_images=check_images, **keys)
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
        image_key = keys.get("image_key") or task_keys(self.task)[0]
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
    def make(i):
        ex = convert(source[i])
        if check_images:
            check_image(ex, task)
        return ex

    keep = [i for i in range(n) if count_row(report, i, lambda: make(i)) is not None]
    return LazyExamples(source, np.asarray(keep, np.int64), convert), report


# ----------------------------------------------------------------------------- dispatch


def read(path, task: str, *, image_dir=None, train_sample_size: int | None = None, seed: int = 0,
         split: str = "train", check_images: bool = False, image_key: str | None = None,
         problem_key: str | None = None, answer_key: str | None = None) -> tuple[Sequence[dict], ReadReport]:
    """Reads any supported source (picked by path; see the module docstring).

    `tfds:NAME` or a directory with `features.json` → TFDS; `.yaml`/`.yml` → mixture;
    `.json`/`.jsonl` → PR1 JSON (or COCO); `.parquet`, `.arrow` or another directory → HF on
    disk. `seed` only matters for `random:` mixture entries. Raises ConfigError (one line: the
    file and the fix) for a missing source (`MissingDataError`), one of no known format, and
    one without a usable row of `task`.
    """
    if task not in all_tasks():
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(all_tasks())}")
    if train_sample_size is not None and train_sample_size < 1:
        raise ConfigError(f"train_sample_size={train_sample_size}: must be ≥ 1 (or None for every row)")
    keys = {k: v for k, v in (("image_key", image_key), ("problem_key", problem_key),
                              ("answer_key", answer_key)) if v}
    common = dict(image_dir=image_dir, train_sample_size=train_sample_size, check_images=check_images, **keys)
    examples, report = _dispatch(os.fspath(path), task, split, seed, common)
    require_rows(examples, report, task)
    report.warn()  # after the check: a refused file is one error line, not a warning and an error
    return examples, report


def _dispatch(s: str, task: str, split: str, seed: int, common: dict) -> tuple[Sequence[dict], ReadReport]:
    if s.startswith("tfds:"):
        return read_tfds(s[len("tfds:"):], task, split=split, **common)
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        if (p / "features.json").exists() or (p / "dataset_info.json").exists() and glob.glob(
                os.path.join(p, "*.array_record*")):
            return read_tfds(p, task, split=split, **common)
        return read_hf(p, task, split=split, **common)
    if not p.exists():
        raise _missing(p)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return read_mixture(p, task, seed=seed, **common)
    if suffix in (".json", ".jsonl"):
        return read_json(p, task, **common)
    if suffix in (".parquet", ".arrow"):
        return read_hf(p, task, split=split, **common)
    raise ConfigError(f"{p}: unknown data format {suffix!r} (expected .json, .jsonl, .yaml, .parquet, "
                      f".arrow, an HF dataset directory, a TFDS directory or tfds:NAME)")
