"""Storage that Cloud TPU pods use (docs/storage.md), on CPU with a fake GCS: etils.epath's
gs:// backend and orbax's tensorstore kvstore pointed at a local directory, with an object
store's rules (an object cannot be appended to; writing one needs no directory).

A training run whose workdir is gs://bucket/run writes every output through epath and
resumes on another mesh (8 devices → 4); `export` reads the checkpoint from gs:// and writes
the HF directory to gs://. Two processes (`jax.distributed`, 2 × 4 CPU devices) save ONE
checkpoint to gs:// that one process restores onto another mesh. Monitor and viz write to
gs:// without appending.

    python tests/test_storage.py --process=0 --port=PORT --root=DIR   # one process of the two-process save
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils.epath import backend, gpath
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.path import gcs_utils

from pr1_jax import checkpoint, cli, export, monitor, multihost, viz
from pr1_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BUCKET = "gs://bucket"


# ------------------------------------------------------------------ the fake GCS
class FakeGcs(backend.Backend):
    """gs://<bucket>/<key> → <root>/<bucket>/<key>; records every object written."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self.written: list[str] = []
        self._os = backend.os_backend

    def local(self, path) -> str:
        text = os.fspath(path)
        if not text.startswith("gs://"):
            raise ValueError(f"not a gs:// path: {text}")
        return os.path.join(self.root, text.removeprefix("gs://"))

    def uri(self, local) -> str:
        return "gs://" + os.path.relpath(local, self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise OSError(errno.EOPNOTSUPP, "a GCS object cannot be appended to", os.fspath(path))
        local = self.local(path)
        if "w" in mode:  # an object needs no directory
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self.written.append(os.fspath(path))
        return self._os.open(local, mode)

    def exists(self, path):
        return self._os.exists(self.local(path))

    def isdir(self, path):
        return self._os.isdir(self.local(path))

    def listdir(self, path):
        return self._os.listdir(self.local(path))

    def glob(self, path):
        return [self.uri(p) for p in self._os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self._os.walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.uri(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self._os.makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self._os.mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        self._os.rmtree(self.local(path))

    def remove(self, path):
        self._os.remove(self.local(path))

    def rename(self, path, dst):
        self._os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        self._os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        self._os.copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return self._os.stat(self.local(path))


def install_fake_gcs(root, setitem=None, setattr_=None):
    """Routes gs:// (epath, and orbax's tensorstore kvstores) to `root`; `setitem`/`setattr_`:
    pytest's monkeypatch methods (undone after the test), or plain assignment."""
    setitem = setitem or (lambda d, k, v: d.__setitem__(k, v))
    setattr_ = setattr_ or setattr
    fake = FakeGcs(root)
    setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    # Orbax writes arrays through tensorstore, which would open the bucket with its own GCS
    # client: the same local directory through tensorstore's file driver instead.
    setattr_(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": fake.local(path)})
    setattr_(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # asks the GCS API
    return fake


# ------------------------------------------------------------------ a small train state, sharded over a mesh
def reference_state():
    """A TrainState (params, AdamW moments after one update, step) and a PRNG key, as NumPy:
    the same values in every process."""
    import jax.numpy as jnp
    import ml_dtypes

    from pr1_jax.train_step import OptimConfig, init_state, make_optimizer

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((16, 6), np.float32), "b": np.zeros(6, np.float32),
              "e": rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16)}
    params = jax.tree.map(jnp.asarray, params)
    opt = make_optimizer(OptimConfig(learning_rate=0.1))
    state = init_state(params, opt)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), state.opt_state, params)
    return jax.device_get(state.replace(step=state.step + 1, opt_state=opt_state)), np.asarray(jax.random.PRNGKey(7))


def sharding_on(x, mesh):
    """Split along the first axis over every device of `mesh` when it divides, else replicated."""
    split = np.ndim(x) >= 1 and np.shape(x)[0] % mesh.devices.size == 0
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names) if split else PartitionSpec())


def on_mesh(tree, mesh):
    """NumPy values (the same on every process) → global arrays sharded by `sharding_on`."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding_on(x, mesh),
                                                               lambda i: np.asarray(x)[i]), tree)


def target_on(tree, mesh):
    """The restore target: ShapeDtypeStructs with `sharding_on`'s shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding_on(x, mesh)), tree)


def mesh_of(devices):
    return jax.sharding.Mesh(np.asarray(devices), ("x",))


