"""Hybrid section: host-resident layers streamed to the GPU vs computed on the CPU vs the planner's choice.

Random Llama-70B-shaped layers (hidden 8192, intermediate 28672, 64 heads, 8 KV heads), stored
int4 (group 32), all held in host RAM (--max-gpu-memory 0: the GPU keeps none, as with 6 GB free
beside a 35 GB model), decoded at batch 1, 8 and 64:
- stream: every layer copied to the GPU each pass (the runtime's default);
- cpu: every layer computed on the CPU where it waits (--cpu-layers <all>);
- auto: the planner's choice per pass (--cpu-layers auto), from speeds measured at open.
Each run opens the folder, generates 2 tokens to warm up, then times `--tokens` decode passes (median).
`--moe` does the same for DeepSeek-V3-shaped MoE layers (hidden 7168, 256 routed experts of
2048, 8 per token, one shared expert, MLA attention; every layer MoE), int4, with the routed
experts streamed (--cpu-experts off), computed on the CPU (on) or placed by the planner per call
(auto); attention, router and shared expert run on the GPU in every mode.
It prints the machine, the measured copy bandwidth and the CPU's GB/s (runtime/hybrid.py's
calibration, same run), s/token per mode and batch, the planner's ratio against the better fixed
mode (goal: at most 1.05), and the arithmetic for a PCIe4 box. `--dry` runs tiny shapes on the CPU
(the check that this code runs; its figures mean nothing).

    python benchmarks/hybrid.py --dry
    python benchmarks/hybrid.py --layers 4 | tee benchmarks/results/hybrid-h200.txt
    python benchmarks/hybrid.py --moe --dry
    python benchmarks/hybrid.py --moe --layers 2 | tee benchmarks/results/hybrid-moe-h200.txt
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_lines, out, release  # noqa: E402

LLAMA70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
MODES = {"stream": None, "cpu": 999, "auto": "auto"}
MOE_MODES = {"stream": "off", "cpu": "on", "auto": "auto"}  # --cpu-experts
# DeepSeek-V3's layer shapes (every layer MoE) and a tiny one for --dry
DSV3 = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
            num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4, num_attention_heads=128,
            num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
            v_head_dim=128)
DSV3_TINY = dict(hidden_size=64, intermediate_size=112, moe_intermediate_size=32, n_routed_experts=16,
                 num_experts_per_tok=4, n_shared_experts=1, n_group=2, topk_group=1, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=16)
PCIE4 = 25e9  # bytes/s, a PCIe4 x16 link's practical copy rate


def build(folder: Path, layers: int, dry: bool, device: str, moe: bool = False) -> Path:
    import transformers as tf

    from reshard.synthetic import write_random_model

    if moe:
        config = tf.DeepseekV3Config(num_hidden_layers=layers, vocab_size=8000, tie_word_embeddings=False,
                                     first_k_dense_replace=0, max_position_embeddings=4096,
                                     **(DSV3_TINY if dry else DSV3))
    else:
        config = tf.LlamaConfig(num_hidden_layers=layers, vocab_size=8000, tie_word_embeddings=False,
                                **(TINY if dry else LLAMA70B))
    write_random_model(config, folder, dtype=torch.float16, device=device, quantize="int4", quantize_group=32)
    return folder


def s_per_token(folder: Path, device: str, mode: str, batch: int, tokens: int, moe: bool = False) -> tuple[float, dict]:
    """Median decode-pass seconds after a warm-up generate (compiled expansions, the allocator and
    the first calibration are paid there), and the last pass's record of where each layer (--moe:
    each layer's routed experts) ran."""
    from runtime import LayeredModel

    where = dict(cpu_experts=MOE_MODES[mode]) if moe else dict(cpu_layers=MODES[mode])
    model = LayeredModel.from_pretrained(folder, device=device, dtype="float16" if device == "cuda" else "float32",
                                         max_gpu_memory=0, max_cpu_memory="200GB" if device == "cuda" else 0,
                                         **where)
    try:
        ids = torch.randint(3, 8000, (batch, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        warm = len(model.stats.per_pass)
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        decode = model.stats.per_pass[warm + 1:]
        return statistics.median(p.seconds for p in decode), decode[-1].cpu_experts if moe else decode[-1].cpu_layers
    finally:
        release(model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: checks the code runs")
    parser.add_argument("--moe", action="store_true", help="DeepSeek-V3-shaped MoE layers, routed experts on the CPU")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4, help="decode passes per run (the prefill is not timed)")
    parser.add_argument("--batches", default="1,8,64")
    args = parser.parse_args()
    device = "cpu" if args.dry or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.float16
    from runtime import hybrid
    from runtime.budget import gib

    for line in machine_lines(str(dtype).removeprefix("torch.")):
        out(line)
    speeds = hybrid.calibrate(torch.device(device), dtype)
    out(f"measured: link {speeds.link / 1e9:.1f} GB/s host->device; CPU matmul {speeds.cpu_bytes / 1e9:.1f} GB/s "
        f"at 1 token, {speeds.cpu_flops / 1e12:.2f} TFLOP/s at 256; CPU int4 kernel {speeds.cpu_packed / 1e9:.1f} GB/s "
        f"at 1 token; CPU int4 expansion {speeds.cpu_expand / 1e9:.2f} GB/s; GPU {speeds.gpu_flops / 1e12:.1f} TFLOP/s")
    work = Path(tempfile.mkdtemp(prefix="hybrid-bench-"))
    try:
        layers, moe = 2 if args.dry else args.layers, args.moe
        folder = build(work / ("dsv3-int4" if moe else "llama70b-int4"), layers, args.dry, device, moe)
        layer_bytes = max(f.stat().st_size for f in folder.glob("*.safetensors") if "layers" in f.name)
        out(f"model: {layers} {'DeepSeek-V3' if moe else 'Llama-70B'}-shaped int4 layers "
            f"({'tiny' if args.dry else 'full'} shape), {gib(layer_bytes)} per layer file; all held in host RAM")
        if moe:
            moe_arithmetic(folder, speeds)
        for batch in (int(b) for b in args.batches.split(",")):
            rows = {m: s_per_token(folder, device, m, batch, args.tokens, moe) for m in MODES}
            best = min(rows["stream"][0], rows["cpu"][0])
            for mode, (sec, where) in rows.items():
                picked = sorted({v.split(":")[0] for v in where.values()}) if where else ["stream"]
                out(f"  batch {batch:>3} {mode:<6} {sec:.4f} s/token  ({sec / best:.2f}x the better fixed mode; "
                    f"{'routed experts' if moe else 'layers'} ran on {'/'.join(picked)})")
            out(f"  batch {batch:>3} planner/best = {rows['auto'][0] / best:.3f} (goal <= 1.05)")
        if moe:
            return 0
        per_token = 80 * layer_bytes
        out(f"PCIe4 arithmetic, 80 such layers ({per_token / 1e9:.1f} GB a token): streamed at {PCIE4 / 1e9:.0f} GB/s "
            f"{per_token / PCIE4:.2f} s/token; on this CPU at {speeds.cpu_bytes / 1e9:.1f} GB/s "
            f"{per_token / speeds.cpu_bytes:.2f} s/token at batch 1")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def moe_arithmetic(folder: Path, speeds) -> None:
    """What one decode token's routed experts cost over a PCIe4 link and on this CPU, for 58 such
    MoE layers (DeepSeek-V3's), from one expert's stored bytes in this folder."""
    import json

    from reshard.format import expert_bytes, read_manifest

    group = next(g for g in read_manifest(folder).groups if g.experts)
    (entry,) = group.experts.values()
    one = expert_bytes(group, entry) // entry["num_experts"]
    k = json.loads((folder / "config.json").read_text())["num_experts_per_tok"]
    per_token = 58 * k * one
    out(f"PCIe4 arithmetic, 58 MoE layers x {k} routed experts of {one / 1e6:.1f} MB ({per_token / 1e9:.2f} GB a "
        f"token at batch 1): streamed at {PCIE4 / 1e9:.0f} GB/s {per_token / PCIE4:.3f} s/token; on this CPU at "
        f"{speeds.cpu_bytes / 1e9:.1f} GB/s {per_token / speeds.cpu_bytes:.3f} s/token")


if __name__ == "__main__":
    sys.exit(main())
