"""The real entry point (`pr1_jax.train`), SFT warm-up then one GRPO step on a tiny model: on
one device, and on a data × fsdp × tensor = 1×2×2 mesh of the fake CPU devices, where every
logged metric, evaluation and parameter equals the one-device run."""

import json

import jax
import numpy as np
import pytest

from configs import demo
from pr1_jax import checkpoint, train

TOL = dict(rtol=1e-5, atol=1e-5)
TIMING_KEYS = ("step_time", "tokens_per_s")


def config(workdir, **mesh):
    c = demo.get_config()
    c.workdir = str(workdir)
    c.mesh.update(mesh)
    c.data.synthetic = 16
    c.data.eval_examples = 6  # two evaluation batches of 4, the last one padded
    c.data.eval_batch = 4
    c.sft.steps = 1
    c.sft.prompts_per_step = 2
    c.total_steps = 1
    c.batch.prompts_per_step = 4
    c.batch.prompts_per_micro = 2  # 2 micro-batches
    c.grpo.num_generations = 2
    c.sampling.max_new_tokens = 8
    c.eval_every = 1
    # Adam's first steps are ≈ lr·sign(g): eps = 1 makes them ≈ lr·g, so the float
    # re-association of sharded sums moves parameters by ~lr·1e-7, not ±lr (as in sharding_case).
    c.optim.eps = 1.0
    return c


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


_RUNS = {}


