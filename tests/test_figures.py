"""benchmarks/check_figures.py: every figure README.md and RESULTS.md quote comes from a raw output."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_figures.py"
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
spec = importlib.util.spec_from_file_location("benchmarks_check_figures", SCRIPT)
check_figures = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_figures)


def check(*docs: Path, results: Path = ROOT / "benchmarks" / "results") -> SimpleNamespace:
    """What the script prints and its exit code, run in this process (the CLI itself: the first test)."""
    checker = check_figures.check(list(docs), results, root=ROOT)
    return SimpleNamespace(returncode=1 if checker.problems else 0, checked=checker.checked,
                           stdout="".join(f"{problem}\n" for problem in checker.problems))


def copy_with(tmp_path: Path, doc: Path, old: str, new: str) -> Path:
    """A copy of `doc` in tmp_path with the one occurrence of `old` replaced by `new`."""
    text = doc.read_text()
    assert text.count(old) == 1, old
    out = tmp_path / doc.name
    out.write_text(text.replace(old, new))
    return out


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_readme_and_results_quote_only_raw_figures():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stdout
    assert run.stdout == ""
    checked = int(run.stderr.split("check_figures: ")[1].split()[0])
    assert checked > 300     # the docs' figures were found, not skipped


def test_a_changed_figure_fails_naming_it(tmp_path):
    # RESULTS (b): the cold pass median as printed by bench_cold.py, 1.02x; 1.03x is in no raw output
    doc = copy_with(tmp_path, DOCS[1], "Met on the medians: 1.02x at 1 token", "Met on the medians: 1.03x at 1 token")
    run = check(doc)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"{doc}:{line_of(doc, 'Met on the medians: 1.03x')}: 1.03x: not in cold.txt (the raw outputs in force "
        "here); quote it as printed or derive it: `FIGURE (= ...)`"]


def test_a_changed_table_cell_fails(tmp_path):
    doc = copy_with(tmp_path, DOCS[1], "| streamed from pinned RAM | 7 host | 0.1524 | 52.67 |",
                    "| streamed from pinned RAM | 7 host | 0.1524 | 52.76 |")
    run = check(doc)
    assert run.returncode == 1
    assert f"{doc}:{line_of(doc, '52.76')}: 52.76: not in gpu_check_h200.txt" in run.stdout


def test_a_wrong_derivation_fails(tmp_path):
    # README: the same-round median for int4 is 1.45x; claiming 1.44x with the same inputs must fail
    doc = copy_with(tmp_path, DOCS[0], "and 1.45x (= median(", "and 1.44x (= median(")
    run = check(doc)
    assert run.returncode == 1
    assert "1.44x: its derivation gives 1.44958, not 1.44 when rounded" in run.stdout


def test_a_derivation_needs_raw_inputs(tmp_path):
    doc = copy_with(tmp_path, DOCS[0], "0.69x (= 34.1 / 49.5)", "0.69x (= 34.1 / 49.4)")
    run = check(doc)
    assert run.returncode == 1
    assert run.stdout == (f"{doc}:{line_of(doc, '49.4')}: 0.69x: input 49.4 of its derivation is not in "
                          "cpu_kernels_issue26.txt, cpu_kernels.txt, gguf_quants.txt, cpu_llamacpp.txt\n")


def test_a_changed_raw_output_fails(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    raw = results / "peers.txt"
    raw.write_text(raw.read_text().replace("132.1 ms/token", "131.9 ms/token"))
    run = check(DOCS[1], results=results)
    assert run.returncode == 1
    line = line_of(DOCS[1], "132.1 ms/token, 1.82x")
    assert f"RESULTS.md:{line}: 132.1 ms/token: not in peers.txt" in run.stdout
    assert f"RESULTS.md:{line}: 1.82x: input 132.1 of its derivation is not in peers.txt" in run.stdout


def test_a_missing_raw_output_and_a_changed_excerpt_fail(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("## x\n\nRaw: `results/nothing.txt` and `results/decode.txt`.\n\n```\n"
                   "transformers in memory: median 77.1 ms/token = 1.00x; best 63.8 ms/token = 1.00x\n"
                   "transformers in memory: median 77.2 ms/token = 1.00x\n```\n")
    run = check(doc)
    assert run.returncode == 1
    assert f"{doc}:3: results/nothing.txt: no such raw output" in run.stdout
    assert f"{doc}:7: transformers in memory: median 77.2 ms/token = 1.00x: this line of a raw excerpt" \
           in run.stdout
    assert f"{doc}:6:" not in run.stdout


def test_what_is_not_a_measurement_is_not_checked(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("## A 16 GB GPU\n\n"
                   "A 70B model is ~140 GB; `--max-gpu-memory 12GiB`; the goal is <= 1.5x; Llama-2-70B, int8, "
                   "Q4_0; 80 layers.\n\n"
                   "## Measured\n\n(`results/decode.txt`) 112.6 ms/token, 1.46x; ~3 GB/s assumed; goal >= 3x.\n")
    run = check(doc)
    assert run.returncode == 0, run.stdout


def test_a_ratio_must_be_a_ratio_in_the_raw_output(tmp_path):
    # ray_workers.txt prints "load average: 1.4 ..." and no ratio 1.4x; quant.txt's "layer ratio" column has 0.502
    doc = tmp_path / "doc.md"
    doc.write_text("## x\n\n(`results/ray_workers.txt`) two workers: 1.4x.\n\n"
                   "## y\n\n(`results/quant.txt`) int8 layers: 0.502x of fp16's bytes, 18.100 perplexity.\n")
    run = check(doc)
    assert run.stdout == f"{doc}:3: 1.4x: not in ray_workers.txt (the raw outputs in force here); quote it as " \
                         "printed or derive it: `FIGURE (= ...)`\n"
