#!/usr/bin/env bash
# Installs pr1_jax on one TPU VM worker; idempotent (a second run with the same
# requirements does nothing). Run it on every worker of a slice at once:
#
#   tpu/run.sh NAME bash tpu/setup.sh
#
# The pinned jax needs Python >= 3.11; the TPU runtime images ship 3.10 (Ubuntu 22.04). So the
# Python is: $PYTHON if set, else python3 if it is new enough, else Python 3.12 installed by
# uv (https://docs.astral.sh/uv/, fetched with pip --user; the VM has internet access).
# Makes .venv in the repository, installs jax[tpu] at the version requirements.txt pins
# (libtpu comes with it from PyPI), then requirements.txt without torch (the CPU-only
# reference for parity tests; from PyPI it would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

STAMP=.venv/.pr1_jax_setup
WANT=$(cat requirements.txt tpu/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
  echo "pr1_jax setup: up to date on $(hostname)"
  exit 0
fi

new_enough() {  # true when "$1" runs Python >= 3.11 with venv
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

fail() {  # one line naming the fix, then stop
  echo "pr1_jax setup: $*" >&2
  exit 1
}

PYTHON=${PYTHON:-python3}
if ! new_enough "$PYTHON"; then
  FOUND=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "no python")
  UV=$(command -v uv || true)
  if [[ -z $UV ]]; then
    { python3 -m pip install -q --user uv 2>/dev/null || python3 -m pip install -q --user --break-system-packages uv 2>/dev/null; } &&
      UV=$HOME/.local/bin/uv
  fi
  [[ -n $UV && -x $UV ]] || fail "$PYTHON is Python $FOUND; jax needs >= 3.11 and uv (to fetch one) could not be" \
    "installed: install Python 3.11+ with venv and rerun with PYTHON=/path/to/python3.11, or install uv"
  "$UV" python install 3.12 >&2 || fail "uv could not install Python 3.12 (no internet?): rerun with PYTHON=/path/to/python3.11+"
  PYTHON=$("$UV" python find 3.12) || fail "uv installed Python 3.12 but cannot find it: rerun with PYTHON=/path/to/python3.11+"
fi
new_enough "$PYTHON" || fail "$PYTHON is not Python >= 3.11 with venv: rerun with PYTHON=/path/to/python3.11+"

[[ -x .venv/bin/python ]] && ! new_enough .venv/bin/python && rm -rf .venv  # an old 3.10 venv
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip

JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
.venv/bin/pip install -q "jax[tpu]==${JAX_VERSION:?requirements.txt pins no jax version}"
grep -v -E '^(torch|pytest)' requirements.txt > .venv/requirements-tpu.txt
.venv/bin/pip install -q -r .venv/requirements-tpu.txt

echo "$WANT" > "$STAMP"
echo "pr1_jax setup: done on $(hostname): $(.venv/bin/python -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)')"
