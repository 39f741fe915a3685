"""Routed experts computed on the CPU beside the device (runtime/cpuexperts.py): as transformers computes.

On this CPU-only machine the device *is* the CPU, so the moves are no-ops, but `--cpu-experts on`
takes the path a CUDA model takes: the device's expert streamer brings nothing, the routed
experts come into CPU slots through the host's own streamer, transformers' experts module
computes on them, and --stats says where each layer's experts ran."""

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MOE_ARCHS
from reshard.errors import UsageError
from runtime import LayeredModel, hybrid

IDS = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(2))
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def reference(moe_checkpoints):
    """transformers' own float32 logits and greedy tokens, by architecture."""
    out = {}
    for arch in MOE_ARCHS:
        model = AutoModelForCausalLM.from_pretrained(moe_checkpoints[arch], dtype=torch.float32).eval()
        with torch.inference_mode():
            out[arch] = (model(IDS).logits, model.generate(IDS[:1, :5], **GREEDY))
    return out


def moe_names(model):
    return [g.name for g, p in zip(model.groups, model.places) if g.experts and p != "device"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_cpu_experts_equal_transformers(moe_converted, reference, arch):
    logits, tokens = reference[arch]
    with LayeredModel.from_pretrained(moe_converted[arch], device="cpu", dtype="float32", max_cpu_memory=0,
                                      cpu_experts="on") as model:
        names = moe_names(model)
        assert names and sorted(model.cpu_experts.groups.values()) == names
        assert torch.equal(model(IDS).logits, logits)
        assert model.stats.per_pass[-1].cpu_experts == {n: "cpu: --cpu-experts on" for n in names}
        # the device's streamer brought no routed expert: the host's did
        assert model.stats.experts_read == 0 and model.cpu_experts.host.stats.experts_read > 0
        assert torch.equal(model.generate(IDS[:1, :5], **GREEDY), tokens)


def test_resident_experts_stay_and_equal_transformers(moe_converted, reference):
    """All experts already on the compute device: nothing to compute elsewhere, the result unchanged."""
    with LayeredModel.from_pretrained(moe_converted["qwen3_moe"], device="cpu", dtype="float32",
                                      max_cpu_memory="1GB", cpu_experts="on") as model:
        assert model.cpu_experts is None
        assert torch.equal(model(IDS).logits, reference["qwen3_moe"][0])


def test_experts_from_a_held_copy_equal_the_file_read(moe_converted, reference):
    """A HOST group on CUDA: the CPU's slots are filled from the pinned copy the device loader holds."""
    with LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", dtype="float32", max_cpu_memory=0,
                                      cpu_experts="on") as model:
        held = {i: model.loader.files[i].data().clone() for i in model.cpu_experts.groups}  # stands in for pinned
        model.cpu_experts.host.loader.host_data = held.get
        assert torch.equal(model(IDS).logits, reference["mixtral"][0])
        host = model.cpu_experts.host.stats
        assert host.experts_read > 0 and host.bytes_read == 0  # no byte came from the files


def test_auto_on_the_cpu_and_off_change_nothing(moe_converted):
    for mode in ("auto", "off", None):
        with LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", max_cpu_memory=0,
                                          cpu_experts=mode) as model:
            assert model.cpu_experts is None


@pytest.mark.parametrize("bad", ["yes", 1, True])
def test_bad_cpu_experts_is_refused(moe_converted, bad):
    with pytest.raises(UsageError) as refused:
        LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", max_cpu_memory=0, cpu_experts=bad)
    assert str(refused.value) == f"cpu_experts must be 'auto', 'on' or 'off', not {bad!r}"


def test_auto_asks_the_planner_per_call(moe_converted, reference):
    """`auto` with given speeds: a slow link sends every call to the CPU, a fast one streams; both exact."""
    link_bound = hybrid.Speeds(link=1e3, cpu_bytes=1e12, cpu_flops=1e15, gpu_flops=1e15)
    gpu_bound = hybrid.Speeds(link=1e15, cpu_bytes=1e3, cpu_flops=1e3, gpu_flops=1e15)
    for speeds, where in ((link_bound, hybrid.CPU), (gpu_bound, hybrid.STREAM)):
        with LayeredModel.from_pretrained(moe_converted["deepseek_v3"], device="cpu", dtype="float32",
                                          max_cpu_memory=0, cpu_experts="on") as model:
            model.cpu_experts.fixed, model.cpu_experts.measure = False, lambda: speeds
            assert torch.equal(model(IDS).logits, reference["deepseek_v3"][0])
            ran = model.stats.per_pass[-1].cpu_experts
            assert ran.keys() == set(moe_names(model))
            assert all(v.startswith(f"{where}: cpu ") and " vs stream " in v for v in ran.values())
            assert (model.cpu_experts.host.stats.experts_read > 0) == (where == hybrid.CPU)


