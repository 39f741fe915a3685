"""How much memory a job needs next to the weights: activations, KV cache and logits.

The budget (runtime.budget) plans where the weights wait; what a forward allocates besides
them depends on the job: how many rows, how many tokens, how many forwards are parked between
layers at once (scoring runs all its micro-batches through each layer before the next is
loaded), and how many positions' logits are kept. `job_bytes` estimates it from the model's
config with the sizes of what transformers' decoder layers allocate, rounded up: it is an
allowance, not a measurement, so it errs on the large side.

On CUDA a job whose forwards run in threads of their own (scoring's Lockstep) also pays per
thread: torch gives every thread that runs a matmul its own cuBLAS handle and workspace, and
keeps both for the life of the process (a later thread reuses a finished one's). Measured on
an H200 with CUDA 13: 72 MiB per thread, 32 of them the workspace inside torch's allocator and
the rest outside it, where the budget only sees them as free memory gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kvcache import passed_cache

SLACK = 1.25  # allocator rounding, temporaries the count below misses
FLOOR = 32 << 20  # every job: small tensors, masks, the sampler's buffers
CUDA_THREAD = 96 << 20  # device memory of a thread's cuBLAS handle and workspace (72 MiB measured, see above)


@dataclass(frozen=True)
class JobShape:
    batch: int = 1  # rows one forward computes together
    tokens: int = 1  # tokens per row in the largest forward (the prompt, for generation)
    context: int = 1  # tokens per row the KV cache reaches (prompt + new tokens)
    logits_rows: int = 1  # positions per row whose logits are kept (1 when generating)
    in_flight: int = 1  # forwards parked between layers at once (scoring's jobs)
    whole_cache: bool = True  # the KV of every layer lives for the whole job (not scoring)
    offload: bool = False  # parked forwards keep their activations in host memory (scoring's option)
    threads: bool = False  # each forward runs in a thread of its own (scoring's Lockstep)

    def describe(self) -> str:
        flight = f", {self.in_flight} forwards in flight" if self.in_flight > 1 else ""
        return f"a batch of {self.batch} x {self.tokens} tokens (context {self.context}{flight})"


# the smallest job anyone runs: one row, a short prompt, a few new tokens
SMALLEST = JobShape(batch=1, tokens=16, context=32)
# what the plan at load time makes room for; a larger job demotes weights when it starts
DEFAULT = JobShape(batch=1, tokens=512, context=1024)
# one decode step at batch 1: the routed experts a sparse MoE layer's slots are planned for at load
DECODE = JobShape(batch=1, tokens=1, context=1024)


def job_bytes(config, dtype: torch.dtype, shape: JobShape, cuda_threads: int = 0) -> int:
    """Bytes `shape`'s job allocates on the compute device, besides the weights (an upper estimate).
    `cuda_threads`: threads whose cuBLAS handles the job needs on a CUDA device (see the module docstring)."""
    dims = _Dims(config)
    size = torch.empty(0, dtype=dtype).element_size()
    rows = shape.batch * shape.tokens  # positions one forward computes
    kv_per_position = 2 * dims.kv_heads * dims.head_dim * size  # keys and values, one layer
    if shape.whole_cache:
        kv = shape.batch * shape.context * dims.layers * kv_per_position
    else:  # scoring: a layer's KV lives until every forward has passed it (two layers at a handover)
        kv = 2 * shape.in_flight * shape.batch * shape.context * kv_per_position
    parked_here = 1 if shape.offload else shape.in_flight  # forwards whose activations are on the device
    parked = parked_here * rows * (2 * dims.hidden + 2 * dims.head_dim) * size  # hidden, residual, cos, sin
    masks = parked_here * shape.batch * shape.tokens * shape.context * 4  # a 4-D mask per forward, worst case
    layer = rows * (4 * dims.hidden + 3 * dims.intermediate + (dims.heads + 2 * dims.kv_heads) * dims.head_dim) * size
    if getattr(config, "_attn_implementation", None) == "eager":  # the whole score matrix, in float32
        layer += shape.batch * dims.heads * shape.tokens * shape.context * 4
    logits = shape.batch * shape.logits_rows * dims.vocab * (size + 4 + 4)  # model dtype, float copy, log-softmax
    return int(SLACK * (kv + parked + masks + layer + logits)) + FLOOR + cuda_threads * CUDA_THREAD


class _Dims:
    """The sizes `job_bytes` needs, from any decoder-only config transformers makes."""

    def __init__(self, config):
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden = _first(c, "hidden_size", "n_embd", "d_model")
        # an attention-free model (Mamba 2) has no attention heads: its SSM heads stand in (an estimate)
        self.heads = _first(c, "num_attention_heads", "n_head", "num_heads", default=None) or 1
        self.kv_heads = _first(c, "num_key_value_heads", "multi_query_group_num", default=self.heads) or self.heads
        self.head_dim = _first(c, "head_dim", default=self.hidden // self.heads) or self.hidden // self.heads
        self.layers = _first(c, "num_hidden_layers", "n_layer")
        self.vocab = _first(c, "vocab_size")
        inter = _first(c, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * self.hidden
        experts = _first(c, "num_experts_per_tok", default=1) or 1  # MoE: the chosen experts' rows
        moe = _first(c, "moe_intermediate_size", default=0) or 0
        self.intermediate = max(inter, experts * moe)


def experts_per_token(config) -> int:
    """The routed experts a token uses in a mixture-of-experts config (0 for a dense model)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return _first(c, "num_experts_per_tok", "num_experts_per_token", "moe_topk", default=0) or 0


