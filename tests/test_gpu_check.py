"""benchmarks/gpu_check.sh in its dry mode (CPU, tiny shapes), so the GPU check cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_assets(tmp_path_factory):
    """What prepare_gpu_check.py writes into .gpu/, here into a temp folder."""
    out = tmp_path_factory.mktemp("gpu-assets")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare_gpu_check.py"), "--out", str(out),
                          "--layers", "2"],  # the GPU machine gets 8 (the default); 2 check the same code
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


def test_prepare_gpu_check_fits_the_carry_limit(gpu_assets):
    size = sum(p.stat().st_size for p in gpu_assets.rglob("*") if p.is_file())
    assert size < 55 << 20
    (gguf,) = (gpu_assets / "smollm2-trim").glob("*.gguf")
    assert "first2layers" in gguf.name
    assert (gpu_assets / "site" / "gguf" / "gguf_reader.py").is_file()
    assert list((gpu_assets / "site").glob("gguf-*.dist-info/METADATA"))
    assert re.fullmatch(r"[0-9a-f]{40}( \+ uncommitted changes)?\n", (gpu_assets / "commit").read_text())


def path_without_python(folder: Path) -> str:
    """PATH with `python`/`python3` that fail: a script must run the interpreter it is given ($PYTHON)."""
    folder.mkdir()
    for name in ("python", "python3"):
        shim = folder / name
        shim.write_text("#!/bin/sh\necho \"$0: the PATH's python was run, not \\$PYTHON\" >&2\nexit 97\n")
        shim.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def dry_run(sections: str, tmp_path, tmp_path_factory, assets=None) -> list[str]:
    """The lines `gpu_check.sh --dry` prints for GPU_CHECK_SECTIONS `sections` (it must succeed), run with a
    PATH whose python fails: the script runs the interpreter it is given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPU_CHECK_DRY": "1", "PYTHON": sys.executable,
           "GPU_CHECK_SECTIONS": sections, "PATH": path_without_python(tmp_path_factory.mktemp("bin") / "shims")}
    extra = ["--assets", str(assets)] if assets is not None else []
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *extra, "--work", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "gpu_check.sh: OK" and not any(line.startswith("FAILED (exit") for line in lines)
    assert list(tmp_path.iterdir()) == []  # the synthetic models were written to temp dirs and removed
    return lines


@pytest.mark.slow
def test_gpu_check_dry_run_of_the_closed_issues_sections(gpu_assets, tmp_path, tmp_path_factory):
    """gpu_check.py's sections (streaming, quantized, MoE streaming, parity, small GPU, speculation); the open
    issues' sections run in tests/test_gpu_check_sections.py (two files: pytest-xdist runs them side by side)."""
    lines = dry_run("legacy", tmp_path, tmp_path_factory, gpu_assets)
    assert lines[0].startswith("## GPU check (DRY RUN")
    header = lines[:8]  # date, commit, machine, load: the header common.machine_lines prints
    assert any(re.fullmatch(r"commit: [0-9a-f]{40}( \+ uncommitted changes)?", line) for line in header), header
    assert any(line.startswith("| resident on device (compute only) | 6 device |") for line in lines)
    assert any(line.startswith("| streamed from disk, cold cache | 6 disk |") for line in lines)
    for label in ("int8", "int4 g32"):  # the quantized streaming section: its table rows and logits check
        assert any(line.startswith(f"| {label} | ") and line.endswith("x |") for line in lines), label
        assert f"{label} logits streamed (page cache; disk, cold cache) vs resident on the device: max |diff| 0: MATCH" in lines
    parity = [line for line in lines if line.startswith("LayeredModel ")]
    assert [line.split(" (")[0] for line in parity] == [
        "LayeredModel resident", "LayeredModel streamed from disk", "LayeredModel streamed from pinned RAM"]
    assert all("tokens MATCH; prompt logits vs resident: max |diff| 0 (EXACT)" in line for line in parity), parity
    assert any(line.startswith("| fp16 | ") and line.endswith("| 1.00x | 1.00x |") for line in lines)
    for task in ("generate", "generate 32 prompts", "score 128 items, batch 16"):  # the small-GPU section
        assert any(line.startswith(f"| ours (default budget) | fp16 | {task} | ") for line in lines), task
    for label in ("int8", "int4"):
        assert any(line.startswith(f"| ours (default budget) | {label} | generate | ") for line in lines), label
    assert any(line.startswith("| accelerate device_map=auto | fp16 | generate | ") and line.endswith("| same as ours | n/a |")
               for line in lines)
    assert any(line.startswith("| AirLLM | fp16 | generate | not importable") for line in lines)
    for n in (1, 16, 64, 256, 1024):  # tree speculation's verify cost (issue 24), then the 70B arithmetic
        assert any(re.fullmatch(rf"\| {n} \| \d+\.\d{{4}} \| \d+\.\d\dx \|", line) for line in lines), n
    assert [line.split(":")[0].strip() for line in lines if "GB/s x " in line] == ["PCIe4 x16 (~25 GB/s)"] * 2 + [
        "PCIe5 x16 (~50 GB/s)"] * 2
    assert lines[lines.index("gpu_check: OK") + 1] == "```"


def test_gpu_check_fails_without_assets(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--assets",
                          str(tmp_path / "missing"), "--layers", "1", "--only", "parity,small"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    assert "parity section FAILED" in run.stdout and "run `python benchmarks/prepare_gpu_check.py` first" in run.stdout
    assert "no tokenizer in" in run.stdout  # the small-GPU section's prompts need it too
    assert run.stdout.splitlines()[-2] == "gpu_check: FAILED: parity, small GPU"


@pytest.mark.parametrize("streamed_diff, tokens_differ, want", [
    (0.0, False, []),
    (2.0 ** -24, False, ["parity: streamed from disk logits differ from resident by 5.96e-08"]),
    (0.0, True, ["parity: streamed from disk tokens differ from transformers'"]),
])
def test_parity_fails_on_any_streamed_logit_difference(streamed_diff, tokens_differ, want, monkeypatch, tmp_path):
    """Streamed vs resident on the same device and dtype must be exact: the smallest difference fails."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_parity
    import reshard.convert

    logits = torch.zeros(1, 3, 5)
    tokens = torch.tensor([4, 2])
    monkeypatch.setattr(gpu_parity, "PARITY_MODES", [("resident", "1TB", "1TB"), ("streamed from disk", "0", "0")])
    monkeypatch.setattr(reshard.convert, "convert", lambda *a, **k: None)
    monkeypatch.setattr(gpu_parity, "reference_greedy", lambda *a: (tokens, logits, None, {}))

    def layered(folder, device, gpu, cpu, ids, gen):
        streamed = gpu == "0"
        got = tokens + 1 if streamed and tokens_differ else tokens
        return got, logits + (streamed_diff if streamed else 0.0), "3 disk" if streamed else "3 device"

    monkeypatch.setattr(gpu_parity, "layered_greedy", layered)
    monkeypatch.setattr(gpu_parity, "out", lambda line="": None)

    class Tok:
        def decode(self, ids):
            return str(ids.tolist())

    monkeypatch.setattr(gpu_parity, "load_smollm2", lambda assets, work: (Tok(), tmp_path))
    args = type("Args", (), {"assets": tmp_path, "dry": True})()
    assert gpu_parity.parity(args, torch.device("cpu"), tmp_path) == want