def test_next_group_copy_is_not_blocked_by_cpu_experts(moe_converted):
    """While the CPU computes a layer's experts, the prefetcher is already loading the next group:
    each CPU compute waits (bounded) for that load to start, so a load held back until the compute
    ended would show up as a timeout."""
    with LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", dtype="float32", max_cpu_memory=0,
                                      prefetch=1, cpu_experts="on") as model:
        started = {i: threading.Event() for i in range(len(model.groups))}
        load = model.prefetcher.load

        def recorded(i):
            started[i].set()
            return load(i)
        model.prefetcher.load = recorded
        overlapped = []

        def on_compute(i, phase):
            if phase == "start":
                order = model.streamed
                nxt = order[(order.index(i) + 1) % len(order)]
                overlapped.append((i, started[nxt].wait(timeout=10)))
        model.cpu_experts.on_compute = on_compute
        model(IDS)
        assert [i for i, _ in overlapped] == sorted(model.cpu_experts.groups)
        assert all(ok for _, ok in overlapped)


def test_cli_cpu_experts_text_and_stats(moe_converted, capsys):
    from runtime.cli import main as runtime_main

    args = ["generate", str(moe_converted["qwen3_moe"]), "--prompt", "w5 w17 w42", "--device", "cpu",
            "--max-new-tokens", "3", "--min-new-tokens", "3", "--max-cpu-memory", "0", "--stats"]
    assert runtime_main(args) == 0
    plain = capsys.readouterr().out
    assert runtime_main([*args, "--cpu-experts", "on"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    passes = json.loads(err.strip().splitlines()[-1])["per_pass"]
    assert len(passes) == 3 and all(p["cpu_experts"] == {"layers.1": "cpu: --cpu-experts on",
                                                        "layers.2": "cpu: --cpu-experts on"} for p in passes)


def test_cli_bad_cpu_experts_exits_2(moe_converted, capsys):
    from runtime.cli import main as runtime_main

    code = runtime_main(["generate", str(moe_converted["mixtral"]), "-p", "w5", "--cpu-experts", "some"])
    assert code == 2
    assert "--cpu-experts 'some' is not understood; give auto, on or off" in capsys.readouterr().err


# --- the planner for a MoE layer's experts (runtime/hybrid.py choose_experts) ------------------

# one DeepSeek-V3 routed expert (gate, up, down: 7168 x 2048 each) in int4, 8 of 256 routed per token
EXPERT_PARAMS = 3 * 7168 * 2048
EXPERT_STORED = EXPERT_PARAMS // 2
DDR5 = hybrid.Speeds(link=25e9, cpu_bytes=60e9, cpu_flops=2e12, gpu_flops=200e12)  # a PCIe4 box


def test_experts_link_bound_pick_the_cpu_at_batch_1():
    # 8 experts, 176 MB: 2.9 ms read by the CPU, 7 ms over the link
    choice = hybrid.choose_experts(8, 8, EXPERT_STORED, EXPERT_PARAMS, DDR5)
    assert choice.where == hybrid.CPU and choice.cpu_seconds < choice.stream_seconds


def test_experts_of_a_large_batch_go_to_the_gpu():
    # a 4096-token prefill routes every expert, 32768 token-expert pairs: 2.9 s of CPU arithmetic
    # against 0.56 s to copy all 256
    choice = hybrid.choose_experts(256, 4096 * 8, EXPERT_STORED, EXPERT_PARAMS, DDR5)
    assert choice.where == hybrid.STREAM and choice.cpu_seconds > 2 * choice.stream_seconds


def test_experts_crossover_follows_the_token_expert_pairs():
    one = hybrid.choose_experts(64, 512, EXPERT_STORED, EXPERT_PARAMS, DDR5)  # batch 64 decode
    many = hybrid.choose_experts(64, 512 * 16, EXPERT_STORED, EXPERT_PARAMS, DDR5)  # same experts, 16x the pairs
    assert (one.where, many.where) == (hybrid.CPU, hybrid.STREAM)
    assert many.stream_seconds == one.stream_seconds  # the copy does not grow with the pairs


def test_experts_with_a_link_faster_than_the_cpu_stream():
    h200 = hybrid.Speeds(link=55e9, cpu_bytes=40e9, cpu_flops=3e12, gpu_flops=500e12)
    assert all(hybrid.choose_experts(r, p, EXPERT_STORED, EXPERT_PARAMS, h200).where == hybrid.STREAM
               for r, p in ((8, 8), (50, 64), (256, 512)))


def test_experts_on_the_device_and_the_cpus_own_traffic_count():
    """Experts the device holds already cost no copy; on the CPU, slot rows written and read in bfloat16
    (int4 experts expanded) cost host memory traffic: either can turn a batch-1 call to streaming."""
    assert hybrid.choose_experts(8, 8, EXPERT_STORED, EXPERT_PARAMS, DDR5).where == hybrid.CPU
    held = hybrid.choose_experts(8, 8, EXPERT_STORED, EXPERT_PARAMS, DDR5, on_device=6)
    assert held.where == hybrid.STREAM and held.stream_seconds == pytest.approx(2 * EXPERT_STORED / DDR5.link)
    expanded = hybrid.choose_experts(8, 8, EXPERT_STORED, EXPERT_PARAMS, DDR5,
                                     cpu_traffic={None: EXPERT_STORED + 2 * 2 * EXPERT_PARAMS})
    assert expanded.where == hybrid.STREAM and expanded.cpu_seconds > 8 * expanded.stream_seconds / 3


def test_int4_experts_on_the_cpu_equal_the_streamed_run(moe_checkpoints, tmp_path):
    """Quantized experts: the host's slots get each routed expert's parts (from the held copy) and
    expand them as the device's streamer does; the logits equal the run without --cpu-experts."""
    from reshard.convert import convert

    folder = tmp_path / "int4"
    convert(str(moe_checkpoints["qwen3_moe"]), folder, quantize="int4", progress=False)
    logits = []
    for mode in ("off", "on"):
        with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, cpu_experts=mode) as model:
            if mode == "on":
                held = {i: model.loader.files[i].data().clone() for i in model.cpu_experts.groups}
                model.cpu_experts.host.loader.host_data = held.get
            logits.append(model(IDS).logits)
            assert (model.stats.experts_read > 0) == (mode == "off")
    assert torch.equal(logits[0], logits[1])


def test_batched_generation_with_cpu_experts_equals_transformers(moe_checkpoints, moe_converted):
    """generate_batch runs its sequences through one pass (runtime/lockstep.py): each forward's
    routed experts are computed on the CPU; the tokens are transformers' own."""
    from transformers import AutoTokenizer

    from runtime.batch import generate_batch

    ref = AutoModelForCausalLM.from_pretrained(moe_checkpoints["qwen3_moe"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(moe_checkpoints["qwen3_moe"])
    prompts = ["w5 w6 w7", "w20 w21 w22 w23 w24", "w40"]
    with LayeredModel.from_pretrained(moe_converted["qwen3_moe"], device="cpu", max_cpu_memory=0,
                                      cpu_experts="on") as model:
        done = generate_batch(model, prompts, do_sample=False, max_new_tokens=6)
        assert model.stats.experts_read == 0 and model.cpu_experts.host.stats.experts_read > 0
    for prompt, got in zip(prompts, done):
        ids = tok(prompt, return_tensors="pt").input_ids
        want = ref.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)[0, ids.shape[1]:]
        assert got.tokens == want.tolist()


def test_auto_streams_the_experts_the_device_holds_already(moe_converted, reference):
    """Routed experts in the device's expert cache cost no copy: on a link-bound machine a call goes
    to the CPU only while some of its routed experts are not on the device; the logits stay exact."""
    link_bound = hybrid.Speeds(link=1e3, cpu_bytes=1e12, cpu_flops=1e15, gpu_flops=1e15)
    gpu_bound = hybrid.Speeds(link=1e15, cpu_bytes=1e3, cpu_flops=1e3, gpu_flops=1e15)
    with LayeredModel.from_pretrained(moe_converted["deepseek_v3"], device="cpu", dtype="float32",
                                      max_cpu_memory=0, expert_cache="64MiB", cpu_experts="on") as model:
        model.cpu_experts.fixed = False
        model.experts.whole_at = None  # routed experts alone even for the prompt, so they reach the cache
        runs = []
        for speeds, clear in ((gpu_bound, False), (link_bound, False), (link_bound, True)):
            if clear:
                model.experts.cache.clear()
            model.cpu_experts._known = speeds
            assert torch.equal(model(IDS).logits, reference["deepseek_v3"][0])
            runs.append(model.stats.per_pass[-1].cpu_experts)
        assert all(r.keys() == set(moe_names(model)) for r in runs), runs
        first, cached, cleared = ([v.partition(":")[0] for v in r.values()] for r in runs)
        assert first == cached == [hybrid.STREAM] * 2 and cleared == [hybrid.CPU] * 2, runs
        # the second pass found every routed expert where the first pass's copies stayed
        for why in runs[1].values():
            held, _, routed = why.rpartition(", ")[2].removesuffix(" on the device").partition(" of ")
            assert held == routed and int(held) > 0, why
        assert not any("on the device" in why for why in runs[2].values())
