"""The CUDA memory budget of a MoE model whose routed experts stream sparsely (issue 23): a
streamed MoE layer is counted with slots for the experts a pass routes, never its E experts, so
an open never fails for lack of room for them; a prompt whose experts do not fit at once is
prefilled in chunks that do. The CPU machine checks the plan with a CUDA loader whose stream is
patched out (the plan reads no GPU); the GPU test runs it."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from reshard.errors import MemoryBudgetError
from reshard.format import read_manifest
from reshard.synthetic import write_random_model
from runtime import LayeredModel, allowance, budget
from runtime.opening import group_costs, place_groups
from runtime.stream import GroupLoader, StreamStats

K, E = 4, 16


def _config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(hidden_size=64, intermediate_size=112, moe_intermediate_size=32, n_routed_experts=E,
                            num_experts_per_tok=K, n_shared_experts=1, n_group=2, topk_group=1, num_attention_heads=4,
                            num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=2, first_k_dense_replace=0,
                            vocab_size=300, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-budget") / "dsv3-int4"
    write_random_model(_config(), out, dtype=torch.float32, quantize="int4")
    return out


@pytest.fixture
def cuda_loader(folder, monkeypatch):
    """A GroupLoader for a CUDA device, on a machine without one: its copy stream is never used here."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    return GroupLoader(folder, read_manifest(folder), torch.device("cuda"), torch.float16, StreamStats())


def test_a_streamed_moe_layer_flies_with_slots_for_its_routed_experts(cuda_loader):
    whole = group_costs(cuda_loader)
    sparse = group_costs(cuda_loader, K)
    layers = [i for i, g in enumerate(cuda_loader.manifest.groups) if g.experts]
    assert layers and all(not sparse[i].experts for i in range(len(sparse)) if i not in layers)
    for i in layers:
        c = sparse[i]
        assert (c.experts, c.per_token) == (E, K) and c.held == whole[i].held
        # float16 slots of gate_up [2 * 32, 64] and down [64, 32] per expert; int4 group 32 with float16 scales in the file
        assert c.expert_held == (2 * 32 * 64 + 64 * 32) * 2
        assert c.expert_stored * E <= c.stored
        rest = c.held - E * c.expert_held + (c.stored - E * c.expert_stored)  # expanded, so both forms while loading
        assert c.flight(1) == rest + K * c.expert_held < c.in_flight == whole[i].in_flight
        assert c.flight(2) == rest + 2 * K * c.expert_held
        assert c.flight(100) == c.flight(None) - E * c.expert_stored == c.in_flight - E * c.expert_stored
    assert budget.stream_reserve(sparse, budget.Budget(cuda=True, capacity=0, host=0), routed_tokens=1) == \
        2 * max(c.flight(1) for c in sparse)


def test_open_plans_a_decode_step_so_a_small_device_takes_the_model(cuda_loader):
    config = _config()
    sparse, whole = group_costs(cuda_loader, K), group_costs(cuda_loader)
    smallest = allowance.job_bytes(config, torch.float16, allowance.SMALLEST)
    alone = budget.Budget(cuda=True, capacity=0, host=1 << 40, prefetch=0)
    decode = budget.smallest_capacity(sparse, alone, smallest, routed_tokens=1)
    assert decode < budget.smallest_capacity(whole, alone, smallest)
    memory = dataclasses.replace(alone, capacity=decode)
    places, used = place_groups(cuda_loader, config, memory, sparse)  # fits: no error
    assert used.prefetch == 0 and budget.DEVICE not in places[1:3]
    with pytest.raises(MemoryBudgetError, match="the smallest job"):  # counting every expert, it did not
        place_groups(cuda_loader, config, memory, whole)
    with pytest.raises(MemoryBudgetError):  # less than a decode step's slots: one clear error
        place_groups(cuda_loader, config, dataclasses.replace(memory, capacity=decode - 1), sparse)


