"""Expert cache policy, measured: routing traces replayed against runtime.expertcache's policies.

A trace is, per decode token, the experts each MoE layer routed. Sources:
- decode: a real decode (sampling, so that a random model does not repeat one token) of the MoE
  benchmark's random models (benchmarks/moe.py shapes: Mixtral-like 8 experts / 2 per token and
  Qwen3-30B-A3B-like 64 / 8), recorded by a pre-hook on each experts module;
- zipf: synthetic DeepSeek-V3-like routing (256 experts, 8 per token): per layer a Zipf(`--zipf`)
  popularity over a shuffled expert order, and each token keeps each of the previous token's experts
  with probability `--repeat` (routing traces of real models show such reuse from token to token);
- `--trace FILE`: a JSON trace recorded elsewhere (`--record-to FILE` writes one from `--record
  FOLDER`, any converted MoE folder: a real model's, where the hub is reachable).
Each trace is replayed through `ExpertCache` itself (entries of one byte, so capacity counts experts)
at capacities that are fractions of all the model's experts, for each policy, with Belady's optimum
(evict the expert used furthest in the future) as the bound no policy beats. Figures are hit rates
(hits / expert accesses); the first pass through a layer misses for every policy alike. Two
synthetic traces: with reuse from token to token (`--repeat`, default 0.5) and without (0).

Usage: python benchmarks/moe_cache_policy.py [--tokens 256] [--zipf 1.0] [--repeat 0.5]
       [--capacities 0.05,0.1,0.25,0.5] [--trace FILE] [--record FOLDER --record-to FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from common import machine_lines  # noqa: E402

ONE = torch.zeros(1, dtype=torch.uint8)  # one cache entry: one byte


def record(folder: Path, tokens: int, seed: int = 0) -> dict:
    """{"experts": E, "trace": [[layer's routed experts, per MoE layer] per decode token]} of a
    sampled decode of the converted MoE `folder` (all resident: routing does not depend on it)."""
    from runtime import LayeredModel

    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory="64GiB", expert_cache=0)
    routed: list[dict] = []
    paths = [p for g in model.manifest.groups for p in g.experts]
    for layer, path in enumerate(paths):
        def hook(module, args, kwargs, layer=layer):
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if index is not None and index.shape[0] == 1:  # a decode pass: one token
                routed[-1][layer] = sorted(index.flatten().tolist())
        model.model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    model.model.register_forward_pre_hook(lambda *_: routed.append({}))
    torch.manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=1.0,
                   pad_token_id=0)
    experts = next(iter(next(g for g in model.manifest.groups if g.experts).experts.values()))["num_experts"]
    model.close()
    return {"experts": experts, "trace": [[t[k] for k in range(len(paths))] for t in routed if len(t) == len(paths)]}


def zipf_trace(layers: int, experts: int, k: int, tokens: int, s: float, repeat: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1 / (r + 1) ** s for r in range(experts)))
    orders = [rng.sample(range(experts), experts) for _ in range(layers)]
    trace, last = [], [[] for _ in range(layers)]
    for _ in range(tokens):
        token = []
        for layer in range(layers):
            chosen = {e for e in last[layer] if rng.random() < repeat}
            while len(chosen) < k:
                chosen.add(orders[layer][rng.choices(range(experts), cum_weights=cum)[0]])
            last[layer] = sorted(chosen)
            token.append(last[layer])
        trace.append(token)
    return {"experts": experts, "trace": trace}


def accesses(trace: dict) -> list[tuple[int, int]]:
    return [(layer, e) for token in trace["trace"] for layer, routed in enumerate(token) for e in routed]


def replay(keys: list, capacity: int, policy: str) -> float:
    """Hit rate of `policy` ("lru", or "lfu/A": lfu with counts halved every A x entries accesses)."""
    from runtime.expertcache import ExpertCache

    name, _, aging = policy.partition("/")
    cache, hits = ExpertCache(capacity, name, **({"aging": int(aging)} if aging else {})), 0
    for key in keys:
        if cache.get(key) is not None:
            hits += 1
        else:
            cache.put(key, {"w": ONE})
    return hits / len(keys)


def belady(keys: list, capacity: int) -> float:
    """Hit rate of the optimal offline policy: on a miss with the cache full, evict the key used
    furthest in the future."""
    import heapq

    upcoming, nxt = {}, [0] * len(keys)
    for t in range(len(keys) - 1, -1, -1):
        nxt[t] = upcoming.get(keys[t], len(keys) + t)
        upcoming[keys[t]] = t
    held, heap, hits = {}, [], 0  # key -> its next use; max-heap of (-next use, key)
    for t, key in enumerate(keys):
        if key in held:
            hits += 1
        elif len(held) >= capacity:
            while True:
                use, old = heapq.heappop(heap)
                if held.get(old) == -use:
                    del held[old]
                    break
        held[key] = nxt[t]
        heapq.heappush(heap, (-nxt[t], key))
    return hits / len(keys)


def table(name: str, trace: dict, fractions: list[float], policies: list[str]) -> dict:
    keys = accesses(trace)
    layers, experts = len(trace["trace"][0]), trace["experts"]
    k = len(trace["trace"][0][0])
    print(f"\n{name}: {len(trace['trace'])} decode tokens, {layers} MoE layers x {experts} experts, {k} per token; "
          f"{len(keys)} expert accesses, {len(set(keys))} distinct experts")
    print(f"  {'capacity':>22} " + " ".join(f"{p:>7}" for p in policies) + "  belady  best vs lru")
    out = {}
    for f in fractions:
        capacity = max(1, round(f * layers * experts))
        rates = {p: replay(keys, capacity, p) for p in policies}
        rates["belady"] = belady(keys, capacity)
        best = max(policies, key=rates.get)
        print(f"  {f:>6.0%} ({capacity:>6} experts) " + " ".join(f"{rates[p]:7.3f}" for p in policies)
              + f"  {rates['belady']:6.3f}  {best} {rates[best] - rates['lru']:+.3f}")
        out[f] = rates
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6, help="MoE benchmark models' layers (decode traces)")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--repeat", type=float, default=0.5)
    ap.add_argument("--capacities", default="0.05,0.1,0.25,0.5")
    ap.add_argument("--trace", type=Path, action="append", default=[])
    ap.add_argument("--record", type=Path, help="a converted MoE folder to record a trace from")
    ap.add_argument("--record-to", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.record:
        trace = record(args.record, args.tokens)
        (args.record_to or Path("trace.json")).write_text(json.dumps(trace))
        return
    from moe import folder_of

    for line in machine_lines("float32", 2):
        print(line)
    fractions = [float(f) for f in args.capacities.split(",")]
    from runtime.expertcache import AGING

    policies = ["lru", *(f"lfu/{a}" for a in sorted({1, AGING, 4, 8, 32}))]
    traces = {f"decode {s} (random weights, sampled)": record(folder_of(s, args.layers, torch.float32), args.tokens)
              for s in ("mixtral", "qwen3")}
    for repeat in (args.repeat, 0.0):
        traces[f"zipf s={args.zipf} repeat={repeat} (synthetic, DeepSeek-V3-like)"] = zipf_trace(
            58, 256, 8, args.tokens, args.zipf, repeat)
    traces.update({str(p): json.loads(p.read_text()) for p in args.trace})
    print(f"\nhit rates; lfu/A: counts halved every A x (entries held) accesses; the default is lfu/{AGING}")
    results = {name: table(name, t, fractions, policies) for name, t in traces.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
