"""Options of the `runtime` commands (click), each defined once and checked before a model loads.

`model_options` opens a converted folder (device, dtype, memory budgets, prefetch, checks, stats);
`sampling_options` controls generation. Bad values stop the command at once with exit 2:
ranges through click's own types, device / dtype / sizes through the same checks the library
makes (so their messages are the library's), combinations in `check_generation`.
"""

from __future__ import annotations

import click

from reshard.commandline import DTYPES, Option, revision_option, token_option, trust_remote_code_option
from reshard.errors import UsageError

MODEL = "Model and memory"
SOURCE = "Hub repo ids (converted into the cache on first use; see `reshard list`)"
SAMPLING = "Generation"


def check_device(ctx, param, value):
    if value is not None:
        from .opening import resolve_device

        resolve_device(value)
    return value


def check_dtype(ctx, param, value):
    if value not in DTYPES:
        raise UsageError(f"unknown dtype {value!r}; use auto, float16, bfloat16 or float32")
    return value


def check_size(ctx, param, value):
    from .budget import parse_size

    parse_size(value)
    return value


def parse_cpu_layers(ctx, param, value):
    """--cpu-layers: "auto", a layer count, or None (off)."""
    if value is None or value == "auto":
        return value
    if not value.isdigit():
        raise UsageError(f"--cpu-layers {value!r} is not understood; give a layer count (e.g. 8) or auto")
    return int(value)


def parse_cpu_experts(ctx, param, value):
    """--cpu-experts: "auto", "on" or "off"."""
    if value not in ("auto", "on", "off"):
        raise UsageError(f"--cpu-experts {value!r} is not understood; give auto, on or off")
    return value


def model_argument():
    """MODEL: a converted folder, or a hub repo id or `.gguf` file (converted into the cache on first use)."""
    return click.argument("model", metavar="MODEL", type=click.Path())


