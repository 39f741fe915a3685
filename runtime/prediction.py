"""Guessing the next MoE layer's experts, so that their reads start before its router has run.

When layer i's experts module gets its routed tokens (the pre-hook in runtime/experts.py), the
predictor applies the router of the next streamed MoE layer j to layer i's hidden state (the
approach of Pre-gated MoE, ProMoE and Fiddler: the residual stream changes little from one
layer to the next), takes each token's top k, and reads the guessed experts the cache lacks
into host memory, in their stored form, on a background thread while layer i computes. Layer
j's hook takes the guessed experts it routes from there instead of reading them; the rest are
dropped when layer j is unloaded. A wrong guess costs bytes, never correctness: each layer
computes with the experts its own router picked. A prefill or batch whose guess covers more than
half the experts guesses nothing (its pass reads the layer nearly whole anyway), and the guesses
for one layer, all forwards of a pass together, never pass half its experts: with a layer's
guesses held until it is unloaded and the next one's being read, host memory holds at most
`guess_allowance` for them, which the budget sets aside at open (runtime/model.py).

The router is the MoE block's `gate.weight` or `router.weight` ([E, hidden], read from the
layer file's mapping: E x hidden values), with the router's bias and DeepSeek-V3's score
correction bias (added to sigmoid scores) where there are any; group-limited routing is not
modelled: it is a guess. StreamStats counts `experts_predicted` (read ahead), `predicted_used`
(routed by their layer: the hits) and `predicted_wasted_bytes` (read ahead, not routed).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from reshard.plan import ROUTER_NAMES

from . import budget

MOST = 0.5  # a guess covering more of the experts than this is not read ahead


def most_guessed(count: int) -> int:
    """The most experts of a layer of `count` that its guesses hold at once."""
    return int(count * MOST)


def guess_allowance(manifest) -> int:
    """Host bytes guesses may hold at once: two layers' worth (one being used, the next being
    read) of `most_guessed` experts, as stored, for the largest MoE layer of `manifest`."""
    from reshard.format import expert_bytes

    per_layer = [most_guessed(entry["num_experts"]) * expert_bytes(g, entry) // entry["num_experts"]
                 for g in manifest.groups for entry in g.experts.values()]
    return 2 * max(per_layer, default=0)


@dataclass
class Router:
    """What guessing group j's experts needs: its router's stored tensors and its experts entry."""

    weight: str  # [E, hidden] tensor name in the group's file
    bias: str | None  # [E] tensor name, if the router has a bias
    correction: torch.Tensor | None  # DeepSeek-V3's e_score_correction_bias (a loaded buffer)
    entry: dict  # the group's experts entry (manifest)

    def pick(self, gf, hidden: torch.Tensor, k: int) -> list[int]:
        """The experts the router would give `hidden` (union of each token's top k), ascending."""
        w = gf.tensor(self.weight)  # a view of the mapping: nothing is copied for a float32 file
        h = hidden.reshape(-1, w.shape[1]).to("cpu", torch.float32)
        scores = h @ w.float().t()  # (tokens, E)
        if self.bias is not None:
            scores += gf.tensor(self.bias).float()
        if self.correction is not None:
            scores = scores.sigmoid() + self.correction.to("cpu", torch.float32)
        return torch.topk(scores, min(k, scores.shape[1]), dim=-1).indices.unique().tolist()


@dataclass
class Guess:
    experts: list[int]  # read ahead, ascending
    future: Future  # -> ({expert: stored tensors}, reads taken)
    used: set = field(default_factory=set)


class ExpertPredictor:
    """Guesses for every streamed MoE group whose router can be found; `read(j, experts, entry)`
    reads experts of group j as stored (ExpertStreamer.read_ahead), `held(j, e)` says whether
    the cache has one."""

    def __init__(self, loader, model, read, held, *, top_k: int):
        self.loader, self.stats, self.read, self.held, self.top_k = loader, loader.stats, read, held, top_k
        self.routers: dict[int, Router] = {}
        self.next: dict[int, int] = {}  # group i -> the MoE group its hidden state guesses for
        self.pending: dict[int, list[Guess]] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="runtime-predict")
        self._find_routers(model)

    def _find_routers(self, model) -> None:
        order = []
        for i, group in enumerate(self.loader.manifest.groups):
            if not group.experts or self.loader.places[i] == budget.DEVICE:
                continue
            order.append(i)
            if len(group.experts) != 1 or self.loader.places[i] != budget.DISK:
                continue  # a host-held group's experts are a copy away already
            [(path, entry)] = group.experts.items()
            parent = path.rpartition(".")[0]
            for owner in (f"{parent}.{name}" for name in ROUTER_NAMES):
                info = group.tensors.get(f"{owner}.weight")
                if info is None or f"{owner}.weight" in group.quantized or len(info["shape"]) != 2 \
                        or info["shape"][0] != entry["num_experts"]:
                    continue
                module = model.get_submodule(owner)
                bias = f"{owner}.bias" if f"{owner}.bias" in group.tensors else None
                correction = getattr(module, "e_score_correction_bias", None)
                self.routers[i] = Router(f"{owner}.weight", bias, correction, entry)
                break
        self.next = {i: j for i, j in zip(order, order[1:]) if j in self.routers}

    def guess(self, i: int, hidden: torch.Tensor) -> None:
        """Layer i's experts got `hidden`: start reading what the next MoE layer will likely route."""
        j = self.next.get(i)
        if j is None:
            return
        router = self.routers[j]
        picked = router.pick(self.loader.files[j], hidden, self.top_k)
        most = most_guessed(router.entry["num_experts"])
        if len(picked) > most:
            return
        asked = {e for g in self.pending.get(j, ()) for e in g.experts}
        todo = [e for e in picked if e not in asked and not self.held(j, e)][:most - len(asked)]
        if todo:
            future = self.pool.submit(self.read, j, todo, router.entry)
            self.pending.setdefault(j, []).append(Guess(todo, future))

    def take(self, j: int, e: int) -> dict[str, torch.Tensor] | None:
        """Expert e of group j's stored tensors if a guess read it (waiting for that read), else None."""
        for g in self.pending.get(j, ()):
            if e in g.experts and e not in g.used:
                g.used.add(e)
                return g.future.result()[0][e]
        return None

    def drop(self, j: int) -> None:
        """Group j is unloaded: its guesses are settled; count them (a read not started is no guess)."""
        for g in self.pending.pop(j, ()):
            if g.future.cancel():
                continue
            stored, reads = g.future.result()
            wasted = sum(t.numel() * t.element_size() for e in g.experts if e not in g.used
                         for t in stored[e].values())
            self.stats.experts_predicted += len(g.experts)
            self.stats.predicted_used += len(g.used)
            self.stats.predicted_wasted_bytes += wasted
            self.stats.bytes_read += wasted
            self.stats.expert_reads += reads

    def close(self) -> None:
        for j in list(self.pending):
            self.drop(j)
        self.pool.shutdown(wait=True)
