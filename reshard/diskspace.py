"""Room on disk: refuse a conversion before it starts where OUT's disk (or the hub cache's) cannot
hold what is left to write and download, with one line saying what to do."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch

from .errors import DiskSpaceError


def check_disk(out: Path, plan, kept, target: torch.dtype, *, extra: int = 0, extra_dir: Path | None = None,
               hint: bool = True, progress: bool = True) -> None:
    """Refuse to start when OUT's disk cannot hold what is left to write, plus `extra` bytes
    downloaded into `extra_dir` (default: beside OUT); `kept` names the groups already written;
    `hint`: mention --low-disk."""
    need = sum(math.prod(s) * target.itemsize for g in plan.groups if g.name not in kept
               for s in g.params.values())
    if extra_dir is not None and _device(extra_dir) != _device(out):
        check_cache_disk(extra_dir, extra)
    else:
        need += extra
    free = shutil.disk_usage(_existing(out)).free
    if progress:
        print(f"reshard: {gb(need)} to write, {gb(free)} free on {out}'s disk", file=sys.stderr)
    if need > free:
        text = f"{out} needs about {gb(need)} more but its disk has {gb(free)} free; " \
               f"free some space or choose an OUT on another disk"
        if not hint:
            raise DiskSpaceError(text)
        raise DiskSpaceError(text + " (for hub sources, low_disk=True keeps only one source shard)",
                             cli=text + " (for hub sources, --low-disk keeps only one source shard)")


def check_cache_disk(cache: Path, need: int) -> None:
    free = shutil.disk_usage(_existing(cache)).free
    if need > free:
        text = (f"the hub cache {cache} needs about {gb(need)} for the download but its disk has {gb(free)} free; "
                f"free some space, set HF_HUB_CACHE to a folder on another disk, or convert with ")
        raise DiskSpaceError(text + "low_disk=True", cli=text + "--low-disk")


def check_gguf_download(cache: Path, out: Path | None, nbytes: int) -> None:
    """Before a hub GGUF's download of `nbytes`: the hub cache's disk holds it, and OUT's disk (where
    given) at least as many bytes again, the least a folder of the file's blocks takes (the exact need
    is checked once the downloaded file's config is read); one disk holding both counts both."""
    check_cache_disk(cache, nbytes)
    if out is None:
        return
    free = shutil.disk_usage(_existing(out)).free - (nbytes if _device(cache) == _device(out) else 0)
    if nbytes > free:
        raise DiskSpaceError(f"{out} needs at least {gb(nbytes)} for this GGUF's conversion but its disk has "
                             f"{gb(max(free, 0))} free besides the download; free some space or choose an OUT on "
                             f"another disk")


def _existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (OUT may not exist yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _device(path: Path) -> int:
    return _existing(path).stat().st_dev


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
