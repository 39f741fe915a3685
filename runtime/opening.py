"""What opening a converted folder takes besides the streaming itself: the device and compute
dtype, the folder (converted into the cache first for a hub id or a `.gguf` file), where each
group waits (runtime.budget's plan for this folder and config), the buffers and the
generation config and tokenizer that sit next to the weights. `LayeredModel.from_pretrained`
runs these in order; runtime/batch.py reuses a few for its draft model.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

from reshard.errors import MemoryBudgetError, UsageError
from reshard.format import DTYPE_NAMES, dtype_name, expert_bytes

from . import allowance, budget, lowbit
from .expertslots import computes_on_slots
from .quantized import param_held_bytes
from .stream import GroupLoader


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None means cuda if torch sees a GPU, else cpu."""
    if device is None:
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            text = f"device '{dev}' asked for, but torch sees no CUDA GPU; use "
            raise UsageError(text + 'device="cpu" (or leave device out)', cli=text + "--device cpu (or leave it out)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise UsageError(f"device '{dev}' is not supported; use cpu, cuda or cuda:N")
    return dev


def converted_folder(path, *, dtype=None, revision=None, token=None, quantize=None,
                     trust_remote_code: bool = False) -> Path:
    """`path` itself, or for a hub repo id or a `.gguf` file its converted folder in the cache."""
    from reshard.cache import ConvertOptions, is_cacheable, open_cached

    if not is_cacheable(path):
        return Path(path)
    name = dtype if isinstance(dtype, str) or dtype is None else dtype_name(dtype)
    options = ConvertOptions(dtype=name or "auto", quantize=quantize)
    return open_cached(path, options=options, revision=revision, token=token, trust_remote_code=trust_remote_code)


def resolve_runtime_dtype(dtype, default: str, device: torch.device | None = None) -> torch.dtype:
    """The compute dtype: `dtype` if given; else the folder's (`default`), except on the CPU,
    where a half-precision folder computes in bfloat16 if the CPU is fast at it, else float32."""
    if dtype is None or dtype == "auto":
        if device is not None and device.type == "cpu":
            return lowbit.cpu_compute_dtype(DTYPE_NAMES[default])
        return DTYPE_NAMES[default]
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, float16, bfloat16 or float32")
    return DTYPE_NAMES[dtype]



def group_costs(loader: GroupLoader, per_token: int = 0, model: nn.Module | None = None) -> list[budget.GroupCost]:
    """What each group takes on the device and on disk (runtime.budget plans with these). With
    `per_token` (the experts a token routes, where routed experts stream sparsely) a CUDA MoE
    layer also says what one routed expert takes, so a streamed one counts slots, not E experts;
    not one whose experts module (in `model`) computes on full-size tensors (no int `num_experts`)."""
    costs = []
    for i, g in enumerate(loader.manifest.groups):
        cost = budget.GroupCost(loader.held_bytes(i), loader.group_bytes(i), g.kind, loader.made_anew(i))
        slotted = model is None or all(computes_on_slots(model.get_submodule(path)) for path in g.experts)
        if per_token and loader.cuda and g.experts and slotted:
            entries = list(g.experts.values())
            count = entries[0]["num_experts"]
            if all(e["num_experts"] == count for e in entries):
                held = sum(param_held_bytes(g, n, loader.dtype, loader.device, loader.packing)
                           for e in entries for n in e["tensors"])
                cost = dataclasses.replace(cost, experts=count, expert_held=-(-held // count),
                                           expert_stored=-(-expert_bytes(g) // count), per_token=per_token)
        costs.append(cost)
    return costs


def routed_tokens(costs: list[budget.GroupCost], tokens: int) -> int | None:
    """What budget functions take for a pass of `tokens` tokens: None where no layer streams its
    experts sparsely (whole groups are counted), else the tokens."""
    return tokens if any(c.experts for c in costs) else None


def place_groups(loader: GroupLoader, config, memory: budget.Budget,
                 costs: list[budget.GroupCost] | None = None) -> tuple[list[str], budget.Budget]:
    """DEVICE/HOST/DISK per group, leaving room for a job of runtime.allowance.DEFAULT's shape,
    and the budget to run with (`costs`: `group_costs(loader)`, made here if not given). On CUDA,
    where the groups in flight with read-ahead do not fit next to the smallest job but one group
    does, read-ahead is turned off (said once on stderr); fails at once if even that cannot fit,
    naming the least --max-gpu-memory that works. A MoE layer whose experts stream sparsely is
    planned with the slots of a decode step (a batch-1 token's experts): a prompt whose union of
    experts does not fit is prefilled in chunks that do (LayeredModel.fit_job)."""
    costs = costs if costs is not None else group_costs(loader)
    decode = routed_tokens(costs, allowance.DECODE.batch * allowance.DECODE.tokens)
    if memory.cuda:
        smallest = allowance.job_bytes(config, loader.dtype, allowance.SMALLEST)
        need = budget.smallest_capacity(costs, memory, smallest, decode)
        if need > memory.capacity and memory.prefetch:
            alone = dataclasses.replace(memory, prefetch=0)
            least = budget.smallest_capacity(costs, alone, smallest, decode)
            if least <= memory.capacity:
                print(f"runtime: {memory.prefetch + 1} groups in flight need {budget.gib(need)} of device memory, "
                      f"more than the {budget.gib(memory.capacity)} there is; reading each group when it is "
                      f"needed (--prefetch 0)", file=sys.stderr)
            memory, need = alone, least
        if need > memory.capacity:
            raise MemoryBudgetError(budget.too_small(memory, need, "the smallest job", loader.device))
    return budget.plan(costs, memory, allowance.job_bytes(config, loader.dtype, allowance.DEFAULT), decode), memory


def place_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers (rotary tables, masks) are computed at build time; move them to the device."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def pin_device(model: nn.Module, device: torch.device) -> None:
    """Make `model.device` report the compute device although its parameters sit on meta."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"device": property(lambda self: device), "__module__": cls.__module__})


def load_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path)
