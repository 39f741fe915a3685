"""What a person waiting at a terminal sees on stderr: a bar over the first pass of a streamed
model (layer i of N, GB/s: the pass that reads the prompt is the long one), and a short summary
of `--stats`. The CLI shows them only when stderr is a terminal; stdout is never touched.
"""

from __future__ import annotations

import sys
import time

from .budget import DEVICE, DISK, HOST


class FirstPassBar:
    """A tqdm bar over the decoder layers of `lm`'s next forward pass; gone when the pass ends."""

    def __init__(self, lm, *, file=None):
        from tqdm.auto import tqdm

        self.lm = lm
        layers = lm.model.get_submodule(lm.manifest.layers_path)
        self.bar = tqdm(total=len(layers), desc="first pass", unit="layer", file=file or sys.stderr, leave=False)
        self.start, self.bytes0 = None, lm.stats.bytes_streamed
        self.hooks = [layer.register_forward_hook(lambda *_: self.advance()) for layer in layers]
        self.hooks.append(lm.model.register_forward_pre_hook(lambda *_: self.begin()))
        self.hooks.append(lm.model.register_forward_hook(lambda *_: self.close()))

    def begin(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def advance(self) -> None:
        seconds = time.perf_counter() - (self.start or time.perf_counter())
        moved = self.lm.stats.bytes_streamed - self.bytes0
        self.bar.set_postfix_str(f"{moved / seconds / 1e9:.2f} GB/s" if seconds > 0 else "", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        self.bar.close()


def show_first_pass(lm) -> FirstPassBar | None:
    """A first-pass bar when stderr is a terminal and some weights stream (are not kept on the device)."""
    if not sys.stderr.isatty() or all(p == DEVICE for p in lm.places):
        return None
    return FirstPassBar(lm)


def summary(stats: dict) -> str:
    """One human line for a `--stats` dict: speed, bytes moved, where the weights sit."""
    seconds, passes = stats.get("seconds") or 0.0, stats.get("passes", 0)
    parts = []
    if "new_tokens" in stats:
        rate = f" ({stats['new_tokens'] / seconds:.2f} tokens/s)" if seconds else ""
        parts.append(f"{stats['new_tokens']} new tokens in {seconds:.1f} s{rate}, {passes} passes")
    else:
        parts.append(f"{passes} passes in {seconds:.1f} s")
    if stats.get("bytes_streamed"):
        parts.append(f"streamed {stats['bytes_streamed'] / 1e9:.2f} GB at {stats.get('stream_gb_per_s') or 0:.2f} GB/s")
    placed = stats.get("resident_bytes") or {}
    where = [f"{placed[k] / 1e9:.2f} GB {label}" for k, label in
             ((DEVICE, "on the device"), (HOST, "in host RAM"), (DISK, "read from disk")) if placed.get(k)]
    if where:
        parts.append("weights: " + ", ".join(where))
    return "runtime: " + "; ".join(parts)


def report_stats(stats: dict) -> None:
    """--stats: the human summary first when stderr is a terminal, then the JSON line, last on stderr."""
    import json

    if sys.stderr.isatty():
        print(summary(stats), file=sys.stderr)
    print(json.dumps(stats), file=sys.stderr)
