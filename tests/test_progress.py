"""What a person at a terminal sees on stderr: the first-pass bar, the scoring bar and the
--stats summary appear only when stderr is a terminal; the JSON line stays last either way."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import torch

from runtime import LayeredModel
from runtime.progress import FirstPassBar, summary


def run_with_terminal_stderr(argv: list[str]) -> tuple[str, str]:
    """(stdout, stderr) of `python -m runtime.cli ARGV` with stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing 0 wide
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", *argv], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=300) == 0, err.decode()
    os.close(master)
    return out, err.decode().replace("\r\n", "\n")


def test_generate_on_a_terminal_shows_the_bar_and_the_summary(tiny_converted):
    argv = ["generate", str(tiny_converted["llama"]), "-p", "w3 w4", "-n", "3", "--device", "cpu",
            "--max-cpu-memory", "0", "--stats"]
    out, err = run_with_terminal_stderr(argv)
    assert len(out.split()) == 3  # the generated words, nothing else, on stdout
    assert "first pass" in err and "layer" in err
    lines = [ln.strip("\r") for ln in err.splitlines() if ln.strip()]
    stats = json.loads(lines[-1])  # the JSON line stays last
    assert stats["new_tokens"] == 3
    assert lines[-2].startswith("runtime: 3 new tokens in ") and "read from disk" in lines[-2]


def test_no_bar_or_summary_off_a_terminal(tiny_converted, capsys):
    from runtime.cli import main

    assert main(["generate", str(tiny_converted["llama"]), "-p", "w3 w4", "-n", "2", "--device", "cpu",
                 "--max-cpu-memory", "0", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "first pass" not in err and "runtime:" not in err
    assert json.loads(err.strip().splitlines()[-1])["new_tokens"] == 2


def test_score_on_a_terminal_shows_the_layers_bar(tiny_converted, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "w3", "choices": [" w4", " w5"]}) + "\n")
    out, err = run_with_terminal_stderr(["score", str(tiny_converted["llama"]), str(src), "-o", "-",
                                         "--device", "cpu", "--max-cpu-memory", "0"])
    assert "layers" in err and json.loads(out)["best"] in (0, 1)


def test_first_pass_bar_counts_layers_once_then_unhooks(tiny_converted):
    lm = LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory=0)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
    shown = io.StringIO()
    bar = FirstPassBar(lm, file=shown)
    ids = torch.tensor([[3, 4, 5]])
    lm(ids)
    assert bar.bar.n == lm.config.num_hidden_layers and bar.hooks == []
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == hooks_before
    lm(ids)  # later passes leave the bar alone
    assert bar.bar.n == lm.config.num_hidden_layers and "first pass" in shown.getvalue()
    lm.close()


def test_summary_line():
    stats = {"passes": 4, "seconds": 2.0, "new_tokens": 4, "bytes_streamed": 3_000_000_000, "stream_gb_per_s": 1.5,
             "resident_bytes": {"device": 1_000_000_000, "disk": 2_500_000_000}}
    assert summary(stats) == ("runtime: 4 new tokens in 2.0 s (2.00 tokens/s), 4 passes; streamed 3.00 GB at "
                              "1.50 GB/s; weights: 1.00 GB on the device, 2.50 GB read from disk")
    assert summary({"passes": 1, "seconds": 0.5}) == "runtime: 1 passes in 0.5 s"
