"""Reading routed experts' byte ranges from layer files: several reads at once, merged where they follow on.

`ExpertReader.read` takes pieces (a stored tensor's info, the buffer its expert's rows go to, the
byte range in the data section): CPU buffers of the stored dtype are read into in place, others
through one staging buffer (pinned on CUDA) and copied (and cast) to them. Reads of ranges
that follow on both in the file and in memory merge into one (`_coalesce`), and up to READERS run
at once (NVMe drives want several in flight). Both the expert hooks (runtime/experts.py) and the
guesses' thread (runtime/prediction.py, whose buffers are always read in place) use one reader.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from reshard.errors import CorruptFileError
from reshard.format import ST_TO_DTYPE, expert_range, stored_names

READERS = 4  # expert reads in flight at once (NVMe drives want several)


class ExpertReader:
    """Reads pieces of layer files for one compute device; `close` lets go of its files and threads."""

    def __init__(self, device: torch.device):
        self.device = device
        self.staging: torch.Tensor | None = None  # bytes of experts being read (pinned on CUDA)
        self.staging_done: torch.cuda.Event | None = None
        self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="runtime-experts")  # reads at once
        self.fds: dict = {}  # file path -> descriptor for the expert reads
        self.fd_lock = threading.Lock()

    def close(self) -> None:
        self.staging = None
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def read(self, gf, pieces: list) -> int:
        """File ranges -> their buffer rows: read in place into CPU rows of the stored dtype,
        else into (pinned) staging memory, then copied (and cast) to the rows. Returns the
        number of reads (ranges that follow on in the file and in memory are one)."""
        direct = [p for p in pieces if p[1].device.type == "cpu" and p[1].dtype == ST_TO_DTYPE[p[0].dtype]]
        staged = sorted((p for p in pieces if not any(p is d for d in direct)), key=lambda p: p[2][0])
        staging = self.stage(sum(end - begin for _, _, (begin, end) in staged)) if staged else None
        jobs, at = [], 0
        for info, dst, (begin, end) in direct:
            jobs.append((dst.view(-1).view(torch.uint8), begin))
        for info, dst, (begin, end) in staged:
            jobs.append((staging[at:at + end - begin], begin))
            at += end - begin
        jobs = _coalesce(jobs)
        fd = self._fd(gf)
        list(self.pool.map(lambda job: _pread(fd, job[0], gf.data_start + job[1], gf.path), jobs))
        at = 0
        for info, dst, (begin, end) in staged:
            dst.copy_(typed(staging[at:at + end - begin], info, dst), non_blocking=True)
            at += end - begin
        if staged and self.device.type == "cuda":
            self.staging_done = torch.cuda.Event()
            self.staging_done.record(torch.cuda.current_stream(self.device))
        return len(jobs)

    def _fd(self, gf) -> int:
        with self.fd_lock:  # the guesses' reader thread opens files too
            fd = self.fds.get(gf.path)
            if fd is None:
                fd = self.fds[gf.path] = os.open(gf.path, os.O_RDONLY)
            return fd

    def stage(self, n: int) -> torch.Tensor:
        """n bytes of staging memory (pinned on CUDA), free again (its last copy to the device finished)."""
        if self.staging_done is not None:
            self.staging_done.synchronize()
            self.staging_done = None
        if self.staging is None or self.staging.numel() < n:
            self.staging = torch.empty(n, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return self.staging[:n]


def read_stored(reader: ExpertReader, gf, group, entry: dict, experts: list[int], held: torch.Tensor | None = None
                ) -> tuple[dict, int]:
    """Experts `experts` of a layer file `gf` (manifest group `group`, experts module `entry`) into
    host memory as stored, or from `held`, its data section in host memory: ({expert: {stored
    tensor name: tensor}}, file reads taken). CPU tensors of the stored dtype are read into
    directly: no staging buffer is shared."""
    count = entry["num_experts"]
    out, pieces = {}, []
    for e in experts:
        out[e] = {}
        for name in (n for param in entry["tensors"] for n in stored_names(param, group.tensors)):
            info = gf.infos[name]
            out[e][name] = torch.empty(info.shape[1:], dtype=ST_TO_DTYPE[info.dtype])
            pieces.append((info, out[e][name], expert_range(info, count, e)))
    if held is not None:
        for info, dst, (begin, end) in pieces:
            dst.copy_(typed(held[begin:end], info, dst))
        return out, 0
    return out, reader.read(gf, pieces)


def _coalesce(jobs: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
    """(destination bytes, file offset) reads merged where both the file ranges and the memory
    they go to follow on: consecutive experts (slots are in expert order) become one sequential
    read, so a prefill or batch that routes most of a layer's experts reads it nearly whole."""
    merged: list[tuple[torch.Tensor, int]] = []
    for dst, offset in sorted(jobs, key=lambda job: job[1]):
        if merged:
            last, at = merged[-1]
            if (at + last.numel() == offset and last.data_ptr() + last.numel() == dst.data_ptr()
                    and last.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr()):
                both = torch.empty(0, dtype=torch.uint8).set_(last.untyped_storage(), last.storage_offset(),
                                                              (last.numel() + dst.numel(),))
                merged[-1] = (both, at)
                continue
        merged.append((dst, offset))
    return merged


def typed(raw: torch.Tensor, info, dst: torch.Tensor) -> torch.Tensor:
    """Raw bytes of one expert of tensor `info`, as its rows (stored dtype)."""
    return raw.view(ST_TO_DTYPE[info.dtype]).view(dst.shape)


def _pread(fd: int, dst: torch.Tensor, offset: int, path) -> None:
    """Read exactly dst.numel() bytes at `offset` into `dst` (uint8, contiguous, on the CPU)."""
    view, done = memoryview(dst.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptFileError(path, f"ends before byte {offset + done}")
        done += n
