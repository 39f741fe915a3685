"""lm-evaluation-harness backend `reshard`: evaluate a converted folder in one weight pass.

    runtime eval --model_args pretrained=llama-70b/,device=cuda,batch_size=16 --tasks hellaswag

(`runtime eval` is `lm_eval` with this backend registered; in Python, importing this module
registers it for `lm_eval.simple_evaluate(model="reshard", ...)`.) lm-eval hands a backend all
the requests of a kind at once:
- `loglikelihood`: every (context, continuation) pair of the run goes to the one-pass scorer
  (runtime/score.py): requests with the same context are one item, the context computed once;
  layers are outermost, so each layer group is read once for all of them.
- `loglikelihood_rolling` (perplexity): lm-eval's own rolling windows, scored the same way.
- `generate_until`: batched generation (runtime/batch.py), `batch_size` prompts per batch,
  stopping at the task's stop sequences.
Tokens are made as lm-eval's `hf` backend makes them (no special tokens, lm-eval's context /
continuation split, BOS else EOS before an empty context), so the numbers are comparable.
`runs` records, per call, the requests and the passes, layer loads and bytes it took
(model_args `stats=true` prints each as a JSON line on stderr, like `--stats`).
"""

from __future__ import annotations

import inspect
import json
import sys

import torch

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import StoppingCriteria, StoppingCriteriaList

from reshard.errors import UsageError

from .batch import generate_ids
from .model import LayeredModel
from .score import Encoded, encode_pair, score_encoded

COUNTERS = ("passes", "layer_loads", "bytes_read", "bytes_streamed")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


