"""Every command line on each expected mistake, in a fresh process as a user runs it: exit
status 2, exactly one line on stderr (`pr1_jax.<cli>: error: ...` naming the problem and the
fix), no traceback. The processes run concurrently (most of their time is importing jax); mistakes that need no
fresh process (sampling parameters, argparse values) are tested in-process in their CLI's
test file.
Plus `cli.run`'s mapping in-process: expected failures → one line, bugs keep their traceback."""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pr1_jax import checkpoint, cli
from pr1_jax.data import synthetic
from pr1_jax.errors import ConfigError
from pr1_jax.train_step import OptimConfig, init_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]
DEMO = "--config=configs/demo.py"

# (id, module, arguments, text the one stderr line contains, fake CPU devices)
# Placeholders: {model} a tiny HF checkpoint, {ckpt} a workdir with checkpoint step 7,
# {full} a non-empty directory, {file} a regular file, {tmp} a fresh directory, {img} an image,
# {data} grounding rows (and {data_dir} their images).
CASES = [
    ("train_typo_key", "train", [DEMO, "--config.sampling.max_new_token=8"],
     "has no key 'sampling.max_new_token'; the closest is --config.sampling.max_new_tokens", 1),
    ("train_bad_value", "train", [DEMO, "--config.total_steps=abc"], "--config.total_steps=abc", 1),
    ("train_config_file", "train", ["--config=configs/nope.py"], "no such config file", 1),
    ("train_model_dir", "train", [DEMO, "--config.model_dir={tmp}/no_model"], "--config.model_dir=", 1),
    ("train_workdir", "train", [DEMO, "--config.model_dir={model}", "--config.workdir={file}/run"],
     "--config.workdir: cannot write", 1),
    ("train_batch_vs_mesh", "train", [DEMO, "--config.model_dir={model}", "--config.workdir={tmp}/run",
                                      "--config.batch.prompts_per_step=3", "--config.batch.prompts_per_micro=3"],
     "multiples of the 2 batch shards", 2),
    ("train_sampling", "train", [DEMO, "--config.model_dir={model}", "--config.workdir={tmp}/run2",
                                 "--config.sampling.top_p=2"], "--config.sampling.top_p must be in (0, 1]", 1),
    ("aot_unknown_key", "aot", [DEMO, "--topology=cpu-2", "--config.batch.prompts_per_stepp=8"],
     "the closest is --config.batch.prompts_per_step", 1),
    ("aot_topology", "aot", [DEMO, "--topology=v9-8"], "--topology=v9-8: cannot describe", 1),
    ("aot_model", "aot", [DEMO, "--topology=cpu-2", "--model=nope"], "--model=nope: not a preset", 1),
    ("export_step", "export", ["--checkpoint={ckpt}", "--out={tmp}/e1", "--step=999"],
     "checkpoint step 999 does not exist in", 1),
    ("export_no_checkpoint", "export", ["--checkpoint={tmp}/nothing", "--out={tmp}/e2"], "does not exist", 1),
    ("export_not_from_train", "export", ["--checkpoint={ckpt}", "--out={tmp}/e3"], "records no model config", 1),
    ("export_not_empty", "export", ["--checkpoint={ckpt}", "--out={full}"], "is not empty", 1),
    ("export_unwritable", "export", ["--checkpoint={ckpt}", "--out={file}/hf"], "--out: cannot write", 1),
    ("infer_temperature", "infer", ["--model_dir={model}", "--image={img}", "--prompt=hi", "--temperature=nan"],
     "temperature must be a finite number", 1),
    ("infer_model_dir", "infer", ["--model_dir={tmp}/no_model", "--image={img}", "--prompt=hi"],
     "model directory not found", 1),
    ("evaluate_other_task", "evaluate", ["--task=counting", "--model_dir={model}", "--data={data}"],
     "none of its 3 rows is a usable counting_eval row", 1),
    ("evaluate_no_images", "evaluate", ["--task=grounding", "--model_dir={model}", "--data={data}",
                                        "--image_dir={tmp}/nowhere"], "has a usable image", 1),
    ("tiny_unwritable", "tiny", ["--out={file}/tiny"], "--out: cannot write", 1),
    ("tiny_unknown_flag", "tiny", ["--out={tmp}/t", "--qwen25"], "unrecognized arguments: --qwen25", 1),
    ("aot_unknown_flag", "aot", [DEMO, "--topolgy=cpu-2"],
     "Unknown command line flag 'topolgy'. Did you mean: topology", 1),
    ("train_unknown_reward", "train", [DEMO, "--config.model_dir={model}", "--config.workdir={tmp}/run3",
                                       "--config.rewards=('pr1_grounding', 'pr1_groundng')"],
     "no reward named 'pr1_groundng'", 1),
    ("train_image_dir", "train", [DEMO, "--config.model_dir={model}", "--config.workdir={tmp}/run4",
                                  "--config.data.synthetic=0", "--config.data.train={data}",
                                  "--config.data.image_dir={tmp}/nowhere", "--config.data.eval_examples=0"],
     "no usable example is left", 1),
    ("evaluate_ocr_on_grounding", "evaluate", ["--task=ocr", "--model_dir={model}", "--data={data}"],
     "none of its 3 rows is a usable ocr row (skipped bad_solution: 3", 1),
    ("curriculum_no_out", "data.curriculum", [DEMO], "--out is required", 1),
    ("curriculum_samples", "data.curriculum", [DEMO, "--config.model_dir={model}", "--out={tmp}/d1", "--samples=1"],
     "--samples must be ≥ 2", 1),
    ("train_curriculum_file", "train", [DEMO, "--config.model_dir={model}", "--config.workdir={tmp}/run5",
                                        "--config.data.synthetic=8", "--config.data.eval_examples=0",
                                        "--config.data.curriculum.difficulty={tmp}/none.json"],
     "--config.data.curriculum.difficulty: cannot read", 1),
]

