#!/usr/bin/env bash
# Sets up everything the demo and the tests need, in ./.venv: system packages for the demo's spoken digits and the
# real benchmark's media,
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
    apt-get update -qq >/dev/null && apt_updated=1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: warning: ${missing[*]} missing; the demo needs them: sudo apt-get install ${missing[*]}" >&2
  fi
fi

# 1b. Real media for the `real` benchmark (Debian: drawings, stamps, recorded prompts with transcripts, an SVG
# renderer; npm: emoji images with their variants). Only as root, only when missing; without them the real
# benchmark's tests skip with the reason and everything else still runs.
real_missing=()
[ -d /usr/share/openclipart/svg ] || real_missing+=(openclipart-svg)
[ -d /usr/share/tuxpaint/stamps ] || real_missing+=(tuxpaint-stamps-default)
[ -d /usr/share/asterisk/sounds/en_US_f_Allison ] || real_missing+=(asterisk-core-sounds-en-wav)
[ -f /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz ] || real_missing+=(asterisk-core-sounds-en)
command -v rsvg-convert >/dev/null 2>&1 || real_missing+=(librsvg2-bin)
if [ ${#real_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${real_missing[*]} (real benchmark media)"
    { { [ -n "${apt_updated:-}" ] || apt-get update -qq >/dev/null; } && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${real_missing[@]}" >/dev/null; } || echo "setup: warning: could not install ${real_missing[*]}; the real benchmark's tests will skip" >&2
  else
    echo "setup: warning: ${real_missing[*]} missing; the real benchmark needs them: sudo apt-get install ${real_missing[*]}" >&2
  fi
fi
EMOJI_PREFIX="${OMNIRET_CACHE:-$HOME/.cache/omniret}/npm"
if [ ! -f "$EMOJI_PREFIX/node_modules/emoji-datasource-google/emoji.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "setup: installing npm emoji-datasource-google into $EMOJI_PREFIX (real benchmark emoji)"
    npm install --silent --no-save --no-audit --no-fund --prefix "$EMOJI_PREFIX" emoji-datasource-google@16.0.0 >/dev/null \
      || echo "setup: warning: npm install emoji-datasource-google failed; the real benchmark's tests will skip" >&2
  else
    echo "setup: warning: npm missing; the real benchmark's emoji need: npm install --prefix $EMOJI_PREFIX emoji-datasource-google@16.0.0" >&2
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
