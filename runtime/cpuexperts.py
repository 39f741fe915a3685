"""A mixture-of-experts layer's routed experts computed on the CPU, where they wait, beside the device.

For each streamed MoE layer (`--cpu-experts on|auto`), attention, router and shared experts run
on the compute device as usual; the routed experts do not cross the link. A forward pre-hook on
transformers' experts module (put before the expert streamer's, see runtime/experts.py) reads
the routed ids and decides where this call runs: always the CPU with `on`, else the faster side
by the planner (runtime/hybrid.py `choose_experts`, from the routed experts' bytes, those the
device holds already (its expert cache), what the host's slots cost and the call's token-expert
pairs). On the CPU the module's forward gets the hidden states, `top_k_index` and
`top_k_weights` moved to the host, the routed experts brought into CPU slots by a second
`ExpertStreamer` over the host (from the device loader's pinned copy of a HOST group, else from
the group's file), and its own code computes there; the result goes back to the device. The
math is transformers', on the same slots the device path uses, so on the CPU the result is
bit-identical. Quantized experts the native CPU kernels take (int4, int8, GGUF Q2_K to Q6_K, IQ4_XS) are not
expanded into slots: they are computed as stored (runtime/packedexperts.py), so the host reads
each expert's stored bytes once, which the planner counts. `log` says per pass where each layer's experts ran and why (--stats).
Llama 4's experts module, which takes its tokens stacked per expert instead of routed ids
(runtime/stackedexperts.py), runs here the same way: its routed experts are those with a row that is not zero.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from reshard.errors import UsageError
from reshard.format import expert_range, stored_names
from reshard.plan import stacks_tokens

from . import budget, hybrid, packedexperts, stackedexperts
from .expertrounds import Restore
from .experts import ExpertStreamer
from .expertslots import computes_on_slots, routed_arg, routed_experts
from .hostcompute import move
from .stream import StreamStats

MODES = ("auto", "on", "off")


class HostView:
    """What an `ExpertStreamer` reads from a loader, for one on the host: the device loader's files
    and its pinned copies of HOST groups, rows made on the CPU in the compute dtype. Its own stats:
    these bytes do not cross the link."""

    def __init__(self, loader):
        self.manifest, self.files, self.scheme = loader.manifest, loader.files, loader.scheme
        self.host_data = loader.host_data
        self.device, self.dtype, self.stats = torch.device("cpu"), loader.dtype, StreamStats()
        self.expert_packing: dict[str, dict] = {}  # experts computed as stored (set by CpuExperts.install)


class CpuExperts:
    """Routed experts of the MoE groups `groups` (group index -> layer name) computed on the host.

    `fixed`: always (`on`); else `speeds()` (calibrated on first use) feeds `hybrid.choose` per call."""

    def __init__(self, loader, groups: dict[int, str], *, fixed: bool,
                 speeds: Callable[[], hybrid.Speeds] | None = None):
        self.loader, self.device, self.groups = loader, loader.device, groups
        self.fixed, self.measure, self._known = fixed, speeds, None  # measure(): the Speeds for `auto`
        self.host = ExpertStreamer(HostView(loader))  # its bring() fills CPU slots, its hooks are never installed
        self.log: dict[str, str] = {}  # this pass: layer -> "cpu|stream: why"
        self.here: dict[str, str] = {}  # experts module path -> why it runs on the host this call
        self.sizes: dict[str, tuple[int, int, dict]] = {}  # experts module path -> one expert's (stored bytes,
        # weights, host memory traffic computed here: {kernel scheme or None (the matmul): bytes})
        self.on_device: Callable[[int, str, list[int]], int] = lambda i, path, routed: 0  # held there already
        self.on_compute: Callable[[int, str], None] = lambda i, phase: None  # "start"/"end" (ordering tests)
        self.hooks: list = []

    def speeds(self) -> hybrid.Speeds:
        if self._known is None:
            self._known = self.measure()
        return self._known

    def kernel_schemes(self) -> list[str]:
        """The kernel schemes of the experts computed as stored (their rates: runtime/hybrid.py)."""
        return sorted({spec.scheme for specs in self.host.packed.values() for spec in specs.values()})

    def elsewhere(self, path: str) -> bool:
        """The expert streamer's question: does this call of module `path` run on the host (bring nothing)?"""
        return path in self.here

    def install(self, model: torch.nn.Module) -> None:
        """Hook the experts modules of the candidate groups in `model` and reset `log` at each pass."""
        self.hooks.append(model.register_forward_pre_hook(lambda *_: self.log.clear()))
        # quantized experts the CPU's native kernels take are computed as stored (runtime/packedexperts.py)
        self.host.packed.update(packedexperts.plan(model, self.loader.manifest, self.host.device))
        for i in self.groups:
            for path, entry in self.loader.manifest.groups[i].experts.items():
                module = model.get_submodule(path)
                signature = inspect.signature(module.forward)
                routes = "hidden_states" if stacks_tokens(module) else routed_arg(module)
                if routes is None or (not computes_on_slots(module) and path not in self.host.packed
                                      and not stacks_tokens(module)):
                    continue  # takes no expert ids, or computes only on full-size [E, ...] tensors: stays on the device
                own = {n.rpartition(".")[2] for n in entry["tensors"]}
                if set(module._parameters) - own or any(b is not None for b in module._buffers.values()):
                    continue  # holds tensors the slots do not replace (they live on the device)
                self.sizes[path] = self._sizes(i, path, entry)
                self.hooks.append(module.register_forward_pre_hook(
                    self._decide(i, path, entry, signature, routes), with_kwargs=True, prepend=True))
                module.forward = self._forward(i, path, module, entry, signature, routes, module.forward)
                self.hooks.append(Restore(module))

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.host.close()

    def _decide(self, i: int, path: str, entry: dict, signature, routes: str):
        count = entry["num_experts"]

        def pre_hook(mod, args, kwargs):
            self.here.pop(path, None)
            index = signature.bind(*args, **kwargs).arguments[routes]
            if self.fixed:
                where, why = hybrid.CPU, "--cpu-experts on"
            else:
                routed, pairs = routing(index, count, stacked=routes == "hidden_states")
                stored, params, traffic = self.sizes[path]
                held = self.on_device(i, path, routed)
                choice = hybrid.choose_experts(len(routed), pairs, stored, params, self.speeds(), on_device=held,
                                               cpu_traffic=traffic)
                where, why = choice.where, choice.reason
                why += f", {held} of {len(routed)} on the device" if held else ""
            self.log[self.groups[i]] = f"{where}: {why}"
            if where == hybrid.CPU:
                self.here[path] = why
            return None

        return pre_hook

    def _sizes(self, i: int, path: str, entry: dict) -> tuple[int, int, dict]:
        """(stored bytes, weights, host memory traffic on the CPU {kernel scheme or None: bytes}) of one
        expert of `entry`, for the planner. Multiplied as stored (`packed`), an expert's weights are
        read by their kernels; else its stored bytes are read, its slot rows written in the compute
        dtype (expanded, if quantized) and read again by the matmul."""
        group, count = self.loader.manifest.groups[i], entry["num_experts"]
        gf = self.loader.files[i]
        one = {p: sum(end - begin for n in stored_names(p, group.tensors) for begin, end in [expert_range(gf.infos[n], count, 0)])
               for p in entry["tensors"]}
        params = 0
        for p in entry["tensors"]:
            shape = group.quantized[p]["shape"] if p in group.quantized else gf.infos[p].shape
            params += int(torch.Size(shape[1:]).numel())
        stored = sum(one.values())
        specs = self.host.packed.get(path)
        if specs is None:
            return stored, params, {None: stored + 2 * params * self.loader.dtype.itemsize}
        traffic: dict = {}
        for p, nbytes in one.items():
            spec = specs.get(p.rpartition(".")[2])
            key = spec.scheme if spec is not None else None  # biases: read as they are
            traffic[key] = traffic.get(key, 0) + nbytes
        return stored, params, traffic

    def _stacked(self, i: int, path: str, module: torch.nn.Module, entry: dict, hidden: torch.Tensor, original):
        """A stacked experts module's call on the host (`hidden` there): packed, or on CPU slots."""
        count = entry["num_experts"]
        routed = stackedexperts.routed(hidden, count) or [0]
        if path in self.host.packed:
            self.host.bring_packed(i, path, module, entry, routed)
            try:
                return packedexperts.run_stacked(module, self.host.packed[path],
                                                 module.__dict__[packedexperts.PACKED], hidden)
            finally:
                module.__dict__.pop(packedexperts.PACKED, None)
        before = dict(module._parameters)
        try:
            slots = self.host.bring(i, path, module, entry, routed)
            rows, call = stackedexperts.compact(hidden, slots.held, count)
            stackedexperts.pad(module, [n.rpartition(".")[2] for n in entry["tensors"]])
            return stackedexperts.spread(original(rows), call)
        finally:
            module._parameters.update(before)

    def _forward(self, i: int, path: str, module: torch.nn.Module, entry: dict, signature, routes: str, original):
        """The module's forward, run on the host when `_decide` said so: packed through the native
        kernels (any module, gpt-oss's `router_indices` too), else on CPU slots (`top_k_index` ones)."""
        count = entry["num_experts"]

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if path not in self.here:
                return original(*args, **kwargs)
            self.on_compute(i, "start")
            bound = signature.bind(*move(args, self.host.device), **move(kwargs, self.host.device))
            if routes == "hidden_states":  # Llama 4's stacked rows
                out = self._stacked(i, path, module, entry, bound.arguments[routes], original)
                self.on_compute(i, "end")
                return move(out, self.device)
            index = bound.arguments[routes]
            routed = routed_experts(index, count)
            if path in self.host.packed:  # the routed experts as stored, through the native kernels
                self.host.bring_packed(i, path, module, entry, routed)
                try:
                    out = packedexperts.run(module, self.host.packed[path], module.__dict__[packedexperts.PACKED],
                                            *packedexperts.routed_call(bound.arguments))
                finally:
                    module.__dict__.pop(packedexperts.PACKED, None)
                self.on_compute(i, "end")
                return move(out, self.device)
            before, experts = dict(module._parameters), module.num_experts
            try:
                slots = self.host.bring(i, path, module, entry, routed)  # CPU slots as the module's parameters
                module.num_experts = len(slots.held)
                bound.arguments[routes] = slots.index(index, count)
                out = original(*bound.args, **bound.kwargs)
            finally:
                module._parameters.update(before)
                module.num_experts = experts
            self.on_compute(i, "end")
            return move(out, self.device)

        return forward


