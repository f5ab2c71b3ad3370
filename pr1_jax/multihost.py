"""What a program needs to run as one of several processes (multi-host JAX): a guarded
`jax.distributed.initialize`, which process writes files, and moving per-process batch
blocks and global arrays between devices and host NumPy.

    multihost.initialize_distributed()           # a no-op on one host
    n = multihost.local_batch_size(16)           # this process's prompts of a global batch of 16
    rows = multihost.host_local(out.tokens)      # this process's rows of a batch-sharded array
    totals = multihost.gather(local_rewards)     # every process's values, in process order

On one process every function is the identity or a plain `np.asarray`. Sharding over the
devices (meshes, rules, sharded programs) lives in `pr1_jax/sharding.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
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
