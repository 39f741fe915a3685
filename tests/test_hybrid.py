"""The planner (runtime/hybrid.py): its choices follow from the speeds it is given."""

import json

import pytest
import torch

from runtime import hybrid
from runtime.hybrid import CPU, STREAM, Speeds, choose

# a 70B-shaped int4 decoder layer: ~0.86e9 weights, half a byte each
PARAMS = 856_000_000
STORED = PARAMS // 2
PCIE4 = 25e9  # bytes/s
GPU = 200e12  # FLOP/s


@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_link_bound_picks_cpu_at_small_batch(tokens):
    # DDR5 host at 60 GB/s and 2 TFLOP/s: reading 0.43 GB takes 7 ms, copying it over PCIe4 17 ms
    speeds = Speeds(link=PCIE4, cpu_bytes=60e9, cpu_flops=2e12, gpu_flops=GPU)
    assert choose(STORED, PARAMS, tokens, speeds).where == CPU


def test_cpu_bound_picks_streaming():
    # a slow host (8 GB/s): 54 ms on the CPU against 17 ms over the link, even at one token
    speeds = Speeds(link=PCIE4, cpu_bytes=8e9, cpu_flops=0.5e12, gpu_flops=GPU)
    assert choose(STORED, PARAMS, 1, speeds).where == STREAM


def test_batch_size_crossover():
    speeds = Speeds(link=PCIE4, cpu_bytes=60e9, cpu_flops=2e12, gpu_flops=GPU)
    one, many = choose(STORED, PARAMS, 1, speeds), choose(STORED, PARAMS, 64, speeds)
    assert (one.where, many.where) == (CPU, STREAM)
    # at 64 tokens the CPU does 2 * 0.856e9 * 64 FLOP at 2 TFLOP/s: about 55 ms, past the 17 ms copy
    assert many.cpu_seconds > 0.05 and many.stream_seconds < 0.02


@pytest.mark.parametrize("tokens", [1, 8, 64, 4096])
def test_link_faster_than_the_cpu_picks_streaming(tokens):
    # an H200 box: the link (55 GB/s measured) outruns what the CPU reads (40 GB/s)
    speeds = Speeds(link=55e9, cpu_bytes=40e9, cpu_flops=3e12, gpu_flops=GPU)
    assert choose(STORED, PARAMS, tokens, speeds).where == STREAM


def test_no_link_never_streams():
    speeds = Speeds(link=0.0, cpu_bytes=1e9, cpu_flops=1e9, gpu_flops=1.0)
    assert choose(STORED, PARAMS, 512, speeds).where == CPU


def test_reason_names_both_estimates():
    speeds = Speeds(link=PCIE4, cpu_bytes=60e9, cpu_flops=2e12, gpu_flops=GPU)
    reason = choose(STORED, PARAMS, 1, speeds).reason
    assert reason.startswith("cpu ") and "vs stream" in reason


def test_calibrate_measures_once_and_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hybrid, "_MEASURED", {})
    cache = tmp_path / "speeds.json"
    speeds = hybrid.calibrate(torch.device("cpu"), torch.float32, cache_file=cache)
    assert speeds.cpu_bytes > 0 and speeds.cpu_flops > 0 and speeds.link == 0.0
    assert json.loads(cache.read_text())["cpu/torch.float32"]["cpu_bytes"] == speeds.cpu_bytes
    # a new process reads the file rather than measuring again
    monkeypatch.setattr(hybrid, "_MEASURED", {})
    marked = {"cpu/torch.float32": {"link": 0.0, "cpu_bytes": 123.0, "cpu_flops": 456.0, "gpu_flops": 1.0,
                                    "cpu_expand": 789.0, "cpu_packed": 0.0, "method": hybrid.CALIBRATION_METHOD}}
    cache.write_text(json.dumps(marked))
    assert hybrid.calibrate(torch.device("cpu"), torch.float32, cache_file=cache).cpu_expand == 789.0
    # an entry an older way of measuring wrote (a weight small enough for a cache) is measured anew
    monkeypatch.setattr(hybrid, "_MEASURED", {})
    marked["cpu/torch.float32"]["method"] = 1
    cache.write_text(json.dumps(marked))
    again = hybrid.calibrate(torch.device("cpu"), torch.float32, cache_file=cache)
    assert again.cpu_bytes != 123.0 and again.cpu_expand > 0


# the H200 machine of benchmarks/results/gpu_check_h200_2026-12-04.txt: the link at 54.7 GB/s, the CPU's
# float16 matmul reading 95.2 GB/s at one token and 0.50 TFLOP/s at 256; expanding int4 on its CPU
# took about 3 s for 2.1 GB (4 layers of 0.5 GiB), some 0.7 GB/s
H200_BOX = Speeds(link=54.7e9, cpu_bytes=95.2e9, cpu_flops=0.5e12, gpu_flops=GPU, cpu_expand=0.7e9)


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_weights_the_cpu_must_expand_every_pass_stream(tokens):
    """int4 layers no CPU kernel multiplies as stored: expanding them costs the CPU ~0.8 s a layer,
    so streaming (9 ms over the link) wins at every batch, where the matmul alone would pick the CPU."""
    choice = choose(STORED, PARAMS, tokens, H200_BOX, expanded=STORED)
    assert choice.where == STREAM and choice.cpu_seconds > 0.5
    assert choose(STORED, PARAMS, 1, H200_BOX).where == CPU  # multiplied as stored: the CPU reads faster


