"""benchmarks/gpu_check.sh's sections for the open issues, in its dry mode (CPU, tiny shapes), so they cannot
rot: fp8 and GGUF Q4_K against bf16 (issue 22), hybrid dense and MoE (issue 25), frontier MoE shapes (issue 23).
A file of its own, beside tests/test_gpu_check.py's run of the older sections: pytest-xdist runs the two side
by side."""

from __future__ import annotations

import re

import pytest
from test_gpu_check import dry_run


@pytest.mark.slow
def test_gpu_check_dry_run_of_the_open_issues_sections(tmp_path, tmp_path_factory):
    lines = dry_run("hybrid-moe fp8 gguf hybrid moe", tmp_path, tmp_path_factory)
    # the hybrid MoE section (--cpu-experts) ran its three modes on the tiny DeepSeek-V3 shape
    assert any(re.fullmatch(r"  batch   1 cpu +[0-9.]+ s/token .*routed experts ran on cpu\)", line) for line in lines)
    assert any(line.startswith("  batch   1 planner/best = ") for line in lines)
    assert any(line.startswith("raw s/token warm, fp8-block (default): ") for line in lines)
    assert sum(re.match(r"(q4_k native|q4_k expanded|bf16) +[0-9.]+ ", line) is not None for line in lines) == 6
    assert [line.split()[0] for line in lines if re.fullmatch(r"\S+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x", line)
            ] == ["q4_k"]  # GGUF blocks' compiled expansion vs plain torch, one row per type
    assert any(re.fullmatch(r"  batch   1 cpu +[0-9.]+ s/token .*layers ran on cpu\)", line) for line in lines)
    frontier = next(k for k, line in enumerate(lines) if line.startswith("deepseek-v3 fp8: 3 MoE layers"))
    assert [line.split()[0] for line in lines[frontier + 1:frontier + 4]] == ["sparse", "cache", "cache+predict"]
    assert all(re.search(r" [0-9.]+ s/token .* GB/token -> floor ", line) for line in lines[frontier + 1:frontier + 4])
