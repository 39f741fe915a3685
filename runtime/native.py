"""The project's C kernels (runtime/kernels/*.c): built once per machine, loaded with ctypes.

Decode at batch 1 reads every weight once per token, so a quantized model is only as fast as
its matrix-vector products read bytes. torch's weight-only CPU kernels expand each weight to
floats first and run at about a third of the memory's speed (benchmarks/cpu_kernels.py);
`lowbit_cpu.c` quantizes the activations per block of 32, as llama.cpp does, and runs integer
dot products (AVX512-VNNI), at memory speed. runtime/lowbit.py uses it where it is available.

It is built with the machine's C compiler (`$CC`, else `cc`) for the CPU it runs on
(`-march=native`) into a per-user folder, `$XDG_CACHE_HOME/reshard-kernels` (default
~/.cache/reshard-kernels), created 0700, named by a hash of the source, the compiler and the
CPU, so a rebuild happens only when one of them changes. The build takes about a second; it is
written to a temporary name and renamed, so processes building at once never load a half-written
file. Loading a shared object runs its code, so the kernels are never kept in the model cache
(`$RESHARD_CACHE`, which teams share), and a file is loaded only if this user owns it and its
folder and no one else can write either (see `private`); otherwise the kernels are built into a
fresh private temporary folder for this process, and stderr says so once. OpenMP is the same
runtime torch loaded (torch's libgomp.so.1), so the two share one thread pool.

The int8/int4 kernels need AVX512-VNNI; the GGML block kernels (kquant_cpu.c, iquant_cpu.c) run on
AVX2 alone too (most desktop CPUs without AVX512), with the same bits (`int_kernels()` tells which).
Where there is no compiler, the build fails, the CPU has neither, or `RESHARD_NATIVE=0` is set,
`lowbit()` is None and the quantized layers run through torch's kernels; a failed build says so
once on stderr.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "lowbit_cpu.c", KERNELS / "kquant_cpu.c", KERNELS / "iquant_cpu.c")  # one library; their shared header: common.h
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
HALF_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # how the int4 kernel reads scales


def cache_dir() -> Path:
    """This user's kernel folder: $XDG_CACHE_HOME/reshard-kernels, else ~/.cache/reshard-kernels
    (never under $RESHARD_CACHE: a model cache may be shared, a folder of code to load must not be)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reshard-kernels"


