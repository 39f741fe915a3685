"""This process's resident memory, for the memory tests' fresh interpreters (run with tests/ on
their path: `memwatch.PATH`). The peak is VmHWM, not ru_maxrss: Linux carries the parent's peak
into a child's ru_maxrss across fork and exec, so ru_maxrss would report pytest's own."""

import os
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"  # PYTHONPATH for such an interpreter: the project and this module


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def high_water() -> int:
    """The peak resident set since the process began, or since the last `reset_peak`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """The high-water mark set to the current RSS (clear_refs 5): the peak from here on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
