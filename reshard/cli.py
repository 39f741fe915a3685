"""`reshard`: convert a Hugging Face checkpoint into per-layer safetensors files.

Examples:
  reshard convert meta-llama/Llama-2-70b-hf llama-70b/ --dtype float16
  reshard convert ./my-checkpoint out/
  reshard convert meta-llama/Llama-2-70b-hf llama-70b-int4/ --dtype float16 --quantize int4
  reshard info llama-70b/
  reshard verify llama-70b/

Set RESHARD_DEBUG=1 to see a traceback instead of a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import ReshardError, UsageError

DEBUG_ENV = "RESHARD_DEBUG"  # set to 1 for tracebacks instead of one-line errors


def run_guarded(main_fn, argv=None) -> int:
    """Run `main_fn(argv)`; known errors become one `Error: ...` line and exit 1."""
    try:
        return main_fn(argv) or 0
    except KeyboardInterrupt:
        print("Error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # the one place that turns exceptions into messages
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"Error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


def error_line(e: BaseException) -> str:
    """One line for an exception: ours say what to do; others get a hint to debug."""
    if isinstance(e, ReshardError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.errno == 28:
        return f"no space left on device ({e.filename or 'output'}); free some space and run the same command again to resume"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{e.strerror}: {e.filename}"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint into per-layer files",
                       description="Convert SOURCE (a hub repo id, a checkpoint folder or a .gguf file) into OUT.\n\n"
                                   "Example: reshard convert meta-llama/Llama-2-70b-hf llama-70b/ --dtype float16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("source", help="hub repo id, local checkpoint folder, or .gguf file")
    c.add_argument("out", help="output folder")
    c.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    c.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the written weights (default: the checkpoint's)")
    c.add_argument("--token", help="hub token (default: $HF_TOKEN)")
    c.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    c.add_argument("--quantize", choices=["int8", "int4"],
                   help="store the decoder layers' linear weights as int8 (per output channel) or int4 (group-wise)")
    c.add_argument("--quantize-group", type=int, default=32, metavar="N",
                   help="int4: input columns per scale/zero group (default 32)")
    c.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize: quantize the embeddings and the output head too")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--force", action="store_true", help="replace an OUT that holds another model or format version")
    c.add_argument("--low-disk", action="store_true",
                   help="hub sources: fetch, convert and delete one source shard at a time (peak disk: OUT + 1 shard)")

    i = sub.add_parser("info", help="describe a converted folder",
                       description="Groups, dtype, bytes, and the device memory streaming needs.\n\n"
                                   "Example: reshard info llama-70b/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("out", help="a folder written by `reshard convert`")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    v = sub.add_parser("verify", help="check every file of a converted folder against its manifest",
                       description="Check presence, size, header, tensor names and shapes, and sha256 of every\n"
                                   "layer file; print each bad file on a line and exit 1 if there is one.\n\n"
                                   "Example: reshard verify llama-70b/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("out", help="a folder written by `reshard convert`")
    v.add_argument("--no-checksums", action="store_true", help="skip the sha256 (fast: size and header only)")
    return parser


def main(argv=None) -> int:
    return run_guarded(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from .convert import convert

        check_quantize_flags(args)
        convert(args.source, args.out, revision=args.revision, dtype=args.dtype, token=args.token,
                trust_remote_code=args.trust_remote_code, progress=not args.quiet, force=args.force,
                low_disk=args.low_disk, quantize=args.quantize, quantize_group=args.quantize_group,
                quantize_embeddings=args.quantize_embeddings)
        print(args.out)
    elif args.command == "info":
        print_info(args.out, as_json=args.json)
    elif args.command == "verify":
        return verify(args.out, checksums=not args.no_checksums)
    return 0


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


def check_quantize_flags(args) -> None:
    if not args.quantize and (args.quantize_embeddings or args.quantize_group != 32):
        raise UsageError("--quantize-group and --quantize-embeddings need --quantize int8 or int4")
    if args.quantize == "int8" and args.quantize_group != 32:
        raise UsageError("--quantize-group applies to int4 only; int8 has one scale per output channel")


def describe(folder) -> dict:
    from .format import read_manifest, unquantized_bytes

    m = read_manifest(folder)
    scheme = (m.quantization or {}).get("scheme")
    # on the device, quantized weights are expanded: a group takes its unquantized size there
    sizes = [unquantized_bytes(g, scheme) for g in m.groups]
    layer_sizes = sorted((g.bytes for g in m.groups if g.kind == "layer"), reverse=True)
    # Streaming holds the group that runs plus the one read ahead (prefetch 1).
    streaming = sum(sorted(sizes, reverse=True)[:2])
    return {
        "architecture": m.architecture, "dtype": m.dtype, "source": m.source,
        "groups": [{"name": g.name, "file": g.file, "bytes": g.bytes, "tensors": len(g.tensors)} for g in m.groups],
        "total_bytes": m.total_bytes, "largest_layer_bytes": layer_sizes[0] if layer_sizes else 0,
        "streaming_weight_bytes": streaming, "quantization": m.quantization,
        # bytes read per forward pass (every file once), and what they would be unquantized
        "pass_bytes": m.total_bytes, "pass_bytes_unquantized": sum(unquantized_bytes(g, scheme) for g in m.groups),
        "layer_bytes": sum(g.bytes for g in m.groups if g.kind == "layer"),
        "layer_bytes_unquantized": sum(unquantized_bytes(g, scheme) for g in m.groups if g.kind == "layer"),
    }


def print_info(folder, *, as_json: bool = False) -> None:
    d = describe(folder)
    if as_json:
        print(json.dumps(d, indent=1))
        return
    print(f"architecture  {d['architecture']}")
    print(f"dtype         {d['dtype']}")
    print(f"source        {d['source'].get('id')} @ {d['source'].get('commit') or d['source'].get('revision') or '-'}")
    print(f"groups        {len(d['groups'])}")
    for g in d["groups"]:
        print(f"  {g['name']:<14} {g['file'] or '(tied)':<28} {_gb(g['bytes']):>10}")
    print(f"total         {_gb(d['total_bytes'])}")
    if d["quantization"]:
        q = d["quantization"]
        group = f" group {q['group_size']}" if q.get("group_size") else ""
        print(f"quantization  {q['scheme']}{group}{', embeddings too' if q.get('embeddings') else ''}")
        print(f"bytes/pass    {_gb(d['pass_bytes'])} ({_gb(d['pass_bytes_unquantized'])} unquantized, "
              f"{d['pass_bytes'] / d['pass_bytes_unquantized']:.3f}x); decoder layers "
              f"{d['layer_bytes'] / d['layer_bytes_unquantized']:.3f}x")
    print(f"device memory for weights while streaming (2 largest groups): {_gb(d['streaming_weight_bytes'])}"
          f" + KV cache and activations")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


if __name__ == "__main__":
    sys.exit(main())