@register_model("reshard")
class ReshardLM(LM):
    """A folder written by `reshard convert`, as an lm-eval model. `--model_args` pass through:
    pretrained (the folder), device, dtype, batch_size, max_batch_size (a cap on batch_size, also
    on what "auto" picks), prefetch, max_gpu_memory, max_cpu_memory,
    trust_remote_code, verify, offload_activations, max_length, max_gen_toks, and stats (print
    each call's counters as a JSON line on stderr)."""

    def __init__(self, pretrained: str, *, device: str | None = None, dtype: str = "auto", batch_size=8,
                 prefetch: int = 1, max_gpu_memory=None, max_cpu_memory=None, trust_remote_code: bool = False,
                 verify: bool = False, offload_activations: bool = False, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, stats: bool = False, max_batch_size=None, **unknown):
        super().__init__()
        refuse_unknown(unknown)
        self.batch_size = check_batch_size(batch_size, max_batch_size)
        self.model = open_folder(pretrained, device=device, dtype=dtype, prefetch=prefetch,
                                 max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                                 trust_remote_code=trust_remote_code, verify=verify)
        if self.model.tokenizer is None:
            raise UsageError(f"{pretrained} has no tokenizer files; convert a checkpoint that has them")
        self.tok = self.model.tokenizer
        self.offload = bool(offload_activations)
        self.max_length = int(max_length or getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.runs: list[dict] = []  # per call: request type, requests, and the counters it moved
        self.stats = bool(stats)  # print each entry of `runs` as a JSON line on stderr

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ReshardLM":
        """From `--model_args`; those win over lm_eval's own --batch_size/--device (so that
        `batch_size=16` in model_args works as in the README)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ReshardLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # --- the three request types -------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, context, continuation) for context, continuation in
                 (req.args for req in requests)]
        fitted = [fit_window(c, r, self.max_length) for c, r in pairs]
        if cut := sum(f != p for f, p in zip(fitted, pairs)):
            print(f"runtime: {cut} of {len(pairs)} requests are longer than max_length {self.max_length}; their "
                  f"contexts were cut on the left (as lm-eval's hf backend does)", file=sys.stderr)
        return self.counted("loglikelihood", len(requests), lambda: self.score_pairs(fitted))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = self.prefix_token_id
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok(text, add_special_tokens=False)["input_ids"]
            for window in get_rolling_token_windows(tokens, prefix, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(n)
        results = self.counted("loglikelihood_rolling", len(requests), lambda: self.score_pairs(windows))
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, results):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation options run together
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out = [""] * len(requests)

        def run() -> None:
            for members in groups.values():
                texts = self.generate_group([requests[n].args[0] for n in members], requests[members[0]].args[1])
                for n, text in zip(members, texts):
                    out[n] = text
        self.counted("generate_until", len(requests), run)
        return out

    # --- how ---------------------------------------------------------------------------------
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability, greedy) per (context, continuation) token pair, all in one weight pass;
        pairs with the same context share one item (the context is computed once)."""
        items: dict[tuple, list] = {}
        for n, (context, continuation) in enumerate(pairs):
            items.setdefault(tuple(context), []).append((n, continuation))
        encoded = [Encoded(list(ctx), [c for _, c in members]) for ctx, members in items.items()]
        scored = score_encoded(self.model, encoded, batch_size=self.batch_size, progress=sys.stderr.isatty(),
                               offload=self.offload)
        out: list = [None] * len(pairs)
        for members, results in zip(items.values(), scored):
            for (n, _), result in zip(members, results):
                out[n] = (result[0], bool(result[1]))
        return out

    def generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Continuations of `contexts` under one set of lm-eval generation options."""
        options, until, max_new = generation_options(gen_kwargs, self.max_gen_toks, self.eos_text())
        keep = max(self.max_length - max_new, 1)  # lm-eval's hf backend keeps the context's last tokens
        seqs = [self.tok(c, add_special_tokens=False)["input_ids"][-keep:] for c in contexts]
        order = sorted(range(len(seqs)), key=lambda n: -len(seqs[n]))  # similar lengths batch together
        texts = [""] * len(seqs)
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            batch = [seqs[n] for n in chunk]
            stop = StopSequences(self.tok, until, prompt_width=max(len(q) for q in batch))
            done = generate_ids(self.model, batch, max_new_tokens=max_new, stopping_criteria=StoppingCriteriaList([stop]),
                                **options)
            for n, g in zip(chunk, done):
                texts[n] = cut_at_stop(g.text, until)
        return texts

    def counted(self, kind: str, requests: int, work):
        """Run `work()`, recording what it cost in `runs`."""
        before = {k: getattr(self.model.stats, k) for k in COUNTERS}
        result = work()
        moved = {k: getattr(self.model.stats, k) - before[k] for k in COUNTERS}
        self.runs.append({"request_type": kind, "requests": requests, **moved, "groups": len(self.model.groups)})
        if self.stats:
            print(json.dumps(self.runs[-1]), file=sys.stderr, flush=True)
        return result

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: BOS, else EOS (as lm-eval's hf backend)."""
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def eos_text(self) -> str | None:
        eos = self.tok.eos_token_id
        return None if eos is None else self.tok.decode([eos], skip_special_tokens=False)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "name_or_path", "reshard").replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_source": "reshard", "model_name": str(self.model.manifest.source.get("id")),
                "groups": len(self.model.groups)}


class StopSequences(StoppingCriteria):
    """A transformers stopping criterion: a row is done once its new text holds a stop sequence
    (the batch stops when every row is). Decodes only the new tokens, as lm-eval's hf backend does."""

    def __init__(self, tokenizer, until: list[str], *, prompt_width: int):
        self.tok, self.until, self.width = tokenizer, [u for u in until if u], prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.width:], skip_special_tokens=False)
        return torch.tensor([any(u in t for u in self.until) for t in texts], device=input_ids.device)


def open_folder(path, *, device, dtype, prefetch, max_gpu_memory, max_cpu_memory, trust_remote_code,
                verify) -> LayeredModel:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LayeredModel.from_pretrained(path, device=device, dtype=dtype, prefetch=int(prefetch),
                                        max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                                        trust_remote_code=bool(trust_remote_code), verify=bool(verify))


