#!/usr/bin/env bash
# Re-run every CPU section of benchmarks/RESULTS.md, in one command, from scratch (models are
# built into $RESHARD_BENCH_CACHE, default /tmp/reshard-bench, on first use). Each section's raw
# output (it starts with the date, commit, machine and load average) goes to
# benchmarks/results/<section>.txt; benchmarks/results/reproduce.txt records the run: commit,
# load average before and after, and each section's wall time.
#   bash benchmarks/reproduce.sh                 # every section, with nothing else running (the older ones took ~15 min on the 2-core VM)
#   bash benchmarks/reproduce.sh decode cold     # only some sections (their record is appended)
# $PYTHON picks the interpreter (default python3). AirLLM, in (c), runs only where
# $AIRLLM_PYTHON (default /tmp/airllm-venv/bin/python) is a Python with airllm installed.
# cpu_llamacpp needs llama-cpp-python in $LLAMACPP_VENV (benchmarks/setup_llamacpp.sh builds it once).
# The GPU section is benchmarks/gpu_check.sh, on a machine with an NVIDIA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
py="${PYTHON:-python3}"
results=benchmarks/results
cache="${RESHARD_BENCH_CACHE:-/tmp/reshard-bench}"
declare -A SECTIONS=(  # each a command line; its stdout is the section's raw output
    [decode]="$py benchmarks/bench_decode.py --runs 3 --tokens 16"
    [cold]="$py benchmarks/bench_cold.py --runs 3"
    [peers]="$py benchmarks/bench_peers.py --runs 1 --tokens 8"
    [convert]="$py benchmarks/bench_convert.py --runs 2"
    [convert_before_after]="$py benchmarks/bench_convert.py --runs 2 --before 89e3a60"
    [quant]="$py benchmarks/quant.py --repeat 3 --models smollm2-135m --work $cache/quant"
    [passes]="$py benchmarks/passes.py all --repeat 1 --score-sizes 8,32,64 --max-new-tokens 48 --batch-sizes 1,4,16 --work $cache"
    [moe_cpu_cold]="$py benchmarks/moe.py --tokens 12 --runs 2 --layers 4 --threads 1 --modes whole,sparse,sparse+cache"
    [moe_cpu_warm]="$py benchmarks/moe.py --tokens 12 --runs 2 --layers 4 --threads 1 --warm --modes whole,sparse,sparse+cache"
    [moe_predict_cpu_cold]="$py benchmarks/moe.py --tokens 12 --runs 3 --layers 4 --threads 2"
    [moe_predict_cpu_warm]="$py benchmarks/moe.py --tokens 12 --runs 3 --layers 4 --threads 2 --warm"
    [moe_prefill_cpu_cold]="$py benchmarks/moe.py --tokens 2 --runs 5 --layers 4 --threads 2 --prompt 32 --modes whole,sparse,sparse-reads"
    [moe_cache_policy]="$py benchmarks/moe_cache_policy.py --tokens 256"
    [cpu_llamacpp]="$py benchmarks/cpu_llamacpp.py --rounds 3"
    [cpu_kernels]="$py benchmarks/cpu_kernels.py"
    [profile_decode]="$py benchmarks/profile_decode.py"
    [serve_cpu]="$py benchmarks/serve.py --repeat 2"
    [ray_workers]="$py benchmarks/ray_workers.py --items 64"
    [gpu_check_dry]="$py benchmarks/prepare_gpu_check.py --out $cache/gpu-assets >&2 && $py benchmarks/gpu_check.py --dry --assets $cache/gpu-assets"
    [fp8_pass]="$py benchmarks/fp8_pass.py"
    [gguf_quants]="$py benchmarks/gguf_quants.py"
    [gguf_quants_moe]="$py benchmarks/gguf_quants.py --model qwen3moe"
    [gguf_gpt_oss]="$py benchmarks/gguf_quants.py --model gpt-oss"
    [gguf_q8_0]="$py benchmarks/gguf_quants.py --weights q8_0"
    [gguf_iq2_xxs]="$py benchmarks/gguf_quants.py --weights iq2_xxs"
    [gguf_kernels]="$py benchmarks/gguf_kernels.py"
    [expansion_cpu]="$py benchmarks/expansion.py"
)
ORDER=(decode cold peers convert convert_before_after quant passes moe_cpu_cold moe_cpu_warm moe_predict_cpu_cold
       moe_predict_cpu_warm moe_prefill_cpu_cold moe_cache_policy cpu_llamacpp cpu_kernels profile_decode
       serve_cpu ray_workers gpu_check_dry fp8_pass gguf_quants gguf_quants_moe gguf_gpt_oss gguf_q8_0 gguf_iq2_xxs gguf_kernels
       expansion_cpu)
log="$results/reproduce.txt"
mkdir -p "$results"
if [[ $# -gt 0 ]]; then  # some sections: their record goes after the last full run's
    ORDER=("$@"); echo >> "$log"
else
    : > "$log"
fi
{
    echo "reproduce.sh ${ORDER[*]}"
    echo "start: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cpus"
    "$py" -c 'import sys; sys.path.insert(0, "benchmarks"); import common; print(f"commit: {common.commit()}")'
} >> "$log"
status=0
for name in "${ORDER[@]}"; do
    t0=$SECONDS
    echo "== $name: ${SECTIONS[$name]}" >&2
    if eval "${SECTIONS[$name]}" > "$results/$name.txt"; then result=ok; else result=FAILED; status=1; fi
    echo "$name: $result, $((SECONDS - t0)) s (load average now $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$log" >&2
done
echo "end: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $SECONDS s in all" >> "$log"
exit $status
