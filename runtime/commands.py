"""What the `runtime` commands do once runtime/cli.py has parsed and checked their options: open
the model, read prompts and JSONL input, generate (one prompt, a file of prompts, or over Ray
workers), score, and write the results.
"""

from __future__ import annotations

import json
import sys

from reshard.commandline import open_output
from reshard.errors import UsageError

from .options import sampling_kwargs
from .progress import report_stats, show_first_pass


def open_model(args):
    from .model import LayeredModel

    return LayeredModel.from_pretrained(args.model, **model_kwargs(args))


def model_kwargs(args) -> dict:
    """`LayeredModel.from_pretrained`'s options from the model options of the command line, for this
    process or each Ray worker (whose device is its own)."""
    return {"device": args.device, "dtype": args.dtype, "prefetch": args.prefetch,
            "max_gpu_memory": args.max_gpu_memory, "max_cpu_memory": args.max_cpu_memory,
            "trust_remote_code": args.trust_remote_code, "verify": args.verify,
            "expert_cache": getattr(args, "expert_cache", None),
            "predict_experts": getattr(args, "predict_experts", False),
            "cpu_layers": getattr(args, "cpu_layers", None), "cpu_experts": getattr(args, "cpu_experts", None)}


def encode_prompt(tokenizer, text: str, *, chat: bool) -> list[int]:
    from .batch import prompt_ids

    if tokenizer is None:
        raise UsageError("this folder has no tokenizer files; convert a checkpoint that has them")
    return prompt_ids(tokenizer, text, chat=chat)


def read_prompt(args) -> str:
    """--prompt, else stdin; on a terminal, say that it waits for the prompt."""
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        print("runtime: type the prompt, then Ctrl-D on a line of its own (or pass --prompt)", file=sys.stderr)
    return sys.stdin.read()


def generate_one(args) -> int:
    import torch
    from transformers import TextStreamer

    from .batch import pad_id

    prompt = read_prompt(args)
    if not prompt:
        raise UsageError("empty prompt; pass --prompt TEXT or text on stdin")
    model = open_model(args)
    ids = encode_prompt(model.tokenizer, prompt, chat=args.chat)
    if not ids:
        raise UsageError("the prompt encodes to no tokens (only whitespace?); pass some text")
    check_context(model.config, len(ids) + args.max_new_tokens)
    show_first_pass(model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = sampling_kwargs(args)
    streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, streamer=streamer,
                         pad_token_id=pad_id(model), **sampling, **speculation(args, model))
    if args.stats:
        report_stats({**model.stats.as_dict(), "new_tokens": int(out.shape[1] - len(ids)), **speculation_stats(model)})
    model.close()
    return 0


def speculation(args, model) -> dict:
    """generate() options for --prompt-lookup, --assistant and --draft (several tokens per pass)."""
    if getattr(args, "draft", None) is not None:
        return tree_speculation(args, model)
    if args.prompt_lookup is not None:
        return {"prompt_lookup_num_tokens": args.prompt_lookup}
    if args.assistant is not None:
        from .batch import assistant_options

        return assistant_options(model, args.assistant)
    return {}


def tree_speculation(args, model) -> dict:
    """generate() options for --draft and --tree-budget: the draft loaded once, whole on the device."""
    if args.draft is None:
        return {}
    if args.min_new_tokens:
        raise UsageError("--min-new-tokens cannot be combined with --draft; drop one")
    from .speculate import LOOKUP, open_draft

    draft = args.draft if args.draft == LOOKUP else open_draft(model, args.draft)  # (prompt lookup: no model)
    return {"draft": draft, "tree_budget": args.tree_budget}


def speculation_stats(model) -> dict:
    """--stats' figures of the last tree speculation: tokens per pass, tree size, acceptance."""
    return {"speculation": model.speculation} if model.speculation is not None else {}


def generate_file(args) -> int:
    from .batch import generate_batch

    items = read_prompts(args.prompts_file)
    if len(items) > 1 and (args.prompt_lookup is not None or args.assistant is not None):
        raise UsageError("--prompt-lookup and --assistant work on one prompt at a time; drop --prompts-file")
    if args.ray_workers is not None:  # checked here, before any worker starts
        from pathlib import Path

        from reshard.plan import read_config

        from .opening import load_tokenizer

        folder = Path(args.model)
        check_prompts(args, items, load_tokenizer(folder),
                      read_config(folder, folder, trust_remote_code=args.trust_remote_code))
        return generate_with_ray(args, items)
    model = open_model(args)
    check_prompts(args, items, model.tokenizer, model.config)
    sampling = sampling_kwargs(args)
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    show_first_pass(model)
    done = generate_batch(model, [it["prompt"] for it in items], chat=args.chat, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.min_new_tokens, **sampling, **speculation(args, model))
    for item, g in zip(items, done):
        print(json.dumps({**item, "completion": g.text, "new_tokens": len(g.tokens)}), flush=True)
    if args.stats:
        report_stats({**model.stats.as_dict(), "new_tokens": sum(len(g.tokens) for g in done),
                      **speculation_stats(model)})
    model.close()
    return 0


