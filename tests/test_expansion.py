"""The compiled expansion of quantized weights (runtime/expansion.py), run on the CPU's Inductor:
many weight shapes compile into a few graphs that equal plain torch bit for bit, and a weight
past the recompile limit expands with plain torch, said once on stderr and counted in --stats."""

from __future__ import annotations

import pytest
import torch

from reshard.quant import dequantize, quantize
from runtime import expansion

# A model's weight shapes (q/k/v/o, gate/up/down, heads; a ragged last int4 group among them):
# compiled per shape, the 9th would reach torch's default recompile limit of 8.
SHAPES = [(64, 128), (96, 256), (32, 64), (48, 160), (80, 96), (16, 320), (112, 64), (64, 200), (128, 128),
          (24, 96), (40, 256), (8, 1000)]


@pytest.fixture
def on_cpu(monkeypatch):
    """The compiled expansion on the CPU too, with this test's fallback count and messages."""
    monkeypatch.setattr(expansion, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(expansion, "_state", {"compiled": {}, "failed": set(), "limit_said": False, "fallbacks": 0})
    monkeypatch.delenv("RUNTIME_COMPILE_EXPANSION", raising=False)


def _parts(rows, cols, scheme, dtype, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize(w.to(dtype), scheme, group=32)


def test_many_shapes_compile_and_equal_plain_torch(on_cpu, capfd):
    from torch._dynamo.utils import counters

    from runtime.stream import StreamStats

    graphs = counters["stats"]["unique_graphs"]
    for scheme in ("int8", "int4"):
        for n, (rows, cols) in enumerate(SHAPES):
            parts = _parts(rows, cols, scheme, torch.bfloat16, seed=n)
            got = expansion.expand_weight(parts, scheme, columns=cols, dtype=torch.bfloat16)
            assert torch.equal(got, dequantize(parts, scheme, columns=cols, dtype=torch.bfloat16)), (scheme, rows, cols)
    # int8 one graph, int4 two (ragged last group or not), where compiling per shape made 24
    assert counters["stats"]["unique_graphs"] - graphs <= 4
    assert expansion.fallbacks() == 0 and StreamStats().as_dict()["expansion_fallbacks"] == 0
    assert "runtime:" not in capfd.readouterr().err  # never gave up, nothing to say


def test_past_the_recompile_limit_plain_torch_said_once_and_counted(on_cpu, monkeypatch, capfd):
    from runtime.stream import StreamStats

    parts = _parts(64, 128, "int8", torch.bfloat16)
    expansion.expand_weight(parts, "int8", columns=128, dtype=torch.bfloat16)  # at least one graph exists
    monkeypatch.setattr(expansion, "RECOMPILE_LIMIT", 1)
    for n, (rows, cols) in enumerate([(48, 160), (40, 256)]):  # float16 int4: a graph no other test made
        new = _parts(rows, cols, "int4", torch.float16, seed=n)
        got = expansion.expand_weight(new, "int4", columns=cols, dtype=torch.float16)
        assert torch.equal(got, dequantize(new, "int4", columns=cols, dtype=torch.float16))
    assert expansion.fallbacks() == 2 and StreamStats().as_dict()["expansion_fallbacks"] == 2
    said = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("runtime:")]
    assert said == ["runtime: the compiled expansion of quantized weights reached its limit of 1 graphs; weights "
                    "of new shapes expand with plain torch (same numbers, slower)"]
    # the limit gives up on new shapes only: the compiled expansion stays on for the others
    assert expansion.compiled_dequantize() is not None


def test_a_compiler_failure_is_said_once_and_every_later_weight_counted(on_cpu, monkeypatch, capfd):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)  # what torch.compile gives fails
    parts = _parts(32, 64, "int4", torch.bfloat16)
    want = dequantize(parts, "int4", columns=64, dtype=torch.bfloat16)
    for _ in range(3):
        assert torch.equal(expansion.expand_weight(parts, "int4", columns=64, dtype=torch.bfloat16), want)
    assert expansion.fallbacks() == 3
    assert capfd.readouterr().err.splitlines() == [
        "runtime: compiled expansion of quantized weights failed (RuntimeError: no working C++ compiler); "
        "expanding with plain torch"]
    expansion.expand_weight(parts, "int4", columns=64, dtype=torch.float32)  # float32 is plain by design
    assert expansion.fallbacks() == 3 and expansion.compiled_dequantize() is None  # given up: off for good


