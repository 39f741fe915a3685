"""Quantized conversion (`reshard convert --quantize int8|int4`) and its expansion by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reshard import cli as reshard_cli
from reshard.convert import convert
from reshard.errors import FormatError
from reshard.format import DTYPE_NAMES, MANIFEST, read_manifest
from reshard.quant import dequantize, quantize
from runtime import cli as runtime_cli
from runtime.model import LayeredModel

from conftest import ARCHS, GroupWrites, pass_bytes

TEXT = Path(__file__).parent / "data" / "english.txt"


# --- the math --------------------------------------------------------------------------------

def _bound(parts: dict, scheme: str, columns: int) -> torch.Tensor:
    """scale / 2 for every element: the round-to-nearest error bound of each scheme."""
    scales = parts["scales"].float()
    if scheme == "int8":
        return scales[:, None].expand(-1, columns) / 2
    group = parts["qweight"].shape[1] * 2 // scales.shape[1]
    return scales.repeat_interleave(group, dim=1)[:, :columns] / 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 24)])
def test_round_trip_error_within_the_schemes_bound(scheme, group, dtype):
    torch.manual_seed(0)
    w = torch.randn(48, 200) * 0.02  # 200 columns: int4 groups of 32/64 leave a ragged last group
    w[3] = 0  # an all-zero row
    w[5] *= 1e-4  # a row whose scale is subnormal in float16
    w[7, 11] = 3.0  # an outlier
    w = w.to(DTYPE_NAMES[dtype])
    parts = quantize(w, scheme, group=group)
    back = dequantize(parts, scheme, columns=200, dtype=torch.float32)
    err = (back - w.float()).abs()
    bound = _bound(parts, scheme, 200)
    assert back.shape == w.shape
    assert (err <= bound * (1 + 1e-6)).all(), (err / bound).max()
    assert (err > bound * 0.9).any()  # the bound is tight, so the check is not vacuous
    assert back[3].abs().max() == 0
    assert {p.dtype for n, p in parts.items() if n != "qweight"} == {w.dtype}


def test_quantized_bytes_are_golden():
    # int8: scale = absmax / 127 = 1, q = round(w) (half to even)
    q, s = quantize(torch.tensor([[-127.0, 0.0, 63.5, 127.0]]), "int8").values()
    assert q.tolist() == [[-127, 0, 64, 127]] and s.tolist() == [1.0]
    # int4: zero = min = 2, scale = (17 - 2) / 15 = 1, q = w - 2; low nibble holds the even column
    parts = quantize(torch.arange(2.0, 18.0)[None], "int4", group=16)
    assert bytes(parts["qweight"].flatten().tolist()) == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    assert parts["scales"].tolist() == [[1.0]] and parts["zeros"].tolist() == [[2.0]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_half_precision_expansion_equals_float32_math_cast_down(scheme, dtype):
    torch.manual_seed(1)
    dt = DTYPE_NAMES[dtype]
    parts = quantize(torch.randn(64, 256) * 0.05, scheme, dtype=dt)
    half = dequantize(parts, scheme, columns=256, dtype=dt)
    full = dequantize(parts, scheme, columns=256, dtype=torch.float32).to(dt)
    assert torch.equal(half, full)


# --- tiny models: the runtime equals transformers' model with the same quantized weights -----

def quantized_reference(src: Path, folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model from `src`, with each weight the folder quantized replaced by
    its quantize -> dequantize round trip (and the others rounded to the folder's dtype)."""
    from transformers import AutoModelForCausalLM

    m = read_manifest(folder)
    stored = DTYPE_NAMES[m.dtype]
    q = m.quantization
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.copy_(p.to(stored))
        for g in m.groups:
            for name, info in g.quantized.items():
                w = params[name].t() if info["transposed"] else params[name]
                parts = quantize(w, q["scheme"], group=q["group_size"] or 0, dtype=stored)
                back = dequantize(parts, q["scheme"], columns=w.shape[1], dtype=torch.float32)
                params[name].copy_(back.t() if info["transposed"] else back)
    return model.to(dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_folder_equals_transformers_with_quantized_weights(arch, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[arch]
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    for scheme, group, emb in [("int8", 32, False), ("int4", 24, True)]:  # 24 leaves ragged groups of 64 columns
        out = tmp_path / f"{scheme}-{group}"
        m = convert(str(src), out, progress=False, quantize=scheme, quantize_group=group, quantize_embeddings=emb)
        quantized = {n for g in m.groups for n in g.quantized}
        linear_in_layers = {n for n in quantized if n.startswith(m.layers_path + ".")}
        assert len(linear_in_layers) == 3 * (7 if arch not in ("gpt2", "phi3") else 4)  # per layer: q,k,v,o,gate,up,down
        assert (quantized - linear_in_layers != set()) == emb  # embeddings/head only when asked
        with torch.no_grad():
            want = quantized_reference(src, out)(ids).logits
        lm = LayeredModel.from_pretrained(out, device="cpu", prefetch=1, max_cpu_memory=0, packed=False)
        got = lm(ids).logits
        streamed = pass_bytes(lm, ids)
        lm.close()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the compressed bytes are what a pass streams (bytes_read also counts the next pass's prefetch)
        assert lm.stats.per_pass[-1].bytes == streamed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_folder_on_cuda_equals_cpu(arch, tiny_checkpoints, tmp_path):
    """The expansion on the copy stream computes what the CPU computes; generation agrees, prefetch on."""
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    for scheme, group, emb in [("int8", 32, False), ("int4", 24, True)]:
        out = tmp_path / scheme
        convert(str(tiny_checkpoints[arch]), out, progress=False, quantize=scheme, quantize_group=group,
                quantize_embeddings=emb)
        cpu = LayeredModel.from_pretrained(out, device="cpu", prefetch=1, max_cpu_memory=0, packed=False)
        for prefetch in (1, 2):
            gpu = LayeredModel.from_pretrained(out, device="cuda", prefetch=prefetch, max_gpu_memory=0)
            torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(gpu.generate(ids.cuda(), **kwargs).cpu(), cpu.generate(ids, **kwargs))
            gpu.close()
        half = LayeredModel.from_pretrained(out, device="cuda", dtype="float16", prefetch=1, max_gpu_memory=0)
        # float16 keeps 11 bits (unit roundoff 2^-11 = 4.9e-4); the logits here are about 1 in size, and the
        # same folders computing in float16 on the CPU come within 1.8e-3 of float32 (issue 26's measure):
        # 1e-2 is some twenty float16 roundings of a logit, where the old 0.05 let a wrong layer pass
        torch.testing.assert_close(half(ids.cuda()).logits.float().cpu(), cpu(ids).logits, rtol=1e-2, atol=1e-2)
        half.close()
        cpu.close()


def test_conv1d_weights_are_quantized_per_output_channel(tiny_checkpoints, tmp_path):
    """GPT-2's Conv1D stores (in, out); int8 must keep one scale per *output* channel."""
    m = convert(str(tiny_checkpoints["gpt2"]), tmp_path / "q", progress=False, quantize="int8")
    g = m.group("layers.0")
    info = g.quantized["transformer.h.0.mlp.c_fc.weight"]
    assert info["transposed"] and info["shape"] == [64, 256]
    assert g.tensors["transformer.h.0.mlp.c_fc.weight.scales"]["shape"] == [256]
    assert g.tensors["transformer.h.0.mlp.c_fc.weight.qweight"]["shape"] == [256, 64]


# --- determinism, interruption --------------------------------------------------------------

def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_quantized_conversion_is_deterministic_and_resumes_byte_identical(tiny_checkpoints, tmp_path, monkeypatch):
    src = str(tiny_checkpoints["qwen2"])
    kwargs = dict(progress=False, quantize="int4", quantize_group=32, quantize_embeddings=True)
    convert(src, tmp_path / "a", **kwargs)
    convert(src, tmp_path / "b", **kwargs)
    assert _folder_bytes(tmp_path / "a") == _folder_bytes(tmp_path / "b")

    writes = GroupWrites(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "c", **kwargs)
    written = writes.names
    assert written == ["embed.safetensors", "layers.00000.safetensors"]
    assert not (tmp_path / "c" / MANIFEST).exists()
    kept_inode = (tmp_path / "c" / "layers.00000.safetensors").stat().st_ino
    writes.resume()
    convert(src, tmp_path / "c", **kwargs)  # the same command again: resumes
    assert written[2:] == ["layers.00001.safetensors", "layers.00002.safetensors", "norm.safetensors", "head.safetensors"]
    assert (tmp_path / "c" / "layers.00000.safetensors").stat().st_ino == kept_inode  # finished work was kept
    assert _folder_bytes(tmp_path / "c") == _folder_bytes(tmp_path / "a")


def test_other_quantization_into_the_same_folder_is_refused(tiny_checkpoints, tmp_path, capsys):
    src, out = str(tiny_checkpoints["llama"]), str(tmp_path / "o")
    assert reshard_cli.main(["convert", src, out, "--quantize", "int8", "--quiet"]) == 0
    assert reshard_cli.main(["convert", src, out, "--quantize", "int4", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "(float32, int8, LlamaForCausalLM), not of " in err and "(float32, int4 group 32, LlamaForCausalLM)" in err
    assert read_manifest(out).quantization["scheme"] == "int8"


# --- CLI -------------------------------------------------------------------------------------

def test_cli_quantized_convert_info_and_generate(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "q"
    assert reshard_cli.main(["convert", str(tiny_checkpoints["llama"]), str(out), "--quantize", "int4",
                             "--quantize-group", "16", "--quiet"]) == 0
    assert read_manifest(out).quantization == {"scheme": "int4", "group_size": 16, "embeddings": False}
    capsys.readouterr()
    assert reshard_cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer_bytes"] < 0.45 * info["layer_bytes_unquantized"]
    assert info["pass_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert reshard_cli.main(["info", str(out)]) == 0
    assert "quantization  int4 group 16" in capsys.readouterr().out
    assert runtime_cli.main(["generate", str(out), "--prompt", "w3 w4 w5", "--max-new-tokens", "4",
                             "--device", "cpu", "--prefetch", "1", "--max-cpu-memory", "0"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


@pytest.mark.parametrize("argv,line", [
    (["--quantize", "int4", "--quantize-group", "7"], "Error: --quantize-group must be an even number of 2 or more, not 7"),
    (["--quantize-group", "64"], "Error: --quantize-group and --quantize-embeddings need --quantize int8 or int4"),
    (["--quantize", "int8", "--quantize-group", "64"],
     "Error: --quantize-group applies to int4 only; int8 has one scale per output channel"),
])
def test_cli_bad_quantize_flags(argv, line, tiny_checkpoints, tmp_path, capsys):
    assert reshard_cli.main(["convert", str(tiny_checkpoints["llama"]), str(tmp_path / "o"), *argv]) == 2  # usage errors
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    assert not (tmp_path / "o").exists()


def test_cli_unknown_scheme_exits_2(tiny_checkpoints, tmp_path):
    with pytest.raises(SystemExit) as e:
        reshard_cli.main(["convert", str(tiny_checkpoints["llama"]), str(tmp_path / "o"), "--quantize", "int3"])
    assert e.value.code == 2


def test_manifest_missing_a_quantized_part_is_refused(tiny_checkpoints, tmp_path):
    out = tmp_path / "q"
    convert(str(tiny_checkpoints["llama"]), out, progress=False, quantize="int8")
    raw = json.loads((out / MANIFEST).read_text())
    del raw["groups"][1]["tensors"]["model.layers.0.mlp.up_proj.weight.scales"]
    (out / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(FormatError, match="model.layers.0.mlp.up_proj.weight lacks model.layers.0.mlp.up_proj.weight.scales"):
        read_manifest(out)


# --- SmolLM2: bytes per pass, perplexity, generation ----------------------------------------

@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_checkpoint, smollm2_converted, smollm2_int4_converted, tmp_path_factory) -> dict:
    """SmolLM2 as converted (float32, the shared folder) and its int8 and int4 (group 32)
    conversions from float16 (int4: the shared folder)."""
    root = tmp_path_factory.mktemp("smollm2-quant")
    convert(str(smollm2_checkpoint), root / "int8", dtype="float16", quantize="int8", progress=False)
    return {"float32": smollm2_converted, "int8": root / "int8", "int4": smollm2_int4_converted}


def _layer_file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("layers.*.safetensors"))


def test_bytes_per_pass_of_decoder_layers(smollm2_quantized):
    fp16 = _layer_file_bytes(smollm2_quantized["float32"]) / 2  # the same tensors at 2 bytes, up to headers
    assert _layer_file_bytes(smollm2_quantized["int8"]) <= 0.53 * fp16
    assert _layer_file_bytes(smollm2_quantized["int4"]) <= 0.33 * fp16
    for name in ("int8", "int4"):  # `reshard info`'s "unquantized" figure is the fp16 folder's, up to headers
        info = reshard_cli.describe(smollm2_quantized[name])
        assert abs(info["layer_bytes_unquantized"] - fp16) < 0.001 * fp16


def mean_nll(model: LayeredModel, text: str) -> float:
    """Mean next-token negative log-likelihood of `text` (natural log)."""
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    logits = model(ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()


@pytest.fixture
def kernel_backend(request, monkeypatch):
    """Which low-bit CPU kernel the packed layers get: "native" (the project's, skipped where it
    cannot be built), "torch" (RESHARD_NATIVE=0), "packed" (the project's where it builds, else
    torch's: what a user gets) or "expanded" (packed=False); native.lowbit() is asked afresh
    before and after."""
    from runtime import native

    backend = request.param
    monkeypatch.setenv("RESHARD_NATIVE", "0" if backend == "torch" else "1")
    native.lowbit.cache_clear()
    if backend == "packed":
        backend = "native" if native.lowbit() is not None else "torch"
    if backend == "native" and native.lowbit() is None:
        pytest.skip("needs a C compiler and an x86 CPU with AVX512-VNNI")
    yield backend
    native.lowbit.cache_clear()


PERPLEXITIES: dict[tuple[Path, str], float] = {}  # (folder, backend) -> perplexity, each computed once


def smollm2_perplexity(folder: Path, backend: str) -> float:
    """SmolLM2's perplexity on tests/data/english.txt in float32, streamed with prefetch, its
    quantized layers run as `backend` says (and checked to have run so). A folder without
    quantized layers runs the same either way: computed once."""
    if not read_manifest(folder).quantization:
        backend = "expanded"
    if (folder, backend) not in PERPLEXITIES:
        PERPLEXITIES[folder, backend] = _perplexity(folder, backend)
    return PERPLEXITIES[folder, backend]


def _perplexity(folder: Path, backend: str) -> float:
    from runtime.lowbit import PackedLinear

    with LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", prefetch=1, max_cpu_memory=0,
                                      packed=backend != "expanded") as lm:
        packed = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
        if read_manifest(folder).quantization and backend != "expanded":
            assert len(packed) == 7 * lm.config.num_hidden_layers
            assert {m.spec.backend for m in packed} == {backend}
            assert all((m.native is not None) == (backend == "native") for m in packed)  # what forward calls
        else:
            assert not packed
        return float(torch.tensor(mean_nll(lm, TEXT.read_text())).exp())


@pytest.mark.slow
@pytest.mark.parametrize("kernel_backend", ["expanded", "packed"], indirect=True)
def test_smollm2_perplexity_int8_and_int4(smollm2_quantized, kernel_backend):
    """float32 vs int8 vs int4 group 32 on the CPU with prefetch on: expanded to
    float32, or packed through the project's kernels (activations quantized per block of 32)
    where they build, else torch's weight-only ones (bfloat16 activations in those layers; the
    next test runs those on int4 where the project's build)."""
    ppl = {name: smollm2_perplexity(folder, kernel_backend) for name, folder in smollm2_quantized.items()}
    assert 5 < ppl["float32"] < 40, ppl  # the model reads English
    assert ppl["int8"] <= 1.01 * ppl["float32"], ppl
    assert ppl["int4"] <= 1.02 * ppl["float32"], ppl


@pytest.mark.slow
@pytest.mark.parametrize("kernel_backend", ["native"], indirect=True)
def test_smollm2_native_int4_costs_at_most_half_a_percent_over_weight_only(smollm2_quantized, kernel_backend,
                                                                            monkeypatch):
    """Quantizing the activations per block of 32 (the project's int4 kernel) costs at most +0.5%
    perplexity over torch's weight-only kernel on the same folder (issue 26: it cost +1.1%, from
    the zero term summing x unquantized, see lowbit_cpu.c)."""
    from runtime import native

    ours = smollm2_perplexity(smollm2_quantized["int4"], "native")
    monkeypatch.setenv("RESHARD_NATIVE", "0")
    native.lowbit.cache_clear()
    weight_only = smollm2_perplexity(smollm2_quantized["int4"], "torch")
    assert ours <= 1.005 * weight_only, (ours, weight_only)


def test_smollm2_int4_generates_as_transformers_does_with_the_same_weights(small_smollm2_checkpoint,
                                                                          small_smollm2_int4_converted):
    """SmolLM2's first 2 layers at int4 (group 32), streamed with prefetch, expanded: transformers'
    greedy tokens on the same quantize -> dequantize weights."""
    folder = small_smollm2_int4_converted
    lm = LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", prefetch=1, max_cpu_memory=0,
                                      packed=False)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    got, got_logits = lm.generate(ids, max_new_tokens=6, do_sample=False), lm(ids).logits
    lm.close()
    ref = quantized_reference(small_smollm2_checkpoint, folder)
    with torch.no_grad():
        want, want_logits = ref.generate(ids, max_new_tokens=6, do_sample=False), ref(ids).logits
    assert got.tolist() == want.tolist()
    assert torch.equal(got_logits, want_logits)
    assert lm.stats.layer_loads > 0 and lm.prefetcher.depth == 1
