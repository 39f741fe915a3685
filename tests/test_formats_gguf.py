"""GGUF quantized blocks kept compact (issue 22): K-quants (Q2_K to Q6_K), Q5_0, Q5_1, IQ4_NL and
IQ4_XS weights are stored as the file's own blocks, Q8_0, Q4_0 and Q4_1 re-packed into the project's
int8/int4 group 32 (per-parameter schemes), expanded at load or multiplied as stored; the runtime
equals transformers' own `from_pretrained(..., gguf_file=...)` of the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_BUDGETS, smollm2_gguf
from gguf import GGMLQuantizationType as Q, dequantize
from gguf_files import random_blocks, write_random_llama

from reshard.convert import convert
from reshard.format import read_manifest
from reshard.ggml_quants import BLOCK_TYPES, dequantize_blocks, scheme_for
from reshard.ggml_repack import REPACKED, repack_blocks
from reshard.quant import dequantize as dequantize_parts

LAYERS = 3
# every kept type in the decoder layers, q/k (rows permuted by transformers) included
TYPES = {"blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q6_K, "blk.0.attn_v.weight": Q.Q8_0,
         "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.IQ2_XXS,
         "blk.0.ffn_down.weight": Q.Q2_K, "blk.1.attn_q.weight": Q.Q5_0, "blk.1.attn_k.weight": Q.IQ4_NL,
         "blk.1.attn_v.weight": Q.IQ2_XS, "blk.1.attn_output.weight": Q.Q3_K, "blk.1.ffn_gate.weight": Q.IQ4_XS,
         "blk.1.ffn_up.weight": Q.Q5_K, "blk.1.ffn_down.weight": Q.Q5_1,
         "blk.2.attn_q.weight": Q.IQ2_S, "blk.2.attn_k.weight": Q.IQ3_XXS, "blk.2.attn_v.weight": Q.IQ3_S,
         "blk.2.attn_output.weight": Q.IQ1_S, "blk.2.ffn_gate.weight": Q.IQ1_M, "blk.2.ffn_up.weight": Q.TQ1_0,
         "blk.2.ffn_down.weight": Q.TQ2_0, "output.weight": Q.MXFP4}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixed-gguf") / "mixed.gguf"
    write_random_llama(path, smollm2_gguf(), layers=LAYERS, hidden=256, inter=512, heads=4, kv_heads=2,
                       types=TYPES, vocab=8192)  # a small vocabulary opens fast (gguf_files.write_trimmed)
    return path


@pytest.fixture(scope="module")
def mixed_converted(mixed_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed-gguf-out")
    convert(str(mixed_gguf), out, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(mixed_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(mixed_gguf.parent, gguf_file=mixed_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("scheme", list(BLOCK_TYPES))
def test_block_expansion_equals_gguf_dequantize(scheme):
    """The torch port equals the gguf package's de-quantization bit for bit in float32."""
    name, size, nbytes = BLOCK_TYPES[scheme]
    raw = random_blocks(scheme)
    want = torch.from_numpy(dequantize(raw, getattr(Q, name)))
    got = dequantize_blocks(torch.from_numpy(raw), scheme, dtype=torch.float32)
    assert got.shape == (8, 3 * size) and torch.equal(got, want)
    assert torch.equal(dequantize_blocks(torch.from_numpy(raw), scheme, dtype=torch.bfloat16), want.bfloat16())


@pytest.mark.parametrize("scheme", list(REPACKED))
def test_repacked_blocks_expand_to_gguf_dequantize(scheme):
    """Q8_0, Q4_0 and Q4_1 re-packed into int8/int4 group 32 expand (reshard.quant's math, the
    one the runtime runs) to the gguf package's values: equal in float32 (bit for bit but the sign
    of some zeros, see reshard/ggml_repack.py), and cast once in half precision."""
    raw = random_blocks(scheme, rows=16, per_row=4)
    want = torch.from_numpy(dequantize(raw, getattr(Q, BLOCK_TYPES[scheme][0])))
    stored, parts = repack_blocks(torch.from_numpy(raw), scheme)
    assert stored == REPACKED[scheme] and parts["scales"].shape == (16, 4)
    assert sum(t.nbytes for t in parts.values()) == raw.nbytes  # the source's bytes, re-arranged
    got = dequantize_parts(parts, stored, columns=128, dtype=torch.float32)
    assert torch.equal(got, want)
    differ = got.view(torch.int32) != want.view(torch.int32)
    assert (want[differ] == 0).all()  # only zeros' signs may differ
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_parts(parts, stored, columns=128, dtype=dtype), want.to(dtype))


