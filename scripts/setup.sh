#!/usr/bin/env bash
# Set up budwood from scratch in .venv: PyTorch (CPU wheel by default), the package, test tools,
# tcmalloc (budwood's CLI preloads it: 20-40 % faster CPU training than glibc malloc), and Debian's
# chromium for the dashboard's browser tests.
# torch==2.13.0 is the CPU wheel on this project's machines (a local wheel). Elsewhere PyPI's Linux
# wheel is the CUDA build; for the CPU build there: TORCH_INDEX=https://download.pytorch.org/whl/cpu
# GPU users: TORCH_SPEC="torch" ./scripts/setup.sh  (the CUDA build from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_ARGS=()
[ -n "${TORCH_INDEX:-}" ] && TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX")
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null) \
      || echo "setup: tcmalloc not installed; budwood falls back to the system allocator" >&2
  fi
fi
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: chromium not installed; the dashboard's browser tests need /usr/bin/chromium" >&2
  else
    echo "setup: the dashboard's browser tests need chromium (apt-get install chromium)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_INDEX_ARGS[@]}" "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test]" "$TORCH_SPEC"
