#!/usr/bin/env bash
# Sets up everything the demo and the tests need, in ./.venv: system packages for the demo's spoken digits,
# the pinned Python environment, and the compiled extensions (CPU always; CUDA when torch has CUDA and nvcc exists).
# Safe to run again: each step is skipped or cheap when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# 1. Spoken digits for the offline demo (Debian's espeak-ng and flite). Only as root, only when missing.
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v flite >/dev/null 2>&1 || missing+=(flite)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: warning: ${missing[*]} missing; the demo needs them: sudo apt-get install ${missing[*]}" >&2
  fi
fi

# 2. The pinned Python environment.
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -r requirements-ci.txt

# 3. The extensions, compiled against the torch just installed (hence no build isolation).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import omniret_kernels as k; print('setup: backends available:', ', '.join(k.available_backends()))"