def private(path: Path) -> bool:
    """Whether `path` (a regular file or a folder, not a link) is owned by this user and writable by
    no one else: the only files (and the only folder for them) whose code this process will run."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
    return kind_ok and st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


@functools.cache
def lowbit() -> ctypes.CDLL | None:
    """The loaded lowbit_cpu library, or None where it cannot run here (see the module docstring)."""
    if os.environ.get("RESHARD_NATIVE", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = load(build(SOURCES, compiler))
    except (OSError, subprocess.SubprocessError) as e:
        print(f"runtime: could not build the CPU kernels ({str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); "
              f"quantized layers run through torch's kernels instead", file=sys.stderr)
        return None
    if lib.reshard_lowbit_isa() not in (1, 2):
        return None  # this CPU has neither AVX512-VNNI nor AVX2
    global _lib
    _lib = lib
    return lib


def int_kernels() -> bool:
    """Whether the int8/int4 kernels run here too (AVX512-VNNI), not only the GGML block kernels
    (which AVX2 alone runs: reshard_lowbit_isa() 2)."""
    lib = lowbit()
    return lib is not None and lib.reshard_lowbit_isa() == 1


def load(path: Path) -> ctypes.CDLL:
    """A built lowbit_cpu library (of this source, or of another version: benchmarks/cpu_kernels.py
    compares them), its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.reshard_int8_gemm.argtypes = [ptr, i32, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.reshard_int4_gemm.argtypes = [ptr, i32, i64, i64, ptr, ptr, i32, i64, i64, ptr, i32]
    lib.reshard_int8_gemm.restype = lib.reshard_int4_gemm.restype = i32
    if hasattr(lib, "reshard_int8g_gemm"):  # an older version of the source (a benchmark's baseline) lacks it
        lib.reshard_int8g_gemm.argtypes = [ptr, i32, i64, i64, ptr, ptr, i64, ptr, i32]
        lib.reshard_int8g_gemm.restype = i32
    if hasattr(lib, "reshard_kquant_gemm"):  # an older version of the source (a benchmark's baseline) lacks it
        lib.reshard_kquant_gemm.argtypes = [ptr, i32, i64, i64, ptr, i32, i64, ptr, i32]
        lib.reshard_kquant_gemm.restype = i32
    if hasattr(lib, "reshard_iquant_gemm"):
        lib.reshard_iquant_gemm.argtypes = [ptr, i32, i64, i64, ptr, i32, ptr, ptr, i64, ptr, i32]
        lib.reshard_iquant_gemm.restype = i32
    return lib


_lib: ctypes.CDLL | None = None  # what lowbit() loaded, for the gemm functions (one lookup less per call)


def build(sources, compiler: str, flags: tuple[str, ...] = ()) -> Path:
    """`sources` (one C file or several, with the headers beside the first) compiled into one library
    in this user's kernel folder (or the copy already there): its path. Where the folder or the
    copy is not `private`, compiled into a fresh temporary folder instead."""
    sources = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    text = b"".join(p.read_bytes() for p in [*sources, *sorted(sources[0].parent.glob("*.h"))])
    key = hashlib.sha256(text + " ".join([compiler, *FLAGS, *flags, _cpu()]).encode()).hexdigest()[:16]
    source = sources[0]
    name = f"{source.stem}-{key}.so"
    folder = cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass  # not private either: refused below
    if private(folder) and private(folder / name):
        return folder / name
    if not private(folder) or os.path.lexists(folder / name):
        refused = folder if not private(folder) else folder / name
        folder = Path(tempfile.mkdtemp(prefix="reshard-kernels-"))  # 0700, this user's
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        print(f"runtime: not loading CPU kernels from {refused}: it must be owned by this user and writable by no "
              f"one else; building them into {folder} for this process instead", file=sys.stderr)
    return _compile(sources, compiler, folder / name, flags)


def _compile(sources: list[Path], compiler: str, out: Path, flags: tuple[str, ...] = ()) -> Path:
    """`sources` compiled to `out`, through a temporary name in the same folder (an atomic rename)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *flags, "-o", tmp, *map(str, sources), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr or f"{compiler} exited with {done.returncode}")
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform's name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({line for line in text.splitlines() if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


IO_KINDS = {torch.float32: 0, torch.bfloat16: 2}  # what the kernels take x in and give y in


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, *, lib: ctypes.CDLL | None = None
              ) -> torch.Tensor:
    """x (M, K) float32 or bfloat16, contiguous, @ (weight (N, K) int8 * scales).T -> (M, N) in x's
    dtype; `scales` float32, (N,) one per row or (N, K/32) one per block of 32 columns (a GGUF's
    Q8_0). Through `lib` (from `load`) where given, else `lowbit()`."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib = lib or _lib or lowbit()
    gemm = lib.reshard_int8g_gemm if scales.dim() == 2 else lib.reshard_int8_gemm
    rc = gemm(x.data_ptr(), IO_KINDS[x.dtype], m, k, weight.data_ptr(), scales.data_ptr(), n, y.data_ptr(),
              torch.get_num_threads())
    _check(rc)
    return y


def int4_gemm(x: torch.Tensor, weight: torch.Tensor, sz: torch.Tensor, group: int, *,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) float32 or bfloat16, contiguous, @ W.T -> (M, N) in x's dtype; W (N, K) int4 from
    `weight` (N, K/2), two values a byte, low nibble first, and `sz` (N, K/32 + K/group) from
    `int4_scales`: w = q * scale + zero per group. Through `lib` where given, as int8_gemm."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    rc = (lib or _lib or lowbit()).reshard_int4_gemm(x.data_ptr(), IO_KINDS[x.dtype], m, k, weight.data_ptr(), sz.data_ptr(),
                                    HALF_KINDS[sz.dtype], group, n, y.data_ptr(), torch.get_num_threads())
    _check(rc)
    return y


