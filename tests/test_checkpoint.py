"""Checkpoints: exact round trip, keep-N, corrupt checkpoints set aside, restore onto another
mesh (saved on 8 devices, restored on 4, 2, 1), SIGTERM and Ctrl-C, and kill-and-resume of the
real entry point equal to an uninterrupted run bit for bit. (gs:// and two-process saves:
tests/test_storage.py.)"""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax.errors import ConfigError
from pr1_jax import checkpoint
from pr1_jax.train_step import OptimConfig, init_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ unit level (a small tree, no model)
def _state(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
              "embed": jax.random.normal(k2, (5, 4)).astype(jnp.bfloat16)}
    opt = make_optimizer(OptimConfig(learning_rate=0.1))
    state = init_state(params, opt)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, state.opt_state, params)  # non-trivial moments and counts
    return state.replace(step=state.step + 1, opt_state=opt_state), jax.random.PRNGKey(seed + 7)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps, keep=3):
    state, rng = _state()
    ckpt = checkpoint.Checkpoints(directory, keep=keep)
    for s in steps:
        ckpt.save(s, state, rng=rng, data_state={"grain": {"next": s}, "report": {}},
                  meta={"history": {"reward": [0.5, float("nan")]}})
    ckpt.close()
    return state, rng


def test_round_trip_is_exact(tmp_path):
    state, rng = _save_steps(tmp_path, [3])
    ckpt = checkpoint.Checkpoints(tmp_path)
    got = ckpt.restore_latest(checkpoint.abstract_like(state), rng)
    assert got.step == 3 and got.data_state == {"grain": {"next": 3}, "report": {}}
    assert got.meta["history"]["reward"][0] == 0.5 and np.isnan(got.meta["history"]["reward"][1])
    _assert_trees_equal(got.state, state)
    _assert_trees_equal(got.rng, rng)
    host = ckpt.restore_params(3)  # export's view: NumPy, no target needed
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    _assert_trees_equal(host, state.params)
    ckpt.close()


def test_keep_newest_n_and_step_0(tmp_path):
    _save_steps(tmp_path, range(6), keep=2)
    assert checkpoint.Checkpoints(tmp_path).steps() == [0, 4, 5]  # step 0 = after SFT, the reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0", "step_4", "step_5"]


