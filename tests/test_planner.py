"""The memory planner: what groups take once held (quantized ones expanded), the job's allowance,
the per-process memory-fraction cap, demotion when a job needs room, and the one error when
nothing fits. CUDA is mocked at the torch.cuda boundary; the real thing is in test_budget_cuda.py."""

from __future__ import annotations

import math
import re

import pytest
import torch

from reshard.errors import MemoryBudgetError
from runtime import allowance, budget
from runtime.allowance import JobShape, job_bytes
from runtime.budget import DEVICE, DISK, HOST, Budget, GroupCost, demote, device_need, parse_size, plan

MiB = 2**20


def cuda(capacity, host=0, prefetch=1, **kw):
    return Budget(cuda=True, capacity=capacity, host=host, prefetch=prefetch, **kw)


# --- held bytes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,scheme", [("llama", "int4"), ("gpt2", "int8"), ("qwen2", "int4")])
def test_held_bytes_are_the_expanded_parameters(arch, scheme, tiny_checkpoints, tmp_path):
    """Each group's held bytes equal transformers' own parameters of that group in the compute
    dtype, although the file stores the quantized weights in far fewer bytes."""
    from transformers import AutoModelForCausalLM

    from reshard.convert import convert
    from reshard.format import param_names
    from runtime.stream import GroupLoader, StreamStats

    manifest = convert(str(tiny_checkpoints[arch]), tmp_path / "q", progress=False, quantize=scheme, quantize_group=16)
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    loader = GroupLoader(tmp_path / "q", manifest, torch.device("cpu"), torch.float32, StreamStats())
    for i, g in enumerate(manifest.groups):
        if not g.quantized:  # float32 as stored: on the CPU the group is its mapped file (a tied head: nothing)
            assert not loader.made_anew(i) and loader.held_bytes(i) == g.bytes, g.name
            continue
        want = sum(ref.get_parameter(n).numel() * 4 for n in param_names(g, scheme))
        assert loader.made_anew(i) and loader.held_bytes(i) == want, g.name
        assert loader.group_bytes(i) < 0.5 * want  # the stored bytes, what each pass reads, are far fewer


# --- planning -----------------------------------------------------------------------------------

QUANTIZED = [GroupCost(20, 20, "pre")] + [GroupCost(100, 31, "layer", made_anew=True)] * 4 + [GroupCost(20, 20, "post")]


def test_plan_counts_quantized_groups_expanded():
    # 440 bytes held + a 50-byte job fit 490: everything stays
    assert plan(QUANTIZED, cuda(490, 1000), job=50) == [DEVICE] * 6
    # at 480: two groups in flight, each 100 expanded + 31 while expanding (262), the job (50):
    # 168 left, which takes embed, head and ONE layer (counting stored bytes would take all four)
    got = plan(QUANTIZED, cuda(480, 1000), job=50)
    assert got == [DEVICE, DEVICE, HOST, HOST, HOST, DEVICE]
    assert device_need(QUANTIZED, got, cuda(480), 50) <= 480
    # host RAM holds the stored (compressed) bytes: 3 x 31; with one byte less, one layer streams
    # from disk, whose two staging buffers (2 x 31) then leave no room for any layer
    assert plan(QUANTIZED, cuda(480, 93), job=50) == [DEVICE, DEVICE, HOST, HOST, HOST, DEVICE]
    assert plan(QUANTIZED, cuda(480, 92), job=50) == [DEVICE, DEVICE, DISK, DISK, DISK, DEVICE]


@pytest.mark.parametrize("job", [60, 110, 150, 170])
def test_plan_leaves_room_for_the_job(job):
    """Plans that use all three tiers fit the job next to the resident and streamed groups, and
    keep on the device every group that could stay (none more would fit); more job, fewer residents."""
    memory = cuda(480, 100)
    got = plan(QUANTIZED, memory, job=job)
    assert {DEVICE, HOST} <= set(got) and got.count(DEVICE) < len(got)  # not all on one tier
    assert device_need(QUANTIZED, got, memory, job) <= 480
    for i, place in enumerate(got):  # first fit leaves nothing off the device that would still fit
        if place != DEVICE:
            assert device_need(QUANTIZED, [DEVICE if k == i else p for k, p in enumerate(got)], memory, job) > 480
    held_on_host = sum(c.stored for c, p in zip(QUANTIZED, got) if p == HOST)
    staging = 2 * max(c.stored for c, p in zip(QUANTIZED, got) if p == DISK) if DISK in got else 0
    assert held_on_host + staging <= memory.host
    more = plan(QUANTIZED, memory, job=job + 100)
    assert more.count(DEVICE) <= got.count(DEVICE)


def test_plan_of_nothing_fits_streams_everything():
    assert plan(QUANTIZED, cuda(200, 0), job=50) == [DISK] * 6
    assert plan(QUANTIZED, cuda(10**9, 0, residents=False), job=50) == [DISK] * 6  # a budget of 0
    assert budget.smallest_capacity(QUANTIZED, cuda(0), 50) == 2 * 131 + 50
    assert budget.smallest_capacity(QUANTIZED, cuda(0, prefetch=0), 50) == 131 + 50


