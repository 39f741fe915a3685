"""Tree speculation (issue 24): tokens per target pass and s/token, chain vs tree; and on a GPU,
what verifying a tree costs next to a 1-token pass of streamed 70B-shaped layers.

  python benchmarks/speculate.py cpu > benchmarks/results/speculate_cpu.txt
  python benchmarks/speculate.py cpu-batch --new-tokens 32 > benchmarks/results/speculate_cpu_batch.txt
  python benchmarks/speculate.py gpu [--tokens-per-pass X]   # a GPU (acceptance 3): tree of 16/64/256/1024
  python benchmarks/speculate.py gpu --dry                   # the same, tiny, on the CPU (CI)

cpu: SmolLM2-135M-Instruct (float32, every group streamed: --max-cpu-memory 0) as the target, its
int4 copy (de-quantized, whole in RAM) as the draft; plain greedy is the baseline in the same run.
Chain = transformers' assisted generation (today's --assistant) and prompt lookup (--prompt-lookup);
tree = runtime/speculate.py (--draft) at a fixed budget and at the measured ("auto") one, and
prompt lookup's trees (--draft prompt-lookup) on the copying prompt. Every
method's tokens are checked against plain greedy's (same = yes).

cpu-batch: the same pair on a batch of prompts: plain batched greedy (one pass per token for the
whole batch) against tree speculation where each prompt grows its own tree and one pass verifies
them all; each row's tokens are checked against plain's.

gpu: 4 random Llama-2-70B-shaped int4 layers held in pinned host RAM and streamed to the GPU each
pass, a 512-token prefix in the KV cache; the time of one forward verifying a tree of n tokens over
the time of a 1-token forward, then the arithmetic for a whole 70B int4 model over PCIe4 and PCIe5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from common import machine_lines, out  # noqa: E402

NEW_TOKENS = 48
PROMPTS = {
    "open": "Explain in a few sentences why the sky is blue.",
    "copying": "Repeat the following text exactly.\n\nText: The old lighthouse keeper climbed the stairs every "
               "evening, lit the lamp, and watched the ships pass the rocky coast until dawn. In winter the "
               "storms were so strong that the windows rattled all night.\n\nRepeated text:",
}


def run_method(model, ids, new_tokens: int, **options) -> tuple[list[int], int, float]:
    """New tokens, target passes and seconds of one greedy generate."""
    model.stats.passes = 0
    start = time.perf_counter()
    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, **options)
    seconds = time.perf_counter() - start
    return got[0, ids.shape[1]:].tolist(), model.stats.passes, seconds


def open_pair(what: str):
    """The CPU sections' target (SmolLM2 float32, every group streamed) and draft (its int4 copy, whole
    in RAM as float32), after the machine lines and a line saying so and `what` is generated."""
    from models import converted, smollm2_checkpoint
    from runtime.batch import load_assistant
    from runtime.model import LayeredModel

    source = smollm2_checkpoint()
    target_folder = converted(source, "smollm2-f32", "float32")
    draft_folder = converted(source, "smollm2-int4-g32", "float16", "int4")
    for line in machine_lines("float32"):
        out(line)
    model = LayeredModel.from_pretrained(target_folder, device="cpu", dtype="float32", max_cpu_memory=0)
    draft = load_assistant(draft_folder, device=torch.device("cpu"), dtype=torch.float32)
    out(f"target: {target_folder.name} streamed (every group read each pass); draft: {draft_folder.name} whole "
        f"in RAM as float32; {what}, greedy")
    return model, draft


def cpu_section(new_tokens: int) -> None:
    from runtime.batch import chat_ids
    from runtime.speculate import resolve_budget

    model, draft = open_pair(f"{new_tokens} new tokens")
    start = time.perf_counter()
    auto = resolve_budget(model, draft, "auto")  # measured once (3 target passes, 3 draft forwards), not timed below
    out(f"measured costs ({time.perf_counter() - start:.1f} s): {model.tree_costs[1]}; auto budget: {auto}")
    out()
    out("| prompt | method | tokens/pass | target passes | s/token | vs plain | same as plain |")
    out("|---|---|---|---|---|---|---|")
    for name, text in PROMPTS.items():
        ids = torch.tensor([chat_ids(model.tokenizer, [{"role": "user", "content": text}])])
        methods = {"plain": {}, "chain (assistant)": {"assistant_model": draft},
                   "tree 16": {"draft": draft, "tree_budget": 16}, "tree 64": {"draft": draft, "tree_budget": 64},
                   f"tree auto ({auto})": {"draft": draft, "tree_budget": "auto"}}
        if name == "copying":
            methods["chain (prompt lookup 10)"] = {"prompt_lookup_num_tokens": 10}
            methods["tree (prompt lookup 64)"] = {"draft": "prompt-lookup", "tree_budget": 64}
        plain = None
        for method, options in methods.items():
            print(f"speculate: {name} / {method}", file=sys.stderr)
            tokens, passes, seconds = run_method(model, ids, new_tokens, **options)
            plain = plain or (tokens, seconds)
            out(f"| {name} | {method} | {len(tokens) / passes:.2f} | {passes} | {seconds / len(tokens):.3f} | "
                f"{plain[1] / seconds:.2f}x | {'yes' if tokens == plain[0] else 'NO'} |")
    model.close()


BATCH = ["Explain in a few sentences why the sky is blue.", "Write a short poem about the sea.",
         "List three uses of copper.", PROMPTS["copying"]]


def cpu_batch_section(new_tokens: int) -> None:
    model, draft = open_pair(f"{len(BATCH)} chat prompts together, {new_tokens} new tokens each")
    out()
    out("| method | tokens/pass (all rows) | target passes | s/token (all rows) | vs plain | rows same as plain |")
    out("|---|---|---|---|---|---|")
    plain = None
    for method, options in {"plain batch": {}, "tree 16 per row": {"draft": draft, "tree_budget": 16},
                            "tree 64 per row": {"draft": draft, "tree_budget": 64}}.items():
        print(f"speculate: batch / {method}", file=sys.stderr)
        model.stats.passes = 0
        start = time.perf_counter()
        done = model.generate_batch(BATCH, chat=True, max_new_tokens=new_tokens, do_sample=False, **options)
        seconds, passes = time.perf_counter() - start, model.stats.passes
        rows = [g.tokens for g in done]
        tokens = sum(map(len, rows))
        plain = plain or (rows, seconds)
        same = sum(r == p for r, p in zip(rows, plain[0]))
        out(f"| {method} | {tokens / passes:.2f} | {passes} | {seconds / tokens:.3f} | {plain[1] / seconds:.2f}x | "
            f"{same}/{len(rows)} |")
    model.close()


def gpu_section(dry: bool, tokens_per_pass: float, work: Path | None = None, *, header: bool = True) -> None:
    """The verify-cost table and the 70B arithmetic. The synthetic model is written into `work`
    (default: the benchmark cache, kept for the next run); `header`: print the machine first
    (benchmarks/gpu_check.py prints its own)."""
    from transformers import DynamicCache, LlamaConfig

    from models import CACHE, LLAMA2_70B
    from reshard.synthetic import write_random_model
    from runtime.kvcache import keep_columns
    from runtime.model import LayeredModel
    from runtime.score import cache_arg
    from runtime.tree import TokenTree

    device = "cpu" if dry else "cuda"
    shapes = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=1000) if dry else LLAMA2_70B
    folder = (work or CACHE) / ("speculate-tiny" if dry else "speculate-70b-4l-int4")
    if not (folder / "manifest.json").is_file():
        config = LlamaConfig(**shapes, num_hidden_layers=4, max_position_embeddings=4096, tie_word_embeddings=False)
        write_random_model(config, folder, dtype=torch.float16, quantize="int4", device=device)
    if header:
        for line in machine_lines("float16"):
            out(line)
    model = LayeredModel.from_pretrained(folder, device=device, dtype="float16", max_gpu_memory="0" if not dry else None,
                                         max_cpu_memory="1TB" if not dry else 0)
    out(f"model: {folder.name} ({'tiny, --dry' if dry else 'Llama-2-70B layer shapes'}); places: {model.places}")
    prefix, sizes = 512, (1, 16, 64, 256, 1024)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.randint(0, shapes["vocab_size"], (1, prefix), device=device), use_cache=True,
              **cache_arg(model, cache))
    g = torch.Generator().manual_seed(0)
    times = {}
    for n in sizes:
        tree = TokenTree()
        for j in range(n):  # a random bushy tree: each node under one of the earlier ones (or the root)
            tree.add(int(torch.randint(0, shapes["vocab_size"], (), generator=g)),
                     int(torch.randint(-1, j, (), generator=g)) if j else -1, 0.0)
        repeats = 1 if dry else 3  # (dry: the script is checked, nothing measured)
        times[n] = statistics.median(verify_seconds(model, cache, tree, prefix, device) for _ in range(repeats))
        keep_columns(cache, torch.arange(prefix, device=device))
    out()
    out("| tree tokens | seconds per pass | vs 1-token pass |")
    out("|---|---|---|")
    for n in sizes:
        out(f"| {n} | {times[n]:.4f} | {times[n] / times[1]:.2f}x |")
    model.close()
    whole = 70e9 * (0.5 + 2 / 32)  # int4 weights with a float16 scale per 32: bytes a 70B pass moves
    out()
    out(f"70B int4 arithmetic: a pass moves about {whole / 1e9:.0f} GB; with the tree's tokens per pass "
        f"T = {tokens_per_pass} (the CPU section's tree figure, passed as --tokens-per-pass):")
    for bus, gbps in (("PCIe4 x16", 25.0), ("PCIe5 x16", 50.0)):
        for n in (64, 256):
            seconds = whole / (gbps * 1e9) * times[n] / times[1]
            out(f"  {bus} (~{gbps:.0f} GB/s): tree {n}: {whole / 1e9:.0f} GB / {gbps:.0f} GB/s x {times[n] / times[1]:.2f} "
                f"= {seconds:.2f} s/pass -> {tokens_per_pass / seconds:.2f} tokens/s (plain: {gbps * 1e9 / whole:.2f})")


def verify_seconds(model, cache, tree, prefix: int, device: str) -> float:
    from runtime.kvcache import keep_columns
    from runtime.score import cache_arg
    from runtime.tree import tree_mask, tree_positions

    keep_columns(cache, torch.arange(prefix, device=device))
    nodes = range(len(tree) - 1) if len(tree) > 1 else range(0)
    pending = [tree.tokens[0]]
    mask = tree_mask(tree, nodes, past=prefix, pending=1, dtype=model.dtype).to(device)
    pos = tree_positions(tree, nodes, root_position=prefix, pending=1).to(device)
    ids = torch.tensor([pending + tree.tokens[:len(nodes)]], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=len(tree),
              **cache_arg(model, cache))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["cpu", "cpu-batch", "gpu"])
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="cpu section: tokens per generate")
    parser.add_argument("--dry", action="store_true", help="gpu section: tiny shapes on the CPU")
    parser.add_argument("--tokens-per-pass", type=float, default=4.0,
                        help="gpu section's arithmetic: tokens a tree pass yields (from the CPU section)")
    args = parser.parse_args()
    if args.section == "cpu":
        cpu_section(args.new_tokens)
    elif args.section == "cpu-batch":
        cpu_batch_section(args.new_tokens)
    else:
        gpu_section(args.dry, args.tokens_per_pass)


if __name__ == "__main__":
    main()