def _first(config, *names: str, default: int | None = None):
    for name in names:
        value = _largest(config, name)
        if isinstance(value, int):
            return value
    return default


def _largest(config, name: str):
    """`config.name`, or its largest value where it differs by layer (a heterogeneous config's: Gemma 4's
    full-attention layers have wider heads), so that an estimate holds for every layer."""
    try:
        return getattr(config, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError: set per layer
        values = [v for layer in config.per_layer_config if isinstance(v := getattr(layer, name, None), int)]
        return max(values, default=None)


# --- the shape of a call ------------------------------------------------------------------------

def shape_of_call(args: tuple, kwargs: dict) -> JobShape:
    """The shape of `model(input_ids, ...)` (or `inputs_embeds=`): every position's logits
    unless `logits_to_keep` says otherwise; the context grows by what a passed cache holds."""
    rows, tokens = _rows_tokens(args, kwargs)
    cache = passed_cache(kwargs)
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    keep = kwargs.get("logits_to_keep", 0)
    kept = keep if isinstance(keep, int) and keep > 0 else tokens
    return JobShape(batch=rows, tokens=tokens, context=past + tokens, logits_rows=kept)


def shape_of_generate(args: tuple, kwargs: dict, generation_config) -> JobShape:
    """The shape of `generate(...)`: prompt rows times beams and returned sequences, the prompt
    plus the new tokens in the cache, and the last positions' logits (more when it drafts tokens)."""
    rows, tokens = _rows_tokens(args, kwargs)
    get = lambda name: kwargs.get(name, getattr(generation_config, name, None))  # noqa: E731
    new = get("max_new_tokens")
    if new is None:
        new = max(0, (get("max_length") or tokens) - tokens)
    rows *= max(get("num_beams") or 1, get("num_return_sequences") or 1)
    drafted = (get("prompt_lookup_num_tokens") or 0) + (20 if kwargs.get("assistant_model") is not None else 0)
    return JobShape(batch=rows, tokens=tokens, context=tokens + new, logits_rows=1 + drafted)


def _rows_tokens(args: tuple, kwargs: dict) -> tuple[int, int]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return 1, int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() else 1
    return int(ids.shape[0]), int(ids.shape[1])