def test_cpu_plan_has_no_host_tier():
    cpu = Budget(cuda=False, capacity=480, host=10**9, prefetch=1)
    assert HOST not in plan(QUANTIZED, cpu, job=50)


# --- demotion -------------------------------------------------------------------------------------

def test_demote_moves_layers_last_first_to_host_then_disk():
    costs, places = QUANTIZED, [DEVICE] * 6
    assert demote(costs, places, cuda(490, 1000), job=50) == places  # fits: unchanged
    # 100 more bytes of job: once a layer streams, two in flight take 262, so every layer goes
    got = demote(costs, places, cuda(490, 1000), job=150)
    assert got == [DEVICE, HOST, HOST, HOST, HOST, DEVICE]
    assert device_need(costs, got, cuda(490), 150) == 40 + 262 + 150
    # host RAM for one demoted layer and the staging buffers (2 x 31): the others go to disk
    assert demote(costs, places, cuda(490, 31 + 62), job=150) == [DEVICE, DISK, DISK, DISK, HOST, DEVICE]
    # only embed and head resident, a little more job: the head (after the layers) goes first
    assert demote(costs, got, cuda(490, 1000), job=190) == [DEVICE, HOST, HOST, HOST, HOST, HOST]
    # nothing makes room (40 + 262 + 150 > 300 even with only embed and head resident... and
    # 262 + 150 with nothing): nothing moves
    assert demote(costs, places, cuda(300, 0), job=150) == places
    assert demote(costs, places, cuda(412, 0), job=150) == [DISK] * 6  # exactly room to stream everything
    cpu = Budget(cuda=False, capacity=490, host=10**9)
    assert HOST not in demote(costs, places, cpu, job=150)


# --- the job's allowance ----------------------------------------------------------------------------

def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, **kw)


def test_job_bytes_kv_cache_and_logits():
    config, f16 = llama_config(), torch.float16
    base = job_bytes(config, f16, JobShape(batch=2, tokens=1, context=1000))
    longer = job_bytes(config, f16, JobShape(batch=2, tokens=1, context=2000))
    kv = 2 * 1000 * 8 * 2 * 4 * 64 * 2  # rows x positions x layers x (k, v) x kv heads x head dim x bytes
    masks = 2 * 1000 * 4
    assert allowance.SLACK * kv <= longer - base <= allowance.SLACK * (kv + masks) + 1
    all_logits = job_bytes(config, f16, JobShape(batch=2, tokens=100, context=100, logits_rows=100))
    last_logits = job_bytes(config, f16, JobShape(batch=2, tokens=100, context=100, logits_rows=1))
    assert all_logits - last_logits >= allowance.SLACK * 2 * 99 * 32000 * (2 + 4 + 4) - 1
    assert job_bytes(config, torch.float32, JobShape()) > job_bytes(config, f16, JobShape()) >= allowance.FLOOR


def test_job_bytes_scoring_in_flight_and_offload():
    config = llama_config()
    one = job_bytes(config, torch.float16, JobShape(batch=8, tokens=64, context=64, in_flight=1, whole_cache=False))
    many = job_bytes(config, torch.float16, JobShape(batch=8, tokens=64, context=64, in_flight=16, whole_cache=False))
    parked = job_bytes(config, torch.float16, JobShape(batch=8, tokens=64, context=64, in_flight=16,
                                                       whole_cache=False, offload=True))
    assert one < parked < many


def test_job_bytes_counts_the_cuda_threads_of_its_forwards():
    config = llama_config()
    shape = JobShape(batch=8, tokens=64, context=64, in_flight=16, whole_cache=False, threads=True)
    plain = job_bytes(config, torch.float16, shape)
    assert job_bytes(config, torch.float16, shape, cuda_threads=16) == plain + 16 * allowance.CUDA_THREAD
    assert allowance.CUDA_THREAD >= 72 << 20  # what one thread's cuBLAS handle and workspace took on an H200


def test_eager_attention_counts_the_score_matrix():
    shape = JobShape(batch=1, tokens=2048, context=2048)
    sdpa, eager = llama_config(), llama_config()
    eager._attn_implementation = "eager"
    assert job_bytes(eager, torch.float16, shape) - job_bytes(sdpa, torch.float16, shape) >= 16 * 2048 * 2048 * 4


def test_shapes_of_calls():
    from transformers import GenerationConfig

    ids = torch.zeros(3, 7, dtype=torch.long)
    assert allowance.shape_of_call((ids,), {}) == JobShape(batch=3, tokens=7, context=7, logits_rows=7)
    assert allowance.shape_of_call((), {"input_ids": ids, "logits_to_keep": 1}).logits_rows == 1
    gc = GenerationConfig(max_new_tokens=20)
    assert allowance.shape_of_generate((ids,), {}, gc) == JobShape(batch=3, tokens=7, context=27, logits_rows=1)
    got = allowance.shape_of_generate((), {"input_ids": ids, "max_new_tokens": 5, "num_beams": 4}, gc)
    assert (got.batch, got.context) == (12, 12)


