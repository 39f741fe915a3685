"""`runtime`: run a model converted by `reshard convert`, streaming it layer by layer.

Examples:
  runtime generate llama-70b/ --prompt "The capital of France is" --max-new-tokens 20
  echo "What is 2+2?" | runtime generate smollm2/ --chat --device cpu
  runtime generate llama-70b/ --verify --prompt "Hello"   # check every file's sha256 first
  runtime generate smollm2/ --prompts-file prompts.txt --max-new-tokens 40 > out.jsonl
  runtime score smollm2/ questions.jsonl --output scored.jsonl --batch-size 16

Set RESHARD_DEBUG=1 to see a traceback instead of a one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys

from reshard.cli import run_guarded
from reshard.errors import UsageError


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (the folder's), float16, bfloat16, float32")
    p.add_argument("--prefetch", type=int, default=1, help="groups read ahead by the background thread (default 1)")
    p.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="weights kept on the GPU, e.g. 12GiB (default: what is free, less a margin)")
    p.add_argument("--max-cpu-memory", default=None, metavar="SIZE",
                   help="weights kept in host RAM, e.g. 32GiB; 0 streams all from disk (default: what is free, less a margin)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.add_argument("--stats", action="store_true", help="print one JSON line of statistics (totals and per pass) last on stderr")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against the manifest first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to stdout",
                       description="Generate a continuation of a prompt (from --prompt or stdin).\n\n"
                                   "Example: runtime generate smollm2/ --chat --prompt 'What is a llama?'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="a folder written by `reshard convert`")
    g.add_argument("--prompt", help="the prompt (default: read stdin)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--min-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--prompts-file", help="generate for every prompt in FILE together (one per line, or JSONL "
                                          "with \"prompt\"); writes JSONL to stdout in input order")
    g.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="propose N tokens per pass copied from the prompt (transformers' prompt lookup)")
    g.add_argument("--assistant", metavar="PATH", help="a small draft model (checkpoint or converted folder) "
                                                       "kept on the device, proposing tokens for each pass")
    add_model_options(g)
    add_score_parser(sub)
    return parser


def add_score_parser(sub) -> None:
    s = sub.add_parser("score", help="log-probabilities of choices or texts, every layer read once",
                       description="Score JSONL lines {\"prompt\", \"choices\"} (adds \"scores\", \"best\") or "
                                   "{\"text\"} (adds \"logprob\", \"tokens\"), reading each layer once for all "
                                   "lines.\n\nExample: runtime score smollm2/ questions.jsonl --output scored.jsonl",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model", help="a folder written by `reshard convert`")
    s.add_argument("input", help="JSONL file of items to score")
    s.add_argument("--output", required=True, help="JSONL file to write, one line per input line")
    s.add_argument("--batch-size", type=int, default=8, help="items per micro-batch (default 8)")
    s.add_argument("--offload-activations", action="store_true",
                   help="keep waiting micro-batches' activations in host memory (when they do not fit on the device)")
    add_model_options(s)


def main(argv=None) -> int:
    return run_guarded(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    if args.command == "score":
        return score(args)
    return 2


def open_model(args):
    import torch

    from .model import LayeredModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LayeredModel.from_pretrained(args.model, device=device, dtype=args.dtype, prefetch=args.prefetch,
                                        max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
                                        trust_remote_code=args.trust_remote_code, verify=args.verify)


def encode_prompt(tokenizer, text: str, *, chat: bool):
    if tokenizer is None:
        raise UsageError("this folder has no tokenizer files; convert a checkpoint that has them")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("this tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(text, return_tensors="pt")


def generate(args) -> int:
    import torch
    from transformers import TextStreamer

    if args.prompts_file is not None:
        return generate_file(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise UsageError("empty prompt; pass --prompt TEXT or text on stdin")
    model = open_model(args)
    inputs = encode_prompt(model.tokenizer, prompt, chat=args.chat)
    check_context(model, inputs["input_ids"].shape[1] + args.max_new_tokens)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = {"do_sample": False} if args.temperature == 0 else {
        "do_sample": True, "temperature": args.temperature, **({"top_p": args.top_p} if args.top_p else {})}
    streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                         streamer=streamer, pad_token_id=_pad_id(model), **sampling, **speculation(args, model))
    if args.stats:
        stats = model.stats.as_dict()
        stats["new_tokens"] = int(out.shape[1] - inputs["input_ids"].shape[1])
        print(json.dumps(stats), file=sys.stderr)
    model.close()
    return 0


def speculation(args, model) -> dict:
    """generate() options for --prompt-lookup and --assistant (several tokens per pass)."""
    if args.prompt_lookup is not None and args.assistant is not None:
        raise UsageError("--prompt-lookup and --assistant cannot be combined; pick one")
    if args.prompt_lookup is not None:
        if args.prompt_lookup < 1:
            raise UsageError(f"--prompt-lookup must be 1 or more, not {args.prompt_lookup}")
        return {"prompt_lookup_num_tokens": args.prompt_lookup}
    if args.assistant is not None:
        from .batch import load_assistant

        return {"assistant_model": load_assistant(args.assistant, device=model.device, dtype=model.dtype)}
    return {}


def generate_file(args) -> int:
    from .batch import generate_batch

    items = read_prompts(args.prompts_file)
    if len(items) > 1 and (args.prompt_lookup is not None or args.assistant is not None):
        raise UsageError("--prompt-lookup and --assistant work on one prompt at a time; drop --prompts-file")
    model = open_model(args)
    if model.tokenizer is not None:
        from .batch import prompt_ids

        longest = max(len(prompt_ids(model.tokenizer, it["prompt"], chat=args.chat)) for it in items)
        check_context(model, longest + args.max_new_tokens)
    sampling = {"do_sample": False} if args.temperature == 0 else {
        "do_sample": True, "temperature": args.temperature, **({"top_p": args.top_p} if args.top_p else {})}
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    done = generate_batch(model, [it["prompt"] for it in items], chat=args.chat, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.min_new_tokens, **sampling, **speculation(args, model))
    for item, g in zip(items, done):
        print(json.dumps({**item, "completion": g.text, "new_tokens": len(g.tokens)}), flush=True)
    if args.stats:
        stats = model.stats.as_dict()
        stats["new_tokens"] = sum(len(g.tokens) for g in done)
        print(json.dumps(stats), file=sys.stderr)
    model.close()
    return 0


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


def score(args) -> int:
    items = [_json_line(args.input, n, ln) for n, ln in
             enumerate(open(args.input, encoding="utf-8").read().splitlines(), 1) if ln.strip()]
    model = open_model(args)
    scored = model.score(items, batch_size=args.batch_size, progress=True, offload=args.offload_activations)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in scored)
    print(args.output)
    if args.stats:
        print(json.dumps({**model.stats.as_dict(), "items": len(items), "groups": len(model.groups)}), file=sys.stderr)
    model.close()
    return 0


def _json_line(path, n: int, line: str):
    try:
        return json.loads(line)
    except ValueError as e:
        raise UsageError(f"{path} line {n} is not valid JSON ({e})") from None


def _pad_id(model):
    gc = model.generation_config
    if gc.pad_token_id is not None:
        return gc.pad_token_id
    eos = gc.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def check_context(model, length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and length > limit:
        raise UsageError(f"prompt plus --max-new-tokens is {length} tokens, more than the model's context of "
                         f"{limit}; shorten the prompt or lower --max-new-tokens")


if __name__ == "__main__":
    sys.exit(main())
