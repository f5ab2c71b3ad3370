"""Readers: every PR1 format on generated files, with corrupt images and malformed rows
whose skip counts are asserted exactly."""

import collections
import io
import json
import math
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from pr1_jax.data import readers, synthetic
from pr1_jax.errors import ConfigError
from pr1_jax.processing.image import load_image


def _corrupt_images(root, names):
    """Turns images/<names[0]> into a truncated PNG and names[1] into a text file; deletes names[2]."""
    truncated, text, missing = (root / "images" / n for n in names)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("this is not a png\n")
    missing.unlink()


@pytest.fixture
def grounding(tmp_path):
    files = synthetic.write_grounding(tmp_path, 6, seed=0)
    rows = json.loads(files.path.read_text())
    _corrupt_images(tmp_path, [os.path.basename(rows[i]["image"]) for i in (0, 1, 2)])
    good = rows[3]
    bad = [
        {k: v for k, v in good.items() if k != "problem"},  # missing_key:problem
        {**good, "solution": "[1, 2, oops]"},               # bad_solution
        {**good, "solution": "[1, 2, 3]"},                  # bad_solution (3 numbers)
        {**good, "problem": 5},                             # bad_type:problem
        {**good, "solution": [500, 10, 100, 20]},           # bad_box (x2 < x1)
        {**good, "solution": "[0, 0, 1500, 20]"},           # bad_box (outside [0, 1000])
        ["not", "a", "dict"],                               # not_a_dict
        {k: v for k, v in good.items() if k != "image"},    # missing_key:image
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows + bad))
    return path, tmp_path, rows


GROUNDING_BAD = {"missing_key:problem": 1, "bad_solution": 2, "bad_type:problem": 1, "bad_box": 2,
                 "not_a_dict": 1, "missing_key:image": 1}


def test_grounding_json(grounding):
    path, root, rows = grounding
    examples, report = readers.read(path, "grounding", image_dir=root)
    assert (report.rows, report.read, report.skipped_malformed) == (14, 6, 8)
    assert report.reasons == collections.Counter(GROUNDING_BAD)
    ex = examples[4]
    assert ex["image"] == os.path.join(root, rows[4]["image"])
    assert ex["solution"] == rows[4]["normalized_solution"]
    assert ex["solution_raw"] == rows[4]["solution"] and ex["normalized_solution"] == rows[4]["normalized_solution"]
    assert ex["problem"] == rows[4]["problem"]
    # check_images also skips the truncated PNG, the text file and the missing file.
    examples, report = readers.read(path, "grounding", image_dir=root, check_images=True)
    assert (report.read, report.skipped_malformed) == (3, 11)
    assert report.reasons == collections.Counter({**GROUNDING_BAD, "bad_image": 2, "missing_image": 1})
    assert report.as_dict()["reasons"]["bad_image"] == 2
    # train_sample_size = the first N rows of the file (PR1's select(range(N))).
    examples, report = readers.read(path, "grounding", image_dir=root, train_sample_size=8)
    assert (report.rows, report.read, report.skipped_malformed) == (8, 6, 2)


def test_skips_are_warned(grounding, caplog):
    path, root, _ = grounding
    with caplog.at_level("WARNING"):
        readers.read(path, "grounding", image_dir=root)
    assert "skipped 8 malformed" in caplog.text


def test_counting_jsonl(tmp_path):
    files = synthetic.write_counting(tmp_path, 5, seed=0)
    lines = files.path.read_text().splitlines()
    good = json.loads(lines[0])
    bad = [
        "{not json",                                          # bad_json
        json.dumps({**good, "clicks": "many"}),               # bad_clicks
        json.dumps({**good, "clicks": [[1, 2, 3]]}),          # bad_clicks
        json.dumps({**good, "count": good["count"] + 1}),     # count_mismatch
        json.dumps({k: v for k, v in good.items() if k != "clicks"}),  # missing_key:clicks
        json.dumps({**good, "clicks": [{"x": 10.5, "y": 20}], "count": 1}),  # fine: PixMo {x, y} points
    ]
    path = tmp_path / "counting_10k.json"  # PR1's counting file: JSON Lines named .json
    path.write_text("\n".join(lines + bad) + "\n\n")
    examples, report = readers.read(path, "counting", image_dir=tmp_path)
    assert (report.rows, report.read) == (11, 6)
    assert report.reasons == collections.Counter(
        {"bad_json": 1, "bad_clicks": 2, "count_mismatch": 1, "missing_key:clicks": 1})
    assert examples[0]["solution"] == good["clicks"] and examples[0]["count"] == good["count"]
    assert examples[-1]["solution"] == [[10.5, 20]] and examples[-1]["count"] == 1
    # The eval format of the same images.
    examples, report = readers.read(files.eval_path, "counting_eval", image_dir=tmp_path)
    assert report.read == 5 and examples[0]["solution"] == good["count"]
    assert examples[0]["problem"] == good["problem"] and examples[0]["image"] == os.path.join(tmp_path, good["image"])


