"""The project's C kernels (runtime/native.py, runtime/kernels/lowbit_cpu.c): their products
equal the same math done in torch, the build is cached and atomic, and where they cannot run the
quantized layers fall back to torch's kernels. The math tests need an x86 CPU with AVX512-VNNI
and a C compiler (CI's machine has both); the fallback tests run everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reshard.quant import dequantize, quantize
from runtime import lowbit, native
from runtime.lowbit import PackedLinear, PackSpec

needs_kernels = pytest.mark.skipif(native.lowbit() is None,
                                   reason="needs a C compiler and an x86 CPU with AVX512-VNNI")


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: per block of 32 values, scale max|x| / 127, rounded to nearest even."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).view(m, k)


@needs_kernels
@pytest.mark.parametrize("n,k", [(96, 256), (7, 64), (300, 5632), (256, 576)])
def test_int8_kernel_is_the_integer_math(n, k):
    torch.manual_seed(0)
    parts = quantize(torch.randn(n, k) * 0.05, "int8")
    x = torch.randn(6, k)  # a block of four activation rows and two after it
    got = native.int8_gemm(x, parts["qweight"], parts["scales"].float()).double()
    w = dequantize(parts, "int8", columns=k, dtype=torch.float64)
    want = quantized_activations(x).double() @ w.T
    # float32 sums of exact integer dots, less the one correction per activation row (see lowbit_cpu.c)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    exact = x.double() @ w.T  # against unquantized activations: the price of the 32-value blocks
    assert 1e-4 < ((got - exact).abs().max() / exact.abs().max()).item() < 2e-2


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,group", [(64, 2048, 32), (9, 320, 32), (300, 5632, 64), (64, 2048, 128), (7, 64, 32)])
def test_int4_kernel_is_the_integer_math(n, k, group, dtype):
    """Full chunks of 256 values and tails shorter than that, groups of 32 to 128, every scale dtype."""
    torch.manual_seed(0)
    parts = quantize((torch.randn(n, k) * 0.05).to(dtype), "int4", group=group)
    x = torch.randn(6, k)  # a block of four activation rows and two after it
    got = native.int4_gemm(x, parts["qweight"], native.int4_scales(parts["scales"], parts["zeros"], group),
                           group).double()
    q = torch.stack([parts["qweight"] & 15, parts["qweight"] >> 4], -1).view(n, k).double()
    scaled = q * parts["scales"].double().repeat_interleave(group, 1)
    sums = x.double().view(6, k // group, group).sum(-1)  # the zero's term uses x's exact sums
    want = quantized_activations(x).double() @ scaled.T + sums @ parts["zeros"].double().T
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-6


@needs_kernels
def test_results_do_not_depend_on_the_thread_count():
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


@needs_kernels
@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_native_packed_linear_is_close_to_the_expanded_weight(scheme, group):
    torch.manual_seed(0)
    w, b = torch.randn(96, 256) * 0.05, torch.randn(96)
    spec = PackSpec(scheme, group, 96, 256, "native", torch.float32)
    layer = nn.Linear(256, 96)
    layer.bias = nn.Parameter(b, requires_grad=False)
    packed = PackedLinear(layer, spec)
    weight, scales = lowbit.pack_param(quantize(w, scheme, group=group or 32), spec)
    assert weight.nbytes + scales.nbytes == lowbit.packed_nbytes(spec)
    packed.weight, packed.qscales = nn.Parameter(weight, requires_grad=False), nn.Parameter(scales, requires_grad=False)
    expanded = dequantize(quantize(w, scheme, group=group or 32), scheme, columns=256, dtype=torch.float32)
    for x in (torch.randn(1, 1, 256), torch.randn(3, 5, 256).bfloat16()):
        with torch.inference_mode():
            got = packed(x)
        want = x.float() @ expanded.T + b
        assert got.shape == want.shape and got.dtype == torch.promote_types(x.dtype, b.dtype)
        assert (got.float() - want).abs().max() / want.abs().max() < 2e-2


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


@needs_kernels
def test_the_build_is_cached_by_source_compiler_and_cpu(fresh):
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


@needs_kernels
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_in_and_out_is_float32_rounded_once(scheme):
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
