"""Published quantized checkpoints (issue 22): GPTQ, AWQ and compressed-tensors pack-quantized
re-packed exactly into the project's int4/int8, and unknown formats refused before any download.

Transformers needs GPU-only libraries to load these formats, so the reference here is each
format's published de-quantization, written out below from the packed tensors on its own (not
with reshard's code), saved as an ordinary float32 checkpoint that transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reshard import cli as reshard_cli
from reshard.convert import convert
from reshard.format import read_manifest
from runtime.model import LayeredModel

from conftest import CPU_BUDGETS, FakeHub, save_tiny_tokenizer

OUT_IN = 128  # hidden size; group 128 then holds one group per row of q/k/v/o/gate/up, two of down
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _config():
    import transformers as tf

    return tf.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, dtype="float16")


# --- the packings, written from each format's description ------------------------------------

def _pack_rows(v: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(R, C) small ints -> (R / k, C) int32: row k*r + j in bits `bits`*j of word r (GPTQ qweight)."""
    k = 32 // bits
    v = v.to(torch.int64).view(-1, k, v.shape[1])
    words = sum(v[:, j] << (bits * j) for j in range(k))
    return (words - ((words >= 2**31).long() << 32)).to(torch.int32).contiguous()  # two's complement, as stored


def _pack_cols(v: torch.Tensor, order=tuple(range(8)), bits: int = 4) -> torch.Tensor:
    """(R, C) small ints -> (R, C / k) int32: column k*c + order[j] in bits `bits`*j of word c."""
    k = 32 // bits
    v = v.to(torch.int64).view(v.shape[0], -1, k)
    words = sum(v[:, :, order[j]] << (bits * j) for j in range(k))
    return (words - ((words >= 2**31).long() << 32)).to(torch.int32).contiguous()


def _random_linear(out: int, inp: int, group: int, gen):
    q = torch.randint(0, 16, (out, inp), generator=gen)
    groups = inp // group
    z = torch.randint(0, 16, (out, groups), generator=gen)
    s = (torch.rand(out, groups, generator=gen) * 0.02 + 0.001).half()
    return q, z, s


def write_checkpoint(folder: Path, kind: str, *, seed: int = 0) -> Path:
    """A tiny llama in `kind`'s layout ("gptq", "gptq_v2", "awq", "ct4", "ct8") in `folder`, and
    the same model de-quantized by the published formula as a float32 checkpoint in folder/reference."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config()
    model = AutoModelForCausalLM.from_config(config).half()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    reference = {k: v.float() for k, v in state.items()}
    gen = torch.Generator().manual_seed(seed)
    group = 64 if kind == "ct4" else 128
    for layer in range(config.num_hidden_layers):
        for lin in LINEARS:
            name = f"model.layers.{layer}.{lin}"
            out, inp = state.pop(name + ".weight").shape
            q, z, s = _random_linear(out, inp, group, gen)
            if kind.startswith("ct"):
                bits = 4 if kind == "ct4" else 8
                g = group if kind == "ct4" else inp
                q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (out, inp), generator=gen)
                s = (torch.rand(out, inp // g, generator=gen) * 0.02 + 0.001).half()
                state[name + ".weight_packed"] = _pack_cols(q + (1 << bits - 1), bits=bits)
                state[name + ".weight_scale"] = s
                state[name + ".weight_shape"] = torch.tensor([out, inp])
                w = q.float() * s.float().repeat_interleave(g, dim=1)
            elif kind == "awq":
                state[name + ".qweight"] = _pack_cols(q.t(), (0, 2, 4, 6, 1, 3, 5, 7))
                state[name + ".qzeros"] = _pack_cols(z.t(), (0, 2, 4, 6, 1, 3, 5, 7))
                state[name + ".scales"] = s.t().contiguous()
                w = (q - z.repeat_interleave(group, dim=1)).float() * s.float().repeat_interleave(group, dim=1)
            else:  # GPTQ; v1 ("gptq") stores z - 1, so z runs 1..16 there; symmetric: z = 8
                z = torch.full_like(z, 7) if kind == "gptq_sym" else z
                z = z if kind == "gptq_v2" else z + 1
                stored = z if kind == "gptq_v2" else z - 1
                g_idx = torch.arange(inp, dtype=torch.int32) // group
                state[name + ".qweight"] = _pack_rows(q.t())
                state[name + ".qzeros"] = _pack_cols(stored.t())
                state[name + ".scales"] = s.t().contiguous()
                state[name + ".g_idx"] = g_idx
                w = (q - z[:, g_idx.long()]).float() * s.float()[:, g_idx.long()]
            reference[name + ".weight"] = w
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    raw = config.to_dict()
    raw["quantization_config"] = QUANT_CONFIGS[kind]
    (folder / "config.json").write_text(json.dumps(raw))
    save_tiny_tokenizer(folder, config.vocab_size)
    ref = folder / "reference"
    config.dtype = "float32"
    config.save_pretrained(ref)
    save_file(reference, ref / "model.safetensors", metadata={"format": "pt"})
    return folder


def _ct(bits: int, strategy: str, group):
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
            "ignore": ["lm_head"]}


QUANT_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"},
    "gptq_v2": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
                "checkpoint_format": "gptq_v2"},
    "gptq_sym": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "ct4": _ct(4, "group", 64),
    "ct8": _ct(8, "channel", None),
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """{kind: (checkpoint, converted folder)}, each written and converted once."""
    root = tmp_path_factory.mktemp("published")
    out = {}
    for kind in QUANT_CONFIGS:
        src = write_checkpoint(root / kind, kind)
        out[kind] = (src, root / f"{kind}-converted")
        convert(str(src), out[kind][1], progress=False)
    return out


def _reference_logits(src: Path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src / "reference", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("kind", list(QUANT_CONFIGS))
@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_published_folder_equals_transformers_on_the_dequantized_checkpoint(kind, placement, published):
    src, folder = published[kind]
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    want, want_tokens = _reference_logits(src, ids)
    lm = LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", packed=False,
                                      max_cpu_memory=CPU_BUDGETS[placement])
    try:
        assert torch.equal(lm(ids).logits, want)
        assert torch.equal(lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want_tokens)
    finally:
        lm.close()


@pytest.mark.parametrize("kind", list(QUANT_CONFIGS))
def test_published_folder_is_stored_quantized_within_a_tenth_of_the_source(kind, published):
    src, folder = published[kind]
    m = read_manifest(folder)
    q = m.quantization
    assert q["scheme"] == ("int8" if kind == "ct8" else "int4") and q["source_format"]
    assert q["group_size"] == {"ct4": 64, "ct8": None}.get(kind, 128)
    source = load_file(src / "model.safetensors")
    for g in (g for g in m.groups if g.kind == "layer"):
        prefix = f"model.{g.name}."
        src_bytes = sum(t.numel() * t.element_size() for k, t in source.items() if k.startswith(prefix))
        assert len(g.quantized) == len(LINEARS)
        assert g.bytes <= 1.1 * src_bytes, (g.bytes, src_bytes)
