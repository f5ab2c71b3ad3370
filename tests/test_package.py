"""The package installs (README set-up: `pip install -r requirements.txt` includes `-e .`):
pr1_jax, the configs and the benchmarks import from any directory, no sys.path edits."""

import subprocess
import sys


def test_imports_from_another_directory(tmp_path):
    code = "import pr1_jax.train, configs.grounding, benchmarks.bench_recipes; print(pr1_jax.train.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "pr1_jax.train"