# --- CUDA's free memory and the per-process fraction, mocked at torch.cuda ---------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """A GPU with 80 GiB, `state["free"]` of it free, torch holding `reserved` (of which `allocated` used)."""
    state = {"free": 8 << 30, "total": 80 << 30, "reserved": 0, "allocated": 0, "fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: state["fraction"])
    return state


DEV = torch.device("cuda", 0)


def test_cuda_available_respects_the_memory_fraction(fake_cuda, monkeypatch):
    assert budget.cuda_available(DEV) == 8 << 30
    fake_cuda["fraction"] = 0.05  # 4 GiB of 80 allowed to this process
    assert budget.cuda_available(DEV) == 4 << 30
    fake_cuda.update(reserved=2 << 30, allocated=1 << 30)  # torch's cache is ours; what it allocated counts
    assert budget.cuda_available(DEV) == 3 << 30
    fake_cuda["fraction"] = 1.0
    assert budget.cuda_available(DEV) == 9 << 30
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")  # older torch: free memory only
    fake_cuda.update(reserved=0, allocated=0)
    assert budget.memory_fraction(DEV) == 1.0 and budget.cuda_available(DEV) == 8 << 30


def test_memory_fraction_that_torch_cannot_report(monkeypatch):
    def broken(device=None):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", broken)
    assert budget.memory_fraction(DEV) == 1.0


def test_make_budget_on_cuda(fake_cuda):
    fake_cuda["fraction"] = 0.05
    default = budget.make_budget(DEV, 1, None, "1GiB")
    assert default.capacity == budget.default_gpu_budget(DEV) == int((4 << 30) * 0.95) - (256 << 20)
    assert (default.host, default.residents, default.limit_from_user) == (1 << 30, True, False)
    assert budget.make_budget(DEV, 1, "1TB", 0).capacity == default.capacity  # never more than the device gives
    mine = budget.make_budget(DEV, 2, "2GiB", 0)
    assert (mine.capacity, mine.limit_from_user, mine.prefetch) == (2 << 30, True, 2)
    stream_all = budget.make_budget(DEV, 1, 0, 0)
    assert not stream_all.residents and stream_all.capacity == default.capacity  # the job still needs room


# --- the one error: the smallest --max-gpu-memory that works --------------------------------------

def test_too_small_names_the_least_budget_that_works(tiny_converted):
    from transformers import AutoConfig

    from reshard.format import read_manifest
    from runtime.opening import place_groups
    from runtime.stream import GroupLoader, StreamStats

    folder = tiny_converted["llama"]
    manifest, config = read_manifest(folder), AutoConfig.from_pretrained(folder)
    loader = GroupLoader(folder, manifest, torch.device("cpu"), torch.float32, StreamStats())
    with pytest.raises(MemoryBudgetError) as e:
        place_groups(loader, config, cuda(1 << 20, limit_from_user=True))
    message = str(e.value)
    assert "\n" not in message and "--max-gpu-memory is 0.01GiB" in message
    assert "(1 group in flight" in message and "--prefetch 0" not in message  # read-ahead is off already
    named = re.search(r"use --max-gpu-memory (\S+) or more", message).group(1)
    enough = parse_size(named)
    assert len(place_groups(loader, config, cuda(enough, limit_from_user=True))[0]) == len(manifest.groups)
    with pytest.raises(MemoryBudgetError):  # 0.01 GiB less does not work: it is the smallest
        place_groups(loader, config, cuda(enough - math.ceil(0.01 * 2**30), limit_from_user=True))
    with pytest.raises(MemoryBudgetError, match=r"can give 0.01GiB .* free device memory"):
        place_groups(loader, config, cuda(1 << 20))


def test_read_ahead_is_dropped_before_failing(tiny_converted, capsys):
    """Where the group read ahead does not fit but one group does (a quantized layer in flight holds its
    stored and expanded bytes), the model opens with --prefetch 0 and says so once; with room for
    two groups, read-ahead stays and nothing is said."""
    from transformers import AutoConfig

    from reshard.format import read_manifest
    from runtime.opening import group_costs, place_groups
    from runtime.stream import GroupLoader, StreamStats

    folder = tiny_converted["llama"]
    manifest, config = read_manifest(folder), AutoConfig.from_pretrained(folder)
    loader = GroupLoader(folder, manifest, torch.device("cpu"), torch.float32, StreamStats())
    costs, job = group_costs(loader), allowance.job_bytes(config, torch.float32, allowance.SMALLEST)
    one = budget.smallest_capacity(costs, cuda(0, prefetch=0), job)
    two = budget.smallest_capacity(costs, cuda(0, prefetch=1), job)
    assert one < two
    _, memory = place_groups(loader, config, cuda(two, prefetch=1))
    assert memory.prefetch == 1 and capsys.readouterr().err == ""
    places, memory = place_groups(loader, config, cuda(two - 1, prefetch=1))
    assert memory.prefetch == 0 and len(places) == len(manifest.groups)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("runtime: 2 groups in flight need ") and "(--prefetch 0)" in err