def _largest_array_file(step_dir, item):
    """The biggest chunk of array data (OCDBT data files live in `d/` directories)."""
    files = [f for f in glob.glob(f"{step_dir}/{item}/**/d/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate_array_data", "delete_meta", "delete_data_state", "bad_checksum"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    state, rng = _save_steps(tmp_path, [1, 2])
    latest = tmp_path / "step_2"
    if damage == "truncate_array_data":
        f = _largest_array_file(latest, "params")
        os.truncate(f, os.path.getsize(f) // 2)
    elif damage == "delete_meta":
        os.remove(latest / "meta" / "metadata")
    elif damage == "delete_data_state":
        os.remove(next((latest / "data").glob("process_*.json")))
    else:  # bytes that decode fine but differ from what was saved: only the checksums see it
        meta = json.loads((latest / "meta" / "metadata").read_text())
        meta["checksums"]["train"][0] ^= 1
        (latest / "meta" / "metadata").write_text(json.dumps(meta))
    # An incomplete save (process killed while writing) is never listed at all.
    (tmp_path / "step_3.orbax-checkpoint-tmp-1234").mkdir()
    ckpt = checkpoint.Checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pr1_jax.checkpoint"):
        got = ckpt.restore_latest(checkpoint.abstract_like(state), rng)
    assert got.step == 1
    _assert_trees_equal(got.state, state)
    message = caplog.text
    assert "step_2 is corrupt or incomplete" in message and "trying step 1" in message, message
    assert (tmp_path / "step_2.corrupt").is_dir() and ckpt.steps() == [1]
    assert not (tmp_path / "step_3.orbax-checkpoint-tmp-1234").exists()
    ckpt.close()


def test_saved_on_8_devices_restores_bit_equal_on_4_2_and_1(tmp_path):
    """Resharding on restore (a run resumed on a smaller or bigger slice): a state sharded over
    8 devices comes back equal on a mesh of other devices, 4, 2 or 1 of them, in the target's
    shardings."""
    from tests.test_storage import assert_equal_on, mesh_of, on_mesh, reference_state, target_on

    state, rng = reference_state()
    mesh8 = mesh_of(jax.devices()[:8])
    saved = on_mesh(state, mesh8)
    assert len(saved.params["w"].sharding.device_set) == 8 and not saved.params["w"].is_fully_replicated
    ckpt = checkpoint.Checkpoints(tmp_path)
    ckpt.save(1, saved, rng=on_mesh(rng, mesh8), data_state={"next": 3}, meta={})
    ckpt.wait()
    for n in (4, 2, 1):
        mesh = mesh_of(jax.devices()[8 - n:])
        got = ckpt.restore(1, target_on(state, mesh), target_on(rng, mesh))
        assert got.data_state == {"next": 3}
        assert_equal_on(got.state, state, mesh)
        assert_equal_on(got.rng, rng, mesh)
        assert_equal_on(ckpt.restore_params(1, like=target_on(state.params, mesh)), state.params, mesh)
    ckpt.close()



def test_model_state_of_a_2x2_mesh_restores_on_1x4_and_1x1(tmp_path):
    """The model's real train state (every parameter and AdamW moment in the training layout,
    `sharding.TRAIN_RULES`) saved from a data=2 × fsdp=2 mesh comes back equal on a 1 × 4 and a
    1 × 1 mesh, each leaf in that mesh's own training sharding."""
    from pr1_jax import sharding, train_state
    from pr1_jax.model.config import ModelConfig, TextConfig, VisionConfig
    from pr1_jax.model.qwen2_vl import init_params

    cfg = ModelConfig(text=TextConfig(vocab_size=512, width=64, mlp_dim=128, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=16, mrope_section=(2, 3, 3)),
                      vision=VisionConfig(depth=1, width=32, num_heads=4, mlp_dim=64, out_width=64))
    opt = make_optimizer(OptimConfig(learning_rate=0.1))
    meshes = {(d, f): sharding.mesh_from_config({"data": d, "fsdp": f}, jax.devices()[:d * f])
              for d, f in ((2, 2), (1, 4), (1, 1))}
    from flax.core import meta

    params = jax.device_get(meta.unbox(init_params(cfg, jax.random.PRNGKey(3))))
    state = train_state.init_train_state(jax.tree.map(jnp.asarray, params), opt, meshes[2, 2], cfg=cfg)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), state.params)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)  # non-zero moments to compare
    state = state.replace(opt_state=opt_state)
    sharded = [leaf for leaf in jax.tree.leaves(state.params) if not leaf.is_fully_replicated]
    assert len(sharded) > 10 and {len(x.sharding.device_set) for x in sharded} == {4}
    rng = jax.device_put(jax.random.PRNGKey(0), sharding.replicated(meshes[2, 2]))
    ckpt = checkpoint.Checkpoints(tmp_path)
    ckpt.save(5, state, rng=rng, data_state={"next": 7}, meta={})
    ckpt.wait()
    want = jax.device_get(state)
    for shape in ((1, 4), (1, 1)):
        mesh = meshes[shape]
        like = train_state.abstract_train_state(cfg, opt, mesh)
        got = ckpt.restore(5, like, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh)))
        assert got.data_state == {"next": 7} and int(got.state.step) == int(want.step)
        for g, w, target in zip(jax.tree.leaves(got.state), jax.tree.leaves(want), jax.tree.leaves(like)):
            assert g.sharding == target.sharding, shape
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    ckpt.close()


def test_changed_shapes_raise_instead_of_skipping(tmp_path):
    state, rng = _save_steps(tmp_path, [1])
    other = state.replace(params={**state.params, "embed": jnp.zeros((6, 4), jnp.bfloat16)})
    ckpt = checkpoint.Checkpoints(tmp_path)
    with pytest.raises(ConfigError, match=r"other shapes/dtypes.*embed"):  # a mistake: one line from the CLI
        ckpt.restore_latest(checkpoint.abstract_like(other), rng)
    assert ckpt.steps() == [1]  # a config mistake does not set the checkpoint aside
    ckpt.close()


def test_checksums_see_one_changed_bit():
    x = {"f32": jnp.linspace(0, 1, 12).reshape(3, 4), "bf16": jnp.ones(7, jnp.bfloat16),
         "bool": jnp.array([True, False]), "i32": jnp.arange(5)}
    base = checkpoint.checksums(x)
    assert base == checkpoint.checksums(jax.tree.map(jnp.copy, x))
    flipped = jax.lax.bitcast_convert_type(x["f32"], jnp.uint32).at[2, 1].add(1)
    y = dict(x, f32=jax.lax.bitcast_convert_type(flipped, jnp.float32))
    assert checkpoint.checksums(y) != base
    swapped = dict(x, i32=x["i32"][::-1])  # same values, other order
    assert checkpoint.checksums(swapped) != base


