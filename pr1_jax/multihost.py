"""What a program needs to run as one of several processes (multi-host JAX): a guarded
`jax.distributed.initialize`, which process writes files, and moving per-process batch
blocks and global arrays between devices and host NumPy.

    multihost.initialize_distributed()           # a no-op on one host
    n = multihost.local_batch_size(16)           # this process's prompts of a global batch of 16
    rows = multihost.host_local(out.tokens)      # this process's rows of a batch-sharded array
    totals = multihost.gather(local_rewards)     # every process's values, in process order

    workdir = multihost.storage_path("gs://bucket/run")  # an etils.epath.Path: local or a URI
    model_dir = multihost.scratch_path(workdir, "base_model")  # local disk, for files others write

On one process every function is the identity or a plain `np.asarray`. Sharding over the
devices (meshes, rules, sharded programs) lives in `pr1_jax/sharding.py`.

Storage (docs/storage.md): a run's outputs go to one location that every process sees, a
local or mounted directory or any URI `etils.epath` supports (gs://bucket/dir on Cloud TPU
pods). Orbax writes checkpoints there from every process; process 0 writes logs and plots.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """`jax.distributed.initialize()` when the environment says this is one of several
    processes; a no-op on one host. Call before any other jax call. Returns whether it ran.

    Multi-process when: arguments are given; JAX_COORDINATOR_ADDRESS is set; PR1_JAX_DISTRIBUTED=1
    (`tpu/run.sh` sets it: jax then finds the TPU pod's workers itself); or a SLURM / Open MPI
    launch of more than one task.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    wanted = (coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in env
              or env.get("PR1_JAX_DISTRIBUTED", "0") not in ("", "0")
              or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not wanted:
        return False
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _env_int(name: str) -> int | None:
    return int(os.environ[name]) if name in os.environ else None


def is_main_process() -> bool:
    """Process 0 writes logs, metrics files and plots."""
    return jax.process_index() == 0


def host_local(tree):
    """Global arrays split along the batch → NumPy arrays of THIS process's rows (the rows
    it passed with `shard_batch(..., process_local=True)`); whole arrays on one host."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        local = multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec)
        return np.asarray(local)

    return jax.tree.map(one, tree)


def fetch(tree):
    """Global arrays → their full NumPy values on every process (all-gathers the rows other
    processes hold); plain `np.asarray` on one host."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def gather(tree):
    """Per-process NumPy values → the same global values on every process, concatenated
    along axis 0 in process order (`process_allgather`); identity on one host."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def local_batch_size(global_size: int) -> int:
    """Prompts per process for a global batch (the data pipeline shards by process)."""
    if global_size % jax.process_count():
        raise ValueError(f"global batch {global_size} is not divisible by {jax.process_count()} processes")
    return global_size // jax.process_count()


def local_slice(global_size: int) -> slice:
    """This process's block of a global batch of `global_size` rows (`local_batch_size` rows at
    its process index): `gather` of the blocks gives the batch back in order."""
    n = local_batch_size(global_size)
    return slice(jax.process_index() * n, (jax.process_index() + 1) * n)


def process_path(path: str | os.PathLike) -> Path:
    """`path`, or `path/process_<i>` when there are several processes: for files that every
    process generates for itself (tiny model, synthetic data), so no shared disk is needed."""
    path = Path(path)
    return path / f"process_{jax.process_index()}" if jax.process_count() > 1 else path


# ------------------------------------------------------------------ where files go
_URI_SCHEMES = ("gs", "s3", "az", "hf")  # etils.epath's
# A URI after pathlib.Path, which collapses "gs://b/x" to "gs:/b/x" (orbax repairs it the same way).
_COLLAPSED_URI = re.compile(rf"^({'|'.join(_URI_SCHEMES)}):/(?!/)")


def _text(path: str | os.PathLike) -> str:
    return _COLLAPSED_URI.sub(r"\1://", os.fspath(path))


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on a file system of this machine (a plain or `file://` path), not a URI
    such as gs://bucket/dir."""
    text = _text(path)
    return text.startswith("file://") or "://" not in text


def storage_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `etils.epath.Path`, the one path type of a run's outputs: a local path with
    `~` expanded, made absolute (a `file://` URI becomes its path), or a URI epath supports
    (gs://, s3://, …) as it is (`pathlib.Path("gs://b/x")` collapses the // and
    `.absolute()` would glue it to the working directory; a collapsed one is repaired)."""
    text = _text(path)
    if not is_local(text):
        return epath.Path(text)
    text = text.removeprefix("file://")
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def scratch_path(workdir: str | os.PathLike, name: str) -> Path:
    """A local directory for files that a writer without URI support generates for the run (the
    tiny model, through transformers; synthetic data and its images): `workdir/name` for a local
    workdir, else `<tmp>/pr1_jax/<workdir as a name>/name`, the same on every restart on this
    machine; per process (`process_path`) when there are several."""
    if is_local(workdir):
        return process_path(Path(storage_path(workdir)) / name)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", os.fspath(workdir)).strip("_")
    return process_path(Path(tempfile.gettempdir()) / "pr1_jax" / slug / name)