def test_detection_json(tmp_path):
    files = synthetic.write_detection(tmp_path, 4, seed=0)
    rows = json.loads(files.path.read_text())
    sol = rows[0]["solution"]
    bad = [
        {**rows[0], "solution": {"target_id": sol["target_id"] + [1], "target_box": sol["target_box"]}},
        {**rows[0], "solution": {"target_id": [12], "target_box": [[0, 0, 5, 5]]}},  # unknown_category
        {**rows[0], "solution": {"target_id": [1], "target_box": [["a", 0, 5, 5]]}},  # bad_solution
        {**rows[0], "solution": {"target_box": [[0, 0, 5, 5]]}},                      # bad_solution
        {**rows[0], "solution": json.dumps(sol)},  # fine: a JSON string
        {"image": rows[0]["image"], "solution": sol},  # fine: detection needs no problem
    ]
    path = tmp_path / "det.json"
    path.write_text(json.dumps(rows + bad))
    examples, report = readers.read(path, "detection", image_dir=tmp_path)
    assert (report.read, report.skipped_malformed) == (6, 4)
    assert report.reasons == collections.Counter({"bad_solution": 3, "unknown_category": 1})
    assert examples[4]["solution"] == sol and examples[0]["solution"] == sol
    assert examples[5]["problem"] == ""


def test_ocr_json(tmp_path):
    files = synthetic.write_ocr(tmp_path, 3, seed=0)
    rows = json.loads(files.path.read_text())
    bad = [
        {**rows[0], "conversations": [{"value": "only a question"}]},  # bad_conversations
        {**rows[0], "conversations": [{"value": "q"}, {"value": 7}]},  # bad_type:conversations
        {**rows[0], "conversations": [{"value": "q"}, {"text": "x"}]},  # missing_key:value
        {"image": rows[0]["image"], "problem": "OCR this image.", "solution": "abc"},  # fine
    ]
    path = tmp_path / "ocr_mixed.json"
    path.write_text(json.dumps(rows + bad))
    examples, report = readers.read(path, "ocr", image_dir=tmp_path)
    assert (report.read, report.skipped_malformed) == (4, 3)
    assert report.reasons == collections.Counter(
        {"bad_conversations": 1, "bad_type:conversations": 1, "missing_key:value": 1})
    assert examples[0]["solution"] == rows[0]["conversations"][1]["value"]
    assert examples[0]["problem"] == rows[0]["conversations"][0]["value"]
    assert examples[3]["solution"] == "abc"


def test_image_resolution(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    rows = [{"image": "/abs/x.png", "problem": "p", "solution": "[0, 0, 1, 1]"},
            {"image": {"bytes": png.getvalue(), "path": "x.png"}, "problem": "p", "solution": "[0, 0, 1, 1]"},
            {"image": {"bytes": None, "path": "rel/y.png"}, "problem": "p", "solution": "[0, 0, 1, 1]"},
            {"image": 3, "problem": "p", "solution": "[0, 0, 1, 1]"}]
    path = tmp_path / "g.json"
    path.write_text(json.dumps(rows[:1] + rows[2:]))
    examples, report = readers.read(path, "grounding", image_dir="/root_dir")
    assert [e["image"] for e in examples] == ["/abs/x.png", "/root_dir/rel/y.png"]
    assert report.reasons == {"bad_type:image": 1}
    assert readers.normalize(rows[1], "grounding")["image"] == png.getvalue()


# ----------------------------------------------------------------------------- mixtures


def test_sample_rows():
    rows = list(range(10))
    assert readers.sample_rows(rows, "all") == rows
    assert readers.sample_rows(rows, "first:3") == [0, 1, 2]
    assert readers.sample_rows(rows, "end:3") == [7, 8, 9]
    assert readers.sample_rows(rows, "first:25%") == [0, 1, 2]  # ceil(2.5)
    assert readers.sample_rows(rows, "end:10%") == [9]
    assert readers.sample_rows(rows, "first:50") == rows
    r = readers.sample_rows(rows, "random:4", seed=1)
    assert len(r) == 4 and len(set(r)) == 4 and r == sorted(r)
    assert r == readers.sample_rows(rows, "random:4", seed=1)
    assert any(readers.sample_rows(rows, "random:4", seed=s) != r for s in range(2, 6))
    assert len(readers.sample_rows(rows, "random:35%", seed=0)) == 4
    for bad in ("first", "middle:3", "first:x", "random:-1"):
        with pytest.raises(ValueError):
            readers.sample_rows(rows, bad)


def test_yaml_mixture(tmp_path):
    a = synthetic.write_grounding(tmp_path / "a", 10, seed=0)
    b = synthetic.write_counting(tmp_path / "b", 10, seed=1)
    rows_a = json.loads(a.path.read_text())
    rows_a[9]["solution"] = "broken"  # the last row: only `end:` picks it
    a.path.write_text(json.dumps(rows_a))
    lines_b = [json.loads(s) for s in b.path.read_text().splitlines()]
    g_rows_b = [{"image": r["image"], "problem": r["problem"], "solution": "[1, 2, 3, 4]"} for r in lines_b]
    (tmp_path / "b" / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in g_rows_b))
    spec = {"datasets": [
        {"json_path": "a/grounding.json", "sampling_strategy": "first:3", "image_dir": str(tmp_path / "a")},
        {"json_path": "a/grounding.json", "sampling_strategy": "end:20%", "image_dir": str(tmp_path / "a")},
        {"json_path": str(tmp_path / "b" / "g.jsonl"), "sampling_strategy": "random:50%"},
    ]}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    examples, report = readers.read(path, "grounding", image_dir=tmp_path / "b", seed=7)
    assert (report.rows, report.read) == (3 + 2 + 5, 9)
    assert report.reasons == {"bad_solution": 1}
    problems = [e["problem"] for e in examples]
    assert problems[:3] == [r["problem"] for r in rows_a[:3]]
    assert problems[3] == rows_a[8]["problem"]  # end:20% = rows 8, 9 (9 is broken)
    rand = examples[4:]
    assert all(e["image"].startswith(str(tmp_path / "b")) for e in rand)
    again, _ = readers.read(path, "grounding", image_dir=tmp_path / "b", seed=7)
    assert [e["image"] for e in again] == [e["image"] for e in examples]
    other = [readers.read(path, "grounding", image_dir=tmp_path / "b", seed=s)[0] for s in (8, 9)]
    assert any([e["image"] for e in o] != [e["image"] for e in examples] for o in other)
    head, report = readers.read(path, "grounding", image_dir=tmp_path / "b", seed=7, train_sample_size=4)
    assert len(head) == 4 and report.rows == 4


