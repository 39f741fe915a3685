"""`reshard`: convert a Hugging Face checkpoint into per-layer safetensors files.

Every command's --help lists its options with their defaults, and examples.
Set RESHARD_DEBUG=1 to see a traceback instead of a one-line error.
"""

from __future__ import annotations

import math
import json
import sys
from pathlib import Path

import click

from .commandline import (DTYPES, Choice, Group, Option, folder_argument, revision_option, run_command,
                          token_option, trust_remote_code_option, version_option)
from .errors import UsageError


@click.group(cls=Group, examples=(
    "reshard convert meta-llama/Llama-2-70b-hf llama-70b/ --dtype float16",
    "reshard convert ./my-checkpoint out/",
    "reshard convert meta-llama/Llama-2-70b-hf llama-70b-int4/ --dtype float16 --quantize int4",
    "reshard info llama-70b/",
    "reshard verify llama-70b/",
    "reshard list",
))
@version_option("reshard")
def cli() -> None:
    """Convert a Hugging Face checkpoint into per-layer safetensors files, for streaming with `runtime`."""


def main(argv=None) -> int:
    return run_command(cli, argv, "reshard")


@cli.command(short_help="convert a checkpoint into per-layer files", examples=("reshard convert meta-llama/Llama-2-70b-hf llama-70b/ --dtype float16",
                       "reshard convert model.gguf out/ --quantize int8"))
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", default="auto", type=Choice(DTYPES), cls=Option,
              help="dtype of the written weights (auto: the checkpoint's)")
@click.option("--quantize", type=Choice(["int8", "int4"]), default=None, cls=Option, section="Quantization",
              help="store the decoder layers' linear weights as int8 (per output channel) or int4 (group-wise)")
@click.option("--quantize-group", type=int, default=32, metavar="N", cls=Option, section="Quantization",
              help="int4: input columns per scale/zero group")
@click.option("--quantize-embeddings", is_flag=True, cls=Option, section="Quantization",
              help="with --quantize: quantize the embeddings and the output head too")
@revision_option()
@token_option()
@click.option("--low-disk", is_flag=True, cls=Option, section="Source",
              help="hub sources: fetch, convert and delete one source shard at a time (peak disk: OUT + 1 shard)")
@trust_remote_code_option(section="Source")
@click.option("-q", "--quiet", is_flag=True, cls=Option, help="no progress bar")
@click.option("--force", is_flag=True, cls=Option, help="replace an OUT that holds another model or format version")
def convert(source, out, dtype, quantize, quantize_group, quantize_embeddings, revision, token, low_disk,
            trust_remote_code, quiet, force) -> int:
    """Convert SOURCE (a hub repo id, a checkpoint folder, a .gguf file, or a hub repo of GGUF files as
    REPO:TAG, e.g. unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M) into the folder OUT."""
    check_quantize_flags(quantize, quantize_group, quantize_embeddings)
    from .convert import convert as convert_checkpoint

    convert_checkpoint(source, out, revision=revision, dtype=dtype, token=token, trust_remote_code=trust_remote_code,
                       progress=not quiet, force=force, low_disk=low_disk, quantize=quantize,
                       quantize_group=quantize_group, quantize_embeddings=quantize_embeddings)
    print(out)
    return 0


@cli.command(short_help="describe a converted folder", examples=("reshard info llama-70b/", "reshard info llama-70b/ --json"))
@folder_argument()
@click.option("--json", "as_json", is_flag=True, cls=Option, help="print JSON instead of a table")
def info(folder, as_json) -> int:
    """Groups, dtype, bytes, and the device memory streaming needs, of FOLDER (written by `reshard convert`)."""
    print_info(folder, as_json=as_json)
    return 0


@cli.command("list", short_help="show the models converted into the cache, and their sizes",
             examples=("reshard list --json   # one JSON object per model", "reshard list"))
@click.option("--json", "as_json", is_flag=True, cls=Option, help="print one JSON object per model instead of a table")
def list_command(as_json) -> int:
    """Show what the conversion cache holds: the models that `runtime` and `LayeredModel.from_pretrained`
    converted from a hub repo id or a .gguf file on first use. The cache is $RESHARD_CACHE, else
    reshard/ in the Hugging Face cache folder; delete a model's folder to free its space."""
    from .cache import cache_root, list_cached

    root = cache_root()
    models = list_cached(root)
    if not models:
        print(f"reshard: no converted models in {root}", file=sys.stderr)
    for line in format_cache(models, as_json=as_json):
        print(line)
    if models and not as_json:
        print(f"total {_gb(sum(m.bytes for m in models))} in {root}")
    return 0


def format_cache(models, *, as_json: bool = False) -> list[str]:
    """One line per cached model: source, commit, dtype/quantization, size, folder."""
    if not models:
        return []
    if as_json:
        return [json.dumps({"source": m.source, "commit": m.commit, "variant": m.variant, "bytes": m.bytes,
                            "finished": m.finished, "folder": str(m.folder)}) for m in models]
    rows = [(m.source, (m.commit or "-")[:12], m.variant, _gb(m.bytes),
             str(m.folder) + ("" if m.finished else "  (unfinished: resumed on next use)")) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join([*(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))), r[4]])
            for r in rows]


