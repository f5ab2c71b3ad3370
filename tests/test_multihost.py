"""Multi-host on one machine: two processes × 4 fake CPU devices joined by `jax.distributed`
(gloo over localhost) load the params sharded, run a sharded forward, greedy rollouts and a
GRPO step with each process passing only its own prompts, and agree with one process on
one device."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from jax.sharding import PartitionSpec

from pr1_jax import multihost, sharding
from pr1_jax.model import hf_io
from tests import sharding_case as case

REPO = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-5, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "PR1_JAX_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert multihost.initialize_distributed() is False  # one host: nothing to join
    assert multihost.is_main_process() and multihost.local_batch_size(8) == 8
    x = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(multihost.gather(x), x)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    arr = sharding.shard_batch(x.repeat(8, 0), mesh, process_local=True)  # one process: local == global
    assert arr.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(multihost.host_local(arr), x.repeat(8, 0))


def test_two_processes_agree_with_one(tmp_path):
    ckpt = str(case.write_checkpoint(tmp_path / "ckpt"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    logs = [open(tmp_path / f"process_{i}.log", "w") for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "sharding_case.py"), f"--process={i}",
                               f"--port={port}", f"--ckpt={ckpt}", f"--out={tmp_path}"],
                              cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in (0, 1)]
    try:  # the one-device references are computed meanwhile
        want_logits = case.reference_forward(ckpt)
        want_params, want_metrics = case.reference_update(ckpt)
        want_tokens, want_logp = case.reference_rollout(ckpt)
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() for p in procs):  # one failed: the other would wait for it forever
                break
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    if codes != [0, 0]:
        tails = [(tmp_path / f"process_{i}.log").read_text()[-3000:] for i in (0, 1)]
        raise AssertionError(f"worker exit codes {codes}\n--- process 0\n{tails[0]}\n--- process 1\n{tails[1]}")
    got = dict(np.load(tmp_path / "results.npz"))

    np.testing.assert_array_equal(got["gathered_ids"], [0, 1])
    np.testing.assert_allclose(got["logits"], want_logits, **TOL)
    # Each process held two non-adjacent blocks of rows, and host_local read back exactly them.
    np.testing.assert_array_equal(got["rows"], [[0, 1, 4, 5], [2, 3, 6, 7]])
    for i in (0, 1):
        np.testing.assert_allclose(got["local_logits"][i], want_logits[got["rows"][i]], **TOL)
    np.testing.assert_array_equal(got["rollout_tokens"], want_tokens)
    np.testing.assert_allclose(got["rollout_logp"], want_logp, **TOL)
    assert str(got["spec/q_proj"]) == str(PartitionSpec(None, "fsdp", "tensor", None))
    for k, v in want_metrics.items():
        np.testing.assert_allclose(got[f"metric/{k}"], v, **TOL, err_msg=k)
    for path, v in want_params.items():
        np.testing.assert_allclose(got[f"param/{path}"], v, **TOL, err_msg=path)
    assert set(f"param/{p}" for p in hf_io.flatten(case.reference_params(ckpt))) <= set(got)