# ----------------------------------------------------------------------------- HF / parquet


def _hf_table(tmp_path):
    import pyarrow as pa
    files = synthetic.write_grounding(tmp_path / "g", 4, seed=0)
    rows = json.loads(files.path.read_text())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF Image storage
    images = [{"bytes": (files.image_dir / r["image"]).read_bytes(), "path": None} for r in rows]
    images[1] = {"bytes": None, "path": rows[1]["image"]}
    solutions = [r["solution"] for r in rows]
    solutions[2] = "not a box"
    return pa.table({"image": pa.array(images, image_type), "problem": [r["problem"] for r in rows],
                     "solution": solutions}), files, rows


def test_parquet(tmp_path):
    import pyarrow.parquet as pq
    table, files, rows = _hf_table(tmp_path)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    for path, n in ((tmp_path / "hub", 4), (tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", 4)):
        examples, report = readers.read(path, "grounding", image_dir=files.image_dir)
        assert (report.rows, report.read, dict(report.reasons)) == (n, 3, {"bad_solution": 1})
        assert isinstance(examples[0]["image"], bytes)
        assert examples[1]["image"] == os.path.join(files.image_dir, rows[1]["image"])
        assert load_image(examples[0]["image"]).size == Image.open(files.image_dir / rows[0]["image"]).size
    examples, report = readers.read(tmp_path / "hub", "grounding", split="test")
    assert report.rows == 1
    examples, report = readers.read(tmp_path / "hub", "grounding", train_sample_size=2)
    assert report.rows == 2


def test_hf_save_to_disk_layout(tmp_path):
    """The layout `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` writes (checked
    against datasets 5.2: Arrow IPC stream files, state.json, dataset_dict.json)."""
    import pyarrow as pa
    table, files, rows = _hf_table(tmp_path)
    for split, t in (("train", table), ("validation", table.slice(0, 2))):
        d = tmp_path / "dd" / split
        d.mkdir(parents=True)
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, t.schema) as writer:
                writer.write_table(t)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (d / "dataset_info.json").write_text("{}")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    examples, report = readers.read(tmp_path / "dd", "grounding", image_dir=files.image_dir)
    assert (report.rows, report.read) == (4, 3)
    assert examples[0]["solution"] == rows[0]["normalized_solution"]
    assert readers.read(tmp_path / "dd", "grounding", split="validation")[1].rows == 2
    assert readers.read(tmp_path / "dd" / "train", "grounding")[1].rows == 4


def test_hf_datasets_package_if_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    table, files, rows = _hf_table(tmp_path)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    examples, report = readers.read(tmp_path / "saved", "grounding", image_dir=files.image_dir)
    assert (report.rows, report.read) == (4, 3)


# ----------------------------------------------------------------------------- TFDS


def _tfds_builder_cls():
    import tensorflow_datasets as tfds

    class Pr1JaxTestGrounding(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        rows: list = []

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "image_decoded": tfds.features.Image(shape=(None, None, 3)),
                "problem": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "key": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(self.rows):
                yield i, row

    return Pr1JaxTestGrounding


_TFDS_CLS = []


def test_tfds_array_record(tmp_path):
    """Built with `download_and_prepare(file_format='array_record')` and read back through
    `builder_from_directory(...).as_data_source()` — no TensorFlow involved."""
    import pickle

    import tensorflow_datasets as tfds
    if not _TFDS_CLS:  # tfds registers builder classes by name: define it once per session
        _TFDS_CLS.append(_tfds_builder_cls())
    files = synthetic.write_grounding(tmp_path / "g", 5, seed=0)
    rows = json.loads(files.path.read_text())
    tf_rows = []
    for r in rows:
        data = (files.image_dir / r["image"]).read_bytes()
        tf_rows.append({"image": data, "image_decoded": data,  # encoded: tfds decodes it on read
                        "problem": r["problem"], "solution": r["solution"], "key": str(len(tf_rows))})
    tf_rows[3]["solution"] = "[1, 2]"
    tf_rows[4]["image"] = b"\x89PNG truncated"
    builder = _TFDS_CLS[0](data_dir=str(tmp_path / "tfds"))
    builder.rows = tf_rows
    builder.download_and_prepare(file_format="array_record")
    assert any(f.name.endswith(".array_record-00000-of-00001") for f in tmp_path.rglob("*"))

    examples, report = readers.read(builder.data_dir, "grounding")
    assert (report.rows, report.read, dict(report.reasons)) == (5, 4, {"bad_solution": 1})
    assert isinstance(examples, readers.LazyExamples) and len(examples) == 4
    # tfds stores records in a shuffled order: match them by the key column.
    assert sorted(e["key"] for e in examples) == ["0", "1", "2", "4"]
    for e in examples:
        i = int(e["key"])
        assert e["image"] == tf_rows[i]["image"] and e["problem"] == rows[i]["problem"]
        assert e["solution"] == rows[i]["normalized_solution"] and e["solution_raw"] == rows[i]["solution"]
        if i != 4:
            assert load_image(e["image"]).size == Image.open(files.image_dir / rows[i]["image"]).size
    # check_images finds the corrupt bytes; decoded Image features are arrays load_image takes.
    _, report = readers.read(builder.data_dir, "grounding", check_images=True)
    assert dict(report.reasons) == {"bad_solution": 1, "bad_image": 1}
    decoded, report = readers.read_tfds(builder.data_dir, "grounding", image_key="image_decoded")
    assert report.read == 4 and all(d["image"].dtype == np.uint8 and d["image"].shape[2] == 3 for d in decoded)
    d = next(d for d in decoded if d["key"] != "4")
    e = next(e for e in examples if e["key"] == d["key"])
    assert np.array_equal(np.asarray(load_image(d["image"])), np.asarray(load_image(e["image"])))
    # Picklable for grain worker processes.
    again = pickle.loads(pickle.dumps(examples))
    assert again[3]["problem"] == examples[3]["problem"]
    assert tfds.builder_from_directory(builder.data_dir).info.splits["train"].num_examples == 5


def test_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        readers.read(tmp_path / "nope.json", "grounding")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data format"):
        readers.read(tmp_path / "x.csv", "grounding")
    with pytest.raises(ValueError, match="unknown task"):
        readers.read(tmp_path / "x.csv", "segmentation")
    (tmp_path / "obj.json").write_text(json.dumps({"image": [1], "problem": [2]}))
    with pytest.raises(ValueError, match="JSON list"):
        readers.read(tmp_path / "obj.json", "grounding")


# ----------------------------------------------------------------------------- bad data never stops a run
# Each test below writes good rows around bad ones and asserts that exactly the bad rows are
# skipped, each counted under its reason, and every good row is read.


def _grounding_rows(tmp_path, n=4):
    files = synthetic.write_grounding(tmp_path, n, seed=0)
    return json.loads(files.path.read_text()), files.image_dir


def _read_text(tmp_path, name, text, task="grounding", **kw):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return readers.read(path, task, image_dir=tmp_path, **kw)


def test_deep_nesting_skips_only_its_rows(tmp_path):
    """A solution string nested 100,000 deep made json.loads raise RecursionError and lost the
    whole file; so did a row that is itself nested that deep (in a list file or a JSONL line)."""
    rows, _ = _grounding_rows(tmp_path)
    deep = [{**rows[0], "solution": "[" * 100_000 + "]" * 100_000},
            {**rows[0], "solution": "(" * 100_000 + ")" * 100_000},   # not JSON: Python's parser
            {**rows[0], "solution": '{"a": ' * 5000 + "1" + "}" * 5000}]
    nested_row = "[" * 100_000 + "]" * 100_000
    text = "[" + ", ".join([json.dumps(r) for r in rows + deep] + [nested_row]) + "]"
    examples, report = _read_text(tmp_path, "deep.json", text)
    assert (report.rows, report.read) == (8, 4)
    assert report.reasons == collections.Counter({"too_deep": 3, "bad_solution": 1})  # "((((…))))" is a SyntaxError
    assert [e["problem"] for e in examples] == [r["problem"] for r in rows]
    lines = [json.dumps(r) for r in rows] + [nested_row, json.dumps(deep[0])]
    examples, report = _read_text(tmp_path, "deep.jsonl", "\n".join(lines))
    assert (report.rows, report.read, dict(report.reasons)) == (6, 4, {"too_deep": 2})


def test_non_utf8_bytes_skip_only_their_rows(tmp_path):
    """One non-UTF-8 byte raised UnicodeDecodeError (without the file name) for the whole file;
    now the file is decoded row by row. A JSON "\\udc80" escape (a lone surrogate, which no
    tokenizer can encode) in the problem is skipped the same way."""
    rows, _ = _grounding_rows(tmp_path)
    good = [json.dumps(r).encode() for r in rows]
    latin1 = json.dumps({**rows[0], "problem": "the café sign"}, ensure_ascii=False).encode()
    latin1 = latin1.replace("é".encode(), b"\xe9")  # é in Latin-1: not UTF-8
    surrogate = json.dumps({**rows[0], "problem": "x\udc80"}).encode()
    separator = json.dumps({**rows[1], "problem": "the dog\u2028on the left"}).encode()  # U+2028 is not a line end
    for name, data in (("enc.json", b"[" + b", ".join(good + [latin1, surrogate, separator]) + b"]"),
                       ("enc.jsonl", b"\n".join(good + [latin1, surrogate, separator]) + b"\n"),
                       ("bom.jsonl", b"\xef\xbb\xbf" + b"\n".join(good + [latin1, surrogate, separator]))):
        examples, report = _read_text(tmp_path, name, data)
        assert (report.rows, report.read, dict(report.reasons)) == (7, 5, {"bad_encoding": 2}), name
        assert examples[-1]["problem"] == "the dog\u2028on the left"
    (tmp_path / "latin1.json").write_bytes(b"[" + b", ".join([latin1] * 3) + b"]")
    with pytest.raises(ConfigError, match=r"latin1.json: none of its 3 rows .*bad_encoding: 3"):
        readers.read(tmp_path / "latin1.json", "grounding")


def test_broken_json_list_keeps_the_readable_items(tmp_path):
    rows, _ = _grounding_rows(tmp_path)
    items = [json.dumps(r) for r in rows]
    text = "[" + ", ".join(items[:2] + ['{"image": "x.png", "problem": oops}'] + items[2:]) + ", "  # cut short
    examples, report = _read_text(tmp_path, "cut.json", text + items[0][:30])
    assert (report.rows, report.read, dict(report.reasons)) == (6, 4, {"bad_json": 2})
    assert [e["problem"] for e in examples] == [r["problem"] for r in rows]


def test_wrong_types_and_missing_columns(tmp_path):
    rows, _ = _grounding_rows(tmp_path, 2)
    good = rows[0]
    bad = [
        {**good, "image": ["a.png"]},                    # bad_type:image
        {**good, "image": {"bytes": 5}},                 # bad_type:image (bytes(5) would be 5 NULs)
        {**good, "image": "images/a\u0000.png"},         # bad_type:image (open() refuses a NUL)
        {**good, "problem": {"text": "dog"}},            # bad_type:problem
        {**good, "solution": {"box": [1, 2, 3, 4]}},     # bad_solution
        {**good, "solution": [1, 2, None, 4]},           # bad_solution
        {**good, "solution": [True, 2, 3, 4]},           # bad_solution (a bool is no coordinate)
        {**good, "solution": None},                      # missing_key:solution
        "a string row", 7, None,                         # not_a_dict
    ]
    examples, report = _read_text(tmp_path, "types.json", json.dumps(rows + bad))
    assert (report.rows, report.read) == (13, 2)
    assert report.reasons == collections.Counter({"bad_type:image": 3, "bad_type:problem": 1, "bad_solution": 3,
                                                  "missing_key:solution": 1, "not_a_dict": 3})
    files = synthetic.write_counting(tmp_path / "c", 2, seed=0)
    c = json.loads(files.path.read_text().splitlines()[0])
    bad = [{**c, "clicks": [[1, None]]}, {**c, "clicks": [["1", 2]]}, {**c, "clicks": {"x": 1, "y": 2}},
           {**c, "count": "3"}, {**c, "problem": 3}]
    examples, report = _read_text(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in [c] + bad), "counting")
    assert report.reasons == collections.Counter({"bad_clicks": 3, "count_mismatch": 1, "bad_type:problem": 1})
    ev = [{"image_path": "a.png", "question": "dogs", "ground_truth": g} for g in (3, "4", "²", "1" * 5000, -1, 2.5,
                                                                                    10 ** 30, [3])]
    examples, report = _read_text(tmp_path, "ev.jsonl", "\n".join(json.dumps(r) for r in ev), "counting_eval")
    assert [e["count"] for e in examples] == [3, 4]
    assert report.reasons == collections.Counter({"bad_ground_truth": 5, "too_many_objects": 1})


def test_non_finite_and_huge_coordinates(tmp_path):
    """NaN / ±inf / huge values in a ground truth are skipped at the reader; the outside battery
    found a detection row with a coordinate near the float64 maximum that readers.read kept and
    whose reward then raised ("cost matrix is infeasible")."""
    rows, _ = _grounding_rows(tmp_path, 2)
    g = rows[0]
    bad = [{**g, "solution": [0, 0, math.nan, 5]}, {**g, "solution": "[0, 0, Infinity, 5]"},
           {**g, "solution": "[0, 0, 1e999, 5]"}, {**g, "solution": [0, 0, 10 ** 400, 5]},
           {**g, "solution": [0, 0, 1.7976931348623157e308, 5]}]   # finite, outside [0, 1000]
    examples, report = _read_text(tmp_path, "nf.json", json.dumps(rows + bad))
    assert (report.read, dict(report.reasons)) == (2, {"not_finite": 4, "bad_box": 1})
    det = synthetic.write_detection(tmp_path / "d", 2, seed=0)
    d = json.loads(det.path.read_text())
    one = {"target_id": [1], "target_box": [[0, 0, 1.7976931348623157e308, 10]]}
    bad = [{**d[0], "solution": one},                                                     # bad_box (> 2^20 px)
           {**d[0], "solution": {"target_id": [1], "target_box": [[0, 0, math.inf, 10]]}},  # not_finite
           {**d[0], "solution": {"target_id": [1], "target_box": [[-5, 0, 10, 10]]}},      # bad_box (negative)
           {**d[0], "solution": {"target_id": [1e300], "target_box": [[0, 0, 10, 10]]}},   # unknown_category
           {**d[0], "solution": {"target_id": [1], "target_box": [[0, 0, 700, 10]]}, "width": 640, "height": 480},
           {**d[0], "width": "wide", "height": 480}]                                      # bad_image_size
    examples, report = readers.read(_write(tmp_path / "d" / "det.json", d + bad), "detection",
                                    image_dir=det.image_dir)
    assert (report.read, dict(report.reasons)) == (2, {"bad_box": 3, "not_finite": 1, "unknown_category": 1,
                                                      "bad_image_size": 1})
    # check_images also compares the boxes with the decoded image (here 1 px past it is fine)
    w, h = Image.open(det.image_dir / d[0]["image"]).size
    edge = {**d[0], "solution": {"target_id": [1], "target_box": [[0, 0, w + 1, h]]}}
    past = {**d[0], "solution": {"target_id": [1], "target_box": [[0, 0, w + 5, h]]}}
    examples, report = readers.read(_write(tmp_path / "d" / "edge.json", [edge, past]), "detection",
                                    image_dir=det.image_dir, check_images=True)
    assert (report.read, dict(report.reasons)) == (1, {"bad_box": 1})
    # counting clicks: Qwen2-VL's [0, 1000] square
    c = json.loads(synthetic.write_counting(tmp_path / "c", 1, seed=0).path.read_text().splitlines()[0])
    bad = [{**c, "clicks": [[5, 1001]], "count": 1}, {**c, "clicks": [[-1, 5]], "count": 1},
           {**c, "clicks": [[math.nan, 5]], "count": 1}, {**c, "clicks": [[0, 0]] * 10_001, "count": None}]
    examples, report = _read_text(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in [c] + bad), "counting")
    assert (report.read, dict(report.reasons)) == (1, {"outside_image": 2, "not_finite": 1, "too_many_objects": 1})


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_empty_problem(tmp_path):
    rows, _ = _grounding_rows(tmp_path, 2)
    examples, report = _read_text(tmp_path, "e.json", json.dumps(rows + [{**rows[0], "problem": ""},
                                                                         {**rows[0], "problem": " \n"}]))
    assert (report.read, dict(report.reasons)) == (2, {"empty_problem": 2})
    det = synthetic.write_detection(tmp_path / "d", 1, seed=0)  # PR1's detection prompt has no {question}
    d = json.loads(det.path.read_text())
    examples, report = readers.read(_write(tmp_path / "d.json", [{**d[0], "problem": ""}]), "detection")
    assert report.read == 1