def test_a_prompt_too_wide_for_the_slots_is_prefilled_in_the_longest_chunks_that_fit(cuda_loader):
    """LayeredModel._prefill_chunk on the plan above: the chunk's pass fits, one token more does not."""
    config = _config()
    costs = group_costs(cuda_loader, K)
    lm = object.__new__(LayeredModel)
    lm.model, lm.loader, lm.cuda_threads = types.SimpleNamespace(config=config), cuda_loader, 0
    lm.costs, lm.places = costs, [budget.HOST] * len(costs)
    prompt = allowance.JobShape(batch=1, tokens=12, context=20)

    def need(tokens: int) -> int:
        part = dataclasses.replace(prompt, tokens=tokens)
        return budget.device_need(costs, lm.places, lm.memory, lm.job_bytes(part), tokens)

    lm.memory = budget.Budget(cuda=True, capacity=0, host=1 << 40, prefetch=0)
    lm.memory = dataclasses.replace(lm.memory, capacity=need(2) + (need(3) - need(2)) // 2)
    assert lm._prefill_chunk(prompt) == 2
    lm.memory = dataclasses.replace(lm.memory, capacity=need(12))
    assert lm._prefill_chunk(prompt) is None  # the whole prompt fits
    lm.memory = dataclasses.replace(lm.memory, capacity=need(1) - 1)
    assert lm._prefill_chunk(prompt) is None  # nothing fits: fit_job's error names the budget
    lm.memory = budget.Budget(cuda=False, capacity=1, host=0)
    assert lm._prefill_chunk(prompt) is None  # the CPU: a job past the budget runs anyway


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_small_gpu_decodes_a_moe_whose_experts_do_not_fit(folder, capsys):
    """On CUDA with room for a decode step's slots but not a whole layer's experts: the model opens,
    the prompt is prefilled in chunks, and greedy tokens equal those of a roomy device."""
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    gen = dict(max_new_tokens=6, do_sample=False)
    with LayeredModel.from_pretrained(folder, device="cuda", dtype="float32", max_cpu_memory="1GB") as roomy:
        want = roomy.generate(ids, **gen)
        sparse = roomy.costs
    config = _config()
    smallest = allowance.job_bytes(config, torch.float32, allowance.SMALLEST)
    alone = budget.Budget(cuda=True, capacity=0, host=1 << 40, prefetch=0)
    one, two = (budget.smallest_capacity(sparse, alone, smallest, routed_tokens=t) for t in (1, 2))
    small = one + (two - one) // 2  # a decode step's slots and half a token's more (this model's experts are KBs)
    assert small < budget.smallest_capacity(sparse, alone, smallest)  # whole layers would not fit
    with LayeredModel.from_pretrained(folder, device="cuda", dtype="float32", max_cpu_memory="1GB",
                                      max_gpu_memory=small, expert_cache=0) as lm:
        got = lm.generate(ids, **gen)
    assert torch.equal(got, want)
    assert "prefilling it" in capsys.readouterr().err


def test_gpt_oss_experts_compute_on_slots_without_rounds(folder, tmp_path, monkeypatch):
    """gpt-oss's experts module takes `router_indices` (not `top_k_index`) and one-hots them over its
    `num_experts`: the streamer gives it slots of the routed experts as it does the others, so the
    budget counts its layers by slots; it cannot skip a round's sentinel, so it never runs in rounds."""
    from transformers import GptOssConfig

    from reshard.plan import build_empty_model
    from runtime.expertslots import computes_on_slots, runs_in_rounds

    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                          vocab_size=300, tie_word_embeddings=False)
    write_random_model(config, tmp_path / "gpt-oss", dtype=torch.float32)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    loader = GroupLoader(tmp_path / "gpt-oss", read_manifest(tmp_path / "gpt-oss"), torch.device("cuda"),
                         torch.float16, StreamStats())
    model = build_empty_model(config, dtype=torch.float16)
    moe = [g for g in loader.manifest.groups if g.experts]
    modules = [model.get_submodule(p) for g in moe for p in g.experts]
    assert moe and all(computes_on_slots(m) and not runs_in_rounds(m) for m in modules)
    costs = group_costs(loader, 2, model)
    assert [c.experts for c in costs if c.experts] == [4] * len(moe) and all(c.per_token == 2 for c in costs if c.experts)
    dsv3 = build_empty_model(_config(), dtype=torch.float16)  # DeepSeek-V3's experts compute on slots, in rounds too
    assert all(runs_in_rounds(dsv3.get_submodule(p)) for g in read_manifest(folder).groups for p in g.experts)