@cli.command("verify", short_help="check every file of a converted folder against its manifest", examples=("reshard verify llama-70b/", "reshard verify llama-70b/ --no-checksums"))
@folder_argument()
@click.option("--no-checksums", is_flag=True, cls=Option, help="skip the sha256 (fast: size and header only)")
def verify_command(folder, no_checksums) -> int:
    """Check every layer file of FOLDER (written by `reshard convert`) against its manifest.

    Checks presence, size, header, tensor names and shapes, and sha256; prints each bad file on a
    line and exits 1 if there is one.
    """
    return verify(folder, checksums=not no_checksums)


def verify(folder, *, checksums: bool = True) -> int:
    """Print each bad file (`path: problem`) on stdout; exit 1 if any, with one `Error:` line."""
    from .errors import FormatError
    from .format import read_manifest
    from .verify import find_bad_files

    manifest = read_manifest(folder)
    bad = find_bad_files(folder, checksums=checksums, manifest=manifest)
    for e in bad:
        print(f"{e.path}: {e.problem}")
    files = sum(1 for g in manifest.groups if g.file)
    if bad:
        raise FormatError(f"{len(bad)} of {files} layer files in {folder} are damaged or missing; "
                          f"run `reshard convert` again to repair them")
    print(f"ok: {files} layer files in {folder} match the manifest" + ("" if checksums else " (checksums skipped)"),
          file=sys.stderr)
    return 0


def check_quantize_flags(quantize, quantize_group: int, quantize_embeddings: bool) -> None:
    if not quantize and (quantize_embeddings or quantize_group != 32):
        raise UsageError("--quantize-group and --quantize-embeddings need --quantize int8 or int4")
    if quantize == "int8" and quantize_group != 32:
        raise UsageError("--quantize-group applies to int4 only; int8 has one scale per output channel")


def describe(folder) -> dict:
    from .format import expert_bytes, read_manifest, row_gathered, unquantized_bytes

    m = read_manifest(folder)
    scheme = (m.quantization or {}).get("scheme")
    # on the device, quantized weights are expanded: a group takes its unquantized size there
    sizes = [unquantized_bytes(g, scheme) for g in m.groups]
    layer_sizes = sorted((g.bytes for g in m.groups if g.kind == "layer"), reverse=True)
    # Streaming holds the group that runs plus the one read ahead (prefetch 1).
    streaming = sum(sorted(sizes, reverse=True)[:2])
    return {
        "architecture": m.architecture, "dtype": m.dtype, "source": m.source,
        "groups": [{"name": g.name, "file": g.file, "bytes": g.bytes, "tensors": len(g.tensors),
                    "expert_bytes": expert_bytes(g)} for g in m.groups],
        "total_bytes": m.total_bytes, "largest_layer_bytes": layer_sizes[0] if layer_sizes else 0,
        "streaming_weight_bytes": streaming, "quantization": m.quantization,
        # bytes read per forward pass (every file once), and what they would be unquantized
        "pass_bytes": m.total_bytes, "pass_bytes_unquantized": sum(unquantized_bytes(g, scheme) for g in m.groups),
        "layer_bytes": sum(g.bytes for g in m.groups if g.kind == "layer"),
        "layer_bytes_unquantized": sum(unquantized_bytes(g, scheme) for g in m.groups if g.kind == "layer"),
        # mixtures of experts: bytes of routed experts, and what a batch-1 token reads of the files
        "expert_bytes": sum(expert_bytes(g) for g in m.groups), "token_bytes": token_bytes(folder, m),
        "embedding_rows": row_gathered(m) is not None,  # a streamed pass reads the rows it looks up
        **routed_memory(folder, m, sizes), "stored_formats": stored_formats(m),
    }


def stored_formats(m) -> dict[str, int]:
    """Bytes of the folder's tensors by how they are stored, largest first: a quantization scheme
    (each parameter's own where a folder mixes them, as one from a GGUF does) or a dtype."""
    from .format import ST_TO_DTYPE, dtype_name, quant_part_names, scheme_of

    scheme = (m.quantization or {}).get("scheme")
    found: dict[str, int] = {}
    for g in m.groups:
        parts = {p: quant_part_names(p, scheme_of(g, p, scheme)).values() for p in g.quantized}
        kind = {n: scheme_of(g, p, scheme) for p, names in parts.items() for n in names}
        for n, t in g.tensors.items():
            key = kind.get(n) or dtype_name(ST_TO_DTYPE[t["dtype"]])
            found[key] = found.get(key, 0) + math.prod(t["shape"]) * ST_TO_DTYPE[t["dtype"]].itemsize
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def routed_memory(folder, m, sizes: list[int]) -> dict:
    """Per MoE layer, its expert bytes and those a batch-1 token routes (of the files), and the
    device memory streaming needs at batch 1 for weights: the two largest groups as they run,
    each holding only a token's routed experts (expanded to the compute dtype)."""
    from .format import ST_TO_DTYPE, expert_bytes

    if not any(g.experts for g in m.groups):
        return {"moe_layers": [], "device_bytes_batch1": None}
    try:
        k = json.loads((Path(folder) / "config.json").read_text())["num_experts_per_tok"]
    except (OSError, ValueError, KeyError):
        return {"moe_layers": [], "device_bytes_batch1": None}
    layers, need = [], []
    for g, size in zip(m.groups, sizes):
        unused = 0  # device bytes of the experts a token leaves out
        routed = 0
        for entry in g.experts.values():
            count, used = entry["num_experts"], min(k, entry["num_experts"])
            routed += expert_bytes(g, entry) * used // count
            for p in entry["tensors"]:
                info = g.quantized.get(p) or g.tensors[p]
                unused += math.prod(info["shape"]) * ST_TO_DTYPE[info["dtype"]].itemsize * (count - used) // count
        need.append(size - unused)
        if g.experts:
            layers.append({"name": g.name, "expert_bytes": expert_bytes(g), "token_bytes": routed})
    return {"moe_layers": layers, "device_bytes_batch1": sum(sorted(need, reverse=True)[:2])}