def test_weights_the_kernels_read_as_stored_cost_the_kernels_rate():
    """A layer of int4 weights multiplied as stored: at one token the CPU's time is their bytes at the
    kernel's measured rate, so a slow kernel streams where the float matmul's rate would pick the CPU."""
    fast = choose(STORED, PARAMS, 1, H200_BOX, packed={"int4": STORED})
    assert fast.where == CPU and fast.cpu_seconds == pytest.approx(STORED / H200_BOX.cpu_bytes)  # not measured: cpu_bytes
    slow_kernel = Speeds(**{**H200_BOX.__dict__, "cpu_packed": 30e9})  # slower than the 54.7 GB/s link
    choice = choose(STORED, PARAMS, 1, slow_kernel, packed={"int4": STORED})
    assert choice.where == STREAM and choice.cpu_seconds == pytest.approx(STORED / 30e9)


def test_each_kernel_scheme_costs_its_own_rate():
    """GGUF grid blocks decode several times slower than K-quants (benchmarks/results/gguf_kernels.txt):
    measured per scheme, a layer of IQ2_XXS streams where the same bytes of Q4_K pick the CPU, and a
    mixed layer costs each part at its rate; a scheme not measured goes at the int4 kernel's."""
    rates = Speeds(**{**H200_BOX.__dict__, "cpu_packed": 80e9, "packed_rates": {"q4_k": 90e9, "iq2_xxs": 20e9}})
    assert choose(STORED, PARAMS, 1, rates, packed={"q4_k": STORED}).where == CPU
    slow = choose(STORED, PARAMS, 1, rates, packed={"iq2_xxs": STORED})
    assert slow.where == STREAM and slow.cpu_seconds == pytest.approx(STORED / 20e9)
    mixed = choose(STORED, PARAMS, 1, rates, packed={"q4_k": STORED // 2, "iq2_xxs": STORED // 2})
    assert mixed.cpu_seconds == pytest.approx((STORED // 2) / 90e9 + (STORED // 2) / 20e9)
    assert rates.packed_rate("q6_k") == 80e9 and Speeds(**{**H200_BOX.__dict__}).packed_rate("q6_k") == H200_BOX.cpu_bytes


def test_calibrate_measures_each_scheme_once_and_keeps_it(tmp_path, monkeypatch):
    """The kernel schemes a model's packed weights use are measured on first use, once, and kept in
    the cache file with the other rates; a later call (or process) with more schemes adds only those."""
    monkeypatch.setattr(hybrid, "_MEASURED", {})
    measured = []
    monkeypatch.setattr(hybrid, "measure_cpu", lambda dtype: (50e9, 1e12))
    monkeypatch.setattr(hybrid, "measure_cpu_expand", lambda dtype: 1e9)
    monkeypatch.setattr(hybrid, "measure_cpu_packed", lambda scheme="int4": measured.append(scheme) or len(scheme) * 1e9)
    cache = tmp_path / "speeds.json"
    speeds = hybrid.calibrate(torch.device("cpu"), torch.float32, cache_file=cache, schemes=["q4_k", "iq2_xxs"])
    assert speeds.packed_rates == {"q4_k": 4e9, "iq2_xxs": 7e9} and measured == ["int4", "q4_k", "iq2_xxs"]
    assert hybrid.calibrate(torch.device("cpu"), torch.float32, cache_file=cache, schemes=["q4_k"]) == speeds
    monkeypatch.setattr(hybrid, "_MEASURED", {})  # a new process: the file has them
    more = hybrid.calibrate(torch.device("cpu"), torch.float32, cache_file=cache, schemes=["iq2_xxs", "mxfp4_blocks"])
    assert measured == ["int4", "q4_k", "iq2_xxs", "mxfp4_blocks"]
    assert json.loads(cache.read_text())["cpu/torch.float32"]["packed_rates"] == more.packed_rates == {
        "q4_k": 4e9, "iq2_xxs": 7e9, "mxfp4_blocks": 12e9}


def test_every_kernel_scheme_can_be_measured():
    from runtime import native

    for scheme in ("int8", "q4_k", "iq2_xxs", "mxfp4_blocks"):
        rate = hybrid.measure_cpu_packed(scheme, rows=256, cols=1024, cold_bytes=8 << 20)
        assert rate > 0 if native.lowbit() is not None else rate == 0, scheme


def test_calibration_measures_the_int4_kernel_where_it_runs():
    from runtime import native

    rate = hybrid.measure_cpu_packed(rows=1024, cols=1024)
    assert rate > 0 if native.lowbit() is not None else rate == 0


def test_an_unmeasured_expansion_rate_never_picks_the_cpu_for_expanded_weights():
    speeds = Speeds(link=PCIE4, cpu_bytes=60e9, cpu_flops=2e12, gpu_flops=GPU)  # cpu_expand 0: unknown
    assert choose(STORED, PARAMS, 1, speeds, expanded=1).where == STREAM
    assert choose(STORED, PARAMS, 1, speeds).where == CPU
