"""Decoder layers computed on the CPU, where their weights wait, next to a model on the device.

A layer group run this way gets its weights from a `GroupLoader` on the host (views of its file,
quantized weights packed or expanded as the CPU runs them) instead of a copy over the link. Beside
a GPU, whose modules hold expanded weights, a quantized linear weight the CPU's kernels take is
loaded packed, and while its layer runs on the host its module is a `PackedLinear` holding those
bytes (the plain module is put back when the layer leaves): the CPU multiplies it as stored, as
it does the routed experts of runtime/cpuexperts.py, instead of expanding it every pass. Hooks
on transformers' own layer module move what the layer is given (hidden states, position
embeddings, masks) to the host before it runs and its output back after, and keep that layer's
KV cache on the host while it computes there (moved once when a pass picks the other side).
Which layers, per pass: the ones `--cpu-layers N` names, or with `auto` those for which the
planner (runtime/hybrid.py) estimates the CPU faster at this pass's token count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reshard.errors import UsageError
from reshard.format import expert_bytes

from . import hybrid, lowbit
from .kvcache import passed_cache
from .stream import GroupLoader, Loaded

AUTO = "auto"


@dataclass(frozen=True)
class Candidate:
    """A layer group that may run on the host, as the planner (runtime/hybrid.py) sees it."""
    stored: int  # bytes of its file
    params: int  # weights it holds
    index: int  # its layer's index in the model (and its KV cache's)
    expanded: int = 0  # stored bytes of quantized weights the host expands every pass
    packed: dict = field(default_factory=dict)  # {kernel scheme: stored bytes} the host's low-bit kernels read


class HostCompute:
    """Layer groups `candidates` (group index -> Candidate) that may run on `host`.

    `fixed`: they always run there (`--cpu-layers N`); else `speeds()` (calibrated on first use)
    feeds `hybrid.choose` at each pass's token count."""

    def __init__(self, loader: GroupLoader, device: torch.device, candidates: dict[int, Candidate],
                 *, fixed: bool, speeds: Callable[[], hybrid.Speeds] | None = None,
                 held: Callable[[int], torch.Tensor | None] = lambda i: None, swapped: frozenset = frozenset()):
        self.loader, self.device, self.host = loader, device, loader.device
        self.swapped = swapped  # packed weights whose plain module makes way for a PackedLinear on the host
        self._swaps = {i: [n for n in loader.manifest.groups[i].quantized if n in swapped] for i in candidates}
        self._standins: dict[str, torch.nn.Module] = {}  # module path -> its PackedLinear, made on first use
        self._empty: dict[str, dict] = {}  # module path -> its PackedLinear's meta parameters (bias aside)
        self._plain: dict[str, torch.nn.Module] = {}  # module path -> the plain module while a PackedLinear stands in
        self._model: torch.nn.Module | None = None  # whose modules those are
        self.candidates, self.fixed, self._speeds = candidates, fixed, speeds
        self.held = held  # group -> its bytes already in host memory (the device loader's pinned copy), or None
        self.names = {i: loader.manifest.groups[i].name for i in candidates}
        self.active: dict[int, str] = {}  # this pass: group -> why it runs on the host
        self.log: dict[str, str] = {}  # this pass: group name -> where it ran and why
        self.enabled: Callable[[], bool] = lambda: True  # False while several forwards share a pass (lockstep)
        self._known: hybrid.Speeds | None = None  # calibrated on first use, kept with the model

    def plan_pass(self, tokens: int) -> None:
        """Decide, for a pass of `tokens` tokens, which candidates run on the host."""
        if self._plain:  # a pass that stopped midway (an exception) left PackedLinears in place
            self.put_plain(self._model)
        self.active, self.log = {}, {}
        if not self.enabled():
            return
        for i, c in self.candidates.items():
            if self.fixed:
                where, why = hybrid.CPU, "--cpu-layers"
            else:
                choice = hybrid.choose(c.stored, c.params, tokens, self.speeds(), c.expanded, c.packed)
                where, why = choice.where, choice.reason
            self.log[self.names[i]] = f"{where}: {why}"
            if where == hybrid.CPU:
                self.active[i] = why

    def speeds(self) -> hybrid.Speeds:
        if self._known is None:
            self._known = self._speeds()
        return self._known

    def weights(self, i: int) -> Loaded:
        """Group i's tensors on the host, as the CPU computes with them: views of its pinned copy where
        the device's loader holds one (a HOST group), else read from its file."""
        data = self.held(i)
        return self.loader.load(i) if data is None else self.loader.load_from(i, data)

    def put_packed(self, model: torch.nn.Module, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Group i's packed weights (in `tensors`, from `weights(i)`) into PackedLinear modules standing
        in for their plain ones (made once per module), with the plain one's bias as put in place."""
        for name in self._swaps.get(i, ()):
            path = name.rpartition(".")[0]
            plain = model.get_submodule(path)
            packed = self._standins.get(path)
            if packed is None:
                packed = self._standins[path] = lowbit.PackedLinear(plain, self.loader.packing[name])
                self._empty[path] = {a: t for a, t in packed._parameters.items() if a != "bias"}
            for stored in lowbit.packed_names(name, packed.spec):
                packed._parameters[stored.rpartition(".")[2]] = torch.nn.Parameter(tensors[stored], requires_grad=False)
            if plain.bias is not None:
                packed.bias = plain.bias
            model.set_submodule(path, packed)
            self._plain[path], self._model = plain, model

    def put_plain(self, model: torch.nn.Module) -> None:
        """The plain modules back where `put_packed` stood PackedLinears in."""
        for path, plain in self._plain.items():
            model.set_submodule(path, plain)
            self._standins[path]._parameters.update(self._empty[path])  # no pass's weights kept alive between passes
        self._plain.clear()

    def install(self, model: torch.nn.Module, layers: torch.nn.ModuleList) -> list:
        """Hooks: the pass's token count on `model`, the moves on each candidate layer; their handles."""
        handles = [model.register_forward_pre_hook(self._start, with_kwargs=True)]
        for i, c in self.candidates.items():
            layer = layers[c.index]
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: self._inputs(i, args, kwargs), with_kwargs=True))
            handles.append(layer.register_forward_hook(lambda mod, args, out, i=i: self._output(i, out)))
        return handles

    def _start(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = ids.numel() if ids is not None else embeds.shape[:-1].numel() if embeds is not None else 1
        self.plan_pass(tokens)

    def _inputs(self, i: int, args, kwargs):
        where = self.host if i in self.active else self.device
        move_cache_layer(passed_cache(kwargs), self.candidates[i].index, where)
        if i not in self.active:
            return None
        return move(args, self.host), move(kwargs, self.host)

    def _output(self, i: int, out):
        return move(out, self.device) if i in self.active else None


def move(obj, device: torch.device):
    """Tensors in `obj` (nested tuples, lists, dicts) on `device`; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def move_cache_layer(cache, index: int, device: torch.device) -> None:
    """Layer `index` of a transformers cache (its `layers[index]` keys and values) to `device`, if not there."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return
    entry = layers[index]
    for attr in ("keys", "values"):
        t = getattr(entry, attr, None)
        if isinstance(t, torch.Tensor) and t.device != device:
            setattr(entry, attr, t.to(device))
    if getattr(entry, "is_initialized", False):
        entry.device = device


def candidates_for(cpu_layers, places: list[str], groups, resident: str) -> list[int]:
    """Group indices of the layers that may run on the host: with an int N the last N layer groups
    not resident on the device (fewer if there are not that many); with "auto" all of them."""
    off_device = [i for i, (g, p) in enumerate(zip(groups, places)) if g.kind == "layer" and p != resident]
    if cpu_layers == AUTO:
        return off_device
    return off_device[max(0, len(off_device) - int(cpu_layers)):] if cpu_layers else []


def open_host_compute(cpu_layers, folder, loader: GroupLoader, costs, layer_index: Callable[[int], int],
                      model: torch.nn.Module | None = None):
    """The HostCompute for `cpu_layers` (None, 0, N or "auto") over `loader`'s plan, or None when
    no layer runs on the host (also for "auto" on the CPU, where the host is the device). With
    `model` (the model's modules, where `packed` is asked for), the candidates' quantized linear
    weights that `loader` expands but the CPU's kernels take are loaded packed on the host."""
    from .budget import DEVICE

    if cpu_layers is None:
        return None
    if cpu_layers != AUTO and (isinstance(cpu_layers, bool) or not isinstance(cpu_layers, int) or cpu_layers < 0):
        raise UsageError(f"cpu_layers must be a layer count (0 or more) or 'auto', not {cpu_layers!r}")
    if not cpu_layers or (cpu_layers == AUTO and loader.device.type == "cpu"):
        return None
    manifest = loader.manifest
    chosen = candidates_for(cpu_layers, loader.places, manifest.groups, DEVICE)
    if loader.device.type != "cpu":  # the expert streamer puts routed experts on the device (--cpu-experts computes them on the CPU instead)
        chosen = [i for i in chosen if not expert_bytes(manifest.groups[i])]
    if not chosen:
        return None
    packing, swapped = dict(loader.packing), frozenset()
    if model is not None:
        names = {n for i in chosen for n in manifest.groups[i].quantized}
        extra = {n: spec for n, spec in lowbit.plan_packing(model, manifest, torch.device("cpu")).items()
                 if n in names and n not in packing}
        packing.update(extra)
        swapped = frozenset(extra)
    host = GroupLoader(folder, manifest, torch.device("cpu"), loader.dtype, loader.stats, packing=packing)
    size = loader.dtype.itemsize
    candidates = {i: Candidate(costs[i].stored, costs[i].held // size, layer_index(i), host.expanded_bytes(i),
                               host.packed_bytes(i)) for i in chosen}
    schemes = sorted({spec.scheme for spec in packing.values()})  # the kernels whose rates the planner needs
    speeds = lambda: hybrid.calibrate(loader.device, loader.dtype, cache_file=hybrid.default_cache_file(),  # noqa: E731
                                      schemes=schemes)
    return HostCompute(host, loader.device, candidates, fixed=cpu_layers != AUTO, speeds=speeds,
                       held=loader.host_data, swapped=swapped)