def test_unforeseen_row_failure_is_counted(tmp_path, monkeypatch):
    """A failure that no check names (a bug or an exotic value) costs its row, not the file."""
    rows, _ = _grounding_rows(tmp_path, 3)
    real = readers.normalize

    def flaky(row, task, **kw):
        if row["problem"] == rows[1]["problem"]:
            raise TypeError("an unforeseen value")
        return real(row, task, **kw)

    monkeypatch.setattr("pr1_jax.data.rows.normalize", flaky)
    examples, report = _read_text(tmp_path, "f.json", json.dumps(rows))
    assert (report.read, dict(report.reasons)) == (2, {"bad_row:TypeError": 1})


def test_missing_files_and_files_without_usable_rows_are_config_errors(tmp_path):
    """One line naming the file and the fix (the CLIs print it and exit 2)."""
    with pytest.raises(readers.MissingDataError) as e:
        readers.read(tmp_path / "nope.json", "grounding")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, FileNotFoundError)
    assert str(e.value).startswith(f"{tmp_path / 'nope.json'}: no such data file") and "check the path" in str(e.value)
    # a file of another task: every row skipped
    files = synthetic.write_counting(tmp_path, 3, seed=0)
    with pytest.raises(ConfigError) as e:
        readers.read(files.path, "grounding")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{files.path}: none of its 3 rows is a usable grounding row")
    assert "missing_key:solution: 3" in message and "another task" in message and '"solution"' in message
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="empty.jsonl: no rows to read"):
        readers.read(tmp_path / "empty.jsonl", "grounding")
    # a YAML mixture naming a file that is not there; a mixture that is not YAML
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "gone.json"}]}))
    with pytest.raises(readers.MissingDataError, match=r"gone.json: no such data file \(entry 0 of .*mix.yaml"):
        readers.read(tmp_path / "mix.yaml", "grounding")
    (tmp_path / "bad.yaml").write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not a readable YAML mixture"):
        readers.read(tmp_path / "bad.yaml", "grounding")
    (tmp_path / "hub").mkdir()
    with pytest.raises(ConfigError, match="hub: cannot read it as an HF dataset or parquet"):
        readers.read(tmp_path / "hub", "grounding")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="junk.parquet: cannot read it as an HF dataset or parquet"):
        readers.read(tmp_path / "junk.parquet", "grounding")
    with pytest.raises(ConfigError, match="train_sample_size=0"):
        readers.read(files.path, "counting", train_sample_size=0)


