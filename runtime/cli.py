"""`runtime`: run a model converted by `reshard convert`, streaming it layer by layer.

Every command's --help lists its options with their defaults, and examples.
Set RESHARD_DEBUG=1 to see a traceback instead of a one-line error.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import click

from reshard.commandline import CONTEXT, Group, Option, output_option, run_command, version_option
from reshard.errors import UsageError

from .commands import generate_file, generate_one, open_model, score_file, speculation_stats, tree_speculation
from .options import (SAMPLING, check_generation, model_argument, model_options, ray_options, sampling_kwargs,
                      sampling_options, tree_options)
from .progress import report_stats, show_first_pass


@click.group(cls=Group, examples=(
    'runtime generate llama-70b/ -p "The capital of France is" -n 20',
    'echo "What is 2+2?" | runtime generate smollm2/ --chat --device cpu',
    'runtime generate llama-70b/ --verify -p "Hello"   # check every file\'s sha256 first',
    'runtime generate HuggingFaceTB/SmolLM2-135M-Instruct --chat -p "Hi"   # converted into the cache once',
    "runtime generate smollm2/ --prompts-file prompts.txt -n 40 > out.jsonl",
    "runtime score smollm2/ questions.jsonl -o scored.jsonl --batch-size 16",
    "runtime score llama-70b/ questions.jsonl -o scored.jsonl --ray-workers 4   # 4 GPUs, one model each",
))
@version_option("runtime")
def cli() -> None:
    """Run a model converted by `reshard convert`, streaming it through the device layer by layer."""


def main(argv=None) -> int:
    return run_command(cli, argv, "runtime")


@cli.command(short_help="generate text, streamed to stdout", examples=(
    "runtime generate smollm2/ --chat -p 'What is a llama?'",
    "echo 'Once upon a time' | runtime generate smollm2/ -n 40 --temperature 0.7 --seed 1",
    "runtime generate smollm2/ --prompts-file prompts.txt -n 40 > out.jsonl",
    "runtime generate HuggingFaceTB/SmolLM2-135M-Instruct --chat -p 'Hi'   # converted into the cache once",
))
@model_argument()
@click.option("-p", "--prompt", default=None, cls=Option, section=SAMPLING, show_default="read stdin",
              help="the prompt")
@click.option("--chat", is_flag=True, cls=Option, section=SAMPLING,
              help="wrap the prompt in the tokenizer's chat template")
@click.option("--prompts-file", type=click.Path(dir_okay=False), default=None, cls=Option, section=SAMPLING,
              help='generate for every prompt in FILE together (one per line, or JSONL with "prompt"); '
                   "writes JSONL to stdout in input order")
@sampling_options
@click.option("--prompt-lookup", type=click.IntRange(min=1), default=None, metavar="N", cls=Option,
              section="Speculation", help="propose N tokens per pass copied from the prompt (transformers' prompt lookup)")
@click.option("--assistant", default=None, metavar="PATH", type=click.Path(), cls=Option, section="Speculation",
              help="a small draft model (checkpoint or converted folder) kept on the device, proposing tokens "
                   "for each pass; one with another tokenizer and vocabulary size is translated through text "
                   "(transformers' universal assisted decoding)")
@tree_options
@model_options
@ray_options
def generate(**options) -> int:
    """Generate a continuation of a prompt (from --prompt or stdin) with MODEL, streaming the text to
    stdout as it is produced. MODEL is a folder written by `reshard convert`, or a hub repo id or a
    .gguf file, converted into the cache on first use (`reshard list` shows it)."""
    args = SimpleNamespace(**options)
    check_generation(args)
    if args.prompt is not None and args.prompts_file is not None:
        raise UsageError("--prompt and --prompts-file cannot be combined; pick one")
    if args.prompt_lookup is not None and args.assistant is not None:
        raise UsageError("--prompt-lookup and --assistant cannot be combined; pick one")
    if args.draft is not None and (args.prompt_lookup is not None or args.assistant is not None):
        raise UsageError("--draft cannot be combined with --prompt-lookup or --assistant; pick one")
    if args.ray_workers is not None and args.prompts_file is None:
        raise UsageError("--ray-workers needs --prompts-file (one prompt runs on one model)")
    use_converted_folder(args)
    if args.prompts_file is not None:
        return generate_file(args)
    return generate_one(args)


@cli.command(short_help="log-probabilities of choices or texts, every layer read once", examples=(
    "runtime score smollm2/ questions.jsonl -o scored.jsonl",
    "runtime score llama-70b/ questions.jsonl -o - --batch-size 16 --device cuda | jq .best",
))
@model_argument()
@click.argument("input", type=click.Path(dir_okay=False))
@output_option(required=True, help="JSONL file to write, one line per input line; - writes to stdout")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, cls=Option, help="items per micro-batch")
@click.option("--offload-activations", is_flag=True, cls=Option,
              help="keep waiting micro-batches' activations in host memory (when they do not fit on the device)")
@model_options
@ray_options
def score(**options) -> int:
    """Score the JSONL lines of INPUT with MODEL (a converted folder, a hub repo id or a .gguf file),
    reading each layer once for all lines.

    Lines {"prompt", "choices"} get "scores" and "best"; lines {"text"} get "logprob" and "tokens".
    """
    args = SimpleNamespace(**options)
    use_converted_folder(args)
    return score_file(args)


def use_converted_folder(args) -> None:
    """A hub repo id or .gguf MODEL becomes its folder in the cache, converted first if need be."""
    from .opening import converted_folder

    args.model = str(converted_folder(args.model, dtype=args.dtype, revision=args.revision, token=args.token,
                                      trust_remote_code=args.trust_remote_code))


SERVER = "Server"


@cli.command(short_help="OpenAI-compatible HTTP server; every pass serves every request", examples=(
    "runtime serve smollm2/ --device cpu",
    "runtime serve llama-70b/ --port 8000 --max-batch 16 --api-key sk-local",
    "curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
    "-d '{\"model\": \"smollm2\", \"prompt\": \"Hello\"}'",
))
@model_argument()
@click.option("--host", default="127.0.0.1", cls=Option, section=SERVER,
              help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, cls=Option, section=SERVER,
              help="port to listen on")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, cls=Option, section=SERVER,
              help="sequences decoded together, one token each per pass")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, cls=Option, section=SERVER,
              help="requests waiting for a free slot; past that a request gets 429")
@click.option("--api-key", default=None, cls=Option, section=SERVER, show_default="none: no check",
              help="require `Authorization: Bearer KEY` on /v1")
@click.option("--model-name", default=None, cls=Option, section=SERVER,
              show_default="the folder's name, or MODEL as given",
              help="the model's name in the API (the `model` field of requests)")
@tree_options
@model_options
def serve(**options) -> int:
    """Serve MODEL (a converted folder, or a hub repo id or .gguf file converted into the cache once)
    over HTTP with OpenAI's API: POST /v1/completions and /v1/chat/completions (streamed with
    "stream": true), GET /v1/models, /health and /metrics.

    One scheduler runs the model: new requests are prefilled together and join the running batch,
    and every pass decodes one token for each running request. With --draft, a request that runs
    alone decodes with tree speculation (several tokens a pass), and goes back to the shared passes
    when another arrives. Ctrl-C stops the server.
    """
    from pathlib import Path

    args = SimpleNamespace(**options)
    try:
        from .server import serve as serve_http
    except ModuleNotFoundError as e:
        raise UsageError(f"runtime serve needs {e.name}; install it with: pip install 'reshard[serve]'") from None
    given = args.model
    name = args.model_name or (Path(given).resolve().name if Path(given).is_dir() else
                               Path(given).stem if given.endswith(".gguf") else given)
    use_converted_folder(args)
    model = open_model(args)
    try:
        serve_http(model, model_name=name, host=args.host,
                   port=args.port, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                   draft=args.draft, tree_budget=args.tree_budget)
        if args.stats:
            print(json.dumps({**model.stats.as_dict(), **speculation_stats(model)}), file=sys.stderr)
    finally:
        model.close()
    return 0


@cli.command(short_help="interactive multi-turn chat, answers streamed", examples=(
    "runtime chat smollm2/",
    "runtime chat llama-70b-chat/ --system 'Answer in one sentence.' -n 256 --device cuda",
    "printf 'Hi!\\nWhat did I just say?\\n' | runtime chat smollm2/ --device cpu",
))
@model_argument()
@click.option("--system", default=None, cls=Option, section=SAMPLING, show_default="the template's",
              help="system prompt at the start of the conversation")
@sampling_options
@tree_options
@model_options
def chat(**options) -> int:
    """Chat with MODEL (a converted folder, a hub repo id or a .gguf file) through its tokenizer's
    chat template, answers streamed to stdout; the conversation is kept from turn to turn.

    Type /reset to forget the conversation, /exit (or Ctrl-D) to leave; Ctrl-C stops the current
    answer. When stdin is not a terminal, each line is one user turn.
    """
    from .chat import Chat, run_chat

    args = SimpleNamespace(**options)
    check_generation(args)
    use_converted_folder(args)
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    model = open_model(args)
    show_first_pass(model)
    options = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens, **sampling_kwargs(args),
               **tree_speculation(args, model)}
    answers = run_chat(Chat(model, system=args.system, generate_options=options, stats=args.stats))
    if args.stats:
        report_stats({**model.stats.as_dict(), "answers": answers, **speculation_stats(model)})
    model.close()
    return 0


@cli.command("eval", short_help="lm-evaluation-harness on a converted folder, one weight pass per request type",
             add_help_option=False, context_settings={**CONTEXT, "ignore_unknown_options": True,
                                                      "allow_extra_args": True, "help_option_names": []})
@click.argument("lm_eval_args", nargs=-1, type=click.UNPROCESSED)
def eval_command(lm_eval_args) -> int:
    """`lm_eval` (EleutherAI's lm-evaluation-harness) with the `reshard` backend registered; every
    argument goes to lm_eval, and --model defaults to reshard. `runtime eval --help` shows lm_eval's
    options. Needs `pip install 'reshard[eval]'`.

    \b
    runtime eval --model_args pretrained=llama-70b/,device=cuda,batch_size=16 --tasks hellaswag
    runtime eval --model_args pretrained=smollm2/,max_cpu_memory=0,stats=true --tasks wikitext
    """
    try:
        from .lm_eval_backend import main as lm_eval_main
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise UsageError("lm-eval is not installed; pip install 'reshard[eval]'") from None
    lm_eval_main(list(lm_eval_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
