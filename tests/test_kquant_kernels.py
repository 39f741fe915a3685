"""The native kernels for GGML's K-quant blocks (runtime/kernels/kquant_cpu.c: Q2_K to Q6_K and IQ4_XS) and
grid blocks (iquant_cpu.c: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S): weights multiplied as a .gguf file stores them. Their products are the exact product of the activations
quantized per block of 32 (as for the int4 kernel, tests/test_native.py) with the weights as the
gguf package de-quantizes them, within float32's rounding; a PackedLinear runs them so, holding the
blocks alone. Needs an x86 CPU with AVX512-VNNI and a C compiler (CI's machine has both)."""

from __future__ import annotations

import pytest
import gguf_files
import torch
from gguf import GGMLQuantizationType as Q, dequantize
from test_native import U, dequantized_activations
from torch import nn

from reshard.ggml_quants import BLOCK_TYPES
from runtime import native
from runtime.lowbit import PackedLinear, PackSpec, pack_param, packed_nbytes, supported

TYPES = {"q2_k": Q.Q2_K, "q3_k": Q.Q3_K, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "iq4_xs": Q.IQ4_XS,
         "iq2_xxs": Q.IQ2_XXS, "iq3_xxs": Q.IQ3_XXS, "iq3_s": Q.IQ3_S, "iq2_xs": Q.IQ2_XS,
         "iq2_s": Q.IQ2_S, "iq1_s": Q.IQ1_S, "iq1_m": Q.IQ1_M, "tq1_0": Q.TQ1_0, "tq2_0": Q.TQ2_0, "iq4_nl": Q.IQ4_NL, "mxfp4_blocks": Q.MXFP4,
         "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}
# from iq2_xxs on: runtime/kernels/iquant_cpu.c (the last four in blocks of 32: any K % 32 == 0)
BLOCKS32 = ("iq4_nl", "mxfp4_blocks", "q5_0", "q5_1")
VALUE_BYTES = {"q2_k": (16, 80), "q4_k": (16, 144), "q5_k": (16, 176), "q5_1": (4, 24)}  # each block's bytes of q (with mins)


def random_blocks(scheme: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k / 256 * block bytes) random blocks of `scheme` whose float16 scales are finite, of both
    signs (every other byte random: 6-bit scales and mins, nibbles, Q6_K's int8 scales)."""
    return torch.from_numpy(gguf_files.random_blocks(scheme, n, k // BLOCK_TYPES[scheme][1], scale=0.02, seed=seed))


def gguf_weight(blocks: torch.Tensor, scheme: str) -> torch.Tensor:
    """The (N, K) weight as the gguf package de-quantizes the blocks (float32 values), in float64."""
    return torch.from_numpy(dequantize(blocks.numpy(), TYPES[scheme])).double()


def assert_within_rounding(got: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, scheme: str) -> None:
    """got equals the quantized activations times gguf's weights, up to float32 sums of the terms:
    each rounded at most K/32 + 16 times (as in tests/test_native.py). The terms are |x| times each
    weight's two parts: Q2_K's, Q4_K's and Q5_K's d * sc * q and dmin * m, Q5_1's d * q and m (the kernels
    sum them apart), the others' w."""
    k = x.shape[1]
    xdq = dequantized_activations(x)
    w = gguf_weight(blocks, scheme)
    want = xdq @ w.T
    if scheme in VALUE_BYTES:  # dmin * m of each group: the weight's value at q = 0, negated
        size, (first, end) = BLOCK_TYPES[scheme][2], VALUE_BYTES[scheme]
        zero_q = blocks.clone()
        zero_q[:, [b * size + i for b in range(k // BLOCK_TYPES[scheme][1]) for i in range(first, end)]] = 0
        mins = -gguf_weight(zero_q, scheme)
        terms = xdq.abs() @ ((w + mins).abs() + mins.abs()).T
    else:
        terms = xdq.abs() @ w.abs().T
    if scheme == "iq1_s":  # summed apart: d * s * grid and d * s * (+-1/8); |grid +- 1/8| >= 1/8, so each <= 9 |w|
        terms = 9 * terms
    bound = (k / 32 + 16) * U * terms + U * want.abs()
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"{(err / bound).max().item():.2f} times the float32 rounding bound"


@pytest.mark.parametrize("scheme,m,n,k", [(s, *shape) for s in TYPES for shape in [(1, 96, 256), (6, 40, 512), (5, 300, 2816)]]
                         + [(s, 5, 24, 2880) for s in BLOCKS32])  # rows of 90 blocks of 32: not whole blocks of 256
def test_k_quant_kernel_is_the_product_of_gguf_weights_with_quantized_activations(scheme, m, n, k, kernels):
    blocks = random_blocks(scheme, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))  # m = 6: a block of four rows, two after
    got = native.kquant_gemm(x, blocks, scheme)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert_within_rounding(got, x, blocks, scheme)
    exact = x.double() @ gguf_weight(blocks, scheme).T  # the price of quantizing x: not zero
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() > 1e-4
    rows = torch.cat([native.kquant_gemm(x[i:i + 1], blocks, scheme) for i in range(m)])
    assert torch.equal(rows, got)  # each row alone as in a block of four: the same bits
    threads = torch.get_num_threads()
    torch.set_num_threads(3 if threads == 1 else 1)
    try:
        assert torch.equal(native.kquant_gemm(x, blocks, scheme), got)  # whatever the thread count
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme", list(TYPES))
def test_k_quant_kernel_takes_and_gives_bfloat16(scheme, kernels):
    blocks = random_blocks(scheme, 64, 512, seed=3)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3)).bfloat16()
    got = native.kquant_gemm(x, blocks, scheme)
    assert got.dtype == torch.bfloat16
    want = native.kquant_gemm(x.float(), blocks, scheme).bfloat16()  # float32 inside, rounded once at the end
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheme", list(TYPES))
def test_packed_linear_holds_the_blocks_as_stored_and_runs_them(scheme, kernels):
    n, k = 48, 768
    blocks = random_blocks(scheme, n, k, seed=5)
    spec = PackSpec(scheme, 0, n, k, "native")
    whole = BLOCK_TYPES[scheme][1]  # K whole blocks of 256, or of 32
    assert supported(spec) and not supported(PackSpec(scheme, 0, n, 640 if whole == 256 else 650, "native"))
    assert not supported(PackSpec(scheme, 0, n, k, "torch"))  # torch has no kernel for them: they expand
    linear = nn.Linear(k, n, bias=True)
    module = PackedLinear(linear, spec)
    assert not hasattr(module, "qscales")
    (weight,) = pack_param({"blocks": blocks}, spec)
    assert weight.data_ptr() == blocks.data_ptr()  # the stored bytes themselves (a view of the mapped file)
    assert packed_nbytes(spec) == blocks.nbytes
    module.weight = nn.Parameter(weight, requires_grad=False)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = module(x)
    assert got.shape == (2, 3, n)
    want = native.kquant_gemm(x.reshape(6, k), blocks, scheme).view(2, 3, n) + linear.bias
    assert torch.equal(got, want)


@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avxvnni")], ids=["avx-vnni", "avx2"])
def test_the_block_kernels_run_on_avx2_alone_with_the_same_bits(flags, kernels, monkeypatch):
    """Built without AVX512 (as for a desktop CPU that has AVX2, with AVX-VNNI where this one has it,
    or without), the library says so (isa 2), its GGML block kernels give the AVX512-VNNI build's
    results bit for bit, and the int8/int4 kernels, which need AVX512-VNNI, are not offered: those
    weights go to torch's kernels."""
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    try:
        avx2 = native.load(native.build(native.SOURCES, compiler, flags))
    except subprocess.SubprocessError as e:  # a compiler without the flag (-mno-avxvnni: gcc 11 on)
        pytest.skip(f"{compiler} cannot build with {flags}: {str(e).strip().splitlines()[-1]}")
    assert avx2.reshard_lowbit_isa() == 2
    for scheme in sorted(native.BLOCK_SCHEMES):
        size = BLOCK_TYPES[scheme][1]
        k = 2816 if size == 256 else 2880
        blocks = random_blocks(scheme, 24, k, seed=7)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(7))
        assert torch.equal(native.kquant_gemm(x, blocks, scheme, lib=avx2), native.kquant_gemm(x, blocks, scheme)), scheme
    monkeypatch.setattr(native, "lowbit", lambda: avx2)
    assert not native.int_kernels()
    assert supported(PackSpec("q4_k", 0, 64, 256, "native")) and supported(PackSpec("iq2_xxs", 0, 64, 256, "native"))
    assert not supported(PackSpec("int4", 32, 64, 256, "native")) and not supported(PackSpec("int8", 0, 64, 256, "native"))
