"""The project's C kernels (runtime/native.py, runtime/kernels/lowbit_cpu.c): their products
equal the same math done in torch, bit for bit where it is integer math and within float32's
rounding where it is not; the build is cached and atomic, in a folder no one else can write; and
where they cannot run the quantized layers fall back to torch's kernels. The kernel tests need an
x86 CPU with AVX512-VNNI and a C compiler (CI's machine has both) and build on first use (the
`kernels` fixture, tests/conftest.py); the reference math and the fallback tests run everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reshard.quant import dequantize, quantize
from runtime import lowbit, native
from runtime.lowbit import PackedLinear, PackSpec

U = 2.0 ** -24  # float32's unit roundoff: one rounding moves a value by at most U times itself


# --- the reference: the kernels' math in torch, float64 where they are exact --------------------

def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq (M, K), d (M, K/32)): x quantized as lowbit_cpu.c's quantize_row does, bit for bit: per
    block of 32 values d = amax / 127 and xq = x * (127 / amax) rounded half to even, every step
    one float32 operation. (torch's `127 / t` is `t.reciprocal() * 127`, two roundings: one ulp off
    the kernel's `127.f / amax`, which moves a value sitting near .5 to the other integer.)"""
    m, k = x.shape
    blocks = x.float().view(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    d = amax.div(torch.full_like(amax, 127.0))
    return torch.round(blocks * inv).view(m, k), d.view(m, k // 32)


def dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    """xq * d, exactly (in float64): the activations the kernels' products are of."""
    xq, d = quantized_activations(x)
    return xq.double() * d.double().repeat_interleave(32, dim=1)


def int4_parts(parts: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * scale, zero) per weight value (N, K), in float64 (exact): the int4 kernel's two terms."""
    n, group = parts["qweight"].shape[0], k // parts["scales"].shape[1]
    q = torch.stack([parts["qweight"] & 15, parts["qweight"] >> 4], -1).view(n, k).double()
    return q * parts["scales"].double().repeat_interleave(group, 1), parts["zeros"].double().repeat_interleave(group, 1)


def reference(x: torch.Tensor, parts: dict, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(want, bound), (M, N) float64: the exact product of the quantized activations with the weights,
    and how far float32 sums of its terms may lie from it: each term rounded at most n = K/32 + 16
    times (the longest chain of roundings in either kernel: its running sums over blocks, horizontal
    adds, scale products), so |got - want| <= n * U * sum |terms| (to first order; n * U < 1e-4)."""
    k = x.shape[1]
    xdq = dequantized_activations(x)
    n = k / 32 + 16
    if scheme == "int8" and parts["scales"].dim() == 2:  # a scale per block of 32 (a GGUF's Q8_0)
        q, wscale = parts["qweight"].double(), parts["scales"].double().repeat_interleave(32, dim=1)
        want = xdq @ (q * wscale).T
        terms = xdq.abs() @ ((q + 128).abs() * wscale).T + 128 * xdq.abs() @ wscale.T
    elif scheme == "int8":
        q, wscale = parts["qweight"].double(), parts["scales"].double()
        want = (xdq @ q.T) * wscale
        # the kernel sums (q + 128) * xq and takes off 128 * xq's sum (see lowbit_cpu.c)
        terms = (xdq.abs() @ (q + 128).abs().T + 128 * xdq.abs().sum(1, keepdim=True)) * wscale
    else:
        qs, zero = int4_parts(parts, k)
        want = xdq @ (qs + zero).T
        terms = xdq.abs() @ (qs.abs() + zero.abs()).T
    return want, n * U * terms + U * want.abs()  # and y's own rounding to float32


def test_the_reference_rounds_as_the_kernel_does():
    """Checked against numpy's float32 arithmetic, operation by operation as quantize_row does it,
    on values where torch's `127 / amax` would round differently (no kernel needed)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2048, generator=g)
    xq, d = quantized_activations(x)
    xb = x.numpy().reshape(64, 64, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.float32(127) / amax
    assert inv.dtype == np.float32
    assert np.array_equal(xq.numpy().reshape(xb.shape), np.rint(xb * inv))
    assert np.array_equal(d.numpy(), (amax / np.float32(127)).reshape(64, 64))
    amax_t = torch.from_numpy(amax)
    assert (127 / amax_t != torch.from_numpy(inv)).any()  # torch's rounding differs here: the test can tell
    assert xq.abs().max() == 127 and (xq == xq.round()).all()


def test_int4_scales_table_lists_blocks_as_the_kernel_sums_them():
    """Per row: K/32 block scales (every block its group's, chunks of 256 values in the order
    0, 2, 4, 6, 1, 3, 5, 7, a tail in order), then the K/group zeros (no kernel needed)."""
    n, k, group = 3, 320, 64  # one chunk of 256 values and a tail of 64
    scales = torch.arange(n * k // group, dtype=torch.float32).view(n, k // group)
    zeros = -scales - 0.5
    table = native.int4_scales(scales, zeros, group)
    assert table.shape == (n, k // 32 + k // group)
    blocks = scales.repeat_interleave(group // 32, dim=1)  # (n, 10): block b's scale
    order = list(native.BLOCK_ORDER) + [8, 9]
    assert torch.equal(table[:, : k // 32], blocks[:, order])
    assert torch.equal(table[:, k // 32:], zeros)


# --- the kernels against the reference --------------------------------------------------------

def run_kernel(x: torch.Tensor, parts: dict, scheme: str, group: int) -> torch.Tensor:
    if scheme == "int8":
        return native.int8_gemm(x, parts["qweight"], parts["scales"].float())
    return native.int4_gemm(x, parts["qweight"], native.int4_scales(parts["scales"], parts["zeros"], group), group)


def assert_within_rounding(got: torch.Tensor, x: torch.Tensor, parts: dict, scheme: str) -> None:
    want, bound = reference(x, parts, scheme)
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"{(err / bound).max().item():.2f} times the float32 rounding bound"


@pytest.mark.parametrize("n,k", [(96, 256), (7, 64), (300, 5632), (256, 576)])
def test_int8_kernel_is_the_integer_math(n, k, kernels):
    torch.manual_seed(0)
    parts = quantize(torch.randn(n, k) * 0.05, "int8")
    x = torch.randn(6, k)  # a block of four activation rows and two after it
    got = native.int8_gemm(x, parts["qweight"], parts["scales"].float())
    assert_within_rounding(got, x, parts, "int8")
    w = dequantize(parts, "int8", columns=k, dtype=torch.float64)
    exact = x.double() @ w.T  # against unquantized activations: the price of the 32-value blocks, not zero
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,group", [(64, 2048, 32), (9, 320, 32), (300, 5632, 64), (64, 2048, 128), (7, 64, 32)])
def test_int4_kernel_is_the_integer_math(n, k, group, dtype, kernels):
    """Full chunks of 256 values and tails shorter than that, groups of 32 to 128, every scale dtype."""
    torch.manual_seed(0)
    parts = quantize((torch.randn(n, k) * 0.05).to(dtype), "int4", group=group)
    x = torch.randn(6, k)  # a block of four activation rows and two after it
    assert_within_rounding(run_kernel(x, parts, "int4", group), x, parts, "int4")


def test_random_shapes_are_the_integer_math(kernels):
    """Seeded random shapes (batch, rows, K, group, scale dtype, weights off centre), among them the
    one where the old reference's rounding of 127 / amax showed (m=9, n=29, k=2048, g=64)."""
    rng = np.random.default_rng(26)
    shapes = [(9, 29, 2048, 64, torch.float32)] + [
        (int(rng.integers(1, 12)), int(rng.integers(1, 70)), 64 * int(rng.integers(1, 48)),
         int(rng.choice([32, 64, 128])), [torch.float16, torch.bfloat16, torch.float32][rng.integers(3)])
        for _ in range(24)]
    for i, (m, n, k, group, dtype) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        group = group if k % group == 0 else 32
        w = torch.randn(n, k, generator=g) * 0.05 + float(rng.uniform(-0.05, 0.05))
        x = torch.randn(m, k, generator=g) * float(rng.uniform(0.1, 10))
        for scheme in ("int8", "int4"):
            parts = quantize(w.to(dtype), scheme, group=group)
            assert_within_rounding(run_kernel(x, parts, scheme, group), x, parts, scheme)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_an_empty_batch_gives_an_empty_result(scheme, kernels):
    """M = 0 (no rows to run): an empty (0, N) result in x's dtype, as torch's matmul gives."""
    parts = quantize(torch.randn(40, 128) * 0.05, scheme, group=32)
    for dtype in (torch.float32, torch.bfloat16):
        got = run_kernel(torch.empty(0, 128, dtype=dtype), parts, scheme, 32)
        assert got.shape == (0, 40) and got.dtype == dtype
    spec = PackSpec(scheme, 32 if scheme == "int4" else 0, 40, 128, "native", torch.float32)
    packed = PackedLinear(nn.Linear(128, 40), spec)
    weight, scales = lowbit.pack_param(parts, spec)
    packed.weight, packed.qscales = nn.Parameter(weight, requires_grad=False), nn.Parameter(scales, requires_grad=False)
    x = torch.empty(0, 5, 128)
    assert packed(x).shape == nn.Linear(128, 40)(x).shape == (0, 5, 40)


def q8_0_parts(n: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """int8 values with a float16 scale per block of 32 columns: a GGUF's Q8_0 as reshard/ggml_repack.py stores it."""
    g = torch.Generator().manual_seed(seed)
    return {"qweight": torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
            "scales": (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half()}


@pytest.mark.parametrize("m,n,k", [(1, 96, 256), (6, 7, 64), (5, 300, 5632), (4, 256, 576)])
def test_int8_kernel_with_block_scales_is_the_integer_math(m, n, k, kernels):
    parts = q8_0_parts(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    got = native.int8_gemm(x, parts["qweight"], parts["scales"].float())
    assert_within_rounding(got, x, parts, "int8")
    per_row = native.int8_gemm(x, parts["qweight"], parts["scales"][:, 0].float().contiguous())  # the block scales matter
    assert not torch.allclose(got, per_row, rtol=1e-3)
    bf16 = native.int8_gemm(x.bfloat16(), parts["qweight"], parts["scales"].float())
    rounded_in = native.int8_gemm(x.bfloat16().float(), parts["qweight"], parts["scales"].float())
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, rounded_in.bfloat16())  # bfloat16 in and out
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.int8_gemm(x, parts["qweight"], parts["scales"].float()), got)
    finally:
        torch.set_num_threads(threads)


def test_q8_0_packed_linear_runs_its_block_scales(kernels):
    spec = PackSpec("int8", 32, 96, 256, "native", torch.float16)
    assert lowbit.supported(spec) and not lowbit.supported(PackSpec("int8", 32, 96, 256, "torch"))
    parts = q8_0_parts(96, 256, seed=2)
    weight, scales = lowbit.pack_param(parts, spec)
    assert weight.nbytes + scales.nbytes == lowbit.packed_nbytes(spec) and scales.shape == (96, 8)
    packed = PackedLinear(nn.Linear(256, 96, bias=False), spec)
    packed.weight, packed.qscales = nn.Parameter(weight, requires_grad=False), nn.Parameter(scales, requires_grad=False)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert_within_rounding(packed(x), x, parts, "int8")


def test_results_do_not_depend_on_the_thread_count(kernels):
    torch.manual_seed(0)
    parts = quantize(torch.randn(512, 1024) * 0.05, "int8")
    x = torch.randn(2, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int8_gemm(x, parts["qweight"], parts["scales"].float())
        torch.set_num_threads(max(2, threads))
        assert torch.equal(native.int8_gemm(x, parts["qweight"], parts["scales"].float()), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_native_packed_linear_is_the_expanded_weight_up_to_quantized_activations(scheme, group, kernels):
    torch.manual_seed(0)
    w, b = torch.randn(96, 256) * 0.05, torch.randn(96)
    spec = PackSpec(scheme, group, 96, 256, "native", torch.float32)
    layer = nn.Linear(256, 96)
    layer.bias = nn.Parameter(b, requires_grad=False)
    packed = PackedLinear(layer, spec)
    parts = quantize(w, scheme, group=group or 32)
    weight, scales = lowbit.pack_param(parts, spec)
    assert weight.nbytes + scales.nbytes == lowbit.packed_nbytes(spec)
    packed.weight, packed.qscales = nn.Parameter(weight, requires_grad=False), nn.Parameter(scales, requires_grad=False)
    expanded = dequantize(parts, scheme, columns=256, dtype=torch.float64)
    for x in (torch.randn(1, 1, 256), torch.randn(3, 5, 256).bfloat16()):
        with torch.inference_mode():
            got = packed(x)
        rows = x.reshape(-1, 256).float()
        want = rows.double() @ expanded.T + b.double()
        assert got.shape == (*x.shape[:-1], 96) and got.dtype == torch.promote_types(x.dtype, b.dtype)
        # quantizing x moves each value by at most half its block's step, d / 2; then the sums' float32
        # rounding (see reference) and b's float32 add; bfloat16 out: y rounded to 8 bits before b is added
        _, d = quantized_activations(rows)
        _, rounding = reference(rows, parts, scheme)
        bound = d.double().repeat_interleave(32, 1) / 2 @ expanded.abs().T + rounding + U * want.abs()
        if x.dtype == torch.bfloat16:
            bound += 2.0 ** -8 * (want - b.double()).abs()
        err = (got.reshape(-1, 96).double() - want).abs()
        assert (err <= bound).all(), (err / bound).max()
        assert (err > 0.05 * bound).any()  # the bound is not loose


def test_shapes_the_native_kernels_take():
    ok = lambda *a: lowbit.supported(PackSpec(*a, backend="native"))  # noqa: E731
    assert ok("int8", 0, 40, 128) and not ok("int8", 0, 40, 96)  # K % 64
    assert ok("int4", 32, 40, 320) and ok("int4", 64, 40, 128)  # any N; a tail of 64 values
    assert not ok("int4", 48, 40, 192) and not ok("int4", 128, 40, 192)  # group % 32, K % group


# --- building and falling back ----------------------------------------------------------------

@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """native.lowbit() built anew into an empty per-user cache, and forgotten again afterwards;
    the model cache is elsewhere, shared by a group."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o775)
    shared.chmod(0o775)  # a team's model cache
    monkeypatch.setenv("RESHARD_CACHE", str(shared))
    native.lowbit.cache_clear()
    yield tmp_path / "user" / "reshard-kernels"
    native.lowbit.cache_clear()


@pytest.fixture
def tiny_source(tmp_path):
    """A C file that compiles in a blink, for the tests of where builds go (no kernel math needed)."""
    src = tmp_path / "tiny.c"
    src.write_text("int reshard_tiny(void) { return 7; }\n")
    return src


def compiler() -> str:
    import shutil

    return shutil.which("cc") or shutil.which("gcc") or pytest.skip("needs a C compiler")


def test_kernels_are_built_into_a_private_per_user_folder_not_the_model_cache(fresh, tiny_source, capsys):
    built = native.build(tiny_source, compiler())
    assert built.parent == fresh and built.is_file()
    assert fresh.stat().st_mode & 0o777 == 0o700  # created private
    assert built.stat().st_mode & 0o022 == 0  # whatever the umask, no one else may write it
    assert not any((fresh.parent.parent / "shared").rglob("*"))  # the group-shared model cache gets nothing
    assert native.build(tiny_source, compiler()) == built  # loaded again from there: it is private
    assert capsys.readouterr().err == ""


def as_if_owned_by(other_uid: int, path, monkeypatch) -> None:
    """os.lstat reports `path` as another user's (tests run as root, and chown needs root anyway)."""
    import os

    real = os.lstat

    def lstat(p, *a, **k):
        st = real(p, *a, **k)
        if os.fspath(p) != os.fspath(path):
            return st
        fields = list(st[:10])
        fields[4] = other_uid  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)


def assert_refused_and_rebuilt(first, second, capsys) -> None:
    assert second != first and second.parent != first.parent  # built afresh, elsewhere
    assert native.private(second) and native.private(second.parent)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("runtime: not loading CPU kernels from "), err
    assert "for this process instead" in err[0]


def test_a_cached_kernel_owned_by_another_user_is_not_loaded(fresh, tiny_source, monkeypatch, capsys):
    import os

    first = native.build(tiny_source, compiler())
    capsys.readouterr()
    as_if_owned_by(os.geteuid() + 1, first, monkeypatch)
    assert_refused_and_rebuilt(first, native.build(tiny_source, compiler()), capsys)


def test_a_kernel_folder_owned_by_another_user_is_not_used(fresh, tiny_source, monkeypatch, capsys):
    import os

    first = native.build(tiny_source, compiler())
    capsys.readouterr()
    as_if_owned_by(os.geteuid() + 1, fresh, monkeypatch)
    assert_refused_and_rebuilt(first, native.build(tiny_source, compiler()), capsys)


@pytest.mark.parametrize("what,mode", [("file", 0o720), ("file", 0o702), ("folder", 0o770), ("folder", 0o707)])
def test_a_kernel_or_folder_others_can_write_is_not_loaded(what, mode, fresh, tiny_source, capsys):
    first = native.build(tiny_source, compiler())
    capsys.readouterr()
    (first if what == "file" else fresh).chmod(mode)
    assert_refused_and_rebuilt(first, native.build(tiny_source, compiler()), capsys)


def test_the_build_is_cached_by_source_compiler_and_cpu(fresh, kernels):
    assert native.lowbit() is not None
    [built] = fresh.glob("lowbit_cpu-*.so")
    stamp = built.stat().st_mtime_ns
    native.lowbit.cache_clear()
    assert native.lowbit() is not None
    assert list(fresh.iterdir()) == [built] and built.stat().st_mtime_ns == stamp  # no rebuild, no leftovers


def test_a_failed_build_says_so_once_and_torch_runs_the_layers(fresh, monkeypatch, capsys, tiny_checkpoints, tmp_path):
    from reshard.convert import convert
    from runtime import LayeredModel

    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    folder = tmp_path / "q"
    convert(str(tiny_checkpoints["llama"]), folder, quantize="int8", progress=False)
    capsys.readouterr()
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory="1GiB") as lm:  # resident
        backends = {m.spec.backend for m in lm.model.modules() if isinstance(m, PackedLinear)}
        lm(torch.tensor([[5, 9, 17]]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("runtime: could not build the CPU kernels"), err
    assert "torch's kernels instead" in err[0]
    assert backends == ({"torch"} if lowbit.kernels_available() else set())
    assert not list(fresh.glob("*.so"))  # nothing half-written left behind


def test_reshard_native_0_turns_the_kernels_off(fresh, monkeypatch):
    monkeypatch.setenv("RESHARD_NATIVE", "0")
    assert native.lowbit() is None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_in_and_out_is_float32_rounded_once(scheme, kernels):
    """bfloat16 activations go in and come out as they are: the float32 product of the same
    values, rounded to bfloat16 once (no copies of x or y in torch around the call)."""
    torch.manual_seed(0)
    parts = quantize(torch.randn(80, 320) * 0.05, scheme, group=32)
    x = torch.randn(4, 320).bfloat16()
    if scheme == "int8":
        run = lambda v: native.int8_gemm(v, parts["qweight"], parts["scales"].float())  # noqa: E731
    else:
        sz = native.int4_scales(parts["scales"], parts["zeros"], 32)
        run = lambda v: native.int4_gemm(v, parts["qweight"], sz, 32)  # noqa: E731
    got = run(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, run(x.float()).bfloat16())