@pytest.mark.slow  # compiles two graphs (about 10 s on a busy 2-core machine)
def test_repacked_gguf_schemes_compile_and_equal_plain_torch(on_cpu):
    """GGUF Q8_0 and Q4_0 re-packed (int8 with group scales, int4-sym: reshard/ggml_repack.py)
    compile too, and equal plain torch bit for bit in half precision (one graph each: a graph per
    scheme and dtype, so each half precision once)."""
    from reshard.ggml_repack import repack_blocks

    gen = torch.Generator().manual_seed(3)
    for scheme, nbytes, dtype in (("q8_0", 34, torch.bfloat16), ("q4_0", 18, torch.float16)):
        raw = torch.randint(0, 256, (48 * 4, nbytes), dtype=torch.uint8, generator=gen)
        raw[:, :2] = (torch.randn(len(raw), 1, generator=gen) * 0.02).half().view(torch.uint8)
        stored, parts = repack_blocks(raw.reshape(48, -1), scheme)
        got = expansion.expand_weight(parts, stored, columns=128, dtype=dtype)
        assert torch.equal(got, dequantize(parts, stored, columns=128, dtype=dtype)), (scheme, dtype)
    assert expansion.fallbacks() == 0


def _blocks(scheme, rows, per_row, seed=0):
    from gguf_files import random_blocks

    return {"blocks": torch.from_numpy(random_blocks(scheme, rows, per_row, scale=0.02, seed=seed))}


def test_gguf_blocks_compile_once_for_every_shape_and_equal_plain_torch(on_cpu, capfd):
    """Q4_K blocks of a model's weight shapes: one graph (the blocks alone, their number dynamic; a
    single block is torch's own case),
    equal to plain torch bit for bit though compiled code may fuse the multiply and subtract."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for n, (rows, per_row) in enumerate([(64, 2), (96, 1), (40, 5), (8, 3), (1, 1), (128, 4)]):
        parts = _blocks("q4_k", rows, per_row, seed=n)
        got = expansion.expand_weight(parts, "q4_k", columns=256 * per_row, dtype=torch.bfloat16)
        assert got.shape == (rows, 256 * per_row)
        assert torch.equal(got, dequantize(parts, "q4_k", columns=256 * per_row, dtype=torch.bfloat16)), (rows, per_row)
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # any number of blocks; a single block (torch's own case)
    assert expansion.fallbacks() == 0 and "runtime:" not in capfd.readouterr().err


def test_a_failure_of_the_blocks_compile_leaves_the_other_weights_compiled(on_cpu, monkeypatch, capfd):
    """GGUF blocks' graph failing turns off that compiled function alone: int4 weights still compile."""
    from reshard.ggml_quants import expand_blocks

    real = torch.compile

    def compile_but_blocks(fn, **options):
        if fn is expand_blocks:
            def broken(*args, **kwargs):
                raise RuntimeError("triton: unsupported bitcast")
            return broken
        return real(fn, **options)

    monkeypatch.setattr(torch, "compile", compile_but_blocks)
    parts = _blocks("q6_k", 16, 2)
    for _ in range(2):
        got = expansion.expand_weight(parts, "q6_k", columns=512, dtype=torch.bfloat16)
        assert torch.equal(got, dequantize(parts, "q6_k", columns=512, dtype=torch.bfloat16))
    assert expansion.fallbacks() == 2
    assert capfd.readouterr().err.splitlines() == [
        "runtime: compiled expansion of GGUF blocks failed (RuntimeError: triton: unsupported bitcast); "
        "expanding with plain torch"]
    assert expansion.compiled_dequantize() is not None  # int4, int8, fp8 ... still compile
    int4 = _parts(64, 128, "int4", torch.bfloat16)
    expansion.expand_weight(int4, "int4", columns=128, dtype=torch.bfloat16)
    assert expansion.fallbacks() == 2


@pytest.mark.slow  # compiles a graph per GGML type (2-4 s each on 2 cores)
@pytest.mark.parametrize("scheme", ["q2_k", "q3_k", "q5_k", "q6_k", "iq4_xs", "q5_0", "iq2_xxs", "iq2_s", "iq3_s",
                                    "iq1_m", "tq1_0", "mxfp4_blocks"])
def test_gguf_block_types_compile_and_equal_plain_torch(on_cpu, scheme):
    """One of each family: K-quants, legacy 5-bit, IQ4, the grid types (their tables looked up in
    the graph), ternary, MXFP4 (q4_k: the test above)."""
    for n, (rows, per_row) in enumerate([(48, 2), (24, 3)]):
        parts = _blocks(scheme, rows, per_row, seed=n)
        columns = per_row * expansion.BLOCK_TYPES[scheme][1]
        got = expansion.expand_weight(parts, scheme, columns=columns, dtype=torch.bfloat16)
        assert torch.equal(got, dequantize(parts, scheme, columns=columns, dtype=torch.bfloat16)), (scheme, rows)
    assert expansion.fallbacks() == 0
