"""Routed experts computed from their stored bits on the CPU: no expansion per expert per pass.

A streamed MoE layer reads only its routed experts (runtime/experts.py). Where they are quantized
(a GGUF's Q2_K to Q6_K and IQ4_XS blocks, int4/int8 folders, act-order GPTQ) and the project's native kernels run
(runtime/native.py), expanding each one to floats before its two products costs more than the
products: at batch 1 an expert is used for a token or two, then dropped. So on the CPU such an
experts module keeps its routed experts as read (or as the expert cache holds them) and computes
with the same kernels as the packed linear layers (runtime/lowbit.py): per routed expert, the
gate/up product, transformers' own `_apply_gate` (or activation), the down product, the routing
weight; the tokens' top-k outputs are summed as transformers' batched experts implementation sums
them. The contract is transformers' `use_experts_implementation` (has_gate, has_bias, is_transposed,
_apply_gate, act_fn, post_expert_norm) or Llama 4's stacked one (`run_stacked`): only modules that declare
one of them run packed, expert biases (gpt-oss's
`gate_up_proj_bias`, `down_proj_bias`) added after each product as transformers adds them. Their results are those of the kernels (activations quantized per block of 32), as for
packed linear layers; `packed=False` expands the experts instead (exact float32 math).

Where the operands come from: for a streamed layer the streamer (runtime/experts.py) puts its
routed experts' operands on the module for the call (`PACKED`) and takes them off after; for a
resident layer `place` puts every expert's (views of the file) there for good. `install` wraps the
module's forward per instance: with no operands on the module, its own forward runs.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from reshard.format import quant_part_names, scheme_of
from reshard.plan import stacks_tokens

from . import native, stackedexperts
from .lowbit import PackSpec, native_kernel, pack_param, weight_spec

PACKED = "_reshard_packed"  # on an experts module computing as stored: {param attr: {expert: operands}}
BIAS = "_bias"  # an expert weight's bias attr: `<param attr>_bias`, [E, out] (gpt-oss's)


def plan(model: nn.Module, manifest, device: torch.device) -> dict[str, dict[str, PackSpec]]:
    """{experts module path: {param attr: PackSpec}} for the MoE experts modules of `manifest`'s
    groups whose expert weights are all quantized in a scheme the native kernels take (on the CPU,
    where they run), held by a module that declares transformers' experts contract (biases, if it
    has them, named `<param attr>_bias`)."""
    if device.type != "cpu" or native.lowbit() is None:
        return {}
    quant = manifest.quantization or {}
    specs = {}
    for group in manifest.groups:
        for path, entry in group.experts.items():
            module = model.get_submodule(path)
            names = {name.rpartition(".")[2]: name for name in entry["tensors"]}
            attrs = {a: n for a, n in names.items() if not a.endswith(BIAS)}
            if stacks_tokens(module):  # Llama 4's: gate and up joined, no biases (`run_stacked`)
                if set(names) != {"gate_up_proj", "down_proj"}:
                    continue
            elif not hasattr(module, "has_gate") or set(attrs) != {"gate_up_proj" if module.has_gate else "up_proj",
                                                                   "down_proj"}:
                continue
            elif getattr(module, "has_bias", True) and not all(a + BIAS in names for a in attrs):
                continue  # biases, but not as the expert tensors they are in every transformers module
            found = {a: weight_spec(group, n, quant, ["native"]) if n in group.quantized else None
                     for a, n in attrs.items()}
            if all(s is not None for s in found.values()):
                specs[path] = found
    return specs


def operands(group, names: dict[str, str], specs: dict[str, PackSpec], stored: dict[str, torch.Tensor],
             scheme: str | None) -> dict[str, tuple]:
    """One expert's kernel operands per param attr, from its stored tensors {stored name: tensor}
    (`names`: param attr -> param name), and its biases' rows (as `<attr>_bias`: (row,))."""
    out = {}
    for attr, spec in specs.items():
        param = names[attr]
        parts = {part: stored[name] for part, name in quant_part_names(param, scheme_of(group, param, scheme)).items()}
        out[attr] = pack_param(parts, spec)
        if attr + BIAS in names:
            out[attr + BIAS] = (stored[names[attr + BIAS]],)
    return out


def place(model: nn.Module, group, tensors: dict[str, torch.Tensor], specs: dict[str, dict[str, PackSpec]],
          scheme: str | None) -> None:
    """After a load of `group` that brought its experts (a resident group, loaded once): each of
    its experts modules in `specs` gets every expert's operands from `tensors`, its stored parts
    [E, ...], for good. A load that left the experts out (a streamed layer: the streamer brings
    the routed ones per call) puts nothing."""
    for path, entry in group.experts.items():
        if path not in specs:
            continue
        names = {name.rpartition(".")[2]: name for name in entry["tensors"]}
        parts = [n for p in entry["tensors"] for n in (
            quant_part_names(p, scheme_of(group, p, scheme)).values() if p in group.quantized else (p,))]
        if not all(n in tensors for n in parts):
            continue
        per_expert = {e: operands(group, names, specs[path], {n: tensors[n][e] for n in parts}, scheme)
                      for e in range(entry["num_experts"])}
        model.get_submodule(path).__dict__[PACKED] = by_attr(per_expert)


