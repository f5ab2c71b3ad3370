"""Monitoring: a tiny run's TensorBoard files hold every logged number, the galleries and sample
completions (read back with TensorBoard's own readers); resume drops a killed run's extra
steps; the no-signal warning; strict summary.json; the eval plot's title; the learning rate
logged is the optimizer's; log lines go above the progress bar."""

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.util import tensor_util
from test_train import _jsonl, one_device_run
from tqdm import tqdm

from configs import counting, demo
from pr1_jax import monitor, train, viz
from pr1_jax.train_step import OptimConfig, TrainState, make_optimizer

REPO = Path(__file__).resolve().parents[1]
ALL = {"scalars": 0, "images": 0, "tensors": 0}  # keep every event (the default samples some)


def _events(workdir):
    acc = event_accumulator.EventAccumulator(str(workdir), size_guidance=ALL)
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def _strict_json(text):
    def no(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=no)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """tests/test_train.py's one-device run (SFT 1 step, GRPO 1 step, evaluations at 0 and 1)."""
    run, _ = one_device_run(tmp_path_factory)
    return run, _events(run)


def test_tensorboard_has_every_number_the_gallery_and_completions(tiny_run):
    run, acc = tiny_run
    assert list(run.glob("events.out.tfevents.*"))
    tags = acc.Tags()
    # Every number of every metrics.jsonl row, at its GRPO step.
    rows = _jsonl(run / "metrics.jsonl")
    for row in rows:
        for key, value in monitor.numbers(row).items():
            if key != "step":
                tag = key if "/" in key else f"grpo/{key}"
                assert _scalars(acc, tag)[row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), tag
    for key in ("grpo/learning_rate", "grpo/frac_reward_zero_std", "grpo/sampler_logp_gap", "time/update_s",
                "time/decode_s", "reward/pr1_grounding/std", "grpo/completion_length_max",
                "grpo/completion_length_min", "grpo/truncated_fraction"):
        assert key in tags["scalars"], key
    # Every number of every eval.jsonl row: the evaluation at the GRPO start (0) and after step 1.
    evals = _jsonl(run / "eval.jsonl")
    assert [(e["phase"], e["step"]) for e in evals] == [("grpo", 0), ("grpo", 1)]
    for row in evals:
        for key, value in monitor.numbers(row).items():
            if key != "step":
                assert _scalars(acc, f"eval/{key}")[row["step"]] == pytest.approx(value), key
    # The SFT warm-up (1 step): its loss at step 1 − 1 = 0, where GRPO starts.
    assert list(_scalars(acc, "sft/loss")) == [0] and _scalars(acc, "sft/loss")[0] > 0
    assert _scalars(acc, "sft/learning_rate")[0] == pytest.approx(demo.get_config().sft.learning_rate)
    # The gallery of each evaluation, byte for byte the PNG train.py wrote.
    images = acc.Images("eval/gallery")
    assert [i.step for i in images] == [0, 1]
    for image in images:
        assert image.encoded_image_string == (run / f"gallery_grpo_{image.step}.png").read_bytes()
    # A few greedy completions per evaluation (monitor.eval_texts = 4), with question and ground truth.
    texts = acc.Tensors("eval/completions")
    assert [t.step for t in texts] == [0, 1]
    for t in texts:
        rows = [r.decode() for r in tensor_util.make_ndarray(t.tensor_proto)]
        assert len(rows) == 4 and all("ground truth: `[" in r and "\n\n    " in r for r in rows), rows
    assert acc.SummaryMetadata("eval/completions").plugin_data.plugin_name == "text"
    # summary.json is strict JSON (a missing score would be null).
    summary = _strict_json((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval_last"] == evals[-1]["acc@0.5"]


def _config(**monitor_keys):
    c = demo.get_config()
    c.sft.steps = 3
    c.monitor.update(monitor_keys)
    return c


def test_resume_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    c = _config()
    killed = monitor.Monitor(tmp_path, c)
    killed.resume_at(None)
    for step in range(1, 4):
        killed.log_sft(step, {"loss": 10.0 - step})
    for step in range(1, 6):  # checkpointed at step 3, killed after logging step 5
        killed.log_step(step, {"loss": float(step)})
    killed.log_eval("grpo", 4, {"acc@0.5": 0.5})
    killed.close()

    resumed = monitor.Monitor(tmp_path, c)
    resumed.resume_at(3)
    for step in (4, 5):
        resumed.log_step(step, {"loss": -float(step)})
    resumed.close()
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "eval.jsonl").read_text()  # the evaluation at step 4 is gone too
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    # Both of TensorBoard's readers: the legacy accumulator and the one its server uses.
    plugin = plugin_event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    plugin.Reload()
    for values in (_scalars(_events(tmp_path), "grpo/loss"),
                   {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in plugin.Tensors("grpo/loss")}):
        assert values == {1: 1.0, 2: 2.0, 3: 3.0, 4: -4.0, 5: -5.0}
    assert _scalars(_events(tmp_path), "sft/loss") == {-2: 9.0, -1: 8.0, 0: 7.0}  # SFT steps k − S are kept
    assert _scalars(_events(tmp_path), "eval/acc@0.5") == {}

    fresh = monitor.Monitor(tmp_path, c)  # no checkpoint: the run starts over, and so do its logs
    fresh.resume_at(None)
    fresh.log_step(1, {"loss": 7.0})
    fresh.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert _scalars(_events(tmp_path), "grpo/loss") == {1: 7.0}


def test_no_learning_signal_warns_once_after_n_steps(tmp_path, caplog):
    mon = monitor.Monitor(tmp_path, _config(no_signal_steps=3, tensorboard=False))
    fracs = [1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]  # a streak of 2, then one of 5
    with caplog.at_level(logging.WARNING, logger="pr1_jax.monitor"):
        for step, frac in enumerate(fracs, 1):
            mon.log_step(step, {"frac_reward_zero_std": frac})
    warnings = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    assert len(warnings) == 1 and "for 3 GRPO steps (steps 4-6)" in warnings[0] and "\n" not in warnings[0]
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # monitor.tensorboard=False


def test_without_tensorboard_installed_one_warning_and_the_run_goes_on(tmp_path):
    """The GPU benchmark machines have no tensorboard: pr1_jax.train still imports, and the
    monitor warns once and writes everything but the event files."""
    code = ("import logging, sys\n"
            "sys.modules['tensorboard'] = None  # import tensorboard → ImportError\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "from configs import demo\n"
            "from pr1_jax import monitor, train\n"
            "mon = monitor.Monitor(sys.argv[1], demo.get_config())\n"
            "mon.resume_at(None)\n"
            "mon.log_sft(1, {'loss': 2.0})\n"
            "for step in (1, 2):\n"
            "    mon.log_step(step, {'loss': 1.0, 'time/update_s': 0.5})\n"
            "mon.log_eval('grpo', 2, {'acc@0.5': 0.5}, samples=[({'problem': 'q', 'solution': [1]}, 'a')])\n"
            "mon.curves({'step': [1, 2], 'reward': [0.1, 0.2], 'eval_step': [0, 2], 'eval_score': [0.0, 0.5]})\n"
            "mon.summary({'steps': 2})\n"
            "mon.close()\n"
            "assert 'tensorboard' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("tensorboard package is not installed") == 1, out.stderr[-3000:]
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in _jsonl(tmp_path / "eval.jsonl")] == [2]
    assert (tmp_path / "reward.png").is_file() and (tmp_path / "eval.png").is_file()
    assert _strict_json((tmp_path / "summary.json").read_text()) == {"steps": 2}
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_completion_length_metrics():
    """min/mean/max completion length and the truncated fraction of a step's N × G completions."""
    from pr1_jax.accounting import StepAccount
    acct = StepAccount()
    lengths = np.array([[3, 8], [8, 5], [1, 7]])
    acct.completions(lengths, lengths >= 8, decode_steps=8)
    m = acct.as_metrics()
    assert (m["completion_length_min"], m["completion_length_max"], m["decode_steps"]) == (1.0, 8.0, 8.0)
    assert m["completion_length_mean"] == pytest.approx(32 / 6) and m["truncated_fraction"] == pytest.approx(1 / 3)


class _FakeWandb:
    """Stands in for the `wandb` package (not installed here): records init, log and finish."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row):
        self.logged.append(row)

    def finish(self):
        self.finished += 1

    class Image:
        def __init__(self, path):
            self.path = path


def test_wandb_gets_the_scalars_and_gallery_when_enabled(tmp_path, monkeypatch, caplog):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    gallery = tmp_path / "gallery.png"
    from PIL import Image
    Image.new("RGB", (4, 3)).save(gallery)
    mon = monitor.Monitor(tmp_path / "run", _config(wandb=True, wandb_project="p", tensorboard=False))
    (tmp_path / "run").mkdir()
    mon.resume_at(None)
    mon.log_sft(3, {"loss": 2.0})
    mon.log_step(1, {"loss": 1.5, "time/update_s": 0.25, "update/remat": "full"})
    mon.log_eval("grpo", 1, {"acc@0.5": 0.5}, gallery=gallery)
    mon.close()
    assert len(fake.inits) == 1 and fake.inits[0]["project"] == "p" and fake.inits[0]["name"] == "run"
    assert fake.inits[0]["config"]["task"] == "grounding" and fake.finished == 1
    assert fake.logged[:2] == [{"sft/loss": 2.0, "step": 0}, {"grpo/loss": 1.5, "time/update_s": 0.25, "step": 1}]
    assert fake.logged[2]["eval/acc@0.5"] == 0.5 and fake.logged[2]["step"] == 1
    assert fake.logged[2]["eval/gallery"].path == str(gallery)
    # Not installed: one warning, and the run's own logs go on.
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    with caplog.at_level(logging.WARNING, logger="pr1_jax.monitor"):
        mon = monitor.Monitor(tmp_path, _config(wandb=True, tensorboard=False))
        mon.resume_at(None)
        mon.log_step(1, {"loss": 1.0})
        mon.close()
    assert [r.getMessage() for r in caplog.records].count(
        "monitor.wandb=True but wandb is not installed (pip install wandb): TensorBoard only") == 1
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_only_an_enabled_monitor_writes(tmp_path):
    mon = monitor.Monitor(tmp_path, _config(), enabled=False)  # a process other than 0
    mon.resume_at(None)
    mon.log_step(1, {"loss": 1.0})
    mon.log_eval("grpo", 1, {"acc@0.5": 1.0})
    mon.summary({"x": 1})
    mon.close()
    assert not list(tmp_path.iterdir())


def test_summary_is_strict_json_and_the_eval_plot_names_the_tasks_metric(tmp_path, monkeypatch):
    c = counting.get_config()
    mon = monitor.Monitor(tmp_path, c, score_name=train.score_name(c))
    mon.summary({"eval_last": float("nan"), "eval_at_grpo_start": np.float32("inf"), "n": [1.5, float("-inf")]})
    assert _strict_json((tmp_path / "summary.json").read_text()) == {
        "eval_last": None, "eval_at_grpo_start": None, "n": [1.5, None]}
    titles = {}
    monkeypatch.setattr(viz, "plot_curves", lambda series, path, title="", **kw: titles.update({path.name: title}))
    mon.curves({"step": [1], "reward": [0.5], "eval_step": [0], "eval_score": [float("nan")]})
    assert "counting: accuracy (%)" in titles["eval.png"] and "grounding" not in titles["eval.png"]
    assert train.score_name(demo.get_config()) == "Acc@0.5"  # grounding's plot: "grounding: Acc@0.5"


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_logged_learning_rate_is_the_optimizers(schedule):
    """Adam's update of a 1-element parameter under a constant gradient 1 is −lr·1/(1 + eps): the
    learning rate the optimizer applied at each step (to float32 rounding of Adam's bias
    corrections), which the logs must show; an update skipped for a NaN gradient applies nothing
    and does not advance the schedule, nor the logged rate."""
    c = demo.get_config()
    c.optim.schedule, total = schedule, 6
    opt = make_optimizer(OptimConfig(learning_rate=c.optim.learning_rate, total_steps=total, schedule=schedule,
                                     max_grad_norm=c.optim.max_grad_norm, eps=c.optim.eps))
    params = {"w": jnp.zeros(1)}
    opt_state = opt.init(params)
    logged = train.grpo_learning_rate(c, total)
    rates = []
    for step in range(1, total + 1):
        grads = {"w": jnp.full(1, jnp.nan if step == 3 else 1.0)}
        updates, opt_state = opt.update(grads, opt_state, params)
        rates.append(logged(TrainState(step=jnp.asarray(step), params=params, opt_state=opt_state)))
        if step == 3:  # skipped: nothing applied, the rate of the last applied update again
            assert float(updates["w"][0]) == 0.0 and rates[-1] == rates[-2]
        else:
            assert float(-updates["w"][0]) == pytest.approx(rates[-1], rel=1e-4), step  # float32 Adam
    if schedule == "linear":  # the values compared above do change
        assert rates[-1] < rates[0]


def test_verbose_keeps_third_party_info_logs():
    loggers = [logging.getLogger(name) for name in monitor.THIRD_PARTY_LOGGERS]
    before = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.NOTSET)
        monitor.quiet_console(verbose=True)  # --config.verbose=True
        assert all(lg.level == logging.NOTSET for lg in loggers)
        monitor.quiet_console(verbose=False)
        assert all(lg.level == logging.WARNING for lg in loggers)
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def test_log_lines_go_above_the_progress_bar(monkeypatch):
    console = io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        monitor.quiet_console(verbose=False)
        assert logging.getLogger("orbax").level == logging.WARNING == logging.getLogger("absl").level
        bar = tqdm(total=3, desc="GRPO", file=sys.stderr)
        bar.update(1)
        logging.getLogger("pr1_jax.test").warning("checkpoint step 1 saved")
        bar.close()
    finally:
        root.removeHandler(handler)
    # Without the redirection the line is glued to the bar's ("GRPO: 33%|…|checkpoint step 1 saved").
    assert "checkpoint step 1 saved" in re.split(r"[\r\n]", console.getvalue()), console.getvalue()
