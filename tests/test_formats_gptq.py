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

from conftest import CPU_BUDGETS, PLACEMENTS, FakeHub, GroupWrites, assert_placed, open_placed, save_tiny_tokenizer

OUT_IN = 128  # hidden size; group 128 then holds one group per row of q/k/v/o/gate/up, two of down
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _config():
    import transformers as tf

    return tf.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, dtype="float16")


# --- the packings, written from each format's description ------------------------------------

def pack_rows(v: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(R, C) small ints -> (R / k, C) int32: row k*r + j in bits `bits`*j of word r (GPTQ qweight)."""
    k = 32 // bits
    v = v.to(torch.int64).view(-1, k, v.shape[1])
    words = sum(v[:, j] << (bits * j) for j in range(k))
    return (words - ((words >= 2**31).long() << 32)).to(torch.int32).contiguous()  # two's complement, as stored


def pack_cols(v: torch.Tensor, order=tuple(range(8)), bits: int = 4) -> torch.Tensor:
    """(R, C) small ints -> (R, C / k) int32: column k*c + order[j] in bits `bits`*j of word c."""
    k = 32 // bits
    v = v.to(torch.int64).view(v.shape[0], -1, k)
    words = sum(v[:, :, order[j]] << (bits * j) for j in range(k))
    return (words - ((words >= 2**31).long() << 32)).to(torch.int32).contiguous()


def random_linear(out: int, inp: int, group: int, gen):
    q = torch.randint(0, 16, (out, inp), generator=gen)
    groups = inp // group
    z = torch.randint(0, 16, (out, groups), generator=gen)
    s = (torch.rand(out, groups, generator=gen) * 0.02 + 0.001).half()
    return q, z, s


def write_checkpoint(folder: Path, kind: str, *, seed: int = 0) -> Path:
    """A tiny llama in `kind`'s layout (a key of QUANT_CONFIGS) in `folder`, and
    the same model de-quantized by the published formula as a float32 checkpoint in folder/reference."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config()
    model = AutoModelForCausalLM.from_config(config).half()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    reference = {k: v.float() for k, v in state.items()}
    gen = torch.Generator().manual_seed(seed)
    group = 64 if kind in ("ct4", "ct4_act") else 128
    for layer in range(config.num_hidden_layers):
        for lin in LINEARS:
            name = f"model.layers.{layer}.{lin}"
            out, inp = state.pop(name + ".weight").shape
            group = inp if kind == "gptq_row" else group  # group_size -1: one group per row
            q, z, s = random_linear(out, inp, group, gen)
            if kind.startswith("ct"):
                bits = 8 if kind.startswith("ct8") else 4
                g = inp if kind.startswith("ct8") else group
                q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (out, inp), generator=gen)
                s = (torch.rand(out, inp // g, generator=gen) * 0.02 + 0.001).half()
                if kind == "ct8_int":  # int-quantized (W8A8's weights): the int8 weight as it is
                    state[name + ".weight"] = q.to(torch.int8)
                else:
                    state[name + ".weight_packed"] = pack_cols(q + (1 << bits - 1), bits=bits)
                    state[name + ".weight_shape"] = torch.tensor([out, inp])
                state[name + ".weight_scale"] = s
                g_idx = torch.arange(inp) // g
                if kind == "ct4_act":  # actorder "group": weight_g_idx puts each group's columns anywhere
                    g_idx = g_idx[torch.randperm(inp, generator=gen)]
                    state[name + ".weight_g_idx"] = g_idx.to(torch.int32)
                w = q.float() * s.float()[:, g_idx]
            elif kind == "awq":
                state[name + ".qweight"] = pack_cols(q.t(), (0, 2, 4, 6, 1, 3, 5, 7))
                state[name + ".qzeros"] = pack_cols(z.t(), (0, 2, 4, 6, 1, 3, 5, 7))
                state[name + ".scales"] = s.t().contiguous()
                w = (q - z.repeat_interleave(group, dim=1)).float() * s.float().repeat_interleave(group, dim=1)
            else:  # GPTQ; v1 ("gptq") stores z - 1, so z runs 1..16 there; symmetric: z = 8
                z = torch.full_like(z, 7) if kind == "gptq_sym" else z
                z = z if kind == "gptq_v2" else z + 1
                stored = z if kind == "gptq_v2" else z - 1
                g_idx = torch.arange(inp, dtype=torch.int32) // group
                if kind == "gptq_act":  # act-order: each group's rows anywhere (GPTQ's order of quantizing them)
                    g_idx = g_idx[torch.randperm(inp, generator=gen)].contiguous()
                state[name + ".qweight"] = pack_rows(q.t())
                state[name + ".qzeros"] = pack_cols(stored.t())
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
    "gptq_row": {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": False},
    "gptq_act": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
                 "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "ct4": _ct(4, "group", 64),
    "ct4_act": {**_ct(4, "group", 64), "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64, "actorder": "group"}}}},
    "ct8": _ct(8, "channel", None),
    "ct8_int": {**_ct(8, "channel", None), "format": "int-quantized", "config_groups": {"group_0": {  # W8A8
        "targets": ["Linear"], "format": "int-quantized", "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}}}},
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
def test_published_folder_equals_transformers_on_the_dequantized_checkpoint(kind, published):
    """Float32 CPU logits bit-identical and greedy tokens equal, streamed and resident."""
    src, folder = published[kind]
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    want, want_tokens = _reference_logits(src, ids)
    for placement in PLACEMENTS:
        lm = open_placed(folder, placement, dtype="float32", packed=False)
        try:
            assert torch.equal(lm(ids).logits, want), placement
            assert torch.equal(lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want_tokens)
            assert_placed(lm.stats, placement, len(read_manifest(folder).groups))
        finally:
            lm.close()


@pytest.mark.parametrize("kind", list(QUANT_CONFIGS))
def test_published_folder_is_stored_quantized_within_a_tenth_of_the_source(kind, published):
    src, folder = published[kind]
    m = read_manifest(folder)
    q = m.quantization
    assert q["scheme"] == ("int8" if kind.startswith("ct8") else "int4") and q["source_format"]
    assert q["group_size"] == {"ct4": 64, "ct4_act": 64, "ct8": None, "ct8_int": None}.get(kind, 128)
    source = load_file(src / "model.safetensors")
    for g in (g for g in m.groups if g.kind == "layer"):
        prefix = f"model.{g.name}."
        src_bytes = sum(t.numel() * t.element_size() for k, t in source.items() if k.startswith(prefix))
        assert len(g.quantized) == len(LINEARS)
        assert g.bytes <= 1.1 * src_bytes, (g.bytes, src_bytes)
    if q["scheme"] == "int4":  # symmetric: no zeros stored (int4-sym); else integer zero points, a byte each
        layer = next(g for g in m.groups if g.kind == "layer")
        symmetric = kind in ("gptq_sym", "ct4")
        assert {i.get("scheme") for i in layer.quantized.values()} == {  # (gptq_act: one-group weights are plain)
            "gptq_act": {"int4-act", None}, "ct4_act": {"int4-act"}}.get(kind, {"int4-sym"} if symmetric else {None})
        zeros = {layer.tensors[f"{name}.zeros"]["dtype"] for name in layer.quantized
                 if f"{name}.zeros" in layer.tensors}
        assert zeros == (set() if symmetric else {"F16"} if kind == "ct4_act" else {"U8"}), zeros  # (-8 * s exact)


# --- refused: formats reshard cannot read, before any weight is downloaded --------------------

def _with_quant_config(src: Path, folder: Path, qc: dict) -> Path:
    """A copy of checkpoint `src` whose config says `qc`."""
    import shutil

    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("reference"))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "quantization_config": qc}))
    return folder


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


ADVICE = ("convert the original unquantized checkpoint, or an FP8, MXFP4, NVFP4, GPTQ, AWQ, compressed-tensors "
          "or bitsandbytes 4-bit version of it")


@pytest.mark.parametrize("qc,what", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit bitsandbytes (LLM.int8)"),
    ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}, "ModelOpt W4A8_AWQ"),
    ({"quant_method": "hqq", "nbits": 4}, "quantized with 'hqq'"),
    ({"quant_method": "exl2"}, "quantized with 'exl2'"),
    ({**QUANT_CONFIGS["gptq"], "bits": 3}, "3-bit GPTQ"),
    ({**QUANT_CONFIGS["awq"], "version": "gemv"}, "AWQ version 'gemv'"),
    ({**QUANT_CONFIGS["ct4"], "format": "marlin-24", "config_groups": {}}, "compressed-tensors in the marlin-24 format"),
    (_ct(4, "tensor", None), "compressed-tensors 4-bit with the 'tensor' strategy"),
])
def test_unreadable_quantization_is_refused_before_any_weight_download(qc, what, published, tmp_path,
                                                                       monkeypatch, capsys):
    folder = _with_quant_config(published["gptq"][0], tmp_path / "repo", qc)
    hub = FakeHub(folder, tmp_path / "cache").install(monkeypatch)
    code = reshard_cli.main(["convert", "org/model", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    assert _error_line(capsys) == f"Error: org/model is {what}, which reshard cannot read; {ADVICE}"
    assert "model.safetensors" not in hub.downloads and "config.json" in hub.downloads
    assert not (tmp_path / "out").exists()


def test_act_order_weights_keep_their_columns_in_group_order(published):
    """Act-order GPTQ (desc_act): each weight is stored with its columns gathered group by group and
    their places ("int4-act", its own scheme), so every group is one contiguous range as in plain int4."""
    folder = published["gptq_act"][1]
    m = read_manifest(folder)
    layer = next(g for g in m.groups if g.kind == "layer")
    for name, info in layer.quantized.items():
        if info["shape"][1] > 128:  # more than one group: stored in act order
            assert info["scheme"] == "int4-act" and f"{name}.columns" in layer.tensors, name
        else:  # one group: any order of its columns is the plain one
            assert "scheme" not in info and f"{name}.columns" not in layer.tensors, name
    assert any("scheme" in info for info in layer.quantized.values())
    assert all("scheme" not in i for g in read_manifest(published["gptq"][1]).groups for i in g.quantized.values())


def test_gptq_whose_groups_are_uneven_is_refused_unless_dequantized(published, tmp_path, capsys):
    """A g_idx that gives one group more columns than another has no exact int4 form with groups
    of one size: refused with one line; --dtype float16 de-quantizes it (the published formula)."""
    src = _with_quant_config(published["gptq"][0], tmp_path / "src", QUANT_CONFIGS["gptq"])
    state = load_file(src / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.g_idx"
    state[key] = torch.zeros_like(state[key])  # every row in group 0
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    assert reshard_cli.main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 1
    assert _error_line(capsys) == (
        "Error: model.layers.1.mlp.down_proj.g_idx does not give each group 128 columns; this cannot be re-packed "
        "exactly: convert with --dtype float16 (or bfloat16) to de-quantize it")
    assert reshard_cli.main(["convert", str(src), str(tmp_path / "f16"), "--quiet", "--dtype", "float16"]) == 0
    down = _stored(tmp_path / "f16", "model.layers.1.mlp.down_proj.weight")
    assert torch.equal(down, gptq_formula(state, "model.layers.1.mlp.down_proj").half())


def gptq_formula(state: dict, name: str) -> torch.Tensor:
    """GPTQ's published de-quantization (v1 format) of linear `name`, from its stored tensors alone:
    w[:, i] = (q[i] - z[g_idx[i]]) * s[g_idx[i]], transposed to (out, in)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    qweight, qzeros = state[name + ".qweight"], state[name + ".qzeros"]
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])  # (in, out)
    z = ((qzeros[:, :, None] >> shifts) & 15).reshape(qzeros.shape[0], -1) + 1  # (groups, out)
    g = state[name + ".g_idx"].long()
    return ((q - z[g]).float() * state[name + ".scales"].float()[g]).t()


def test_packed_expert_weights_are_refused_unless_dequantized(tmp_path, capsys):
    """A packed expert weight that transformers stacks with unpacked ones into one [E, ...] tensor
    at load cannot be re-packed (all packed, they are: tests/test_formats_gptq_moe.py); an explicit
    --dtype de-quantizes it, and the folder runs."""
    import shutil

    from transformers import AutoModelForCausalLM

    from conftest import save_tiny

    src = save_tiny("mixtral", tmp_path / "src")
    state = load_file(src / "model.safetensors")
    key = next(k for k in state if ".experts.0." in k and k.endswith(".weight"))
    out, inp = state.pop(key).shape
    q, z, s = random_linear(out, inp, inp, torch.Generator().manual_seed(3))
    ref = shutil.copytree(src, tmp_path / "reference")  # the published formula's weight, in float32
    save_file({**state, key: (q - z).float() * s.float()}, ref / "model.safetensors", metadata={"format": "pt"})
    prefix = key[: -len("weight")]
    state.update({prefix + "qweight": pack_rows(q.t()), prefix + "qzeros": pack_cols(z.t()),
                  prefix + "scales": s.t().contiguous(), prefix + "g_idx": torch.zeros(inp, dtype=torch.int32)})
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    qc = {**QUANT_CONFIGS["gptq_v2"], "group_size": -1}
    (src / "config.json").write_text(json.dumps({**raw, "quantization_config": qc}))
    assert reshard_cli.main(["convert", str(src), str(tmp_path / "kept"), "--quiet"]) == 1
    assert _error_line(capsys) == (
        f"Error: {key} is a packed GPTQ weight that transformers combines with others at load; convert with "
        f"--dtype float16 (or bfloat16) to de-quantize it")
    m = convert(str(src), tmp_path / "float", dtype="float32", progress=False)
    assert m.quantization is None
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()(ids).logits
    lm = LayeredModel.from_pretrained(tmp_path / "float", device="cpu", max_cpu_memory=0)
    try:
        assert torch.equal(lm(ids).logits, want)
    finally:
        lm.close()


# --- reshard info; --dtype de-quantizes, --quantize re-quantizes --------------------------------

@pytest.mark.parametrize("kind,line", [("gptq", "int4 group 128 (from GPTQ)"), ("awq", "int4 group 128 (from AWQ)"),
                                       ("ct8", "int8 (from compressed-tensors)")])
def test_info_names_the_stored_format_and_bytes_per_pass(kind, line, published, capsys):
    folder = published[kind][1]
    assert reshard_cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"quantization  {line}\n" in out
    total = sum(g.bytes for g in read_manifest(folder).groups)
    assert f"bytes/pass    {total / 1e6:.2f} MB (" in out


def _stored(folder: Path, name: str) -> torch.Tensor:
    m = read_manifest(folder)
    g = next(g for g in m.groups if name in g.tensors)
    return load_file(folder / g.file)[name]


@pytest.mark.parametrize("kind", ["gptq", "awq", "ct4"])
def test_explicit_dtype_dequantizes_at_convert(kind, published, tmp_path):
    src = published[kind][0]
    reference = load_file(src / "reference" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert reshard_cli.main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--quiet"]) == 0
    assert read_manifest(tmp_path / "bf16").quantization is None
    assert torch.equal(_stored(tmp_path / "bf16", name), reference[name].to(torch.bfloat16))
    convert(str(src), tmp_path / "f32", dtype="float32", progress=False)
    ids = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    want, _ = _reference_logits(src, ids)
    lm = LayeredModel.from_pretrained(tmp_path / "f32", device="cpu", max_cpu_memory=0)
    try:
        assert torch.equal(lm(ids).logits, want)
    finally:
        lm.close()


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantize_from_a_published_checkpoint_requantizes_its_weights(scheme, published, tmp_path):
    from reshard.quant import quantize

    src = published["gptq"][0]
    reference = load_file(src / "reference" / "model.safetensors")
    out = tmp_path / scheme
    assert reshard_cli.main(["convert", str(src), str(out), "--quantize", scheme, "--quiet"]) == 0
    q = read_manifest(out).quantization
    assert q["scheme"] == scheme and "source_format" not in q
    name = "model.layers.0.self_attn.o_proj.weight"
    # the published weight, de-quantized exactly (float32), is what the project's quantizer rounds into
    # the float16 folder's parts
    want = quantize(reference[name], scheme, group=32, dtype=torch.float16)
    for part, t in want.items():
        assert torch.equal(_stored(out, f"{name}.{part}"), t), part


# --- the CPU's low-bit kernels: they take re-packed weights whose parts are in the folder's dtype --

@pytest.mark.parametrize("kind", ["gptq", "gptq_sym", "gptq_act", "ct4", "ct8"])
def test_kernels_take_repacked_weights_and_packed_false_expands_them_exactly(kind, published):
    """Re-packed weights run through the CPU kernels, each close to the exact product (asymmetric
    GPTQ's float32 zeros in a float32 table); with packed=False they expand, bit-identical."""
    from runtime import native
    from runtime.lowbit import PackedLinear, kernels_available

    if native.lowbit() is None and not kernels_available():
        pytest.skip("no CPU low-bit kernel on this machine")
    src, folder = published[kind]
    reference = load_file(src / "reference" / "model.safetensors")
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    want, _ = _reference_logits(src, ids)
    with LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", packed=False, max_cpu_memory=0) as lm:
        assert torch.equal(lm(ids).logits, want)
    lm = LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", max_cpu_memory=CPU_BUDGETS["resident"])
    try:
        lm(ids)
        packed = {n: m for n, m in lm.model.named_modules() if isinstance(m, PackedLinear)}
        assert len(packed) == 2 * len(LINEARS)
        permuted = {n for n, m in packed.items() if m.spec.permuted}  # act order: the input gathered to match
        assert bool(permuted) == (kind == "gptq_act") and all(packed[n].qorder.shape == (256,) for n in permuted)
        x = torch.randn(4, 256, generator=torch.Generator().manual_seed(7))
        for name, module in packed.items():  # each re-packed weight, through the kernel, against the exact product
            exact = x[:, :module.spec.in_features] @ reference[name + ".weight"].t()
            err = (module(x[:, :module.spec.in_features]) - exact).abs().max() / exact.abs().max()
            assert 0 < err < 0.03, (name, err)  # bfloat16 activations and scales in the kernels
    finally:
        lm.close()


# --- from the hub; resumed ---------------------------------------------------------------------

def test_gptq_repo_from_the_hub_converts_and_resumes_byte_identical(published, tmp_path, monkeypatch):
    src, folder = published["gptq"]
    hub = FakeHub(src, tmp_path / "cache").install(monkeypatch)
    writes = GroupWrites(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        convert("org/gptq", tmp_path / "out", progress=False)
    writes.resume()
    m = convert("org/gptq", tmp_path / "out", progress=False)  # the same command again: resumes
    assert "model.safetensors" in hub.downloads and m.quantization["source_format"] == "GPTQ"
    for g in (g for g in m.groups if g.file):  # the same bytes as the local conversion, kept groups included
        assert (tmp_path / "out" / g.file).read_bytes() == (folder / g.file).read_bytes(), g.name


def test_gptq_repo_converts_with_low_disk_one_shard_at_a_time(published, tmp_path, monkeypatch):
    src, folder = published["gptq"]
    hub = FakeHub(src, tmp_path / "cache").install(monkeypatch)
    m = convert("org/gptq", tmp_path / "out", progress=False, low_disk=True)
    assert m.quantization["source_format"] == "GPTQ" and "model.safetensors" in hub.downloads
    assert not (tmp_path / ".out.download").exists()  # the shards work folder is removed at the end
    for g in (g for g in m.groups if g.file):
        assert (tmp_path / "out" / g.file).read_bytes() == (folder / g.file).read_bytes(), g.name


# --- on a GPU: the same folders expand on the device's copy stream ------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gptq", "gptq_sym", "gptq_act", "ct4_act", "awq"])
def test_published_folder_on_cuda_equals_the_dequantized_checkpoint(kind, published):
    """Integer zero points, int4-sym and int4-act weights expand on CUDA (float32: as on the CPU, up to
    the device's matmul rounding), streamed from pinned host memory; greedy tokens equal."""
    from transformers import AutoModelForCausalLM

    src, folder = published[kind]
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    ref = AutoModelForCausalLM.from_pretrained(src / "reference", dtype=torch.float32).eval().cuda()
    with torch.no_grad():
        want, want_tokens = ref(ids).logits, ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with LayeredModel.from_pretrained(folder, device="cuda", dtype="float32", max_gpu_memory=0,
                                      max_cpu_memory="1GB") as lm:
        torch.testing.assert_close(lm(ids).logits, want, rtol=0, atol=1e-4)
        assert torch.equal(lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want_tokens)
