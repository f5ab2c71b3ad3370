"""grain pipeline: order by seed, host shards, exact checkpoint/restore, bad images skipped."""

import json
import os

import numpy as np
import pytest

from pr1_jax.data import pipeline, readers, synthetic
from pr1_jax.errors import ConfigError
from pr1_jax.processing import image as image_lib

N = 13


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    files = synthetic.write_grounding(root, N, seed=0)
    examples, _ = readers.read(files.path, "grounding", image_dir=root)
    return examples


@pytest.fixture(scope="module")
def bad_examples(tmp_path_factory):
    """N examples; 1 has a truncated PNG, 4 a text file named .png, 7 a missing file."""
    root = tmp_path_factory.mktemp("pipe_bad")
    files = synthetic.write_grounding(root, N, seed=1)
    examples, _ = readers.read(files.path, "grounding", image_dir=root)
    data = open(examples[1]["image"], "rb").read()
    open(examples[1]["image"], "wb").write(data[: len(data) // 2])
    open(examples[4]["image"], "w").write("not an image\n")
    os.remove(examples[7]["image"])
    return examples


def _ids(it, n=None):
    out = []
    for ex in it:
        out.append(ex["example_index"])
        if n is not None and len(out) == n:
            break
    return out


def _iter(examples, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    kw.setdefault("prepare", _light_prepare)
    return pipeline.make_iterator(examples, **kw)


def _light_prepare(example):
    # Decode only (skips the resize) to keep the order tests fast; the default is tested below.
    image_lib.load_image(example["image"])
    return example


def test_order_is_deterministic_per_seed(examples):
    a = _ids(_iter(examples, seed=0, num_epochs=2))
    assert a == _ids(_iter(examples, seed=0, num_epochs=2))
    assert len(a) == 2 * N
    assert sorted(a[:N]) == sorted(a[N:]) == list(range(N))  # each epoch a permutation
    assert a[:N] != a[N:]  # reshuffled every epoch
    assert a[:N] != _ids(_iter(examples, seed=1))
    assert _ids(_iter(examples, shuffle=False)) == list(range(N))


def test_host_shards_are_disjoint_and_cover(examples):
    shards = [_ids(_iter(examples, seed=5, shard_index=i, shard_count=3)) for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(N))
    assert [len(s) for s in shards] == [5, 4, 4]
    even = [_ids(_iter(examples, seed=5, shard_index=i, shard_count=3, drop_remainder=True)) for i in range(3)]
    assert [len(s) for s in even] == [4, 4, 4] and len(set(sum(even, []))) == 12
    # Default shard = this JAX process (one process here).
    assert sorted(_ids(pipeline.make_iterator(examples, prepare=_light_prepare))) == list(range(N))
    with pytest.raises(ValueError):
        pipeline.make_dataset(examples, shard_index=3, shard_count=3)
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_dataset(examples[:2], shard_index=2, shard_count=3)


@pytest.mark.parametrize("consumed", [0, 5, N, N + 3])
def test_checkpoint_restore_continues_identically(bad_examples, consumed):
    it = _iter(bad_examples, seed=3, num_epochs=2)
    head = _ids(it, consumed) if consumed else []
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON (stored with checkpoints)
    report = it.report.as_dict()
    rest = _ids(it)
    restored = _iter(bad_examples, seed=3, num_epochs=2)
    restored.set_state(state)
    assert restored.report.as_dict() == report
    assert _ids(restored) == rest
    assert sorted(head + rest) == sorted(2 * [i for i in range(N) if i not in (1, 4, 7)])
    assert restored.report.as_dict() == it.report.as_dict()


def test_bad_images_are_counted_and_skipped(bad_examples, caplog):
    it = pipeline.make_iterator(bad_examples, seed=0, num_epochs=2, shard_index=0, shard_count=1)
    with caplog.at_level("WARNING"):
        out = list(it)
    assert len(out) == 2 * (N - 3)
    assert it.report.as_dict() == {"yielded": 2 * (N - 3), "skipped": 6,
                                   "reasons": {"bad_image": 4, "missing_image": 2}}
    assert "skipped example" in caplog.text
    assert {e["example_index"] for e in out} == set(range(N)) - {1, 4, 7}


def test_default_prepare_resizes(examples):
    cfg = image_lib.ImageProcessorConfig(min_pixels=3136, max_pixels=112 * 112)
    ex = next(iter(pipeline.make_iterator(examples, seed=0, shard_index=0, shard_count=1, image_config=cfg)))
    h, w = ex["resized_hw"]
    assert ex["image_hwc"].shape == (h, w, 3) and ex["image_hwc"].dtype == np.uint8
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 112 * 112
    oh, ow = ex["orig_hw"]
    assert (h, w) == image_lib.smart_resize(oh, ow, 28, 3136, 112 * 112)
    src = examples[ex["example_index"]]
    assert ex["problem"] == src["problem"] and "image_hwc" not in src  # the source is not mutated


def test_custom_prepare_and_errors(examples):
    def prepare(ex):
        if ex["problem"] == examples[2]["problem"]:
            raise image_lib.ImageError("unusable")
        return {"n": len(ex["problem"])}

    it = _iter(examples, prepare=prepare, shuffle=False)
    out = list(it)
    skipped = sum(e["problem"] == examples[2]["problem"] for e in examples)
    assert len(out) == N - skipped and it.report.reasons == {"bad_image": skipped}
    assert out[0] == {"n": len(examples[0]["problem"]), "example_index": 0}

    def buggy(ex):
        raise KeyError("a bug, not a bad image")

    with pytest.raises(KeyError):
        next(_iter(examples, prepare=buggy))
    # Nothing usable left: an endless pipeline raises instead of spinning forever.
    with pytest.raises(ConfigError, match="no usable example.*image_dir"):
        next(_iter(examples, prepare=lambda ex: (_ for _ in ()).throw(image_lib.ImageError("x")),
                   num_epochs=None))


def test_endless_epochs(examples):
    it = _iter(examples, seed=0, num_epochs=None)
    ids = _ids(it, 3 * N + 2)
    assert len(ids) == 3 * N + 2 and sorted(ids[N:2 * N]) == list(range(N))


def test_worker_processes_match_in_process(bad_examples):
    it = _iter(bad_examples, seed=2, worker_count=2, prepare=None)
    head = _ids(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    rest = _ids(it)
    assert head + rest == _ids(_iter(bad_examples, seed=2))
    assert it.report.as_dict()["reasons"] == {"bad_image": 2, "missing_image": 1}
    restored = _iter(bad_examples, seed=2, worker_count=2, prepare=None)
    restored.set_state(state)
    assert _ids(restored) == rest
    it.close(), restored.close()