def refuse_unknown(names) -> None:
    if names:
        raise UsageError(f"unknown model_args for the reshard backend: {', '.join(sorted(names))}; "
                         f"see `runtime eval --help`")


def check_model_args(argv: list[str]) -> None:
    """The reshard backend's `--model_args` in lm_eval's argv, checked before lm_eval loads its
    tasks (seconds): unknown names and the batch sizes, each error the line ReshardLM would give."""
    from lm_eval.utils import simple_parse_args_string

    given = [argv[k + 1] for k, a in enumerate(argv[:-1]) if a == "--model_args"]
    given += [a.split("=", 1)[1] for a in argv if a.startswith("--model_args=")]
    known = set(inspect.signature(ReshardLM.__init__).parameters) - {"self", "unknown"}
    for arg_string in given:
        args = simple_parse_args_string(arg_string) if isinstance(arg_string, str) else {}
        refuse_unknown(set(args) - known)
        check_batch_size(args.get("batch_size"), args.get("max_batch_size"))


def check_batch_size(value, cap=None) -> int:
    """lm-eval's batch_size: a number, or "auto" (taken as 8: one weight pass serves every batch
    anyway), no more than `cap` (lm-eval's max_batch_size) where given."""
    size = 8 if value in (None, "auto") or str(value).startswith("auto:") else whole_number("batch_size", value)
    if cap is None:
        return size
    return min(size, whole_number("max_batch_size", cap, auto=False))


def whole_number(name: str, value, *, auto: bool = True) -> int:
    """`value` as a count of 1 or more, else the UsageError that names `name`."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a whole number{' or auto' if auto else ''}, not {value!r}") from None
    if size < 1:
        raise UsageError(f"{name} must be 1 or more, not {size}")
    return size


def generation_options(gen_kwargs: dict, default_max: int, eos: str | None) -> tuple[dict, list[str], int]:
    """(generate() options, stop sequences with EOS added, max new tokens) from a request's
    generation kwargs, read as lm-eval's hf backend reads them."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if eos and eos not in until:
        until.append(eos)
    max_new = next((int(kwargs.pop(k)) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                    if k in kwargs), default_max)
    for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_length"):
        kwargs.pop(k, None)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    sample = bool(kwargs.pop("do_sample", temperature > 0))
    options = {"do_sample": True, "temperature": temperature, **kwargs} if sample and temperature > 0 else \
        {"do_sample": False, **{k: v for k, v in kwargs.items() if k not in ("top_p", "top_k")}}
    return options, until, max_new


def fit_window(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(context, continuation) cut on the left so that the model sees at most `max_length` tokens,
    as lm-eval's hf backend cuts them: the last `max_length + 1` tokens of both, the last one only
    predicted (an empty continuation: the context's last `max_length`)."""
    if len(continuation) > max_length:
        raise UsageError(f"a continuation of {len(continuation)} tokens is longer than max_length {max_length}")
    if not continuation:  # nothing predicted: the model sees the context alone
        return context[-max_length:], continuation
    whole = context + continuation
    if len(whole) <= max_length + 1:
        return context, continuation
    return whole[-(max_length + 1):len(whole) - len(continuation)], continuation


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first of the stop sequences (lm-eval's rule)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def main(argv=None) -> None:
    """`lm_eval` with this backend registered (--model defaults to reshard): `runtime eval`."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[:1] if argv[:1] in (["run"], ["ls"], ["validate"]) else []
    rest = argv[len(command):]
    if command in ([], ["run"]) and rest and not any(a == "--model" or a.startswith("--model=") for a in rest):
        rest = ["--model", "reshard", *rest]
    argv = command + rest
    model = [rest[k + 1] for k, a in enumerate(rest[:-1]) if a == "--model"]
    model += [a.split("=", 1)[1] for a in rest if a.startswith("--model=")]
    if command in ([], ["run"]) and model == ["reshard"]:
        check_model_args(rest)
    saved, sys.argv = sys.argv, ["lm_eval", *argv]  # lm_eval's CLI reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
