"""`runtime`: run a model converted by `reshard convert`, streaming it layer by layer.

Examples:
  runtime generate llama-70b/ --prompt "The capital of France is" --max-new-tokens 20
  echo "What is 2+2?" | runtime generate smollm2/ --chat --device cpu
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
    add_model_options(g)
    return parser


def main(argv=None) -> int:
    return run_guarded(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


def open_model(args):
    import torch

    from .model import LayeredModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LayeredModel.from_pretrained(args.model, device=device, dtype=args.dtype, prefetch=args.prefetch,
                                        max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
                                        trust_remote_code=args.trust_remote_code)


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
                         streamer=streamer, pad_token_id=_pad_id(model), **sampling)
    if args.stats:
        stats = model.stats.as_dict()
        stats["new_tokens"] = int(out.shape[1] - inputs["input_ids"].shape[1])
        print(json.dumps(stats), file=sys.stderr)
    model.close()
    return 0


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