def test_sigterm_sets_a_flag_then_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    preempt = checkpoint.Preemption()
    try:
        assert not preempt.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert preempt.requested and preempt.stop_requested()
        with pytest.raises(SystemExit) as e:
            with preempt.exit_at_once():
                pass
        assert e.value.code == 0
    finally:
        preempt.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_first_sigint_sets_the_flag_and_restores_the_default_action():
    # Python's own Ctrl-C handler, as in a run started from a terminal (a test runner started in
    # the background of a script inherits an ignored SIGINT, which Preemption rightly keeps).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        preempt = checkpoint.Preemption()
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: no KeyboardInterrupt
            time.sleep(0.01)
            assert preempt.requested and preempt.stop_requested()
            assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second one ends the process
        finally:
            preempt.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_an_ignored_sigint_stays_ignored():
    """`nohup` or `cmd &` in a script: the terminal's Ctrl-C is not meant for the run."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        preempt = checkpoint.Preemption()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == preempt._handle  # SIGTERM is still handled
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert not preempt.requested
        preempt.close()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_second_sigint_exits_at_once():
    code = ("import os, signal, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)  # as started from a terminal\n"
            "from pr1_jax import checkpoint\n"
            "preempt = checkpoint.Preemption()\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1)\n"
            "print('requested', preempt.requested, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n"
            "print('still running', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == -signal.SIGINT, out.stderr[-2000:]
    assert out.stdout == "requested True\n"
    assert "Ctrl-C again to exit now" in out.stderr and "Traceback" not in out.stderr


def test_trim_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "los')  # cut short by a kill
    checkpoint.trim_jsonl(path, lambda row: row["step"] <= 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ------------------------------------------------------------------ the real entry point, killed and resumed
# The demo config at toy sizes: SFT warm-up (1 step), then 8 GRPO steps over 8 rows (the
# data iterator crosses epoch boundaries), G = 2, 8 new tokens, no evaluation. Other
# overrides go in `overrides` (each key once).
TOTAL = 8
TRAIN_ARGS = ["--config.data.synthetic=8", "--config.data.eval_examples=0", "--config.sft.steps=1",
              "--config.sft.prompts_per_step=2", f"--config.total_steps={TOTAL}", "--config.batch.prompts_per_step=2",
              "--config.batch.prompts_per_micro=1", "--config.grpo.num_generations=2",
              "--config.sampling.max_new_tokens=8", "--config.eval_every=1000"]
# Wall times, and what a fresh process compiles again after a restart, differ between runs.
TIMING_KEYS = ("step_time", "tokens_per_s", "compiled", "compiled_rollout")


def train_command(workdir, model_dir, *overrides):
    keys = {o.split("=")[0] for o in overrides}
    base = [a for a in TRAIN_ARGS if a.split("=")[0] not in keys]
    return [sys.executable, "-m", "pr1_jax.train", "--config=configs/demo.py", f"--config.workdir={workdir}",
            f"--config.model_dir={model_dir}", *base, *overrides]


def train_env():
    """Same XLA set-up for every run (bitwise comparisons), shared persistent compile cache,
    and XLA's cheapest optimisation level: these runs are short, their compiles are not."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TOKENIZERS_PARALLELISM="false")
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(cache, "train_cli")
    return env


def start_train(workdir, model_dir, *overrides):
    """`python -m pr1_jax.train ...` in the background; output appended to WORKDIR.log."""
    # The child keeps an ignored SIGINT (pytest started with `&` in a script): give it a handler,
    # which exec resets to the default, so that the Ctrl-C stage reaches the run.
    sigint = signal.getsignal(signal.SIGINT)
    if sigint is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(Path(str(workdir) + ".log"), "ab") as log:
            return subprocess.Popen(train_command(workdir, model_dir, *overrides), cwd=REPO, env=train_env(),
                                    stdout=log, stderr=subprocess.STDOUT)
    finally:
        if sigint is signal.SIG_IGN:
            signal.signal(signal.SIGINT, sigint)


def run_train(workdir, model_dir, *overrides, timeout=600):
    proc = start_train(workdir, model_dir, *overrides)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, _tail(workdir)
    return proc


def _tail(workdir, n=3000):
    return Path(str(workdir) + ".log").read_text(errors="replace")[-n:]


