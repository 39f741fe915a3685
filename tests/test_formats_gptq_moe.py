"""GPTQ and AWQ mixture-of-experts checkpoints (issue 22): per-expert packed weights (`experts.N.w1.qweight`,
...) re-packed into int4 and stacked as transformers stacks them at load, each part [E, ...] so
that one expert's bytes of it are one range and expert-sparse streaming reads an expert alone.

As in tests/test_formats_gptq.py, the reference is the published formula (written out in that
module, independent of reshard's code) saved as a float32 checkpoint that transformers loads."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import PLACEMENTS, moe_config, open_placed, save_tiny_tokenizer
from reshard.convert import convert
from reshard.format import expert_tensors, read_manifest
from reshard.quant import dequantize
from test_formats_gptq import QUANT_CONFIGS, pack_cols, pack_rows, random_linear

GROUP = 32
PACKED = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.o_proj.", ".experts.")


KINDS = ("gptq_v2", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def write_packed_mixtral(folder: Path, kind: str, *, seed: int = 0) -> Path:
    """A tiny Mixtral with every decoder-layer linear weight (experts included, router not) in
    `kind`'s layout (GPTQ v2, act-order or symmetric GPTQ, or AWQ gemm), group 32, and its published de-quantization as a
    float32 checkpoint in folder/reference."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = moe_config("mixtral")
    config.intermediate_size = 64  # so group 32 divides every input width
    AutoModelForCausalLM.from_config(config).save_pretrained(folder.parent / "plain")  # per-expert names, as published
    state = load_file(folder.parent / "plain" / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    reference, stored = {}, {}
    for key, w in state.items():
        if not (key.endswith(".weight") and any(p in key for p in PACKED)):
            reference[key], stored[key] = w.float(), w
            continue
        out, inp = w.shape
        q, z, s = random_linear(out, inp, GROUP, gen)
        g_idx = torch.arange(inp, dtype=torch.int32) // GROUP
        z = torch.full_like(z, 8) if kind == "gptq_sym" else z
        if kind == "gptq_act":  # act-order: each group's rows anywhere, one order per input (w1 and w3 share it)
            seed = zlib.crc32(key.rsplit(".", 2)[0].encode())
            g_idx = g_idx[torch.randperm(inp, generator=torch.Generator().manual_seed(seed))].contiguous()
        prefix = key[: -len("weight")]
        if kind == "awq":
            stored.update({prefix + "qweight": pack_cols(q.t(), AWQ_ORDER), prefix + "qzeros": pack_cols(z.t(), AWQ_ORDER),
                           prefix + "scales": s.t().contiguous()})
        else:
            stored.update({prefix + "qweight": pack_rows(q.t()), prefix + "qzeros": pack_cols(z.t()),
                           prefix + "scales": s.t().contiguous(), prefix + "g_idx": g_idx})
        reference[key] = (q - z[:, g_idx.long()]).float() * s.float()[:, g_idx.long()]
    folder.mkdir(parents=True)
    save_file(stored, folder / "model.safetensors",
              metadata={"format": "pt"})
    raw = config.to_dict()
    v2 = {"checkpoint_format": "gptq_v2"} if kind in ("gptq_act", "gptq_sym") else {}  # z as stored (as gptq_v2's)
    raw["quantization_config"] = {**QUANT_CONFIGS[kind], "group_size": GROUP, **v2}
    (folder / "config.json").write_text(json.dumps(raw))
    save_tiny_tokenizer(folder, config.vocab_size)
    config.dtype = "float32"
    config.save_pretrained(folder / "reference")
    save_file(reference, folder / "reference" / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=KINDS)
def gptq_moe(request, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"{request.param}-moe")
    src = write_packed_mixtral(root / "src", request.param)
    convert(str(src), root / "out", progress=False)
    return src, root / "out"


def test_expert_weights_are_stored_int4_one_range_per_expert(gptq_moe):
    """Each layer's stacked expert parameters are int4 parts [E, ...]; expert e's slice of them
    expands to the published values of its own w1/w3 (gate_up) and w2 (down) weights."""
    src, out = gptq_moe
    manifest = read_manifest(out)
    label = "AWQ" if src.parent.name.startswith("awq") else "GPTQ"
    assert manifest.quantization["scheme"] == "int4" and manifest.quantization["source_format"] == label
    reference = load_file(src / "reference" / "model.safetensors")
    layers = [g for g in manifest.groups if g.kind == "layer"]
    for group in layers:
        i = int(group.name.split(".")[1])
        experts = f"model.layers.{i}.mlp.experts"
        assert set(expert_tensors(group)) == {f"{experts}.{p}.{part}" for p in ("gate_up_proj", "down_proj")
                                              for part in ("qweight", "scales", "zeros")}
        with safe_open(out / group.file, framework="pt") as f:
            for param, sources in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))):
                info = group.quantized[f"{experts}.{param}"]
                parts = {part: f.get_tensor(f"{experts}.{param}.{part}") for part in ("qweight", "scales", "zeros")}
                assert all(t.shape[0] == 8 for t in parts.values())
                for e in (0, 5):
                    want = torch.cat([reference[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"]
                                      for w in sources])
                    got = dequantize({k: v[e] for k, v in parts.items()}, "int4", columns=info["shape"][2],
                                     dtype=torch.float32)
                    assert torch.equal(got, want), (param, e)


def test_layers_take_at_most_a_tenth_more_than_the_source_at_group_32(gptq_moe):
    """Asymmetric zero points kept as integers (one byte a group, not a float32 -z * s): a decoder
    layer's bytes stay within 1.1x the source's even at group 32, experts and attention alike."""
    src, out = gptq_moe
    source = load_file(src / "model.safetensors")
    for g in (g for g in read_manifest(out).groups if g.kind == "layer"):
        prefix = f"model.{g.name}."
        src_bytes = sum(t.numel() * t.element_size() for k, t in source.items() if k.startswith(prefix))
        assert g.bytes <= 1.1 * src_bytes, (g.name, g.bytes, src_bytes)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gptq_moe_equals_the_published_dequantization(gptq_moe, placement):
    """Float32 logits and greedy tokens equal transformers' load of the published de-quantization,
    streamed (routed experts read alone) and resident."""
    from transformers import AutoModelForCausalLM

    src, out = gptq_moe
    ref = AutoModelForCausalLM.from_pretrained(src / "reference", dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
        want_tokens = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    lm = open_placed(out, placement, dtype="float32", packed=False)
    try:
        assert torch.equal(lm(ids).logits, want)
        assert torch.equal(lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), want_tokens)
    finally:
        lm.close()


def test_decode_pass_reads_only_the_routed_experts_int4_bytes(gptq_moe):
    """Streamed batch-1 decode reads, per MoE layer, k experts' int4 parts (each expert alone),
    not the layer's whole expert tensors."""
    from runtime import LayeredModel

    from reshard.format import expert_bytes

    _, out = gptq_moe
    manifest = read_manifest(out)
    moe = [g for g in manifest.groups if g.experts]
    with LayeredModel.from_pretrained(out, device="cpu", dtype="float32", packed=False, max_cpu_memory=0,
                                      expert_cache=0) as lm:
        lm.generate(torch.tensor([[5, 17, 42, 99, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        k, last = lm.config.num_experts_per_tok, lm.stats.per_pass[-1]
    assert len(moe) == 3 and last.experts_read == k * len(moe)
    assert last.expert_bytes == sum(expert_bytes(g) * k // 8 for g in moe) > 0
    assert last.bytes <= manifest.total_bytes - sum(expert_bytes(g) * (8 - k) // 8 for g in moe)


def test_symmetric_experts_store_no_zeros_and_equal_the_published_dequantization(tmp_path):
    """Symmetric GPTQ (every zero point 8): each weight, experts stacked, is "int4-sym" (scales only)."""
    from transformers import AutoModelForCausalLM

    src = write_packed_mixtral(tmp_path / "src", "gptq_sym")
    convert(str(src), tmp_path / "out", progress=False)
    layer = next(g for g in read_manifest(tmp_path / "out").groups if g.kind == "layer")
    assert {i.get("scheme") for i in layer.quantized.values()} == {"int4-sym"}
    assert not [n for n in layer.tensors if n.endswith(".zeros")]
    ref = AutoModelForCausalLM.from_pretrained(src / "reference", dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
    lm = open_placed(tmp_path / "out", "streamed", dtype="float32", packed=False)
    try:
        assert torch.equal(lm(ids).logits, want)
    finally:
        lm.close()
    assert_experts_computed_as_stored(tmp_path / "out", ref, ids)


def test_act_order_experts_are_stored_in_group_order_and_equal_the_published_dequantization(tmp_path, capsys):
    """Act-order GPTQ experts: each expert's columns gathered group by group ("int4-act", its
    `columns` part [E, in] too), so an expert is still one range of each part; streamed float32
    logits equal the published de-quantization. Experts stacked with plain ones are refused."""
    from transformers import AutoModelForCausalLM

    from reshard import cli as reshard_cli

    src = write_packed_mixtral(tmp_path / "src", "gptq_act")
    convert(str(src), tmp_path / "out", progress=False)
    layer = next(g for g in read_manifest(tmp_path / "out").groups if g.kind == "layer")
    experts = "model.layers.0.mlp.experts"
    assert {layer.quantized[f"{experts}.{p}"].get("scheme") for p in ("gate_up_proj", "down_proj")} == {"int4-act"}
    assert f"{experts}.down_proj.columns" in expert_tensors(layer)
    ref = AutoModelForCausalLM.from_pretrained(src / "reference", dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
    lm = open_placed(tmp_path / "out", "streamed", dtype="float32", packed=False)
    try:
        assert torch.equal(lm(ids).logits, want)
    finally:
        lm.close()
    assert_experts_computed_as_stored(tmp_path / "out", ref, ids)
    state = load_file(src / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.3.w1.g_idx"
    state[key] = torch.arange(state[key].numel(), dtype=torch.int32) // GROUP  # this one expert in plain order
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert reshard_cli.main(["convert", str(src), str(tmp_path / "mixed"), "--quiet"]) == 1
    assert ("Error: model.layers.0.block_sparse_moe.experts.0.w1.weight and the weights transformers stacks with "
            "it are not all in act-order (or all not); convert with --dtype float16 (or bfloat16) to de-quantize"
            ) in capsys.readouterr().err.splitlines()
    state[key] = state[key].flip(0).contiguous()  # act-order again, but not w3's order: one order cannot serve both
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert reshard_cli.main(["convert", str(src), str(tmp_path / "two-orders"), "--quiet"]) == 1
    assert ("Error: model.layers.0.block_sparse_moe.experts.0.w1.weight and the weights transformers concatenates "
            "with it have different act-orders; convert with --dtype float16 (or bfloat16) to de-quantize them"
            ) in capsys.readouterr().err.splitlines()


def assert_experts_computed_as_stored(folder: Path, ref, ids) -> None:
    """By default the CPU computes the experts as stored (runtime/packedexperts.py; act-order ones
    with the input gathered into their column order): each experts call of layer 0 is the published
    experts' math within the kernels' error (activations quantized per block of 32)."""
    from test_formats_gguf_moe import exact_experts

    experts, seen = "model.layers.0.mlp.experts", {}
    with open_placed(folder, "streamed", dtype="float32") as lm:
        if not lm.loader.expert_packing:
            return  # no native kernel on this machine: the experts expand (tested above)
        assert set(lm.loader.expert_packing) == {f"model.layers.{i}.mlp.experts" for i in range(3)}
        module = lm.model.get_submodule(experts)
        module.register_forward_pre_hook(lambda m, args: seen.update(args=[a.clone() for a in args[:3]]), prepend=True)
        module.register_forward_hook(lambda m, args, out: seen.update(out=out.clone()))
        lm(ids)
    exact = exact_experts(experts, ref, *seen["args"])
    err = ((seen["out"].double() - exact).abs().max() / exact.abs().max()).item()
    assert 1e-5 < err < 0.03, err