def check_prompts(args, items: list[dict], tokenizer, config) -> None:
    """What a --prompts-file must pass before anything generates: every prompt encodes to some
    tokens, and the longest plus --max-new-tokens fits the model's context."""
    if tokenizer is None:
        return
    from .batch import prompt_ids

    lengths = [len(prompt_ids(tokenizer, it["prompt"], chat=args.chat)) for it in items]
    if 0 in lengths:
        raise UsageError(f"{args.prompts_file} line {lengths.index(0) + 1}: the prompt encodes to no tokens "
                         "(only whitespace?); pass some text")
    check_context(config, max(lengths) + args.max_new_tokens)


def read_prompts(path) -> list[dict]:
    """Prompts of a --prompts-file: JSONL objects with "prompt", or one prompt per (non-empty) line."""
    lines = [ln for ln in open(path, encoding="utf-8").read().splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"{path} holds no prompts")
    if not lines[0].lstrip().startswith("{"):
        return [{"prompt": ln} for ln in lines]
    items = [_json_line(path, n, ln) for n, ln in enumerate(lines, 1)]
    for n, it in enumerate(items, 1):
        if not isinstance(it, dict) or not isinstance(it.get("prompt"), str):
            raise UsageError(f"{path} line {n} has no \"prompt\" string")
    return items


def score_file(args) -> int:
    items = [_json_line(args.input, n, ln) for n, ln in
             enumerate(open(args.input, encoding="utf-8").read().splitlines(), 1) if ln.strip()]
    if args.ray_workers is not None:
        return score_with_ray(args, items)
    model = open_model(args)
    scored = model.score(items, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                         offload=args.offload_activations)
    write_jsonl(args.output, scored)
    if args.stats:
        report_stats({**model.stats.as_dict(), "items": len(items), "groups": len(model.groups)})
    model.close()
    return 0


def write_jsonl(output: str, items: list[dict]) -> None:
    """Items as JSONL to OUTPUT (- is stdout); a file's path is printed once it is written."""
    f = open_output(output)
    f.writelines(json.dumps(item) + "\n" for item in items)
    f.flush()
    if output != "-":
        f.close()
        print(output)


def score_with_ray(args, items: list[dict]) -> int:
    from .distributed import score_items

    scored, blocks = score_items(items, args.model, workers=args.ray_workers, address=args.ray_address,
                                 block_size=args.ray_block_size, threads=args.ray_threads,
                                 model_options=model_kwargs(args), batch_size=args.batch_size,
                                 offload=args.offload_activations)
    write_jsonl(args.output, scored)
    if args.stats:
        print(json.dumps({"items": len(items), "blocks": [b.__dict__ for b in blocks]}), file=sys.stderr)
    return 0


def generate_with_ray(args, items: list[dict]) -> int:
    from .distributed import generate_items

    done, blocks = generate_items(items, args.model, workers=args.ray_workers, address=args.ray_address,
                                  block_size=args.ray_block_size, threads=args.ray_threads,
                                  model_options=model_kwargs(args), chat=args.chat, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                  **sampling_kwargs(args), **ray_speculation(args))
    for item in done:
        print(json.dumps(item), flush=True)
    if args.stats:
        print(json.dumps({"new_tokens": sum(it["new_tokens"] for it in done),
                          "blocks": [b.__dict__ for b in blocks]}), file=sys.stderr)
    return 0


def ray_speculation(args) -> dict:
    """--draft and --tree-budget for Ray workers: each opens the draft once (runtime.distributed.Worker)."""
    return {} if args.draft is None else {"draft": args.draft, "tree_budget": args.tree_budget}


def _json_line(path, n: int, line: str):
    try:
        return json.loads(line)
    except ValueError as e:
        raise UsageError(f"{path} line {n} is not valid JSON ({e})") from None


def check_context(config, length: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit and length > limit:
        raise UsageError(f"prompt plus --max-new-tokens is {length} tokens, more than the model's context of "
                         f"{limit}; shorten the prompt or lower --max-new-tokens")
