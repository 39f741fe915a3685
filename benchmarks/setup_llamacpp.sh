#!/usr/bin/env bash
# llama-cpp-python for benchmarks/cpu_llamacpp.py, in its own venv (not a project dependency).
# PyPI ships it as source: pip builds llama.cpp with the machine's C/C++ compiler and cmake
# (tuned to this CPU); on 2 cores that takes a long while (tens of minutes).
set -euo pipefail
VENV="${LLAMACPP_VENV:-/work/venvs/llamacpp}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c "import llama_cpp" 2>/dev/null && { echo "llama-cpp-python already in $VENV" >&2; exit 0; }
"$VENV/bin/pip" install --no-cache-dir llama-cpp-python numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in', '$VENV')"
