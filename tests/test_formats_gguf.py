"""GGUF quantized blocks kept compact (issue 22): Q8_0, Q4_0, Q4_1, Q4_K and Q6_K weights are
stored as the file's own blocks (per-parameter schemes) and expanded at load; the runtime
equals transformers' own `from_pretrained(..., gguf_file=...)` of the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smollm2_gguf
from gguf import GGMLQuantizationType as Q, dequantize
from gguf_files import write_random_llama

from reshard.convert import convert
from reshard.format import read_manifest
from reshard.ggml_quants import BLOCK_TYPES, dequantize_blocks

LAYERS = 2
# every kept type in the decoder layers, q/k (rows permuted by transformers) included
TYPES = {"blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q6_K, "blk.0.attn_v.weight": Q.Q8_0,
         "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q4_K,
         "blk.0.ffn_down.weight": Q.Q6_K, "blk.1.attn_q.weight": Q.Q4_0, "blk.1.attn_k.weight": Q.Q4_1,
         "blk.1.attn_v.weight": Q.Q6_K, "blk.1.attn_output.weight": Q.Q8_0, "blk.1.ffn_gate.weight": Q.Q6_K,
         "blk.1.ffn_up.weight": Q.Q4_0, "blk.1.ffn_down.weight": Q.Q4_K}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixed-gguf") / "mixed.gguf"
    write_random_llama(path, smollm2_gguf(), layers=LAYERS, hidden=256, inter=512, heads=4, kv_heads=2,
                       types=TYPES)
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
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (8 * 3, nbytes), dtype=np.uint8)
    where = {"q6_k": [nbytes - 2], "q4_1": [0, 2], "q4_k": [0, 2]}.get(scheme, [0])
    for at in where:  # finite float16 scales, of both signs
        raw[:, at:at + 2] = (rng.standard_normal((len(raw), 1)) * 0.05).astype(np.float16).view(np.uint8)
    raw = raw.reshape(8, -1)
    want = torch.from_numpy(dequantize(raw, getattr(Q, name)))
    got = dequantize_blocks(torch.from_numpy(raw), scheme, dtype=torch.float32)
    assert got.shape == (8, 3 * size) and torch.equal(got, want)
    assert torch.equal(dequantize_blocks(torch.from_numpy(raw), scheme, dtype=torch.bfloat16), want.bfloat16())


def test_blocks_are_kept_with_their_own_scheme(mixed_converted, mixed_gguf):
    """Each decoder-layer weight is stored as its GGUF blocks under the scheme of its type, and
    the decoder layers' stored bytes are at most 1.1x the source's."""
    from gguf import GGUFReader

    manifest = read_manifest(mixed_converted)
    schemes = {p: q["scheme"] for g in manifest.groups for p, q in g.quantized.items()}
    hf = {f"model.layers.{i}.{m}.weight": f"blk.{i}.{n}.weight" for i in range(LAYERS) for m, n in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"))}
    assert schemes == {p: TYPES[n].name.lower() for p, n in hf.items()}
    source = sum(int(t.n_bytes) for t in GGUFReader(mixed_gguf).tensors if t.name.startswith("blk."))
    stored = sum(g.bytes for g in manifest.groups if g.kind == "layer")
    assert stored <= 1.1 * source, (stored, source)


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
def test_logits_and_tokens_equal_transformers(mixed_converted, reference, resident):
    from runtime import LayeredModel

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        want = reference(ids).logits
        want_tokens = reference.generate(ids, max_new_tokens=5, do_sample=False)
    kwargs = {} if resident else {"max_cpu_memory": 0}
    with LayeredModel.from_pretrained(mixed_converted, device="cpu", **kwargs) as model:
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want_tokens)


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