def assert_equal_on(got, want, mesh):
    """Bit-equal values, every array on `mesh`'s devices with `sharding_on`'s sharding."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.sharding == sharding_on(w, mesh) and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ------------------------------------------------------------------ one process of the two-process save
def worker(process: int, port: int, root: str) -> None:
    """Joins a 2-process run (4 CPU devices each), saves the reference state sharded over all
    8 devices to gs:// as step 1, then restores it there (its own data state back)."""
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process))
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4)
    assert multihost.initialize_distributed() and jax.process_count() == 2 and len(jax.local_devices()) == 4
    install_fake_gcs(root)
    mesh = mesh_of(jax.devices())
    state, rng = reference_state()
    ckpt = checkpoint.Checkpoints(f"{BUCKET}/run/checkpoints")
    ckpt.save(1, on_mesh(state, mesh), rng=on_mesh(rng, mesh), data_state={"next": 10 + process},
              meta={"history": {"step": [1]}})
    ckpt.close()
    got = checkpoint.Checkpoints(f"{BUCKET}/run/checkpoints").restore_latest(target_on(state, mesh),
                                                                              target_on(rng, mesh))
    assert got.step == 1 and got.data_state == {"next": 10 + process}, got.data_state
    for g, w in zip(jax.tree.leaves(got.state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(multihost.fetch(g), w)
    jax.distributed.shutdown()


# ------------------------------------------------------------------ tests
@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The fake GCS (bucket `gs://bucket` under tmp_path/gcs); local scratch under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # scratch_path, the monitor's staging
    return install_fake_gcs(tmp_path / "gcs", monkeypatch.setitem, monkeypatch.setattr)


def _jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


def test_paths(tmp_path):
    assert multihost.storage_path(f"file://{tmp_path}/run") == tmp_path / "run"
    assert multihost.is_local(f"file://{tmp_path}") and multihost.is_local("runs/x")
    assert str(multihost.storage_path("gs://b/run") / "x") == "gs://b/run/x"
    assert str(multihost.storage_path(Path("gs://b/run"))) == "gs://b/run"  # collapsed by pathlib: repaired
    assert multihost.scratch_path(tmp_path, "data") == tmp_path / "data"
    assert multihost.scratch_path("gs://b/run", "data").parts[-3:] == ("pr1_jax", "gs_b_run", "data")


def test_writable_dir_on_gs(gcs, tmp_path):
    uri = f"{BUCKET}/run"
    assert str(cli.writable_dir(uri, "--config.workdir")) == uri
    assert gcs.written and not any((tmp_path / "gcs" / "bucket" / "run").iterdir())  # the probe object is gone
    assert cli.writable_dir(f"file://{tmp_path}/local", "--out") == tmp_path / "local"


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs installed: gs:// is reachable")
def test_gs_without_a_gcs_client_is_one_line():
    with pytest.raises(ConfigError, match=r"--config.workdir: cannot write to gs://b/run .*pip install gcsfs"):
        cli.writable_dir("gs://b/run", "--config.workdir")


def test_monitor_and_viz_write_to_gs_without_appending(gcs, tmp_path):
    """Every monitor output lands in the bucket (the fake refuses appends); the JSON-lines logs
    and the event file are copied whole, at most every sync_every_s and at every `curves`."""
    from configs import demo
    from tensorboard.backend.event_processing import event_accumulator

    c = demo.get_config()
    c.sft.steps = 2
    c.monitor.sync_every_s = 3600.0  # only the forced copies
    bucket = tmp_path / "gcs" / "bucket" / "run"
    mon = monitor.Monitor(f"{BUCKET}/run", c)
    mon.resume_at(None)
    mon.log_sft(1, {"loss": 3.0})
    for step in (1, 2, 3):
        mon.log_step(step, {"loss": float(step)})
    assert not (bucket / "metrics.jsonl").exists()  # not copied yet
    gallery = f"{BUCKET}/run/gallery_grpo_3.png"
    viz.gallery([{"image": np.zeros((20, 30, 3), np.uint8), "pred": [[1, 1, 9, 9]], "caption": "x"}], gallery)
    mon.log_eval("grpo", 3, {"acc@0.5": 0.5}, samples=[({"problem": "q", "solution": [1]}, "a")], gallery=gallery)
    mon.curves({"step": [1, 2, 3], "reward": [0.1, 0.2, 0.3], "eval_step": [3], "eval_score": [0.5]})
    assert [r["step"] for r in _jsonl((bucket / "metrics.jsonl").read_text())] == [1, 2, 3]
    mon.summary({"steps": 3})
    mon.close()
    assert not list((tmp_path / "tmp").iterdir())  # the staging directory is gone
    assert [r["step"] for r in _jsonl((bucket / "eval.jsonl").read_text())] == [3]
    for name in ("reward.png", "eval.png", "summary.json", "gallery_grpo_3.png"):
        assert (bucket / name).is_file(), name
    acc = event_accumulator.EventAccumulator(str(bucket), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("grpo/loss")] == [1, 2, 3]
    assert acc.Images("eval/gallery")[0].encoded_image_string == (bucket / "gallery_grpo_3.png").read_bytes()

    resumed = monitor.Monitor(f"{BUCKET}/run", c)  # a restart from the checkpoint of step 2
    resumed.resume_at(2)
    resumed.log_step(3, {"loss": -3.0})
    resumed.close()
    assert [r["loss"] for r in _jsonl((bucket / "metrics.jsonl").read_text())] == [1.0, 2.0, -3.0]
    assert not (bucket / "eval.jsonl").read_text()
    assert len(list(bucket.glob("events.out.tfevents.*"))) == 2


def test_training_run_on_gs_resumes_on_4_devices_and_exports(gcs, tmp_path, caplog, tiny_dir):
    """The real entry point with workdir gs://bucket/run: one GRPO step on a mesh of 8 devices,
    then a restart on 4 that resumes it (the arrays resharded, their checksums verified) and
    does step 2; `export` reads the checkpoint from gs:// and writes the HF directory there."""
    from safetensors.numpy import load

    from pr1_jax import train
    from pr1_jax.model import hf_io
    from pr1_jax.model.config import ModelConfig
    from test_train import config

    def run(total_steps, devices):
        c = config(f"{BUCKET}/run", fsdp=len(devices))
        c.model_dir = str(tiny_dir)  # the session's (a "tiny" model_dir is written to local scratch: test_paths)
        c.sft.steps, c.total_steps, c.checkpoint_every, c.eval_every = 0, total_steps, 1, 1
        c.data.synthetic, c.data.eval_examples, c.data.eval_batch = 16, 8, 8
        c.batch.prompts_per_step, c.batch.prompts_per_micro = 8, 8
        return train.train_and_evaluate(c, devices=devices)

    run(1, jax.devices()[:8])
    with caplog.at_level(logging.INFO, logger="pr1_jax.checkpoint"):
        summary = run(2, jax.devices()[:4])
    assert f"resuming from {BUCKET}/run/checkpoints/step_1" in caplog.text and "corrupt" not in caplog.text
    assert summary["steps"] == 2
    bucket = tmp_path / "gcs" / "bucket" / "run"
    assert [r["step"] for r in _jsonl((bucket / "metrics.jsonl").read_text())] == [1, 2]
    assert [r["step"] for r in _jsonl((bucket / "eval.jsonl").read_text())] == [0, 1, 2]
    for name in ("config.json", "summary.json", "reward.png", "eval.png", "checkpoints/step_1/commit_success.txt",
                 "checkpoints/step_2/commit_success.txt"):
        assert (bucket / name).is_file(), name
    assert len(list(bucket.glob("events.out.tfevents.*"))) == 2  # one per run
    assert sorted(p.name for p in bucket.glob("gallery_grpo_*.png")) == [f"gallery_grpo_{i}.png" for i in (0, 1, 2)]
    assert not (REPO / "gs:").exists() and not (Path.cwd() / "gs:").exists()  # no URI taken for a local path

    # The step-1 checkpoint, saved on 8 devices, read onto 4 and onto the host: equal.
    ckpt = checkpoint.Checkpoints(f"{BUCKET}/run/checkpoints", read_only=True)
    host = ckpt.restore_params(1)
    mesh = mesh_of(jax.devices()[:4])
    on4 = ckpt.restore_params(1, like=target_on(host, mesh))
    assert_equal_on(on4, host, mesh)
    params = ckpt.restore_params(2)
    ckpt.close()

    out = export.export(f"{BUCKET}/run", f"{BUCKET}/hf")
    assert str(out) == f"{BUCKET}/hf"
    hf = tmp_path / "gcs" / "bucket" / "hf"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in hf.iterdir()}
    cfg = ModelConfig.from_hf_dict(json.loads((hf / "config.json").read_text()))
    got = load((hf / "model.safetensors").read_bytes())
    want = hf_io.to_hf_state_dict(params, cfg)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_save_one_checkpoint_that_one_process_restores(gcs, tmp_path, caplog):
    """Two processes × 4 CPU devices save the state sharded over all 8 to gs://: one step
    directory, each process's shards and data state in it. This one process restores it onto
    4 devices: equal values; the data iterators (2 shards) cannot carry over, with a warning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(REPO))
    port, root = _free_port(), str(tmp_path / "gcs")
    logs = [open(tmp_path / f"process_{i}.log", "w") for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, __file__, f"--process={i}", f"--port={port}", f"--root={root}"],
                              cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() for p in procs):  # one failed: the other would wait for it forever
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    if codes != [0, 0]:
        tails = [(tmp_path / f"process_{i}.log").read_text()[-3000:] for i in (0, 1)]
        raise AssertionError(f"worker exit codes {codes}\n--- process 0\n{tails[0]}\n--- process 1\n{tails[1]}")

    step_dirs = tmp_path / "gcs" / "bucket" / "run" / "checkpoints"
    assert [p.name for p in step_dirs.iterdir()] == ["step_1"]  # ONE checkpoint, in the shared location
    step = step_dirs / "step_1"
    assert (step / "commit_success.txt").is_file()
    assert sorted(p.name for p in (step / "data").glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(p.name for p in (step / "params").glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]

    state, rng = reference_state()
    mesh = mesh_of(jax.devices()[:4])
    ckpt = checkpoint.Checkpoints(f"{BUCKET}/run/checkpoints")
    with caplog.at_level(logging.WARNING, logger="pr1_jax.checkpoint"):
        got = ckpt.restore_latest(target_on(state, mesh), target_on(rng, mesh))
    ckpt.close()
    assert got.step == 1 and got.data_state is None and got.meta["history"] == {"step": [1]}
    assert "saved by another number of processes" in caplog.text
    assert_equal_on(got.state, state, mesh)
    assert_equal_on(got.rng, rng, mesh)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--process", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", required=True)
    a = ap.parse_args()
    worker(a.process, a.port, a.root)
    sys.exit(0)