def test_q4_0_whose_zeros_overflow_float16_keeps_them_in_float32():
    """A Q4_0 scale above 8188 makes -8 * d overflow float16: that weight is plain int4, its zeros
    float32, and still expands to gguf's values."""
    raw = random_blocks("q4_0", rows=2, per_row=2)
    raw[0, :2] = np.array([9000.0], dtype=np.float16).view(np.uint8)
    stored, parts = repack_blocks(torch.from_numpy(raw), "q4_0")
    assert stored == "int4" and parts["zeros"].dtype == torch.float32
    want = torch.from_numpy(dequantize(raw, Q.Q4_0))
    assert torch.equal(dequantize_parts(parts, stored, columns=64, dtype=torch.float32), want)


def test_blocks_are_kept_with_their_own_scheme(mixed_converted, mixed_gguf):
    """Each decoder-layer weight is stored as its GGUF blocks under the scheme of its type, or
    re-packed (Q8_0, Q4_0, Q4_1), the output head's too; each weight's stored bytes, so every type's
    bytes per pass, are at most 1.1x the source tensor's, and so are the decoder layers'."""
    from gguf import GGUFReader

    from reshard.format import ST_TO_DTYPE, quant_part_names

    manifest = read_manifest(mixed_converted)
    schemes = {p: q["scheme"] for g in manifest.groups for p, q in g.quantized.items()}
    hf = {f"model.layers.{i}.{m}.weight": f"blk.{i}.{n}.weight" for i in range(LAYERS) for m, n in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"))}
    hf["lm_head.weight"] = "output.weight"  # the head too (untied): read whole on every pass
    kept = {p: scheme_for(TYPES[n].name) for p, n in hf.items()}  # "mxfp4_blocks" for MXFP4
    assert schemes == {p: REPACKED.get(s, s) for p, s in kept.items()}
    groups = {p: q.get("group_size") for g in manifest.groups for p, q in g.quantized.items()}
    assert all(groups[p] == (32 if kept[p] in REPACKED else None) for p in hf)
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(mixed_gguf).tensors}
    for g in manifest.groups:
        for p, q in g.quantized.items():
            parts = [g.tensors[n] for n in quant_part_names(p, q["scheme"]).values()]
            nbytes = sum(np.prod(t["shape"]) * ST_TO_DTYPE[t["dtype"]].itemsize for t in parts)
            assert nbytes <= 1.1 * tensors[hf[p]], (p, q["scheme"], nbytes, tensors[hf[p]])
    source = sum(n for name, n in tensors.items() if name.startswith("blk."))
    stored = sum(g.bytes for g in manifest.groups if g.kind == "layer")
    assert stored <= 1.1 * source, (stored, source)