# Mistakes only the data pipeline finds, once the run has started (and logged).
FOUND_WHILE_RUNNING = {"train_image_dir", "train_curriculum_file"}


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(module, args, devices=1):
    return subprocess.run([sys.executable, "-m", f"pr1_jax.{module}", *args], cwd=REPO, env=_env(devices),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def places(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    state = init_state({"w": jnp.zeros(3)}, make_optimizer(OptimConfig()))
    ckpt = checkpoint.Checkpoints(root / "run" / "checkpoints")
    ckpt.save(7, state, rng=jax.random.PRNGKey(0), data_state={}, meta={})
    ckpt.close()
    (root / "full").mkdir()
    (root / "full" / "model-00001-of-00002.safetensors").write_text("another model's")
    (root / "a_file").write_text("not a directory")
    files = synthetic.WRITERS["grounding"](root / "data", 3, seed=0)
    return {"model": tiny_dir, "ckpt": root / "run", "full": root / "full", "file": root / "a_file",
            "tmp": root, "img": files.image_dir / "images" / "grounding_000000.png", "data": files.eval_path}


@pytest.fixture(scope="module")
def results(places):
    """Every case (and `--help` of train), run concurrently: id → CompletedProcess."""
    jobs = {name: (module, [a.format(**places) for a in args], devices)
            for name, module, args, _, devices in CASES}
    jobs["train_help"] = ("train", [DEMO, "--help"], 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_run, *job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name, module, expected", [(c[0], c[1], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_and_status_2(results, name, module, expected):
    proc = results[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    if name in FOUND_WHILE_RUNNING:  # the run's own log lines come first; the error is still one line, the last
        lines = lines[-1:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"pr1_jax.{module}: error: ") and expected in lines[0], lines[0]


def test_train_help_lists_the_config_keys(results):
    proc = results["train_help"]
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("Perception-R1 training: GRPO")  # the module docstring
    assert "Keys of configs/demo.py and their values" in out
    for line in ("total_steps = 30", "sampling.max_new_tokens = 32", "batch.prompts_per_step = 4",
                 "model_dir = 'tiny'"):
        assert line in out, line


def test_export_missing_step_names_the_steps(results):
    assert "the steps there: 7" in results["export_step"].stderr


# ------------------------------------------------------------------ cli.run in-process
def _boom(e):
    raise e


@pytest.mark.parametrize("error, expected", [
    (ConfigError("batch.x=3: make it even"), "batch.x=3: make it even"),
    (PermissionError(13, "Permission denied", "/ro/out"), "/ro/out: Permission denied (choose a location you can"),
    (FileNotFoundError("no step 9 in /ckpt: the steps there: 1, 2"), "no step 9 in /ckpt: the steps there: 1, 2"),
    (ModuleNotFoundError("No module named 'torch'", name="torch"), "pip install -r requirements.txt"),
    (checkpoint.CorruptCheckpointError("meta unreadable"), "corrupt checkpoint: meta unreadable"),
])
def test_expected_failures_are_one_line(error, expected, capsys):
    assert cli.run("pr1_jax.x", _boom, error) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pr1_jax.x: error: ") and expected in err, err


def test_bugs_keep_their_traceback(capsys):
    for bug in (ValueError("a bug"), KeyError("k"), ModuleNotFoundError("No module named 'pr1_jax.nope'",
                                                                         name="pr1_jax.nope")):
        with pytest.raises(type(bug)):
            cli.run("pr1_jax.x", _boom, bug)
    assert capsys.readouterr().err == ""
    assert cli.run("pr1_jax.x", lambda: None) == 0 and cli.run("pr1_jax.x", _boom, KeyboardInterrupt()) == 130


def test_writable_dir(tmp_path):
    assert cli.writable_dir(tmp_path / "a" / "b", "--out").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"--out: cannot write to .*f/x \(.*\): choose a directory"):
        cli.writable_dir(tmp_path / "f" / "x", "--out")


def test_model_dir(tmp_path, tiny_dir):
    """A damaged config.json was a ValueError traceback from the model loader (train, aot)."""
    assert cli.model_dir(str(tiny_dir), "--model_dir") == tiny_dir
    for name, text, message in [("missing", None, "no such directory"), ("empty", "", "no config.json there"),
                                ("cut", '{"model_type": "qwen2_vl", ', "its config.json is not valid JSON"),
                                ("latin1", b'{"name": "caf\xe9"}', "its config.json is not valid JSON"),
                                ("list", "[1]", "its config.json is not a JSON object")]:
        d = tmp_path / name
        if text is not None:
            d.mkdir()
            if text:
                (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError, match=f"--model_dir={d}: {message}"):
            cli.model_dir(str(d), "--model_dir")


# ------------------------------------------------------------------ value checks shared by the commands
@pytest.mark.parametrize("values, message", [
    ((float("nan"), 1.0, 0), "T must be a finite number ≥ 0"),
    ((-1.0, 1.0, 0), "T must be a finite number ≥ 0"),
    ((1.0, float("nan"), 0), r"P must be in \(0, 1\]"),
    ((1.0, 0.0, 0), r"P must be in \(0, 1\]"),
    ((1.0, 1.0, -1), "K must be an integer ≥ 0"),
    ((1.0, 1.0, True), "K must be an integer ≥ 0"),
])
def test_check_sampling_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        cli.check_sampling(*values, names={"temperature": "T", "top_p": "P", "top_k": "K"})


def test_check_sampling_accepts_the_ends():
    for values in [(0.0, 1.0, 0), (0, 1, 0), (2.5, 1e-9, 50), (1.0, 0.5, 3.0)]:
        cli.check_sampling(*values)


def test_check_training_config():
    from configs import demo

    cli.check_training_config(demo.get_config())  # the shipped config passes
    for key, value, message in [("grpo.num_generations", 1, "--config.grpo: GRPOConfig: num_generations"),
                                ("grpo.temperature", float("inf"), "--config.grpo.temperature must be a finite"),
                                ("sampling.top_k", -3, "--config.sampling.top_k must be an integer"),
                                ("sampling.max_new_tokens", 0, "--config.sampling.max_new_tokens must be a positive"),
                                ("task", "countng", "--config.task='countng' is not a task.*did you mean 'counting'"),
                                ("rewards", ("pr1_grounding", "pr1_iou"), "no reward named 'pr1_iou'"),
                                ("rewards", (), "--config.rewards must be a non-empty tuple"),
                                ("optim.learning_rate", float("nan"), "--config.optim.learning_rate must be a finite"),
                                ("sft.learning_rate", -1e-5, "--config.sft.learning_rate must be a finite"),
                                ("batch.prompts_per_micro", 3, "prompts_per_step=4 is not a multiple of "
                                                               "--config.batch.prompts_per_micro=3")]:
        c = demo.get_config()
        if "." in key:
            section, name = key.split(".")
            c[section][name] = value
        else:
            c[key] = value
        with pytest.raises(ConfigError, match=message):
            cli.check_training_config(c)
