"""benchmarks/gpu_check.sh in its dry mode (CPU, tiny shapes), so the GPU check cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_assets(tmp_path_factory):
    """What prepare_gpu_check.py writes into .gpu/, here into a temp folder."""
    out = tmp_path_factory.mktemp("gpu-assets")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare_gpu_check.py"), "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


def test_prepare_gpu_check_fits_the_carry_limit(gpu_assets):
    size = sum(p.stat().st_size for p in gpu_assets.rglob("*") if p.is_file())
    assert size < 55 << 20
    (gguf,) = (gpu_assets / "smollm2-trim").glob("*.gguf")
    assert "first8layers" in gguf.name
    assert (gpu_assets / "site" / "gguf" / "gguf_reader.py").is_file()
    assert list((gpu_assets / "site").glob("gguf-*.dist-info/METADATA"))


def path_without_python(folder: Path) -> str:
    """PATH with `python`/`python3` that fail: a script must run the interpreter it is given ($PYTHON)."""
    folder.mkdir()
    for name in ("python", "python3"):
        shim = folder / name
        shim.write_text("#!/bin/sh\necho \"$0: the PATH's python was run, not \\$PYTHON\" >&2\nexit 97\n")
        shim.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.slow
def test_gpu_check_dry_run(gpu_assets, tmp_path, tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPU_CHECK_DRY": "1", "PYTHON": sys.executable,
           "PATH": path_without_python(tmp_path_factory.mktemp("bin") / "shims")}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--assets", str(gpu_assets),
                          "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("## GPU check (DRY RUN")
    assert any(line.startswith("| resident on device (compute only) | 6 device |") for line in lines)
    assert any(line.startswith("| streamed from disk, cold cache | 6 disk |") for line in lines)
    assert sum("tokens MATCH" in line for line in lines) == 3
    for label in ("int8", "int4 g32"):  # the quantized streaming section: its table rows and logits check
        assert any(line.startswith(f"| {label} | ") and line.endswith("x |") for line in lines), label
        assert f"{label} logits streamed (page cache; disk, cold cache) vs resident on the device: max |diff| 0: MATCH" in lines
    assert any(line.startswith("| fp16 | ") and line.endswith("| 1.00x | 1.00x |") for line in lines)
    assert lines[-2:] == ["gpu_check: OK", "```"]
    assert list(tmp_path.iterdir()) == []  # the synthetic model was written to a temp dir and removed


def test_gpu_check_fails_without_assets(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--assets",
                          str(tmp_path / "missing"), "--layers", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    assert "parity section FAILED" in run.stdout and "run `python benchmarks/prepare_gpu_check.py` first" in run.stdout
    assert run.stdout.splitlines()[-2] == "gpu_check: FAILED: parity"
