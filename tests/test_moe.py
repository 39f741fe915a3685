"""Mixtures of experts: hub checkpoints (one tensor per expert) convert with transformers' own
weight converters, run exactly as transformers runs them, and a streamed decode pass reads
only the experts the router picks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MOE_ARCHS, pass_bytes
from reshard.cli import main as reshard_main
from reshard.format import GroupFile, dense_range, expert_bytes, expert_range, expert_tensors, read_manifest
from runtime import LayeredModel
from runtime.cli import main as runtime_main

# scoring and batched generation: one architecture in the default run, the others marked slow
ONE_FAST = [a if a == "qwen3_moe" else pytest.param(a, marks=pytest.mark.slow) for a in MOE_ARCHS]
PLACEMENTS = {"streamed": dict(max_cpu_memory=0), "resident": dict(max_cpu_memory="1GB")}
IDS = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(1))
GREEDY = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def moe_layers(manifest):
    return [g for g in manifest.groups if g.experts]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_checkpoints_hold_one_tensor_per_expert(arch, moe_checkpoints):
    keys = set()
    for path in moe_checkpoints[arch].glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            keys |= set(f.keys())
    assert any(".experts.0." in k for k in keys) and any(".experts.7." in k for k in keys)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)  # hub layout, not fused


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_each_expert_is_one_contiguous_range(arch, moe_checkpoints, moe_converted):
    ref = reference(moe_checkpoints[arch])
    manifest = read_manifest(moe_converted[arch])
    assert moe_layers(manifest), "no layer recorded experts"
    for group in moe_layers(manifest):
        gf = GroupFile(moe_converted[arch] / group.file, group)
        begin, end = dense_range(gf.infos, group)
        for name, count in expert_tensors(group).items():
            assert count == 8 and group.tensors[name]["shape"][0] == 8
            want = ref.get_parameter(name)
            for e in range(count):
                lo, hi = expert_range(gf.infos[name], count, e)
                assert hi <= begin or lo >= end  # the other tensors' span holds no expert byte
                got = gf.data((lo, hi)).view(torch.float32).view(want.shape[1:])
                assert torch.equal(got, want[e])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_equal_transformers(arch, placement, moe_checkpoints, moe_converted):
    ref = reference(moe_checkpoints[arch])
    model = LayeredModel.from_pretrained(moe_converted[arch], device="cpu", **PLACEMENTS[placement])
    with torch.no_grad():
        want = ref(IDS).logits
    assert torch.equal(model(IDS).logits, want)  # streamed: 22 tokens load the MoE layers whole
    if placement == "streamed":  # and through the expert hooks, the routed experts alone
        assert model.stats.experts_read == 0
        model.experts.whole_at = None
        assert torch.equal(model(IDS).logits, want)
        assert model.stats.experts_read > 0


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_tokens_equal_transformers(arch, placement, moe_checkpoints, moe_converted):
    ref = reference(moe_checkpoints[arch])
    model = LayeredModel.from_pretrained(moe_converted[arch], device="cpu", **PLACEMENTS[placement])
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    got = model.generate(ids, **GREEDY)
    assert got.shape[1] == ids.shape[1] + 12
    assert torch.equal(got, ref.generate(ids, **GREEDY))


def test_checkpoint_buffers_are_loaded(moe_checkpoints, moe_converted):
    """DeepSeek-V3's router score bias is a buffer the checkpoint holds (random here, not zeros)."""
    ref = reference(moe_checkpoints["deepseek_v3"])
    model = LayeredModel.from_pretrained(moe_converted["deepseek_v3"], device="cpu", max_cpu_memory=0)
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert ref.get_buffer(name).abs().sum() > 0
    assert torch.equal(model.model.get_buffer(name), ref.get_buffer(name))
    assert read_manifest(moe_converted["deepseek_v3"]).group("layers.1").buffers == [name]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_decode_pass_reads_only_routed_experts(arch, moe_converted):
    """Acceptance: batch-1 decode streamed from disk; the last pass brings at most all file bytes
    minus, per MoE layer, its expert bytes x (E - k) / E."""
    folder = moe_converted[arch]
    manifest = read_manifest(folder)
    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0)
    model.generate(torch.tensor([[5, 17, 42, 99, 7]]), **GREEDY)
    k, last = model.config.num_experts_per_tok, model.stats.per_pass[-1]
    saved = sum(expert_bytes(g) * (8 - k) // 8 for g in moe_layers(manifest))
    assert last.bytes <= manifest.total_bytes - saved
    assert last.experts_read == k * len(moe_layers(manifest))  # one token: k experts per MoE layer
    assert last.expert_bytes == sum(expert_bytes(g) * k // 8 for g in moe_layers(manifest))
    assert last.experts_cached == 0


def test_expert_cache_serves_repeated_experts(moe_checkpoints, moe_converted):
    ref = reference(moe_checkpoints["mixtral"])
    model = LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", max_cpu_memory=0,
                                         expert_cache="1MB")
    model.experts.whole_at = None  # 22 tokens would load the layers whole
    with torch.no_grad():
        want = ref(IDS).logits
    assert torch.equal(model(IDS).logits, want)
    first = model.stats.per_pass[-1]
    assert torch.equal(model(IDS).logits, want)  # same tokens, same experts: all from the cache
    second = model.stats.per_pass[-1]
    assert first.experts_read > 0 and first.experts_cached == 0
    assert second.experts_read == 0 and second.experts_cached == first.experts_read
    assert second.bytes == first.bytes - first.expert_bytes


def test_cli_convert_info_generate(moe_checkpoints, tmp_path, capsys):
    src = moe_checkpoints["qwen3_moe"]
    out = tmp_path / "q"
    assert reshard_main(["convert", str(src), str(out)]) == 0
    capsys.readouterr()
    assert reshard_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = read_manifest(out)
    assert info["expert_bytes"] == sum(expert_bytes(g) for g in manifest.groups) > 0
    embed = next(g for g in manifest.groups if g.kind == "pre")  # read by rows: one row a token
    row = embed.tensors["model.embed_tokens.weight"]["shape"][1] * 4
    assert info["token_bytes"] == manifest.total_bytes - info["expert_bytes"] * 6 // 8 - embed.bytes + row
    assert [g["expert_bytes"] for g in info["groups"]] == [expert_bytes(g) for g in manifest.groups]
    # per MoE layer: its experts, and the 2 of 8 a batch-1 token routes; the device holds the two
    # largest groups with only those (float32 folder: stored bytes are device bytes)
    assert info["moe_layers"] == [{"name": g.name, "expert_bytes": expert_bytes(g), "token_bytes": expert_bytes(g) // 4}
                                  for g in moe_layers(manifest)]
    held = sorted((g.bytes - expert_bytes(g) * 6 // 8 for g in manifest.groups), reverse=True)
    assert info["device_bytes_batch1"] == held[0] + held[1] < info["streaming_weight_bytes"]
    assert reshard_main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert all(f"{g.name}" in shown for g in moe_layers(manifest)) and "at batch 1 (2 largest groups" in shown

    tok = AutoTokenizer.from_pretrained(src)
    prompt = "w5 w17 w42 w99 w7"
    ids = tok(prompt, return_tensors="pt").input_ids
    want = reference(src).generate(ids, **GREEDY)
    code = runtime_main(["generate", str(out), "--prompt", prompt, "--device", "cpu", "--max-cpu-memory", "0",
                         "--expert-cache", "0", "--max-new-tokens", "12", "--min-new-tokens", "12", "--stats"])
    text, err = capsys.readouterr()
    assert code == 0
    assert text == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["experts_read"] > 0 and stats["expert_bytes"] > 0
    assert stats["per_pass"][-1]["experts_read"] == 2 * len(moe_layers(manifest))
    # what info said a decode pass reads (info counts whole files; a MoE layer's reads skip their headers)
    assert 0.99 * info["token_bytes"] <= stats["per_pass"][-1]["bytes"] <= info["token_bytes"]
    assert stats["experts_cached"] == 0  # --expert-cache 0


@pytest.mark.parametrize("arch", ONE_FAST)
def test_score_equals_transformers(arch, moe_checkpoints, moe_converted):
    """Micro-batches share one layer load (Lockstep): each brings the experts still missing, so
    every one of them computes with its own routed experts, and each expert is read once a pass."""
    from conftest import open_placed, word_tokenizer
    from test_score import ITEMS, assert_close, reference_scores

    ref = reference(moe_checkpoints[arch])
    model = open_placed(moe_converted[arch], "streamed", expert_cache=0)
    model.experts.whole_at = None  # micro-batches of this size would load the layers whole
    model.tokenizer = word_tokenizer(moe_converted[arch])
    got = model.score(ITEMS, batch_size=2)
    assert_close(got, reference_scores(ref, model.tokenizer, ITEMS), ITEMS)
    assert model.stats.passes == 1 and model.stats.layer_loads == len(model.groups)
    layers = moe_layers(read_manifest(moe_converted[arch]))
    assert 2 * len(layers) < model.stats.experts_read <= 8 * len(layers)  # the union, each expert once


@pytest.mark.parametrize("arch", ONE_FAST)
def test_batched_generation_equals_transformers(arch, moe_checkpoints, moe_converted):
    from runtime.batch import generate_batch

    ref = reference(moe_checkpoints[arch])
    tok = AutoTokenizer.from_pretrained(moe_checkpoints[arch])
    model = LayeredModel.from_pretrained(moe_converted[arch], device="cpu", max_cpu_memory=0, expert_cache=0)
    prompts = ["w5 w6 w7", "w20 w21 w22 w23 w24 w25 w26 w27 w28", "w40", "w100 w101 w102 w100"]
    done = generate_batch(model, prompts, do_sample=False, max_new_tokens=10)
    assert model.stats.passes == max(len(g.tokens) for g in done)  # one pass per token for all four
    for prompt, got in zip(prompts, done):
        ids = tok(prompt, return_tensors="pt").input_ids
        want = ref.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=0)[0, ids.shape[1]:]
        assert got.tokens == want.tolist()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_experts_stream_alone(scheme, moe_checkpoints, tmp_path):
    """--quantize stores expert weights quantized too, each expert's parts one range per part;
    streamed, the routed experts' parts come alone and expand into their slots: streamed and
    resident, the logits are those of transformers' model holding the expanded weights."""
    from reshard.convert import convert
    from reshard.format import quant_part_names, stored_names
    from runtime.quantized import expand_param

    convert(str(moe_checkpoints["qwen3_moe"]), tmp_path / scheme, quantize=scheme, progress=False)
    manifest = read_manifest(tmp_path / scheme)
    for group in moe_layers(manifest):
        [entry] = group.experts.values()
        assert set(entry["tensors"]) <= set(group.quantized)  # the expert weights are quantized
        assert all(len(stored_names(p, group.tensors)) > 1 for p in entry["tensors"])
    streamed = LayeredModel.from_pretrained(tmp_path / scheme, device="cpu", max_cpu_memory=0, expert_cache=0,
                                            packed=False)
    resident = LayeredModel.from_pretrained(tmp_path / scheme, device="cpu", max_cpu_memory="1GB", packed=False)
    # the exact reference: transformers' model holding the weights the folder expands to
    ref = reference(moe_checkpoints["qwen3_moe"])
    expanded = 0
    for group in manifest.groups:
        gf = GroupFile(tmp_path / scheme / group.file, group)
        for param, info in group.quantized.items():
            parts = {part: gf.tensor(name) for part, name in quant_part_names(param, streamed.loader.scheme).items()}
            weight = expand_param(parts, info, streamed.loader.scheme, torch.float32)
            target = ref.get_parameter(param)
            assert weight.shape == target.shape and not torch.equal(weight, target)  # quantized: changed
            with torch.no_grad():
                target.copy_(weight)
            expanded += 1
    assert expanded > 0
    with torch.no_grad():
        want = ref(IDS).logits
    assert torch.equal(resident(IDS).logits, want)
    assert torch.equal(streamed(IDS).logits, want)
    streamed.generate(torch.tensor([[5, 17, 42]]), **GREEDY)
    last = streamed.stats.per_pass[-1]
    assert last.experts_read == 2 * len(moe_layers(manifest))
    assert last.expert_bytes == sum(expert_bytes(g) * 2 // 8 for g in moe_layers(manifest))
    # the layers' other tensors come as one range that holds no expert byte, parts of any size
    assert last.bytes <= manifest.total_bytes - sum(expert_bytes(g) * 6 // 8 for g in moe_layers(manifest))


def test_only_the_routed_experts_ranges_are_read(moe_converted, monkeypatch):
    """Every expert read is one the router picked in that layer, at that expert's byte range;
    the layer's other tensors come as one span that holds no expert byte."""
    import runtime.expertread as expertread

    folder = moe_converted["mixtral"]
    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0)
    reads, routed = [], {}
    real = expertread._pread
    monkeypatch.setattr(expertread, "_pread", lambda fd, dst, off, path: (
        reads.append((path.name, off, off + dst.numel())), real(fd, dst, off, path))[1])
    manifest = read_manifest(folder)
    for group in moe_layers(manifest):
        [(path, entry)] = group.experts.items()
        model.model.get_submodule(path).register_forward_pre_hook(
            lambda m, args, g=group: routed.setdefault(g.file, set()).update(args[1].unique().tolist()),
            prepend=True)  # the router's expert ids, before the expert hook turns them into slots
    model(torch.tensor([[5, 17, 42]]))
    want = set()
    for group in moe_layers(manifest):
        gf = GroupFile(folder / group.file, group)
        for name, count in expert_tensors(group).items():
            want |= {(group.file, *(gf.data_start + b for b in expert_range(gf.infos[name], count, e)))
                     for e in routed[group.file]}
        span = dense_range(gf.infos, group)
        assert model.loader.partial[manifest.groups.index(group)][0] == span
    assert any(len(r) < 8 for r in routed.values())  # some experts were not picked: they must not be read
    runs = []  # the wanted ranges, those that follow on in one file as one read
    for file, begin, end in sorted(want):
        if runs and runs[-1][0] == file and runs[-1][2] == begin:
            runs[-1] = (file, runs[-1][1], end)
        else:
            runs.append((file, begin, end))
    assert sorted(reads) == runs


def test_an_expert_read_that_comes_back_short_names_the_file(moe_converted, monkeypatch):
    """A layer file that ends before a routed expert's range (it shrank after the checks at open):
    the pass stops with the file's one-line error. The read is made to come back empty rather than
    the file cut, so that no mapped page past its end is touched."""
    import re

    import runtime.expertread as expertread
    from reshard.errors import CorruptFileError

    model = LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", max_cpu_memory=0, expert_cache=0)
    monkeypatch.setattr(expertread.os, "preadv", lambda fd, buffers, offset: 0)
    with pytest.raises(CorruptFileError) as e:
        model(torch.tensor([[5, 17, 42]]))
    assert re.fullmatch(r".*/layers\.\d{5}\.safetensors: ends before byte \d+; run `reshard convert` again to repair it",
                        str(e.value)), str(e.value)


def test_the_expert_cache_takes_what_the_plan_leaves_and_gives_way_to_a_larger_job(moe_converted, capsys):
    """By default the cache gets the budget's room after the groups and the default job. On a GPU
    (a CUDA budget of 8 MB more than streaming needs, put on this streamed CPU model) a job larger
    than the default shrinks it, said once, before it could overflow the device; the logits do not
    change."""
    import re

    from runtime import allowance
    from runtime.budget import Budget, device_need
    from runtime.expertcache import cache_budget

    model = LayeredModel.from_pretrained(moe_converted["mixtral"], device="cpu", max_cpu_memory=0)
    assert model.experts.cache.capacity == 0  # a budget of 0 leaves no room
    big_ids = torch.randint(3, 300, (8, 120), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(big_ids).logits
    default_job, extra = model.job_bytes(allowance.DEFAULT), 8 << 20
    gpu = Budget(cuda=True, capacity=0, host=0, residents=False, prefetch=model.depth, limit_from_user=True)
    gpu = Budget(**{**gpu.__dict__, "capacity": device_need(model.costs, model.places, gpu, default_job) + extra})
    assert cache_budget(model.loader, model.costs, gpu, default_job, None) == extra
    assert cache_budget(model.loader, model.costs, gpu, default_job, "1MB") == 10**6  # asked for: as asked
    model.memory = gpu
    model.experts.cache.resize(extra)  # what from_pretrained gives with this budget
    big = allowance.JobShape(batch=8, tokens=120, context=120, logits_rows=120)  # what model(big_ids) runs
    room = gpu.capacity - device_need(model.costs, model.places, gpu, model.job_bytes(big))
    assert 0 < room < extra
    capsys.readouterr()
    with torch.inference_mode():
        assert torch.equal(model(big_ids).logits, want)
        assert torch.equal(model(big_ids).logits, want)
    assert model.experts.cache.capacity == room and model.experts.cache.used <= room
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"runtime: a batch of 8 x 120 tokens .* the expert cache shrinks from "
                                          r"0\.01GiB to \S+GiB", err[0]), err
    model.close()


def test_an_experts_module_without_top_k_index_gets_every_expert_and_says_so_once(moe_converted, capsys):
    """An experts module whose forward takes no `top_k_index` cannot say which experts it uses:
    each call reads all of them, and the streamer says so on stderr once for its class."""
    folder = moe_converted["mixtral"]
    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0)
    manifest = read_manifest(folder)

    class Whole(torch.nn.Module):  # an experts class of another shape: all tokens, no routing index
        def forward(self, hidden_states):
            return hidden_states

    capsys.readouterr()
    before = model.stats.experts_read
    for group in moe_layers(manifest):
        i = manifest.groups.index(group)
        [(path, entry)] = group.experts.items()
        module = model.model.get_submodule(path)
        hook = model.experts._hook(i, path, Whole(), entry)
        hook(module, (torch.zeros(1, 64),), {})
        gf = GroupFile(folder / group.file, group)
        for name in entry["tensors"]:  # every expert in place, read from the file
            assert torch.equal(module.get_parameter(name.rpartition(".")[2]), gf.tensor(name))
    err = capsys.readouterr().err
    assert err.count("takes no routed expert ids") == 1 and "reads all 8 of its experts" in err
    assert model.stats.experts_read - before == 8 * len(moe_layers(manifest))


def test_a_pass_routing_consecutive_experts_reads_them_in_one_go(moe_checkpoints, moe_converted, monkeypatch):
    """Slots hold experts in order and the file stores them in order: a run of consecutive routed
    experts is one read per expert tensor, so a prefill routing every expert reads each tensor
    whole, sequentially; the logits stay transformers' own."""
    import runtime.expertread as expertread

    folder = moe_converted["mixtral"]
    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0)
    model.experts.whole_at = None  # routed experts read alone, however many
    sizes = []
    real = expertread._pread
    monkeypatch.setattr(expertread, "_pread", lambda fd, dst, off, path: (sizes.append(dst.numel()),
                                                                           real(fd, dst, off, path))[1])
    routed = {}
    manifest = read_manifest(folder)
    for group in moe_layers(manifest):
        [(path, entry)] = group.experts.items()
        model.model.get_submodule(path).register_forward_pre_hook(
            lambda m, args, g=group: routed.setdefault(g.name, set()).update(args[1].unique().tolist()),
            prepend=True)
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(moe_checkpoints["mixtral"])(ids).logits
    assert torch.equal(model(ids).logits, want)
    assert all(r == set(range(8)) for r in routed.values())  # 40 tokens route all 8 experts
    names = [n for g in moe_layers(manifest) for n in expert_tensors(g)]
    assert len(sizes) == len(names) == model.stats.per_pass[-1].expert_reads
    whole = [GroupFile(folder / g.file, g).infos[n] for g in moe_layers(manifest) for n in expert_tensors(g)]
    assert sorted(sizes) == sorted(i.nbytes for i in whole)  # each tensor in one read


def test_a_prefill_routing_most_experts_loads_its_layers_whole(moe_checkpoints, moe_converted):
    """On the CPU, for a folder used as stored, a pass expected to route most experts (40 tokens,
    2 of 8 each) loads its MoE layers whole, by the prefetcher (no expert read; all file bytes),
    and decode passes read their routed experts alone; a scoring pass (micro-batches through one
    load) computes on the whole layers too. Logits, tokens and scores stay transformers' own."""
    from conftest import word_tokenizer
    from test_score import ITEMS, assert_close, reference_scores

    folder = moe_converted["mixtral"]
    manifest = read_manifest(folder)
    ref = reference(moe_checkpoints["mixtral"])
    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0)
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    assert torch.equal(model(ids).logits, want)
    prefill = model.stats.per_pass[-1]
    assert prefill.experts_read == 0 and prefill.bytes == pass_bytes(model, ids)
    short = {**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3}
    assert torch.equal(model.generate(ids, **short), ref.generate(ids, **short))
    k, layers = model.config.num_experts_per_tok, len(moe_layers(manifest))
    assert model.stats.per_pass[-1].experts_read == k * layers  # decode: sparse again
    model.tokenizer = word_tokenizer(folder)
    before = model.stats.experts_read
    assert_close(model.score(ITEMS, batch_size=4), reference_scores(ref, model.tokenizer, ITEMS), ITEMS)
    assert model.stats.experts_read == before