def test_coco_instances_file_reads_as_detection_rows(tmp_path):
    """The COCO file `evaluate` scores against is also a training `data.eval` file: one row per
    image, xywh → xyxy, crowd regions left out, an image without objects kept (empty GT)."""
    files = synthetic.write_detection(tmp_path, 4, seed=0)
    rows = json.loads(files.path.read_text())
    coco = json.loads(files.eval_path.read_text())
    examples, report = readers.read(files.eval_path, "detection", image_dir=files.image_dir)
    assert (report.rows, report.read) == (4, 4)
    for ex, row in zip(examples, rows):
        assert ex["solution"] == row["solution"] and ex["image"] == os.path.join(files.image_dir, row["image"])
    coco["annotations"].append({"id": 999, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    coco["images"] += [{"id": 77, "file_name": rows[0]["image"], "width": 50, "height": 50},  # no objects
                       {"id": 78}, "not a dict"]                                            # bad_image_entry
    coco["annotations"].append({"id": 1000, "image_id": 78, "category_id": 1, "bbox": [0, 0, 5, 5]})
    examples, report = readers.read(_write(tmp_path / "c.json", coco), "detection", image_dir=files.image_dir)
    assert (report.rows, report.read, dict(report.reasons)) == (7, 5, {"bad_image_entry": 2})
    assert examples[0]["solution"] == rows[0]["solution"]  # the crowd box is not a target
    assert examples[4]["solution"] == {"target_id": [], "target_box": []} and examples[4]["image_id"] == 77


@pytest.mark.parametrize("task", sorted(synthetic.WRITERS))
def test_synthetic_train_and_eval_files_read_as_the_task(tmp_path, task):
    """One eval-file format per task: the eval file `synthetic` writes is read by training
    (`data.eval` → `readers.read(path, task)`) as well as the training file; counting's also
    as PR1's eval format (`counting_eval`, which `evaluate` reads first)."""
    files = synthetic.WRITERS[task](tmp_path, 7, seed=1)
    for path in (files.path, files.eval_path):
        examples, report = readers.read(path, task, image_dir=files.image_dir, check_images=True)
        assert (report.rows, report.read, len(examples)) == (7, 7, 7), path
    train, _ = readers.read(files.path, task, image_dir=files.image_dir)
    held, _ = readers.read(files.eval_path, task, image_dir=files.image_dir)
    assert [e["solution"] for e in held] == [e["solution"] for e in train]
    assert [e["image"] for e in held] == [e["image"] for e in train]
    if task == "counting":
        examples, report = readers.read(files.eval_path, "counting_eval", image_dir=files.image_dir)
        assert report.read == 7 and [e["count"] for e in examples] == [len(e["solution"]) for e in train]


@pytest.mark.parametrize("task", sorted(synthetic.WRITERS))
def test_files_of_another_task_have_no_usable_row(tmp_path, task):
    """Every synthetic train and eval file read as each other task: a ConfigError (the CLIs'
    one line, exit 2), never rows of the wrong task. OCR's plain {image, problem, solution}
    rows used to accept a grounding file (its solution "[x1, y1, x2, y2]" is a string), so
    `evaluate --task=ocr` on a grounding file exited 0."""
    files = synthetic.WRITERS[task](tmp_path, 3, seed=0)
    for other in sorted(set(synthetic.WRITERS) - {task}):
        for path in (files.path, files.eval_path):
            with pytest.raises(ConfigError, match=f"none of its 3 rows is a usable {other} row"):
                readers.read(path, other, image_dir=files.image_dir)
    # OCR answers that are text keep being read, brackets and all
    rows = [{"image": "a.png", "problem": "OCR this image.", "solution": s}
            for s in ("[1, 2, 3, 4]", '{"target_id": [1]}', "[[1, 2]]", "[see page 4]", '["a", "b"]', "{}", "[]")]
    examples, report = _read_text(tmp_path, "ocr_plain.json", json.dumps(rows), "ocr")
    assert [e["solution"] for e in examples] == ["[see page 4]", '["a", "b"]', "{}", "[]"]
    assert dict(report.reasons) == {"bad_solution": 3}


ADVERSARIAL = [math.nan, math.inf, -math.inf, 1e308, -1e308, 1.7976931348623157e308, 10 ** 400, 2 ** 63, -1, 1001,
               5.5, 0, True, None, "", " ", "NaN", "[" * 3000, "x\udc80", "[1, 2, 3, 4]", "[0, 0, 1e999, 5]",
               [], {}, [1, 2], [[1, 2]], [None], {"x": 1, "y": 2}, {"target_id": [1], "target_box": [[0, 0, 1, 1]]}]
REWARDS = {"grounding": ["pr1_grounding", "grounding_iou"], "counting": ["pr1_counting", "counting_strict"],
           "detection": ["pr1_detection", "detection_robust"], "ocr": ["pr1_ocr", "ocr_edit_distance"]}


def _mutate(value, rng, depth=0):
    """`value` with one leaf (or the whole of it) replaced by an adversarial value."""
    if depth > 0 and rng.random() < 0.3 or not isinstance(value, (dict, list)) or not value:
        return ADVERSARIAL[rng.integers(len(ADVERSARIAL))]
    value = dict(value) if isinstance(value, dict) else list(value)
    key = list(value)[rng.integers(len(value))] if isinstance(value, dict) else int(rng.integers(len(value)))
    value[key] = _mutate(value[key], rng, depth + 1)
    return value


@pytest.mark.parametrize("task", sorted(synthetic.WRITERS))
def test_adversarial_rows_never_raise_and_accepted_rows_are_scorable(tmp_path, task):
    """2,000 seeded mutations of good rows (a leaf replaced by NaN, a huge number, a wrong
    type, deep nesting, a lone surrogate, ...) in one file: `read` raises nothing, counts every
    skip, and the training rewards score every row it accepts without an exception."""
    from pr1_jax import rewards
    files = synthetic.WRITERS[task](tmp_path, 4, seed=0)
    good = readers.load_rows(files.path)
    rng = np.random.default_rng(sum(map(ord, task)))
    rows = [_mutate(good[i % len(good)], rng) for i in range(2000)] + good
    path = tmp_path / "adversarial.json"
    path.write_text(json.dumps(rows))
    examples, report = readers.read(path, task, image_dir=files.image_dir)
    assert report.rows == len(rows) and report.read == len(examples) >= len(good)
    assert report.read + report.skipped_malformed == report.rows and report.skipped_malformed > 1000
    assert not [r for r in report.reasons if r.startswith("bad_row:")], report.reasons  # every skip is foreseen
    sols = [e["solution"] for e in examples]
    answer = {"grounding": "<|object_ref_start|>x<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|><|im_end|>",
              "counting": "<|object_ref_start|>x<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|><|im_end|>",
              "detection": '[{"bbox_2d": [0, 0, 10, 10], "label": "person"}]', "ocr": "the page"}[task]
    for name in REWARDS[task]:
        out = rewards.get(name)([answer] * len(sols), solution=sols)
        assert np.isfinite(out).all() and len(out) == len(sols)
