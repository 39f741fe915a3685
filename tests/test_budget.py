"""The memory budget: parsing sizes, placing groups, and what a resident model does per pass."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import pass_bytes

from reshard.errors import UsageError
from runtime import budget
from runtime.budget import DEVICE, DISK, HOST, Budget, GroupCost, parse_size, plan
from runtime.model import LayeredModel


@pytest.mark.parametrize("text,want", [("12GiB", 12 << 30), ("500MB", 500_000_000), ("1.5GB", 1_500_000_000),
                                       ("4096", 4096), (" 2 kib ", 2048), ("0", 0), (123, 123), (None, None)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["12 gigs", "GiB", "-1GB", ""])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(UsageError, match="12GiB"):
        parse_size(text)


def test_plan_cpu_fills_ram_first_fit():
    costs = [GroupCost(n, n, k) for n, k in zip([10, 40, 40, 40, 5, 10], ["pre", "layer", "layer", "layer", "post", "post"])]
    cpu = lambda capacity: Budget(cuda=False, capacity=capacity, host=0, prefetch=0)  # noqa: E731
    # one group in flight (40) held back: non-layer groups first (25 bytes), then layers while they fit
    assert plan(costs, cpu(140), job=0) == [DEVICE, DEVICE, DISK, DISK, DEVICE, DEVICE]
    assert plan(costs, cpu(0), job=0) == [DISK] * 6
    assert plan(costs, cpu(145), job=0) == [DEVICE] * 6
    assert plan(costs, cpu(145), job=1) != [DEVICE] * 6  # the job's allowance counts too


def test_plan_gpu_device_then_host_then_disk():
    costs = [GroupCost(n, n, k) for n, k in zip([10, 40, 40, 40, 40, 10], ["pre"] + ["layer"] * 4 + ["post"])]
    gpu = lambda capacity, host: Budget(cuda=True, capacity=capacity, host=host, prefetch=1)  # noqa: E731
    assert plan(costs, gpu(180, 0), job=0) == [DEVICE] * 6
    # does not fit: 80 bytes held back for two streamed groups, 59 left for residents;
    # host RAM keeps 80 for the two staging buffers while a group streams from disk
    assert plan(costs, gpu(139, 125), job=0) == [DEVICE, HOST, DISK, DISK, DISK, DEVICE]
    assert plan(costs, gpu(139, 160), job=0) == [DEVICE] + [HOST] * 4 + [DEVICE]  # nothing left on disk: no staging


GiB = 1 << 30


@pytest.mark.parametrize("free_gib,budget_gib", [(64, 48), (16, 12), (8, 6), (6, 4), (4, 2), (2, 0), (1, 0), (0, 0)])
def test_default_cpu_budget_leaves_a_margin(free_gib, budget_gib, monkeypatch):
    """A quarter of the available RAM stays free, and never less than 2 GiB: with 16 GiB
    available 12 may be used, with 6 GiB 4, with 2 GiB or less nothing."""
    monkeypatch.setattr(budget, "host_available", lambda: free_gib * GiB)
    assert budget.default_cpu_budget() == budget_gib * GiB


def test_host_available_is_what_the_os_says_is_available():
    psutil = pytest.importorskip("psutil")
    ours, theirs = budget.host_available(), psutil.virtual_memory().available
    assert 0 < ours <= psutil.virtual_memory().total
    assert abs(ours - theirs) < 0.05 * theirs + (256 << 20)  # read a moment apart: other processes move it


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("cpu_budget", ["0", "6KB", "300KB", "1GiB"])
def test_budgeted_model_equals_transformers(tiny_checkpoints, tiny_converted, arch, cpu_budget):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]).eval()
    ids = torch.tensor([[5, 9, 17, 3, 44]])
    model = LayeredModel.from_pretrained(tiny_converted[arch], device="cpu", max_cpu_memory=cpu_budget)
    try:
        for _ in range(2):  # a second pass reuses what the first left behind
            assert torch.equal(_logits(model, ids), _logits(ref, ids))
    finally:
        model.close()


def test_resident_model_reads_nothing_after_the_first_pass(tiny_converted, monkeypatch):
    """Acceptance 3: with a budget that fits the whole model, passes read no weights."""
    from runtime.stream import GroupLoader

    calls = []
    original = GroupLoader.load
    monkeypatch.setattr(GroupLoader, "load", lambda self, i: calls.append(i) or original(self, i))
    model = LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cpu", max_cpu_memory="1GiB")
    n = len(model.groups)
    assert model.places == [DEVICE] * n
    model.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=4, do_sample=False)
    read_after_first = (len(calls), model.stats.bytes_read)
    model.generate(torch.tensor([[7, 8]]), max_new_tokens=3, do_sample=False)
    assert model.stats.passes == 7
    assert read_after_first == (len(calls), model.stats.bytes_read) == (n, model.manifest.total_bytes)
    assert sorted(calls) == list(range(n))
    assert model.stats.bytes_streamed == 0 and model.stats.layer_loads == 0
    model.close()


def test_streamed_model_reads_every_group_every_pass(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cpu", max_cpu_memory=0)
    model(torch.tensor([[5, 9, 17]]))
    model(torch.tensor([[5, 9, 17]]))
    files = [g for g in model.groups if g.file]
    one = pass_bytes(model, torch.tensor([[5, 9, 17]]))
    assert model.stats.bytes_streamed == 2 * one
    assert [p.bytes for p in model.stats.per_pass] == [one] * 2
    assert all(model.stats.per_group_loads[i] == 2 for i in range(len(files)))
    model.close()


def test_per_pass_stats(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory=0)
    model.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=3, do_sample=False)
    stats = model.stats
    assert len(stats.per_pass) == stats.passes == 3
    for p in stats.per_pass:
        assert p.seconds > 0 and 0 <= p.wait_seconds <= p.seconds
        assert p.compute_seconds == pytest.approx(p.seconds - p.wait_seconds)
        assert p.gb_per_s == pytest.approx(p.bytes / p.seconds / 1e9)
    d = json.loads(json.dumps(stats.as_dict()))
    assert len(d["per_pass"]) == 3 and d["bytes_streamed"] == sum(p.bytes for p in stats.per_pass)
    model.close()


def test_cli_budget_flags_and_stats(tiny_converted, capsys):
    from runtime.cli import main

    folder = str(tiny_converted["llama"])
    rc = main(["generate", folder, "--prompt", "w5 w6", "--max-new-tokens", "3", "--device", "cpu",
               "--max-cpu-memory", "1GiB", "--stats"])
    err = capsys.readouterr().err
    assert rc == 0
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["bytes_streamed"] == 0 and stats["resident_bytes"]["device"] > 0 and len(stats["per_pass"]) == 3
    assert main(["generate", folder, "--prompt", "w5", "--device", "cpu", "--max-cpu-memory", "lots"]) == 2
    assert capsys.readouterr().err.strip() == ("Error: memory size 'lots' is not understood; "
                                               "write e.g. 12GiB, 500MB or a byte count")