def one_device_run(tmp_path_factory):
    """The one-device run, once per test process (tests/test_monitor.py reads its TensorBoard files)."""
    if "one_device" not in _RUNS:
        run = tmp_path_factory.mktemp("one_device")
        _RUNS["one_device"] = run, train.train_and_evaluate(config(run, fsdp=1), devices=jax.devices()[:1])
    return _RUNS["one_device"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return one_device_run(tmp_path_factory)


def test_train_entry_point_one_step(one_device):
    run, summary = one_device
    lines = _jsonl(run / "metrics.jsonl")
    assert len(lines) == 1 and lines[0]["step"] == 1
    for key in ("loss", "reward", "reward_std", "kl", "completion_length", "grad_norm", "tokens_per_s",
                "time/prefill_s", "time/decode_s", "time/update_s", "tokens/prompt_real", "tokens/completion_padded",
                "decode_steps", "completion_length_max", "truncated_fraction", "compiled", "learning_rate",
                "frac_reward_zero_std", "reward/pr1_grounding/std", "sampler_logp_gap"):
        assert key in lines[0], key
    row = lines[0]
    assert row["tokens/prompt_real"] <= row["tokens/prompt_padded"] <= 1.25 * row["tokens/prompt_real"] + 64 * 4
    assert row["tokens/completion_real"] <= row["tokens/completion_padded"]
    assert row["compiled"] >= 2  # the sampling decode and the update (the prefill was compiled by the evaluation)
    assert row["learning_rate"] == pytest.approx(1e-4)  # the demo's constant schedule
    assert 0 <= row["frac_reward_zero_std"] <= 1
    # The rollout's and the update's float32 log-probs of the same tokens: equal up to rounding.
    assert 0 <= row["sampler_logp_gap"] < 1e-4
    assert summary["steps"] == 1 and summary["skipped_examples"]["skipped"] == 0
    for name in ("reward.png", "eval.png", "summary.json", "eval.jsonl"):
        assert (run / name).is_file(), name
    assert list(run.glob("gallery_*.png")) and (run / "checkpoints" / "step_1").is_dir()


def test_sharded_run_equals_one_device(one_device, tmp_path):
    ref, _ = one_device
    run = tmp_path / "mesh"
    train.train_and_evaluate(config(run, data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    for name in ("metrics.jsonl", "eval.jsonl"):
        got, want = _jsonl(run / name), _jsonl(ref / name)
        assert len(got) == len(want) > 0, name
        for g, w in zip(got, want):
            assert set(g) == set(w), name
            for k in {k for k in w if k not in TIMING_KEYS and not k.startswith("time/")}:
                if isinstance(w[k], str):
                    assert g[k] == w[k], k
                else:
                    np.testing.assert_allclose(g[k], w[k], **TOL, err_msg=f"{name}: {k}")
    for step in (0, 1):  # after SFT, after the GRPO step
        a = checkpoint.Checkpoints(ref / "checkpoints", read_only=True).restore_params(step)
        b = checkpoint.Checkpoints(run / "checkpoints", read_only=True).restore_params(step)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(y, x, **TOL)


@pytest.mark.parametrize("layout", ["rows_per_prompt", "packed_prompts"])
def test_update_layouts_give_the_same_run(one_device, tmp_path, layout):
    """`batch.completion_blocks` (the default) lets a micro-batch's prompts share their completion
    rows, `batch.pack_prompts` packs their prompts too: the same math, so the same metrics,
    evaluations and parameters as each prompt's rows of its own / left-padded prompts."""
    ref, _ = one_device
    run = tmp_path / layout
    c = config(run, fsdp=1)
    if layout == "rows_per_prompt":
        c.batch.completion_blocks = False
    else:
        c.batch.pack_prompts = True
    train.train_and_evaluate(c, devices=jax.devices()[:1])
    if layout == "packed_prompts":  # the update's prompt positions: the real tokens, not B × P
        rows = _jsonl(run / "metrics.jsonl")
        assert all(r["tokens/update_prompt_padded"] < r["tokens/prompt_padded"] for r in rows)
    for name in ("metrics.jsonl", "eval.jsonl"):
        got, want = _jsonl(run / name), _jsonl(ref / name)
        assert len(got) == len(want) > 0, name
        for g, w in zip(got, want):
            for k in {k for k in w if k not in TIMING_KEYS and not k.startswith(("time/", "tokens/completion_",
                                                                                  "tokens/update_"))}:
                if isinstance(w[k], str):
                    assert g[k] == w[k], k
                else:
                    np.testing.assert_allclose(g[k], w[k], **TOL, err_msg=f"{name}: {k}")
    for step in (0, 1):
        a = checkpoint.Checkpoints(ref / "checkpoints", read_only=True).restore_params(step)
        b = checkpoint.Checkpoints(run / "checkpoints", read_only=True).restore_params(step)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(y, x, **TOL)


def test_batch_sizes_must_divide_over_the_mesh(tmp_path):
    c = config(tmp_path, data=1, fsdp=4, tensor=1)
    c.batch.prompts_per_micro = 2
    with pytest.raises(ValueError, match=r"batch.prompts_per_micro=2, sft.prompts_per_step=2: .* 4 batch shards"):
        train.train_and_evaluate(c, devices=jax.devices()[:4])


@pytest.mark.parametrize("flag", ["--config.sampling.end_lengths=poisson:3", "--config.sampling.decode_attention=flash"])
def test_config_mistake_is_one_line_and_exit_2(tmp_path, flag):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pr1_jax.train", "--config=configs/demo.py",
                          f"--config.workdir={tmp_path}", flag], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("pr1_jax.train: error:")]
    assert len(errors) == 1 and flag.split("=")[0].removeprefix("--config.") in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("task", ["counting", "detection", "ocr", "pointing"])
def test_every_task_trains_and_evaluates_with_its_paper_metric(task, tmp_path):
    """One GRPO step of each other task through the real entry point; the held-out evaluation
    reports the task's paper metrics (`pr1_jax/tasks`) and the mean reward."""
    from pr1_jax import tasks

    t = tasks.get(task)
    c = config(tmp_path, fsdp=1)
    c.task, c.rewards, c.skip_special_tokens = task, t.default_rewards, t.skip_special_tokens
    c.sft.steps, c.data.synthetic, c.data.eval_examples, c.batch.prompts_per_micro = 0, 4, 2, 0
    c.batch.seq_len, c.batch.patch_row_len = 1024, 512  # detection's prompt lists the 80 categories
    c.data.synthetic_kwargs = {}
    summary = train.train_and_evaluate(c, devices=jax.devices()[:1])
    rows = _jsonl(tmp_path / "eval.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert t.headline in r and "reward" in r and r["n"] == 2, r
    assert summary["eval_last"] == rows[-1][t.headline] or np.isnan(rows[-1][t.headline])
