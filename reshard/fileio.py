"""Bytes into a file without copying them through Python, and their sha256 on another thread.

`write_at` writes memory (a tensor's own buffer) at an offset with `pwrite`; `copy_at` copies
a range of another file in the kernel with `copy_file_range` (falling back to `pread`/`pwrite`
through one small buffer where the kernel or file system cannot); `Digest` computes the sha256
of what is written, in order, on its own thread (hashlib releases the GIL), reading copied
ranges through a memory map a window at a time, so nothing is copied to hash it either.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading

from .errors import SourceError

WINDOW = 64 << 20  # bytes of a source file mapped at a time for hashing
FALLBACK_CHUNK = 16 << 20  # buffer of the pread/pwrite fallback
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def write_at(fd: int, data, offset: int) -> None:
    """Write all of `data` (any buffer) to `fd` at `offset`."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_at(src: str | os.PathLike, src_offset: int, nbytes: int, fd: int, offset: int) -> None:
    """Copy `nbytes` of file `src` from `src_offset` to `fd` at `offset`, in the kernel if it can."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(f.fileno(), fd, nbytes - done, src_offset + done, offset + done)
                    if n == 0:
                        raise SourceError(f"{src} ends before byte {src_offset + nbytes}; was it changed during the conversion?")
                    done += n
                return
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE:
                    raise
        _copy_through_buffer(f.fileno(), src_offset + done, nbytes - done, fd, offset + done, src)


def _copy_through_buffer(src_fd: int, src_offset: int, nbytes: int, fd: int, offset: int, src) -> None:
    buf = bytearray(min(nbytes, FALLBACK_CHUNK))
    done = 0
    while done < nbytes:
        n = os.preadv(src_fd, [memoryview(buf)[: min(len(buf), nbytes - done)]], src_offset + done)
        if n == 0:
            raise SourceError(f"{src} ends before byte {src_offset + nbytes}; was it changed during the conversion?")
        write_at(fd, memoryview(buf)[:n], offset + done)
        done += n


class Digest:
    """sha256 of buffers and file ranges given in order, computed on a background thread.

    Buffers must stay unchanged until `hexdigest()` returns (the caller keeps them alive: this
    holds a reference). Use as a context manager so the thread ends on errors too.
    """

    def __init__(self):
        self._sha = hashlib.sha256()
        self._work: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reshard-sha256", daemon=True)
        self._thread.start()

    def update(self, data) -> None:
        self._work.put(("buffer", data))

    def update_from_file(self, path, offset: int, nbytes: int) -> None:
        self._work.put(("file", (path, offset, nbytes)))

    def hexdigest(self) -> str:
        self._finish()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()

    def __enter__(self) -> "Digest":
        return self

    def __exit__(self, *exc) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            if self._error is not None:
                continue  # drain: the error is raised by hexdigest
            kind, what = item
            try:
                if kind == "buffer":
                    self._sha.update(memoryview(what).cast("B"))
                else:
                    self._hash_file_range(*what)
            except BaseException as e:  # handed to the caller by hexdigest
                self._error = e

    def _hash_file_range(self, path, offset: int, nbytes: int) -> None:
        with open(path, "rb", buffering=0) as f:
            end = offset + nbytes
            while offset < end:
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                length = min(end, start + WINDOW) - start
                with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as m:
                    with memoryview(m) as view:
                        self._sha.update(view[offset - start:length])
                offset = start + length