KQUANT_KINDS = {"q4_k": 0, "q6_k": 1, "q5_k": 2, "iq4_xs": 3, "q3_k": 4, "q2_k": 5}  # the GGML K-quant blocks kquant_cpu.c multiplies as stored
# the GGML grid blocks and blocks of 32 iquant_cpu.c multiplies as stored
IQUANT_KINDS = {"iq2_xxs": 0, "iq3_xxs": 1, "iq3_s": 2, "iq2_xs": 3, "iq2_s": 4, "iq4_nl": 5, "mxfp4_blocks": 6, "q5_0": 7,
                "q5_1": 8, "tq2_0": 9, "iq1_s": 10, "iq1_m": 11, "tq1_0": 12}
BLOCK_SCHEMES = frozenset(KQUANT_KINDS) | frozenset(IQUANT_KINDS)  # every GGML block type the kernels take as stored


def kquant_gemm(x: torch.Tensor, blocks: torch.Tensor, scheme: str, *, lib: ctypes.CDLL | None = None
                ) -> torch.Tensor:
    """x (M, K) float32 or bfloat16, contiguous, @ W.T -> (M, N) in x's dtype; W (N, K) kept as its
    GGML blocks `blocks` (N, K / 256 * block bytes) uint8, contiguous, in `scheme` (a KQUANT_KINDS
    key, or an IQUANT_KINDS one: their grids from `iquant_tables`): each weight exactly gguf's
    de-quantized value, the activations quantized per block of 32."""
    m, k = x.shape
    n = blocks.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib = lib or _lib or lowbit()
    if scheme in IQUANT_KINDS:
        grid, signs = iquant_tables(scheme)
        rc = lib.reshard_iquant_gemm(x.data_ptr(), IO_KINDS[x.dtype], m, k, blocks.data_ptr(), IQUANT_KINDS[scheme],
                                     grid.data_ptr(), signs.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    else:
        rc = lib.reshard_kquant_gemm(x.data_ptr(), IO_KINDS[x.dtype], m, k, blocks.data_ptr(), KQUANT_KINDS[scheme],
                                     n, y.data_ptr(), torch.get_num_threads())
    _check(rc)
    return y


@functools.cache
def iquant_tables(scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What iquant_cpu.c reads for `scheme`, made once: a grid type's grid and sign patterns
    (reshard/ggml_iquants.py: the gguf package's own), IQ4_NL's and MXFP4's 16 values, or nothing."""
    from reshard.ggml_iquants import GRIDS, MXFP4_VALUES, kernel_tables
    from reshard.ggml_quants import IQ4_VALUES

    if scheme in GRIDS:
        return kernel_tables(scheme)
    values = {"iq4_nl": IQ4_VALUES, "mxfp4_blocks": MXFP4_VALUES}.get(scheme, (0,) * 16)
    table = torch.tensor(values, dtype=torch.int8)
    return table, table


def int4_scales(scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The (N, K/32 + K/group) table the int4 kernel reads per row: each block of 32 values' scale
    (its group's), the eight of every chunk of 256 values in the order the kernel sums them
    (0, 2, 4, 6, 1, 3, 5, 7), then the groups' zeros; in the scales' own dtype."""
    n = scales.shape[0]
    blocks = scales.repeat_interleave(group // 32, dim=1)
    full = blocks.shape[1] // 8 * 8
    head = blocks[:, :full].reshape(n, -1, 8)[:, :, list(BLOCK_ORDER)].reshape(n, full)
    return torch.cat([head, blocks[:, full:], zeros.to(scales.dtype)], dim=1).contiguous()


BLOCK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _check(rc: int) -> None:
    if rc == -1:
        raise MemoryError("the CPU kernel could not allocate its activation buffers")
    if rc != 0:
        raise ValueError(f"the CPU kernel refused its arguments (code {rc}); runtime.lowbit should not have sent them")
