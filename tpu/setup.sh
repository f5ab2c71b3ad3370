#!/usr/bin/env bash
# Installs pr1_jax on one TPU VM worker; idempotent (a second run with the same
# requirements does nothing). Run it on every worker of a slice at once:
#
#   tpu/run.sh NAME bash tpu/setup.sh
#
# Makes .venv in the repository, installs jax[tpu] at the version requirements.txt pins
# (libtpu comes with it from PyPI), then requirements.txt without torch (the CPU-only
# reference for parity tests; from PyPI it would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=.venv/.pr1_jax_setup
WANT=$(cat requirements.txt tpu/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
  echo "pr1_jax setup: up to date on $(hostname)"
  exit 0
fi

if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip

JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
.venv/bin/pip install -q "jax[tpu]==${JAX_VERSION:?requirements.txt pins no jax version}"
grep -v -E '^(torch|pytest)' requirements.txt > .venv/requirements-tpu.txt
.venv/bin/pip install -q -r .venv/requirements-tpu.txt

echo "$WANT" > "$STAMP"
echo "pr1_jax setup: done on $(hostname): $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
