"""Issue 23, acceptance 1: streamed with nothing resident and no expert cache, a mixture of
experts' memory follows the experts a token routes, not how many the layer has. Two DeepSeek-V3
style folders identical but for the routed-expert count (16 and 256, 8 per token) decode with
sampling; their peak resident-set growth differs by at most a quarter of one 256-expert layer's
experts (an [E, ...] buffer per expert tensor made it differ by all of them)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import memwatch
import pytest
import torch

# A fresh process per folder, its peak read from VmHWM after a reset (see tests/test_memory.py).
DECODE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from memwatch import high_water, reset_peak, rss
    from runtime.model import LayeredModel
    torch.set_num_threads(2)
    model = LayeredModel.from_pretrained(sys.argv[1], device="cpu", max_cpu_memory=0, expert_cache=0)
    ids = torch.tensor([[11, 12]])  # two tokens: the prompt's pass routes few experts too
    base = rss()  # before any pass: what the experts' memory ever holds counts
    reset_peak()
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=True, pad_token_id=0)
    print(json.dumps({"base": base, "peak": high_water(), "tokens": out.shape[1] - ids.shape[1],
                      "experts_read": model.stats.experts_read}))
""")


def _folder(root: Path, experts: int) -> tuple[Path, int]:
    """A 2-layer DeepSeek-V3 (layer 1 MoE) with `experts` routed experts of 393 KB each (bf16);
    returns the folder and its MoE layer's expert bytes."""
    from transformers import DeepseekV3Config

    from reshard.format import expert_bytes
    from reshard.synthetic import write_random_model

    config = DeepseekV3Config(vocab_size=320, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=256,
                              n_routed_experts=experts, num_experts_per_tok=8, n_shared_experts=1, n_group=1,
                              topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=128,
                              tie_word_embeddings=False)
    folder = root / f"e{experts}"
    manifest = write_random_model(config, folder, dtype=torch.bfloat16)
    [group] = [g for g in manifest.groups if g.experts]
    return folder, expert_bytes(group)


def _decode_memory(folder: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(folder)], capture_output=True, text=True,
                         env={"PYTHONPATH": memwatch.PATH, "PATH": "/usr/bin:/bin"}, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_follows_routed_experts_not_their_count(tmp_path):
    small, _ = _folder(tmp_path, 16)
    large, layer = _folder(tmp_path, 256)
    assert layer >= 90e6  # one layer's experts: far above allocator noise
    m16, m256 = _decode_memory(small), _decode_memory(large)
    assert m16["tokens"] == m256["tokens"] == 24 and m16["experts_read"] > 0 and m256["experts_read"] > 0
    g16, g256 = m16["peak"] - m16["base"], m256["peak"] - m256["base"]
    assert abs(g256 - g16) <= 0.25 * layer, (
        f"peak RSS grew {g16 / 1e6:.1f} MB (16 experts) and {g256 / 1e6:.1f} MB (256), "
        f"one layer's experts are {layer / 1e6:.0f} MB: {m16} {m256}")