def test_info_names_each_stored_format(mixed_converted, capsys):
    """`reshard info` of a folder that mixes block types names each with its bytes (counted here
    from the files themselves) and the bytes per pass."""
    from safetensors import safe_open

    from reshard.cli import describe, main
    from reshard.format import dtype_name

    want: dict[str, int] = {}
    for g in read_manifest(mixed_converted).groups:
        if not g.file:
            continue
        owner = {n: q["scheme"] for p, q in g.quantized.items() for n in g.tensors if n.startswith(p + ".")}
        with safe_open(mixed_converted / g.file, framework="pt") as f:
            for n in f.keys():
                t = f.get_tensor(n)
                key = owner.get(n) or dtype_name(t.dtype)
                want[key] = want.get(key, 0) + t.nbytes
    assert {"q4_k", "q6_k", "int8", "int4", "int4-sym"} <= set(want)
    assert describe(mixed_converted)["stored_formats"] == want
    assert main(["info", str(mixed_converted)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [stored] = [ln for ln in lines if ln.startswith("stored as ")]
    assert all(f" {name} " in stored for name in want), stored
    assert any(ln.startswith("bytes/pass ") for ln in lines)


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
def test_logits_and_tokens_equal_transformers(mixed_converted, reference, resident):
    from runtime import LayeredModel

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        want = reference(ids).logits
        want_tokens = reference.generate(ids, max_new_tokens=5, do_sample=False)
    kwargs = {"max_cpu_memory": CPU_BUDGETS["resident" if resident else "streamed"]}
    # packed=False: the re-packed int4/int8 weights expand (the CPU kernels compute in bfloat16)
    with LayeredModel.from_pretrained(mixed_converted, device="cpu", packed=False, **kwargs) as model:
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want_tokens)


def test_repacked_and_k_quant_weights_run_through_the_cpu_kernels(mixed_converted, reference):
    """By default the re-packed int4 weights (Q4_0, Q4_1) run packed through the CPU's low-bit
    kernels, and so do Q2_K to Q6_K, IQ4_XS and the IQ2/IQ3 grid blocks, as stored, and Q8_0's int8 with a scale per
    block of 32, where the project's native kernels run; each close to the exact product."""
    from runtime import LayeredModel, native
    from runtime.lowbit import PackedLinear, kernels_available

    if native.lowbit() is None and not kernels_available():
        pytest.skip("no CPU low-bit kernel on this machine")
    manifest = read_manifest(mixed_converted)
    kernel = ("int4", "int8", *sorted(native.BLOCK_SCHEMES)) if native.lowbit() is not None else ("int4",)
    want = {p[: -len(".weight")]: q["scheme"] for g in manifest.groups for p, q in g.quantized.items()
            if q["scheme"] in kernel or q["scheme"].startswith("int4")}
    assert set(kernel) <= set(want.values()) or native.lowbit() is None
    weights = dict(reference.named_parameters())
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(7))
    with LayeredModel.from_pretrained(mixed_converted, device="cpu", dtype="float32", max_cpu_memory="100GB") as lm:
        lm(torch.tensor([[1, 504, 3458]]))
        packed = {n: m for n, m in lm.model.named_modules() if isinstance(m, PackedLinear)}
        assert set(packed) == set(want)
        for name, module in packed.items():
            if not want[name].startswith(("int4", "int8")):  # held as the file's blocks: the stored bytes, no scale table
                assert module.weight.dtype == torch.uint8 and not hasattr(module, "qscales")
            if want[name] == "int8":  # Q8_0 as stored: its int8 values and a float32 scale per block of 32
                assert module.weight.dtype == torch.int8 and module.qscales.shape == (module.spec.out_features,
                                                                                     module.spec.in_features // 32)
            xs = x[:, :module.spec.in_features]
            exact = xs @ weights[name + ".weight"].t()
            err = (module(xs) - exact).abs().max() / exact.abs().max()
            assert 0 < err < 0.03, (name, err)  # bfloat16 activations and scales in the kernels


def test_explicit_dtype_dequantizes_at_convert(mixed_gguf, mixed_converted, tmp_path):
    """`--dtype` given: nothing is kept as blocks; the kept folder's unquantized size (read
    through each parameter's own scheme) is that folder's size."""
    from reshard.cli import describe

    manifest = convert(str(mixed_gguf), tmp_path / "f32", dtype="float32", progress=False)
    assert not any(g.quantized for g in manifest.groups)
    kept, plain = describe(mixed_converted), describe(tmp_path / "f32")
    # equal up to the files' headers (the kept folder's tensor names end in ".blocks")
    assert abs(kept["layer_bytes_unquantized"] - plain["layer_bytes"]) < 1024 * LAYERS
    assert plain["layer_bytes"] > 4 * kept["layer_bytes"]


def test_quantize_from_gguf_requantizes(mixed_gguf, tmp_path):
    manifest = convert(str(mixed_gguf), tmp_path / "int4", quantize="int4", progress=False)
    entries = [(g, p, q) for g in manifest.groups for p, q in g.quantized.items()]
    assert manifest.quantization["scheme"] == "int4" and len(entries) == 7 * LAYERS
    assert all("scheme" not in q and f"{p}.zeros" in g.tensors for g, p, q in entries)


def test_blocks_that_do_not_fit_the_config(mixed_gguf, tmp_path, monkeypatch, capsys):
    """A GGUF whose blocks disagree with its own config (one row short) is refused by name."""
    from test_gguf import cli_convert

    from reshard.gguf_source import GGUFSource

    real = GGUFSource.read_blocks
    monkeypatch.setattr(GGUFSource, "read_blocks", lambda self, key: real(self, key)[1:])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert cli_convert(capsys, mixed_gguf, tmp_path / "out") == (
        1, f"Error: {name}: the source's q4_k blocks [255, 144] do not make a weight of shape [256, 256]; "
           f"the checkpoint does not match its config")
