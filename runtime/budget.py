"""Where each layer group lives while the model runs: on the device, in host RAM, or on disk.

`place_groups` decides once, at load, from the group sizes and two byte budgets:
- DEVICE: the group's tensors stay on the compute device for good (never re-read);
- HOST: its bytes stay in host memory (pinned, on CUDA) and are copied to the device per pass;
- DISK: it streams from its mapped file every pass.
On the CPU the device *is* host memory, so there are only DEVICE and DISK groups and the
budget that counts is `max_cpu_memory`.
"""

from __future__ import annotations

import os
import re

import torch

from reshard.errors import UsageError

DEVICE, HOST, DISK = "device", "host", "disk"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float | None) -> int | None:
    """"12GiB", "500MB", "1.5GB" or a byte count -> bytes; None stays None (use the default)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"memory size {text!r} is not understood; write e.g. 12GiB, 500MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def host_available() -> int:
    """Bytes the host can give without swapping (MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def default_cpu_budget() -> int:
    """Keep a quarter of the available RAM (at least 2 GiB) for activations, the OS and others."""
    free = host_available()
    return max(0, int(min(free * 0.75, free - (2 << 30))))


def default_gpu_budget(device: torch.device) -> int:
    """Free device memory minus 10% and 1 GiB, for activations and the KV cache."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, int(free * 0.9) - (1 << 30))


def place_groups(sizes: list[int], kinds: list[str], *, device_budget: int | None, host_budget: int,
                 reserve: int) -> list[str]:
    """One of DEVICE/HOST/DISK per group, filling the device first, then host RAM.

    `device_budget` None means the device is host memory (CPU): only DEVICE and DISK.
    `reserve` is what streaming itself needs on the device (prefetched groups), held back
    unless everything fits. Groups outside the layers go first: they run on every pass too,
    and are often small. Within a tier, first fit in model order.
    """
    order = sorted(range(len(sizes)), key=lambda i: (kinds[i] == "layer", i))
    places = [DISK] * len(sizes)
    if device_budget is None:
        return _fill(places, order, sizes, host_budget, DEVICE)
    if sum(sizes) <= device_budget:
        return [DEVICE] * len(sizes)
    _fill(places, order, sizes, device_budget - reserve, DEVICE)
    return _fill(places, order, sizes, host_budget, HOST)


def _fill(places: list[str], order: list[int], sizes: list[int], budget: int, tier: str) -> list[str]:
    for i in order:
        if places[i] == DISK and sizes[i] <= budget:
            places[i] = tier
            budget -= sizes[i]
    return places
