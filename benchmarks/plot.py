"""Plot benchmarks/results/*.txt into benchmarks/results.png (needs matplotlib; any venv will do).

Usage: python benchmarks/plot.py
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def numbers(name: str, pattern: str) -> list[tuple[str, float]]:
    text = (HERE / "results" / name).read_text()
    return [(m.group(1).strip(), float(m.group(2))) for m in re.finditer(pattern, text, re.M)]


def bars(ax, items, title, unit):
    labels = [label for label, _ in items]
    values = [v for _, v in items]
    ax.barh(range(len(values)), values, color=["#888"] + ["#3a7"] * (len(values) - 1))
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:g}", va="center", fontsize=7)


def main() -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    decode = numbers("decode.txt", r"^(transformers in memory|LayeredModel[^:]*): median ([0-9.]+) ms/token")
    bars(axes[0][0], decode, "(a) SmolLM2 decode, warm cache, CPU", "ms/token (median of runs)")
    cold = numbers("cold.txt", r"^read-only \(cold, plain reads\)(): ([0-9.]+) s")
    cold = [("read-only (cold)", cold[0][1])] if cold else []
    for m in re.finditer(r"^(\d+) token\(s\)/pass: compute-only ([0-9.]+) s; cold pass median ([0-9.]+) s",
                         (HERE / "results" / "cold.txt").read_text(), re.M):
        cold += [(f"{m.group(1)} tok: compute-only", float(m.group(2))),
                 (f"{m.group(1)} tok: cold pass (median)", float(m.group(3)))]
    bars(axes[0][1], cold, "(b) 1.7 GB bf16 model, cold page cache, CPU", "s/pass")
    peers = numbers("peers.txt", r"^([^:\n]+): ([0-9.]+) ms/token")
    bars(axes[1][0], [(label[:40], v) for label, v in peers], "(c) SmolLM2 decode: reshard vs peers (log)", "ms/token")
    axes[1][0].set_xscale("log")
    conv = numbers("convert.txt", r"^(plain copy[^:]*|reshard convert[^:]*): [0-9.]+ s, ([0-9.]+) GB/s")
    bars(axes[1][1], conv, "(d) convert vs copy, 1.7 GB", "GB/s")
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=110)


if __name__ == "__main__":
    main()