def routing(index: torch.Tensor, count: int, *, stacked: bool) -> tuple[list[int], int]:
    """(routed experts, token-expert pairs) of a call: from its routed ids, or a stacked module's rows
    that are not zero; one wait for the router, then both counts on the host."""
    if stacked:
        used = index.reshape(count, -1, index.shape[-1]).ne(0).any(-1).cpu()  # (E, N)
        return torch.nonzero(used.any(1)).flatten().tolist(), int(used.sum())
    index = index.cpu()
    return routed_experts(index, count), int(((index >= 0) & (index < count)).sum())


def open_cpu_experts(mode, loader) -> CpuExperts | None:
    """The CpuExperts for `mode` ("on", "auto", "off" or None) over `loader`'s plan, or None when no
    streamed MoE layer's experts run on the host (also "auto" on the CPU, where the host is the device)."""
    if mode is None or mode == "off":
        return None
    if mode not in MODES:
        raise UsageError(f"cpu_experts must be 'auto', 'on' or 'off', not {mode!r}")
    if mode == "auto" and loader.device.type == "cpu":
        return None
    groups = {i: g.name for i, (g, p) in enumerate(zip(loader.manifest.groups, loader.places))
              if g.experts and p != budget.DEVICE}
    if not groups:
        return None
    speeds = lambda: hybrid.calibrate(loader.device, loader.dtype, cache_file=hybrid.default_cache_file(),  # noqa: E731
                                      schemes=experts.kernel_schemes())
    experts = CpuExperts(loader, groups, fixed=mode == "on", speeds=speeds)
    return experts
