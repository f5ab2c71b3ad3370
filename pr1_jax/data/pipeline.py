"""The input pipeline: examples → shard → shuffle → epochs → prepare, on grain.

    examples, _ = readers.read(path, "grounding", image_dir=root)
    it = make_iterator(examples, seed=0, num_epochs=1, prepare=my_prepare)
    ex = next(it)                       # my_prepare(example) for the next good example
    state = it.get_state()              # JSON-serialisable; store it with the checkpoint
    it.set_state(state)                 # resumes at exactly the same next example
    print(it.report)                    # yielded 1000; skipped 2 (missing_image: 1, bad_image: 1)

Order of operations (a `grain.MapDataset` over example indices):
  1. shard: host `shard_index` of `shard_count` (default jax.process_index/count) takes
     indices shard_index, shard_index + shard_count, … — disjoint, together the whole
     data set (`drop_remainder=True` makes all shards equally long, which multi-host
     training with a fixed number of steps per epoch needs);
  2. shuffle the shard with `seed` (a fresh permutation every epoch; `shuffle=False`
     keeps file order, e.g. for a curriculum-ordered detection file);
  3. repeat `num_epochs` times (None = forever);
  4. `prepare(example) -> dict`, the pluggable transform (default: `load_and_resize`:
     decode + Qwen2-VL smart_resize). PR1's repeat-G grouping is the trainer's job.

An example whose image is missing or corrupt (`prepare` raises `image.ImageError`, as
`image.load_image` does for a missing, truncated or non-image file) is skipped, never a
crash: the iterator counts it by reason (`it.report`), logs the first few, and the counts
are part of the checkpointed state. Other exceptions from `prepare` are bugs and
propagate; a whole epoch of skips in a row raises (nothing usable is left).

With `worker_count > 0` the map runs in grain worker processes (`mp_prefetch`); the
default (0) uses grain's in-process thread prefetch. Skip markers travel with the data,
so the counts are right either way.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from pr1_jax.errors import ConfigError
from pr1_jax.processing import image as image_lib

log = logging.getLogger(__name__)

Prepare = Callable[[dict], dict]
_SKIP = "__pr1_skipped__"  # key of the marker an unusable example turns into


# ----------------------------------------------------------------------------- default transform


def load_and_resize(example: Mapping[str, Any], cfg: image_lib.ImageProcessorConfig | None = None) -> dict:
    """Decodes `example["image"]` and resizes it with Qwen2-VL's smart_resize.

    Returns a new dict: the example's keys plus
      `image_hwc`:  uint8 [H', W', 3], the resized RGB image (H', W' multiples of 28);
      `orig_hw`:    (H, W) of the decoded image;
      `resized_hw`: (H', W').
    Qwen2-VL box targets are in [0, 1000) space and do not depend on the resize; absolute
    pixel targets (detection) scale by resized_hw / orig_hw.
    """
    cfg = cfg or image_lib.ImageProcessorConfig()
    img = image_lib.load_image(example["image"])
    resized = image_lib.resize(img, cfg)
    out = dict(example)
    out["image_hwc"] = np.asarray(resized, dtype=np.uint8)
    out["orig_hw"] = (img.height, img.width)
    out["resized_hw"] = (resized.height, resized.width)
    return out


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """Picklable wrapper: index → prepare(examples[index]) or a skip marker."""

    examples: Sequence[dict]
    prepare: Prepare

    def __call__(self, index: int) -> dict:
        example = self.examples[index]
        try:
            out = self.prepare(copy.copy(example))
        except image_lib.ImageError as e:
            return {_SKIP: _skip_reason(example, e), "index": int(index), "error": str(e)[:300]}
        if not isinstance(out, dict):
            raise TypeError(f"prepare must return a dict, got {type(out).__name__}")
        out.setdefault("example_index", int(index))
        return out


def _skip_reason(example: Mapping[str, Any], error: Exception) -> str:
    src = example.get("image") if isinstance(example, Mapping) else None
    if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
        return "missing_image"
    if isinstance(error, FileNotFoundError) or isinstance(error.__cause__, FileNotFoundError):
        return "missing_image"
    return "bad_image"


# ----------------------------------------------------------------------------- dataset


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return int(shard_index), int(shard_count)


def shard_indices(n: int, shard_index: int, shard_count: int, drop_remainder: bool = False) -> range:
    """The example indices of one shard: strided, disjoint, covering range(n)."""
    if drop_remainder:
        n -= n % shard_count
    return range(shard_index, n, shard_count)


def make_dataset(examples: Sequence[dict], *, prepare: Prepare | None = None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = 1, shard_index: int | None = None,
                 shard_count: int | None = None, drop_remainder: bool = False,
                 image_config: image_lib.ImageProcessorConfig | None = None) -> grain.MapDataset:
    """The pipeline as a `grain.MapDataset` (elements: prepared dicts or skip markers).

    `examples`: any random-access sequence of example dicts (a reader's output).
    `prepare`: example → dict; default `load_and_resize` with `image_config`. It gets a
    shallow copy of the example; prepared dicts get `example_index` (the index into
    `examples`) unless prepare sets it. With worker processes it must be picklable (a
    module-level function, a functools.partial or a dataclass instance; not a lambda).
    Iterate it through `DataIterator` (or `make_iterator`), which drops and counts the
    markers; iterating the dataset directly yields the markers too.
    """
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    if prepare is None:
        prepare = _DefaultPrepare(image_config or image_lib.ImageProcessorConfig())
    indices = shard_indices(len(examples), shard_index, shard_count, drop_remainder)
    if len(indices) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} is empty ({len(examples)} examples)")
    ds = grain.MapDataset.source(indices)
    if shuffle:
        # Mix the user seed so that seeds s and s+1 do not share permutations (grain
        # shuffles epoch e with seed + e).
        ds = ds.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]) % 2**31)
    ds = ds.repeat(num_epochs)
    return ds.map(_Prepare(examples, prepare))


@dataclasses.dataclass(frozen=True)
class _DefaultPrepare:
    cfg: image_lib.ImageProcessorConfig

    def __call__(self, example: dict) -> dict:
        return load_and_resize(example, self.cfg)


# ----------------------------------------------------------------------------- iterator


@dataclasses.dataclass
class SkipReport:
    yielded: int = 0
    skipped: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {"yielded": self.yielded, "skipped": self.skipped, "reasons": dict(self.reasons)}

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
        return f"yielded {self.yielded}; skipped {self.skipped}" + (f" ({why})" if why else "")


class DataIterator:
    """Iterator over a `make_dataset` dataset that skips (and counts) unusable examples.

    `get_state()` / `set_state()` round-trip exactly: the restored iterator yields the same
    next example, and its `report` continues from the saved counts. The state is a
    JSON-serialisable dict {"grain": <grain iterator state>, "report": {...}}.
    """

    def __init__(self, dataset: grain.MapDataset, *, worker_count: int = 0, read_threads: int = 16,
                 prefetch_buffer_size: int = 64, log_first: int = 5, epoch_size: int | None = None):
        self._dataset = dataset
        self._epoch_size = epoch_size  # raise after this many skips in a row
        self._skips_in_a_row = 0
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                            prefetch_buffer_size=prefetch_buffer_size))
        if worker_count > 0:
            _mark_flags_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        self._it = iter(iter_ds)
        self.report = SkipReport()
        self._log_first = log_first

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            element = next(self._it)
            if isinstance(element, dict) and _SKIP in element:
                self._count_skip(element)
                self._skips_in_a_row += 1
                if self._epoch_size and self._skips_in_a_row >= self._epoch_size:
                    # Every row failed to load (typically a wrong data.image_dir): a mistake to fix.
                    raise ConfigError(f"{self._skips_in_a_row} examples in a row were skipped, a whole epoch: "
                                      f"no usable example is left ({self.report}); check data.image_dir and "
                                      f"the data file's image paths")
                continue
            self._skips_in_a_row = 0
            self.report.yielded += 1
            return element

    def _count_skip(self, marker: dict) -> None:
        r = self.report
        r.skipped += 1
        r.reasons[marker[_SKIP]] += 1
        if r.skipped <= self._log_first or r.skipped % 1000 == 0:
            log.warning("skipped example %d (%s: %s); %s", marker["index"], marker[_SKIP],
                        marker["error"], r)

    def get_state(self) -> dict:
        return {"grain": copy.deepcopy(self._it.get_state()), "report": self.report.as_dict()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._it.set_state(copy.deepcopy(state["grain"]))
        rep = state.get("report", {})
        self.report = SkipReport(int(rep.get("yielded", 0)), int(rep.get("skipped", 0)),
                                 collections.Counter(rep.get("reasons", {})))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _mark_flags_parsed() -> None:
    # grain worker processes read absl flags; under pytest / plain scripts nobody parsed them.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(examples: Sequence[dict], *, worker_count: int = 0, read_threads: int = 16,
                  **dataset_kw) -> DataIterator:
    """`DataIterator(make_dataset(examples, **dataset_kw), worker_count=...)`."""
    dataset = make_dataset(examples, **dataset_kw)
    shard = shard_indices(len(examples), *_default_shard(dataset_kw.get("shard_index"), dataset_kw.get("shard_count")),
                          dataset_kw.get("drop_remainder", False))
    return DataIterator(dataset, worker_count=worker_count, read_threads=read_threads,
                        epoch_size=max(1, len(shard)))


def make_mixed_iterator(examples: Sequence[dict], groups: Sequence[Sequence[int]], weights: Sequence[float], *,
                        prepare: Prepare, seed: int = 0, shard_index: int | None = None,
                        shard_count: int | None = None, worker_count: int = 0) -> DataIterator:
    """Examples drawn from `groups` (lists of indices into `examples`) in proportion to
    `weights` (grain's `MapDataset.mix`): each group is sharded over the processes as
    `make_dataset` shards, shuffled afresh every epoch and repeated forever. The curriculum's
    stages (`data/schedule.py`) are such mixtures of difficulty buckets."""
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    parts = []
    for g, group in enumerate(groups):
        local = [int(group[i]) for i in shard_indices(len(group), shard_index, shard_count)]
        if not local:
            raise ValueError(f"group {g} has {len(group)} examples, fewer than the {shard_count} processes")
        group_seed = int(np.random.SeedSequence([seed, g]).generate_state(1)[0]) % 2**31
        parts.append(grain.MapDataset.source(local).shuffle(seed=group_seed).repeat(None))
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [float(w) for w in weights])
    epoch = sum(len(shard_indices(len(g), shard_index, shard_count)) for g in groups)
    return DataIterator(mixed.map(_Prepare(examples, prepare)), worker_count=worker_count, epoch_size=max(1, epoch))