def _wait_for(predicate, proc, workdir, what, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run exited (rc {proc.returncode}) before {what}:\n{_tail(workdir)}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{_tail(workdir)}")
        time.sleep(0.02)


def _logged_steps(workdir):
    metrics = Path(workdir) / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def _metric_rows(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")} for r in rows]


def _steps(workdir):
    ckpt = checkpoint.Checkpoints(Path(workdir) / "checkpoints", read_only=True)
    steps = ckpt.steps()
    ckpt.close()
    return steps


@pytest.fixture
def spawn():
    """start_train, with every process it started killed at teardown (a failed test leaves none)."""
    procs = []
    yield lambda *args: procs.append(start_train(*args)) or procs[-1]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigterm_ctrl_c_and_sigkill_then_resume_equal_an_uninterrupted_run(tmp_path, tiny_dir, spawn):
    ref, run = tmp_path / "reference", tmp_path / "interrupted"
    # The uninterrupted reference run; the interrupted one starts once the reference has
    # compiled everything (GRPO step 1 logged) and finds it all in the compile cache.
    reference = spawn(ref, tiny_dir, "--config.checkpoint_every=1000")
    _wait_for(lambda: _logged_steps(ref) >= 1, reference, ref, "GRPO step 1")

    # 1. SIGTERM mid-GRPO: a checkpoint at the step it was in (no periodic ones), exit status 0.
    proc = spawn(run, tiny_dir, "--config.checkpoint_every=1000")
    _wait_for(lambda: _logged_steps(run) >= 1, proc, run, "GRPO step 1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, _tail(run)
    assert reference.wait(timeout=600) == 0, _tail(ref)
    stopped = len(_metric_rows(run))
    assert '"preempted": true' in _tail(run) and 1 <= stopped < TOTAL
    assert _steps(run) == [0, stopped]  # step 0: the policy after SFT
    assert (run / "reward.png").is_file()  # the curves are drawn at each checkpoint, not only at the end
    log = _tail(run, 100_000)
    # The console: pr1_jax's own lines, none of orbax's INFO lines (~40 per checkpoint when verbose).
    assert "] checkpoint step 0 → " in log and "checkpoint_manager.py" not in log and "atomicity.py" not in log

    # 2. Resume; the first Ctrl-C (SIGINT) once a step more is logged: the same as SIGTERM.
    proc = spawn(run, tiny_dir, "--config.checkpoint_every=1000")
    _wait_for(lambda: _logged_steps(run) > stopped, proc, run, f"GRPO step {stopped + 1}")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 0, _tail(run)
    interrupted = len(_metric_rows(run))
    assert "SIGINT received: saving a checkpoint" in _tail(run) and '"preempted": true' in _tail(run)
    assert stopped < interrupted < TOTAL - 2 and _steps(run) == [0, stopped, interrupted]

    # 3. Resume (no SFT again), SIGKILL once two more checkpoints exist.
    proc = spawn(run, tiny_dir, "--config.checkpoint_every=1")
    _wait_for((run / "checkpoints" / f"step_{interrupted + 2}").is_dir, proc, run, f"step_{interrupted + 2}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    log = _tail(run, 100_000)
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped}'}" in log
    assert f"resuming from {run / 'checkpoints' / f'step_{interrupted}'}" in log
    assert log.count("SFT:") == log.split("resuming from")[0].count("SFT:")  # the warm-up ran once

    # 4. Damage the newest checkpoint: the restart says so, sets it aside and uses the previous
    #    one (written by the killed process).
    *_, previous, latest = _steps(run)
    assert previous > interrupted and latest < TOTAL
    target = run / "checkpoints" / f"step_{latest}"
    f = _largest_array_file(target, "params")
    os.truncate(f, os.path.getsize(f) // 2)
    run_train(run, tiny_dir, "--config.checkpoint_every=1")
    log = _tail(run, 100_000).split("corrupt or incomplete")
    assert len(log) == 2 and str(target) in log[0][-300:] and f"trying step {previous}" in log[1][:2000]
    assert f"resuming from {run / 'checkpoints' / f'step_{previous}'}" in log[1]
    assert (target.parent / f"{target.name}.corrupt").is_dir()

    # Every step logged once, values bit-equal; parameters, optimizer state and RNG bit-equal.
    assert [r["step"] for r in _metric_rows(run)] == list(range(1, TOTAL + 1))
    assert _metric_rows(run) == _metric_rows(ref)
    a = checkpoint.Checkpoints(ref / "checkpoints", read_only=True)
    b = checkpoint.Checkpoints(run / "checkpoints", read_only=True)
    _assert_trees_equal(a.restore_params(TOTAL), b.restore_params(TOTAL))
    assert a.read_meta(TOTAL)["checksums"] == b.read_meta(TOTAL)["checksums"]  # optimizer state and RNG too
    assert a.read_meta(TOTAL)["history"] == b.read_meta(TOTAL)["history"]
    a.close()
    b.close()