def token_bytes(folder, m) -> int | None:
    """Bytes one token's streamed pass reads: every file, but only its routed experts of a MoE
    layer (None: k unknown) and one row of input embeddings read by rows (format.row_gathered)."""
    from .format import expert_bytes, row_gathered

    gathered = row_gathered(m)
    total = m.total_bytes - (m.groups[gathered[0]].bytes - gathered[2] if gathered else 0)
    if not any(g.experts for g in m.groups):
        return total
    try:
        k = json.loads((Path(folder) / "config.json").read_text())["num_experts_per_tok"]
    except (OSError, ValueError, KeyError):
        return None
    unused = 0
    for g in m.groups:
        for entry in g.experts.values():
            count = entry["num_experts"]
            unused += expert_bytes(g, entry) * max(0, count - k) // count
    return total - unused


def print_info(folder, *, as_json: bool = False) -> None:
    d = describe(folder)
    if as_json:
        print(json.dumps(d, indent=1))
        return
    print(f"architecture  {d['architecture']}")
    print(f"dtype         {d['dtype']}")
    src = d["source"]  # at its commit, or for a local source the fingerprint errors name it by
    print(f"source        {src.get('id')} @ {src.get('commit') or (src.get('fingerprint') or '')[:12] or '-'}")
    print(f"groups        {len(d['groups'])}")
    for g in d["groups"]:
        print(f"  {g['name']:<14} {g['file'] or '(tied)':<28} {_gb(g['bytes']):>10}")
    print(f"total         {_gb(d['total_bytes'])}")
    mixed = not d["quantization"] and len(d["stored_formats"]) > 1  # per-parameter schemes (a GGUF's)
    if mixed:
        total = sum(d["stored_formats"].values())
        print("stored as     " + ", ".join(f"{name} {_gb(n)} ({n / total:.0%})"
                                           for name, n in d["stored_formats"].items()))
    if d["quantization"]:
        q = d["quantization"]
        group = f" group {q['group_size']}" if q.get("group_size") else ""
        origin = f" (from {q['source_format']})" if q.get("source_format") else ""  # re-packed published weights
        print(f"quantization  {q['scheme']}{group}{origin}{', embeddings too' if q.get('embeddings') else ''}")
    if d["quantization"] or (mixed and d["pass_bytes"] < d["pass_bytes_unquantized"]):
        print(f"bytes/pass    {_gb(d['pass_bytes'])} ({_gb(d['pass_bytes_unquantized'])} unquantized, "
              f"{d['pass_bytes'] / d['pass_bytes_unquantized']:.3f}x); decoder layers "
              f"{d['layer_bytes'] / d['layer_bytes_unquantized']:.3f}x")
    if d["token_bytes"] is not None and d["token_bytes"] < d["total_bytes"]:
        print(f"bytes/token   {_gb(d['token_bytes'])} a streamed batch-1 pass reads: "
              f"{'routed experts only, ' if d['expert_bytes'] else ''}"
              f"{'the looked-up embedding row, ' if d['embedding_rows'] else ''}(all files: {_gb(d['total_bytes'])})")
    if d["expert_bytes"]:
        print(f"experts       {_gb(d['expert_bytes'])} routed-expert bytes in "
              f"{sum(1 for g in d['groups'] if g['expert_bytes'])} layers "
              f"({_gb(max(g['expert_bytes'] for g in d['groups']))} in the largest)")
        for g in d["moe_layers"]:
            print(f"  {g['name']:<14} experts {_gb(g['expert_bytes']):>10}, a batch-1 token routes "
                  f"{_gb(g['token_bytes'])}")
        if d["device_bytes_batch1"] is not None:
            print(f"device memory for weights at batch 1 (2 largest groups, routed experts only): "
                  f"{_gb(d['device_bytes_batch1'])}")
    print(f"device memory for weights while streaming (2 largest groups): {_gb(d['streaming_weight_bytes'])}"
          f" + KV cache and activations")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


if __name__ == "__main__":
    sys.exit(main())