def by_attr(per_expert: dict[int, dict[str, tuple]]) -> dict[str, dict[int, tuple]]:
    """{expert: {attr: operands}} (from `operands`) as the module holds them: {attr: {expert: operands}}."""
    attrs = next(iter(per_expert.values()), {})
    return {a: {e: ops[a] for e, ops in per_expert.items()} for a in attrs}


def clear(model: nn.Module, group) -> None:
    """`group` leaves: its experts modules let go of the operands `place` gave them."""
    for path in group.experts:
        model.get_submodule(path).__dict__.pop(PACKED, None)


def install(model: nn.Module, specs: dict[str, dict[str, PackSpec]]) -> None:
    """Wrap the forward of each experts module in `specs`: packed while the streamer has put its
    operands on it, the module's own otherwise."""
    for path, found in specs.items():
        module = model.get_submodule(path)
        module.forward = _forward(module, found)


def run(module: nn.Module, specs: dict[str, PackSpec], packed: dict[str, dict[int, tuple]],
        hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts module's output for routed `index` / `weights` (tokens, k) computed on the CPU
    from `packed` ({param attr: {expert: kernel operands}}, the experts the call routes)."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    kernels = {attr: _product(spec) for attr, spec in specs.items()}
    bias = {a: packed[a + BIAS] for a in (first, "down_proj") if a + BIAS in packed}
    up, down = kernels[first], kernels["down_proj"]
    tokens, k = index.shape
    x = hidden if hidden.dtype in native.IO_KINDS else hidden.float()
    flat = index.reshape(-1)
    out = torch.zeros(tokens * k, hidden.shape[-1], dtype=x.dtype)
    for e in sorted(packed[first]):
        rows = (flat == e).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        h = up(x.index_select(0, rows // k), packed[first][e])
        if first in bias:
            h = h + bias[first][e][0].to(h.dtype)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = down(h.to(x.dtype), packed["down_proj"][e])
        if "down_proj" in bias:
            y = y + bias["down_proj"][e][0].to(y.dtype)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        out.index_copy_(0, rows, y.to(x.dtype))
    out = out * weights.reshape(-1, 1).to(out.dtype)
    return out.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def run_stacked(module: nn.Module, specs: dict[str, PackSpec], packed: dict[str, dict[int, tuple]],
                hidden: torch.Tensor) -> torch.Tensor:
    """A stacked experts module's output (Llama 4's, runtime/stackedexperts.py: `hidden` [E * N, hidden],
    each expert's copy of the tokens scaled by its router score) from `packed`: per expert with a row
    that is not zero, gate and up, `act_fn(gate) * up`, down; zero rows for the others, as its own
    forward gives them."""
    kernels = {attr: _product(spec) for attr, spec in specs.items()}
    x = hidden if hidden.dtype in native.IO_KINDS else hidden.float()
    rows = x.reshape(module.num_experts, -1, x.shape[-1])  # (E, N, hidden)
    out = torch.zeros_like(rows)
    for e in stackedexperts.routed(hidden, module.num_experts):
        gate, up = kernels["gate_up_proj"](rows[e], packed["gate_up_proj"][e]).chunk(2, dim=-1)
        out[e] = kernels["down_proj"]((up * module.act_fn(gate)).to(x.dtype), packed["down_proj"][e]).to(x.dtype)
    return out.reshape(-1, x.shape[-1]).to(hidden.dtype)


def routed_call(arguments: dict) -> tuple:
    """(hidden states, routed expert ids, routing weights) of an experts module's bound call: its
    first three arguments, whatever the module names them (gpt-oss: router_indices, routing_weights)."""
    hidden, index, weights = list(arguments.values())[:3]
    return hidden, index, weights


@functools.cache  # one per weight shape and scheme, not one per call
def _product(spec: PackSpec):
    """f(x (M, K), one expert's operands) -> x @ W.T through the native kernel; an act-order weight's
    input gathered into its stored column order first (its operands end with that order)."""
    kernel = native_kernel(spec)
    if spec.permuted:
        return lambda x, ops: kernel(x.index_select(-1, ops[-1]).contiguous(), *ops[:-1])
    return lambda x, ops: kernel(x.contiguous(), *ops)


def _forward(module: nn.Module, specs: dict[str, PackSpec]):
    own = module.forward  # the bound method: transformers' dispatch to the configured implementation
    signature = inspect.signature(own)

    def forward(*args, **kwargs):
        packed = module.__dict__.get(PACKED)
        if packed is None:
            return own(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        if stacks_tokens(module):
            return run_stacked(module, specs, packed, arguments["hidden_states"])
        return run(module, specs, packed, *routed_call(arguments))

    forward.__signature__ = signature
    return forward
