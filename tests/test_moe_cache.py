"""Issue 23: the expert cache holds experts as stored (quantized ones as their parts) and its
policies evict what they say; a guess of the next layer's experts (--predict-experts) changes
bytes, never logits, and its counters add up to what an independent count finds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from reshard.format import expert_bytes, read_manifest
from runtime import LayeredModel
from runtime.expertcache import ExpertCache

IDS = torch.randint(3, 320, (1, 11), generator=torch.Generator().manual_seed(1))
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def int4_moe(moe_checkpoints, tmp_path_factory):
    from reshard.convert import convert

    folder = tmp_path_factory.mktemp("moe-int4") / "qwen3_moe"
    convert(str(moe_checkpoints["qwen3_moe"]), folder, quantize="int4", progress=False)
    return folder


def one_expert_bytes(group) -> int:
    """Stored bytes of one routed expert of `group`, from the manifest."""
    [entry] = group.experts.values()
    return expert_bytes(group) // entry["num_experts"]


def assert_cached_as_stored(model) -> None:
    """Every expert the cache of `model` (a LayeredModel) holds takes its stored bytes, no more."""
    cache, groups = model.experts.cache, model.manifest.groups
    assert cache.entries
    for (i, e, *params), stored in cache.entries.items():
        assert sum(t.numel() * t.element_size() for t in stored.values()) == one_expert_bytes(groups[i])
    assert cache.used == sum(one_expert_bytes(groups[key[0]]) for key in cache.entries)


def assert_cached_and_guessed_as_transformers(model, ref, ids, greedy: dict) -> None:
    """`model` (an expert cache and guesses on) gives `ref`'s logits on `ids` twice (the second
    time from the cache, which holds experts as stored) and its greedy tokens on a prompt, and
    guessed experts on the way."""
    with torch.no_grad():
        want = ref(ids).logits
    assert torch.equal(model(ids).logits, want)
    assert torch.equal(model(ids).logits, want)  # this time from the cache
    assert model.stats.per_pass[-1].experts_cached > 0
    assert_cached_as_stored(model)
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.equal(model.generate(prompt, **greedy), ref.generate(prompt, **greedy))
    assert model.stats.experts_predicted > 0  # the misses were guessed


def test_the_cache_holds_int4_experts_as_their_stored_parts(int4_moe):
    """A cached int4 expert is its packed bytes and scales (the stored size, not the expanded
    one), expanded into its slot when routed: the logits equal the uncached run's bit for bit."""
    manifest = read_manifest(int4_moe)
    plain = LayeredModel.from_pretrained(int4_moe, device="cpu", max_cpu_memory=0, expert_cache=0, packed=False)
    cached = LayeredModel.from_pretrained(int4_moe, device="cpu", max_cpu_memory=0, expert_cache="4MB", packed=False)
    want = plain(IDS).logits
    assert torch.equal(cached(IDS).logits, want)  # fills the cache
    assert torch.equal(cached(IDS).logits, want)  # every expert from the cache, expanded anew
    first, second = cached.stats.per_pass
    assert first.experts_read > 0 and second.experts_read == 0 and second.experts_cached == first.experts_read
    cache = cached.experts.cache
    assert len(cache.entries) == first.experts_read
    for (i, e, *params), stored in cache.entries.items():
        group = manifest.groups[i]
        assert set(params) <= set(group.quantized) and not set(params) & set(stored)  # parts, not weights
        size = sum(t.numel() * t.element_size() for t in stored.values())
        expanded = sum(math.prod(group.quantized[p]["shape"][1:]) * 4 for p in params)  # float32 rows
        assert size == one_expert_bytes(group) and 4 * size < expanded
    assert_cached_as_stored(cached)
    plain.close()
    cached.close()


def test_the_cache_holds_bfloat16_experts_in_bfloat16_when_computing_in_float32(moe_checkpoints, tmp_path):
    """A bfloat16 folder computing in float32: the cache keeps the experts' bfloat16 rows (the
    cast back to float32 is exact), half the bytes of the float32 slots, and the logits hold."""
    from reshard.convert import convert

    convert(str(moe_checkpoints["mixtral"]), tmp_path / "bf16", dtype="bfloat16", progress=False)
    plain = LayeredModel.from_pretrained(tmp_path / "bf16", device="cpu", dtype="float32", max_cpu_memory=0,
                                         expert_cache=0)
    cached = LayeredModel.from_pretrained(tmp_path / "bf16", device="cpu", dtype="float32", max_cpu_memory=0,
                                          expert_cache="4MB")
    want = plain(IDS).logits
    assert torch.equal(cached(IDS).logits, want) and torch.equal(cached(IDS).logits, want)
    assert cached.stats.per_pass[-1].experts_read == 0 and cached.stats.per_pass[-1].experts_cached > 0
    assert all(t.dtype == torch.bfloat16 for stored in cached.experts.cache.entries.values() for t in stored.values())
    assert_cached_as_stored(cached)


def entry(n: int) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(n, dtype=torch.uint8)}


@pytest.mark.parametrize("policy, kept", [("lru", {"b", "c", "d"}), ("lfu", {"a", "c", "d"})])
def test_the_policies_evict_the_least_recent_or_the_least_frequent(policy, kept):
    """Three 10-byte entries fill 30 bytes; `a` used thrice long ago, `b` once just now: a fourth
    entry evicts `a` under LRU, `b` under LFU."""
    cache = ExpertCache(30, policy, aging=1000)
    for key in "abc":
        assert cache.get(key) is None
        cache.put(key, entry(10))
    for key in ["a", "a", "c", "c", "b"]:
        assert cache.get(key) is not None
    cache.get("d")
    cache.put("d", entry(10))
    assert set(cache.entries) == kept and cache.used == 30
    cache.resize(10)  # shrinking drops by the same rule, down to the one the policy ranks first
    assert set(cache.entries) == {"d" if policy == "lru" else "c"}