def test_a_job_too_wide_for_the_slots_gets_rounds_of_the_most_tokens_that_fit(cuda_loader):
    """LayeredModel._expert_rounds on the plan above: a job whose experts' slots do not fit computes
    them in rounds of the most tokens that do (fits() says so too); the CPU and layers without
    slots never get rounds."""
    config = _config()
    costs = group_costs(cuda_loader, K)
    lm = object.__new__(LayeredModel)
    lm.model, lm.loader, lm.cuda_threads = types.SimpleNamespace(config=config), cuda_loader, 0
    lm.costs, lm.places = costs, [budget.HOST] * len(costs)
    lm.experts = types.SimpleNamespace(rounds_possible=True)
    batch = allowance.JobShape(batch=4, tokens=12, context=12)
    job = allowance.job_bytes(config, torch.float16, batch)

    def need(tokens: int) -> int:
        return budget.device_need(costs, lm.places, lm.memory, job, tokens)

    lm.memory = budget.Budget(cuda=True, capacity=0, host=1 << 40, prefetch=0)
    lm.memory = dataclasses.replace(lm.memory, capacity=need(2) + (need(3) - need(2)) // 2)
    assert lm._expert_rounds(job, 48) == 2 and lm.fits(batch)
    lm.memory = dataclasses.replace(lm.memory, capacity=need(1) - 1)
    assert lm._expert_rounds(job, 48) is None and not lm.fits(batch)  # nothing fits: fit_job's error
    lm.memory = dataclasses.replace(lm.memory, capacity=need(2))
    lm.experts.rounds_possible = False  # experts on full-size tensors (gpt-oss): no rounds
    assert lm._expert_rounds(job, 48) is None and not lm.fits(batch)


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-rounds") / "dsv3"
    write_random_model(_config(), out, dtype=torch.float32)
    return out


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])  # transformers' experts kernels
def test_experts_in_rounds_read_each_once_and_give_the_same_logits(float_folder, implementation, monkeypatch):
    """Rounds of 3 experts (what fit_job sets where a job's slots do not fit on CUDA) on the CPU: each
    round's slots hold its own experts only, every routed expert is read once per layer as without
    rounds, the layer's other weights pass once, and greedy tokens equal the unsplit model's. Each
    expert computes on the same rows; a token's sum is grouped by round, so float32 may differ in the
    last place: rounds happen only where one call's slots do not fit on the device."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    opts = dict(device="cpu", dtype="float32", packed=False, max_cpu_memory=0, expert_cache=0)
    with LayeredModel.from_pretrained(float_folder, **opts) as plain:
        plain.model.config._experts_implementation = implementation
        want = plain(ids).logits
        want_tokens = plain.generate(ids[:1], max_new_tokens=4, do_sample=False)
    with LayeredModel.from_pretrained(float_folder, **opts) as lm:
        lm.model.config._experts_implementation = implementation
        fit = lm.fit_job
        monkeypatch.setattr(lm, "fit_job", lambda shape, **kw: (fit(shape, **kw), setattr(lm.experts, "round_experts", 3))[0])
        brought, bring = [], lm.experts.bring

        def counted(i, path, module, entry, routed, **kwargs):
            slots = bring(i, path, module, entry, routed, **kwargs)
            brought.append((i, slots.held))
            return slots

        monkeypatch.setattr(lm.experts, "bring", counted)
        lm.experts.whole_at = None  # the CPU would load these layers whole (views of the files): no slots
        passes, reads = lm.stats.passes, lm.stats.experts_read
        got = lm(ids).logits
        assert lm.stats.passes == passes + 1  # one weight pass, its experts in rounds
        layers = {i for i, _ in brought}
        assert len(brought) > len(layers) and max(len(held) for _, held in brought) <= 3  # rounds of at most 3
        for layer in layers:  # each routed expert brought (and read) once per layer, as without rounds
            experts = [e for i, held in brought if i == layer for e in held]
            assert len(experts) == len(set(experts)), (layer, experts)
        assert lm.stats.experts_read - reads == sum(len(held) for _, held in brought)
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
        assert torch.equal(lm.generate(ids[:1], max_new_tokens=4, do_sample=False), want_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_small_gpu_runs_a_batch_whose_experts_do_not_fit_in_rounds(folder, capsys):
    """On CUDA with room for a batch's activations and 2 tokens' slots but not the experts its 48
    tokens route: the forward runs (no MemoryBudgetError), its experts in rounds of 2 tokens' worth
    (2 k), and the logits are the roomy device's within float32 rounding, the same greedy picks."""
    ids = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(2)).cuda()
    with LayeredModel.from_pretrained(folder, device="cuda", dtype="float32", max_cpu_memory="1GB") as roomy:
        want = roomy(ids).logits
        sparse = roomy.costs
        job = roomy.job_bytes(allowance.shape_of_call((ids,), {}))
    alone = budget.Budget(cuda=True, capacity=0, host=1 << 40, prefetch=0)
    two, three = (budget.smallest_capacity(sparse, alone, job, routed_tokens=t) for t in (2, 3))
    small = two + (three - two) // 2
    assert small < budget.smallest_capacity(sparse, alone, job, routed_tokens=48)
    with LayeredModel.from_pretrained(folder, device="cuda", dtype="float32", max_cpu_memory="1GB",
                                      max_gpu_memory=small, expert_cache=0) as lm:
        got = lm(ids).logits
        assert lm.experts.round_experts == 2 * K  # 2 tokens' worth of slots
    assert torch.allclose(got, want, rtol=0, atol=1e-4) and torch.equal(got.argmax(-1), want.argmax(-1))
    assert f"brings them {2 * K} at a time" in capsys.readouterr().err