def model_options(fn):
    """--device, --dtype, --prefetch, --max-gpu-memory, --max-cpu-memory, --expert-cache, --predict-experts,
    --cpu-layers, --cpu-experts, --trust-remote-code, --verify, --stats, and --revision, --token for a
    hub repo id: what `open_model` needs."""
    decorators = [
        click.option("--device", default=None, callback=check_device, cls=Option, section=MODEL,
                     show_default="cuda if available, else cpu", help="cpu, cuda or cuda:N"),
        click.option("--dtype", default="auto", callback=check_dtype, cls=Option, section=MODEL,
                     metavar="[" + "|".join(DTYPES) + "]", shell_complete=complete_dtype,
                     help="compute dtype (auto: the folder's; on the CPU, bfloat16 for a float16/bfloat16 "
                          "folder where the CPU has it natively, else float32)"),
        click.option("--prefetch", type=click.IntRange(min=0), default=1, cls=Option, section=MODEL,
                     help="groups read ahead by the background thread"),
        click.option("--max-gpu-memory", default=None, metavar="SIZE", callback=check_size, cls=Option,
                     section=MODEL, show_default="what is free, less a margin",
                     help="weights kept on the GPU, e.g. 12GiB"),
        click.option("--max-cpu-memory", default=None, metavar="SIZE", callback=check_size, cls=Option,
                     section=MODEL, show_default="what is free, less a margin",
                     help="weights kept in host RAM, e.g. 32GiB; 0 streams all from disk"),
        click.option("--expert-cache", default=None, metavar="SIZE", callback=check_size, cls=Option,
                     section=MODEL, show_default="what the budgets leave",
                     help="mixtures of experts: recently used experts kept on the device, e.g. 4GiB"),
        click.option("--predict-experts", is_flag=True, cls=Option, section=MODEL,
                     help="mixtures of experts: while a layer computes, read the experts the next layer's router "
                          "likely picks (a wrong guess costs bytes, never results); --stats counts the hits"),
        click.option("--cpu-layers", default=None, metavar="N|auto", callback=parse_cpu_layers, cls=Option,
                     section=MODEL, show_default="off",
                     help="compute the last N layers kept off the GPU on the CPU, where their weights wait, "
                          "instead of copying them (auto: per pass, where measured speeds say the CPU is "
                          "faster); --stats says where each ran"),
        click.option("--cpu-experts", default="off", metavar="auto|on|off", callback=parse_cpu_experts, cls=Option,
                     section=MODEL, help="mixtures of experts: compute the routed experts of layers kept off the "
                                         "GPU on the CPU, where they wait (auto: per call, where measured speeds "
                                         "say the CPU is faster); --stats says where each ran"),
        trust_remote_code_option(section=MODEL),
        click.option("--verify", is_flag=True, cls=Option, section=MODEL,
                     help="check every file's sha256 against the manifest first"),
        click.option("--stats", is_flag=True, cls=Option, section=MODEL,
                     help="print one JSON line of statistics (totals and per pass) last on stderr"),
        revision_option(section=SOURCE),
        token_option(section=SOURCE),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


RAY = "Ray (several workers, one model each)"


def ray_options(fn):
    """--ray-workers, --ray-address, --ray-block-size, --ray-threads: the job over Ray Data workers."""
    decorators = [
        click.option("--ray-workers", type=click.IntRange(min=1), default=None, metavar="N", cls=Option,
                     section=RAY, show_default="off", help="run the job on N Ray workers, one model each "
                                                           "(pip install 'reshard[ray]')"),
        click.option("--ray-address", default=None, metavar="ADDR", cls=Option, section=RAY,
                     show_default="$RAY_ADDRESS, else a local cluster", help="the Ray cluster to join"),
        click.option("--ray-block-size", type=click.IntRange(min=1), default=None, metavar="N", cls=Option,
                     section=RAY, show_default="one block per worker",
                     help="items per block; each block is one weight pass on one worker"),
        click.option("--ray-threads", type=click.IntRange(min=1), default=None, metavar="N", cls=Option,
                     section=RAY, show_default="the CPUs Ray gives each worker",
                     help="torch CPU threads per worker (results equal one process's bit for bit at its "
                          "thread count)"),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


def complete_dtype(ctx, param, incomplete: str):
    return [d for d in DTYPES if d.startswith(incomplete)]


def sampling_options(fn):
    """-n/--max-new-tokens, --min-new-tokens, --temperature, --top-p, --seed."""
    decorators = [
        click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=128, cls=Option,
                     section=SAMPLING, help="stop after this many new tokens"),
        click.option("--min-new-tokens", type=click.IntRange(min=0), default=None, cls=Option, section=SAMPLING,
                     show_default="none", help="do not stop (end of text) before this many new tokens"),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, cls=Option, section=SAMPLING,
                     help="sampling temperature; 0 means greedy"),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, cls=Option,
                     section=SAMPLING, show_default="off",
                     help="sample from the smallest set of tokens whose probability reaches P"),
        click.option("--seed", type=int, default=None, cls=Option, section=SAMPLING, show_default="random",
                     help="seed for sampling (the same seed gives the same sampled text)"),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


SPECULATION = "Speculation"


def check_tree_budget(ctx, param, value):
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value if value == "auto" else int(value)
    raise click.BadParameter(f"{value!r} is neither a number of tokens (1 or more) nor auto", ctx, param)


def tree_options(fn):
    """--draft, --tree-budget: tree speculative decoding (runtime/speculate.py)."""
    decorators = [
        click.option("--draft", default=None, metavar="PATH", type=click.Path(), cls=Option, section=SPECULATION,
                     help="a small draft model (checkpoint or converted folder, e.g. an int4 copy) kept whole on "
                          "the device; it grows a tree of guesses that each pass checks at once. It must use the "
                          "target's tokenizer (a different one is refused: use --assistant for that). "
                          "'prompt-lookup': no model, the tree holds what followed earlier occurrences of the "
                          "context's last tokens"),
        click.option("--tree-budget", default="auto", metavar="N|auto", callback=check_tree_budget, cls=Option,
                     section=SPECULATION, show_default="from the measured cost of a pass",
                     help="tokens of the draft's tree checked per pass"),
    ]
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


def check_generation(args) -> None:
    """Combinations of generation options that cannot work, refused before a model loads."""
    if args.min_new_tokens is not None and args.min_new_tokens > args.max_new_tokens:
        raise UsageError(f"--min-new-tokens ({args.min_new_tokens}) is more than --max-new-tokens "
                         f"({args.max_new_tokens}); lower it or raise --max-new-tokens")
    if args.temperature == 0 and args.top_p is not None:
        raise UsageError("--top-p needs --temperature above 0 (0 is greedy)")


def sampling_kwargs(args) -> dict:
    """generate() keyword arguments for --temperature and --top-p."""
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, **({"top_p": args.top_p} if args.top_p else {})}