@pytest.mark.parametrize("aging, kept", [(1000, {"a", "c"}), (2, {"b", "c"})])
def test_lfu_counts_age(aging, kept):
    """`a` used 7 times, then `b` 4 times: without aging a new entry evicts `b` (fewer uses);
    with counts halved every 2 x (entries) accesses, `a`'s old uses have faded and it goes."""
    cache = ExpertCache(20, "lfu", aging=aging)
    for key in "ab":
        cache.get(key)
        cache.put(key, entry(10))
    for key in "a" * 6 + "b" * 3:
        cache.get(key)
    cache.get("c")
    cache.put("c", entry(10))
    assert set(cache.entries) == kept


def routing_log(model, manifest) -> dict:
    """(pass, group) -> the experts the router picked, recorded before the expert hook maps them."""
    routed = {}
    for i, group in enumerate(manifest.groups):
        for path in group.experts:
            model.model.get_submodule(path).register_forward_pre_hook(
                lambda m, args, i=i: routed.setdefault((model.stats.passes, i), set()).update(
                    args[1].unique().tolist()), prepend=True)
    return routed


@pytest.mark.parametrize("arch, cache", [("mixtral", 0), ("deepseek_v3", 0), ("mixtral", "1MB")])
def test_predicted_experts_change_no_token_and_their_counts_add_up(arch, cache, moe_checkpoints, moe_converted):
    """With guesses on, greedy tokens are transformers' own; every expert read ahead is counted
    once as a guess, as a hit when its layer routed it in that pass, and otherwise as wasted bytes
    (its stored bytes): the counters equal a count made from the reads and the routers' picks."""
    folder = moe_converted[arch]
    manifest = read_manifest(folder)
    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=cache,
                                         predict_experts=True)
    predictor = model.experts.predictor
    assert predictor is not None and predictor.next  # every MoE layer but the last guesses for the next
    guesses, real = [], predictor.read
    predictor.read = lambda j, experts, entry: (guesses.append((model.stats.passes, j, list(experts))),
                                                real(j, experts, entry))[1]
    routed = routing_log(model, manifest)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    ref = AutoModelForCausalLM.from_pretrained(moe_checkpoints[arch], dtype=torch.float32).eval()
    want = ref.generate(ids, **GREEDY)
    assert torch.equal(model.generate(ids, **GREEDY), want)
    hits = sum(len(set(experts) & routed[(p, j)]) for p, j, experts in guesses)
    wasted = sum(len(set(experts) - routed[(p, j)]) * one_expert_bytes(manifest.groups[j]) for p, j, experts in guesses)
    stats = model.stats
    assert stats.experts_predicted == sum(len(experts) for _, _, experts in guesses) > 0
    assert stats.predicted_used == hits <= stats.experts_predicted and hits > 0
    assert stats.predicted_wasted_bytes == wasted
    k, layers = model.config.num_experts_per_tok, sum(1 for g in manifest.groups if g.experts)
    last = stats.per_pass[-1]  # a decode pass still brings k experts a layer, guessed or read or cached
    assert last.experts_read + last.experts_cached == k * layers
    model.close()


def test_cli_predict_experts_reports_its_counts(moe_converted, capsys):
    from runtime.cli import main as runtime_main

    code = runtime_main(["generate", str(moe_converted["qwen3_moe"]), "--prompt", "w5 w17 w42", "--device", "cpu",
                         "--max-cpu-memory", "0", "--expert-cache", "0", "--predict-experts", "--max-new-tokens", "4",
                         "--min-new-tokens", "4", "--stats"])
    assert code == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert 0 <= stats["predicted_used"] <= stats["experts_predicted"] > 0
    assert stats["predicted_wasted_bytes"] >= 0 and "experts_predicted" in stats["per_pass"][-1]


def test_guesses_have_host_memory_set_aside_and_hold_at_most_half_a_layer(moe_converted):
    """--predict-experts sets aside `guess_allowance` of the memory budget (two layers' worth of half
    their experts, as stored); however many forwards guess for a layer, its guesses hold at most half
    its experts."""
    from runtime.prediction import guess_allowance, most_guessed

    folder = moe_converted["deepseek_v3"]
    manifest = read_manifest(folder)
    moe = next(g for g in manifest.groups if g.experts)
    count = next(iter(moe.experts.values()))["num_experts"]
    allowance = guess_allowance(manifest)
    assert allowance == 2 * most_guessed(count) * one_expert_bytes(moe) > 0
    capacity = {}
    for predict in (False, True):
        with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory="1GiB", predict_experts=predict) as m:
            capacity[predict] = m.memory.capacity
    assert capacity[False] - capacity[True] == allowance
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0,
                                      predict_experts=True) as model:
        predictor = model.experts.predictor
        i, j = next(iter(predictor.next.items()))
        gen = torch.Generator().manual_seed(0)
        for _ in range(12):  # as many forwards through one layer load (runtime/lockstep.py), each its own guess
            predictor.guess(i, torch.randn(1, 1, model.config.hidden_size, generator=gen))
        asked = [e for g in predictor.pending[j] for e in g.experts]
        assert len(asked) == len(set(asked)) == most_guessed(count)
