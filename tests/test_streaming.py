"""How weights move: each group read once per pass, read ahead while the previous one runs,
and gone from the model after it ran."""

from __future__ import annotations

import threading
import time

import torch

from conftest import pass_bytes

from runtime import LayeredModel


def _trace(model: LayeredModel, compute_seconds: float):
    """Record load intervals (background thread) and compute intervals (layers) with timestamps."""
    events, lock = [], threading.Lock()
    load = model.loader.load

    def traced_load(i):
        t0 = time.perf_counter()
        out = load(i)
        with lock:
            events.append(("load", i, t0, time.perf_counter(), threading.current_thread().name))
        return out

    model.prefetcher.load = traced_load
    layers = model.model.get_submodule(model.manifest.layers_path)
    for j, layer in enumerate(layers):
        def pre(module, args, j=j):
            module._t0 = time.perf_counter()

        def post(module, args, output, j=j):
            time.sleep(compute_seconds)  # stand-in for real compute time
            with lock:
                events.append(("compute", j, module._t0, time.perf_counter(), threading.current_thread().name))
        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    return events


def test_one_pass_loads_each_group_once(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cpu", prefetch=2, max_cpu_memory=0)
    model(torch.tensor([[5, 6, 7, 8]]))
    n = len(model.manifest.groups)
    assert model.stats.layer_loads == n
    assert dict(model.stats.per_group_loads) == {i: 1 for i in range(n)}
    assert model.stats.bytes_streamed == pass_bytes(model, torch.tensor([[5, 6, 7, 8]]))
    model(torch.tensor([[5, 6, 7, 8]]))
    assert dict(model.stats.per_group_loads) == {i: 2 for i in range(n)}


def test_prefetch_reads_next_group_while_current_runs(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", prefetch=1, max_cpu_memory=0)
    events = _trace(model, compute_seconds=0.05)
    model(torch.tensor([[5, 6, 7, 8]]))
    loads = {i: e for (kind, i, *e) in events if kind == "load"}
    computes = [(j, *e) for (kind, j, *e) in events if kind == "compute"]
    first_layer = [g.name for g in model.manifest.groups].index("layers.0")
    for j, start, end, thread in computes:
        nxt = first_layer + j + 1  # the group after layer j
        load_start, load_end, load_thread = loads[nxt]
        assert load_thread != thread, "loads run on the background thread"
        assert load_start < end, f"group {nxt} was not being read while layer {j} ran"


def test_prefetch_crosses_into_the_next_pass(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", prefetch=1, max_cpu_memory=0)
    model(torch.tensor([[5, 6, 7]]))
    # After the last group ran, the background thread is already on the next pass's first group.
    assert [i for i, _ in model.prefetcher.pending] == [0]


def test_weights_leave_after_their_group_ran(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", prefetch=1, max_cpu_memory=0)
    layers = model.model.get_submodule(model.manifest.layers_path)
    seen = []

    def check(module, args, j):
        # When layer j starts, layer j-1's weights are gone; layer j's are real.
        seen.append(j)
        assert all(not p.is_meta for p in layers[j].parameters())
        if j > 0:
            assert all(p.is_meta for p in layers[j - 1].parameters())

    for j, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, j=j: check(m, a, j))
    model(torch.tensor([[5, 6, 7]]))
    assert seen == list(range(len(layers)))
    assert all(p.is_meta for p in model.model.parameters())


def test_close_lets_go_of_every_weight_at_once(tiny_converted):
    import gc
    import weakref

    gc.disable()  # what close() frees must not wait for the cycle collector
    try:
        with LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory="1GB") as model:
            model(torch.tensor([[5, 6, 7]]))
            layers = model.model.get_submodule(model.manifest.layers_path)
            assert all(not p.is_meta for p in layers.parameters())  # resident while open
            weight = weakref.ref(layers[0].mlp.up_proj.weight)
        assert all(p.is_meta for p in model.model.parameters())
        inner = model.model
        ref = weakref.ref(model)
        del model
        assert ref() is None and weight() is None
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in inner.modules())
    finally:
        gc.enable()
