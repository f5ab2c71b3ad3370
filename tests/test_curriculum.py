"""The detection curriculum: the offline difficulty pass (`pr1_jax.data.curriculum`) and the
training-side stages (`pr1_jax.data.schedule`) on a tiny model and synthetic data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from configs import demo
from pr1_jax import checkpoint, train
from pr1_jax.data import curriculum, readers, schedule
from pr1_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TIMING = ("step_time", "tokens_per_s", "compiled", "compiled_rollout")


def _detection(workdir, n=6):
    c = demo.get_config()
    c.workdir = str(workdir)
    c.task = "detection"
    c.rewards = ("pr1_detection",)
    c.data.synthetic = n
    c.data.synthetic_kwargs = dict(min_side=112, max_side=168)
    c.batch.prompts_per_step = 2
    c.batch.seq_len = 256
    c.sampling.max_new_tokens = 8
    return c


def test_partition_follows_the_scores():
    scores = {i: {"mean": m} for i, m in enumerate([0.1, 0.9, 0.5, 0.9, 0.0, 0.3, 0.7])}
    diff = curriculum.partition(scores, 3)
    assert diff["order"] == [1, 3, 6, 2, 5, 0, 4]  # reward descending, ties by index
    assert diff["buckets"] == [[1, 3, 6], [2, 5], [0, 4]]
    assert diff["reward_range"] == [[0.7, 0.9], [0.3, 0.5], [0.0, 0.1]]
    with pytest.raises(ValueError):
        curriculum.partition(scores, 0)


def test_offline_pass_two_devices_equal_one_and_resumes_after_sigterm(tmp_path):
    c = _detection(tmp_path / "w")
    one = curriculum.score_pass(c, tmp_path / "one", samples=2, buckets=2, devices=jax.devices()[:1], progress=False)
    two = curriculum.score_pass(c, tmp_path / "two", samples=2, buckets=2, devices=jax.devices()[:2], progress=False)
    s1, s2 = curriculum.read_scores(tmp_path / "one"), curriculum.read_scores(tmp_path / "two")
    assert sorted(s1) == list(range(6)) and s1 == s2 and one["order"] == two["order"]
    assert one["buckets"] == [one["order"][:3], one["order"][3:]]
    means = [s1[i]["mean"] for i in one["order"]]
    assert means == sorted(means, reverse=True)
    # Each bucket is a file the readers read as the task's rows, with the rows of its indices.
    rows, _ = readers.read(tmp_path / "one" / "bucket_1.json", "detection")
    every, _ = readers.read(tmp_path / "one" / "data" / "train.json", "detection",
                            image_dir=tmp_path / "one" / "data")
    assert [r["solution"] for r in rows] == [every[i]["solution"] for i in one["buckets"][1]]

    # The command line, stopped by SIGTERM after its first batch, then run again: the same scores.
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "pr1_jax.data.curriculum", "--config=configs/demo.py", f"--out={out}",
           "--samples=2", "--buckets=2", "--config.task=detection", "--config.rewards=('pr1_detection',)",
           "--config.data.synthetic=6", "--config.data.synthetic_kwargs={'min_side': 112, 'max_side': 168}",
           "--config.batch.prompts_per_step=2", "--config.batch.seq_len=256", "--config.sampling.max_new_tokens=8",
           "--config.mesh.fsdp=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / curriculum.SCORES).is_file() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = curriculum.read_scores(out)
    assert 0 < len(stopped) < 6 and "run the same command again to resume" in err
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert curriculum.read_scores(out) == s1
    assert json.loads((out / curriculum.DIFFICULTY).read_text())["order"] == one["order"]


def test_offline_pass_on_two_devices_equals_one_where_scores_differ(tmp_path):
    """OCR's reward of a random model's answers varies from example to example (detection's is 0):
    the per-example means, and so the order, are equal on one and two devices."""
    c = _detection(tmp_path / "w")
    c.task, c.rewards, c.data.synthetic_kwargs = "ocr", ("pr1_ocr",), {}
    one = curriculum.score_pass(c, tmp_path / "one", samples=2, buckets=2, devices=jax.devices()[:1], progress=False)
    two = curriculum.score_pass(c, tmp_path / "two", samples=2, buckets=2, devices=jax.devices()[:2], progress=False)
    s1 = curriculum.read_scores(tmp_path / "one")
    assert len({r["mean"] for r in s1.values()}) > 3 and s1 == curriculum.read_scores(tmp_path / "two")
    assert one["order"] == two["order"] != sorted(one["order"])


def _grounding(workdir, difficulty):
    c = demo.get_config()
    c.workdir = str(workdir)
    c.data.synthetic = 8
    c.data.eval_examples = 0
    c.sft.steps = 0
    c.total_steps = 4
    c.checkpoint_every = 1
    c.batch.prompts_per_step = 2
    c.batch.prompts_per_micro = 2
    c.grpo.num_generations = 2
    c.sampling.max_new_tokens = 8
    c.data.curriculum.difficulty = str(difficulty)
    c.data.curriculum.stage_steps = (0, 2)
    c.data.curriculum.num_generations = (2, 4)
    c.data.curriculum.mix = ((1.0,), (0.25, 0.75))
    return c


def _rows(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time/")} for r in rows]


def test_two_stages_switch_compile_once_and_resume_bit_exactly(tmp_path, monkeypatch):
    order = [5, 1, 7, 0, 2, 6, 3, 4]  # any order of the 8 training rows: the stages must follow it
    (tmp_path / "difficulty.json").write_text(json.dumps({"order": order}))
    c = _grounding(tmp_path / "straight", tmp_path / "difficulty.json")
    train.train_and_evaluate(c, devices=jax.devices()[:1])
    rows = _rows(tmp_path / "straight")
    assert [r["curriculum/stage"] for r in rows] == [0, 0, 1, 1]
    assert [r["curriculum/num_generations"] for r in rows] == [2, 2, 4, 4]
    assert "curriculum/reward_stage_0" in rows[1] and "curriculum/reward_stage_1" in rows[2]
    stages = json.loads((tmp_path / "straight" / "curriculum.json").read_text())["stages"]
    assert [(st["start"], st["num_generations"], st["bucket_sizes"]) for st in stages] == [(0, 2, [4]), (2, 4, [4, 4])]
    raw = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    compiled = [r["compiled"] for r in raw]
    # Stage 0 draws only from the easiest bucket (the first half of the order).
    sched = schedule.Curriculum.from_config(c, 8)
    assert sched.stages[0].buckets == ((5, 1, 7, 0),) and sched.stages[1].buckets == ((5, 1, 7, 0), (2, 6, 3, 4))
    # Stage 1's rollout decode (G = 4) compiles in the background from step 0 on (prefill depends on the
    # prompts only), so the switch compiles one program, the update for its answers; nothing at the next step.
    assert [r["compiled_ahead"] for r in raw] == [1, 0, 0, 0]
    assert (compiled[2], raw[2]["compiled_rollout"], compiled[3]) == (1, 0, 0)

    # Stopped after step 3 (as SIGTERM stops a run), then resumed: bit-equal to the straight run.
    calls = {"n": 0}
    real = checkpoint.Preemption.stop_requested

    def stop_after_three(self):
        calls["n"] += 1
        return calls["n"] == 3 or real(self)

    monkeypatch.setattr(checkpoint.Preemption, "stop_requested", stop_after_three)
    c = _grounding(tmp_path / "resumed", tmp_path / "difficulty.json")
    assert train.train_and_evaluate(c, devices=jax.devices()[:1])["preempted"]
    monkeypatch.setattr(checkpoint.Preemption, "stop_requested", real)
    train.train_and_evaluate(c, devices=jax.devices()[:1])
    assert _rows(tmp_path / "resumed") == rows
    a = checkpoint.Checkpoints(tmp_path / "straight" / "checkpoints", read_only=True)
    b = checkpoint.Checkpoints(tmp_path / "resumed" / "checkpoints", read_only=True)
    assert a.read_meta(4)["checksums"] == b.read_meta(4)["checksums"]
    a.close()
    b.close()


def test_the_detection_recipe_names_its_schedule():
    from configs import detection

    cc = detection.get_config("curriculum").data.curriculum
    assert cc.stage_steps == (0, 300, 600) and cc.num_generations == (8, 12, 16)
    assert not detection.get_config().data.curriculum.difficulty  # off by default, as PR1's code


def test_bad_curriculum_configs_are_one_line_errors(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"order": [1, 0, 2]}))
    c = _grounding(tmp_path, tmp_path / "d.json")
    with pytest.raises(ConfigError, match="orders 3 examples but the training data has 8"):
        schedule.Curriculum.from_config(c, 8)
    c.data.curriculum.stage_steps = (1, 2)
    with pytest.raises(ConfigError, match="must start at 0"):
        schedule.Curriculum.from_config(c, 3)
    c.data.curriculum.stage_steps = (0, 2)
    c.data.curriculum.mix = ((1.0,), (1.0,))
    with pytest.raises(ConfigError, match="s \\+ 1 non-negative weights"):
        schedule.Curriculum.from_config(c, 3)
    c.data.curriculum.difficulty = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="cannot read"):
        schedule.Curriculum.from_config(c, 3)
    c.data.curriculum.difficulty = ""
    assert not schedule.Curriculum.from_config(c, 3).on
