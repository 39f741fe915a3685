"""Layers computed on the CPU beside the device (runtime/hostcompute.py): same logits as without.

On this CPU-only machine the device *is* the CPU, so the moves are no-ops, but the path is the
one a CUDA model takes: the layers' weights come from the host loader, not the streaming one,
the hooks move inputs, outputs and the layer's KV cache, and --stats says where each ran."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from reshard.errors import UsageError
from runtime import LayeredModel
from runtime.hostcompute import candidates_for, move, move_cache_layer

IDS = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35]])


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """transformers' own float32 logits and greedy tokens, by architecture."""
    out = {}
    for arch in ("llama", "gpt2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=torch.float32).eval()
        with torch.inference_mode():
            out[arch] = (model(IDS).logits, model.generate(IDS, max_new_tokens=5, do_sample=False))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("cpu_layers", [1, 99])
def test_cpu_layers_equal_transformers(tiny_converted, reference, arch, cpu_layers):
    logits, tokens = reference[arch]
    with LayeredModel.from_pretrained(tiny_converted[arch], device="cpu", dtype="float32", max_cpu_memory=0,
                                      cpu_layers=cpu_layers) as model:
        layers = [i for i, g in enumerate(model.groups) if g.kind == "layer"]
        on_cpu = layers[-cpu_layers:]
        assert sorted(model.host.candidates) == on_cpu
        assert torch.equal(model(IDS).logits, logits)
        assert torch.equal(model.generate(IDS, max_new_tokens=5, do_sample=False), tokens)
        # the streaming loader never brought those layers; the others it did, every pass
        assert all(model.stats.per_group_loads[i] == 0 for i in on_cpu)
        assert all(model.stats.per_group_loads[i] > 0 for i in layers if i not in on_cpu)
        ran = model.stats.per_pass[-1].cpu_layers
        assert ran == {model.groups[i].name: "cpu: --cpu-layers" for i in on_cpu}
        assert model.stats.as_dict()["per_pass"][0]["cpu_layers"] == ran


def test_no_cpu_layers_when_every_layer_is_resident(tiny_converted):
    with LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory="64GiB",
                                      cpu_layers=2) as model:
        assert model.host is None


def test_auto_on_the_cpu_changes_nothing(tiny_converted):
    with LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory=0,
                                      cpu_layers="auto") as model:
        assert model.host is None


@pytest.mark.parametrize("bad", [-1, "two", 1.5, True])
def test_bad_cpu_layers_is_refused(tiny_converted, bad):
    with pytest.raises(UsageError) as refused:
        LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory=0, cpu_layers=bad)
    assert str(refused.value) == f"cpu_layers must be a layer count (0 or more) or 'auto', not {bad!r}"


def test_candidates_are_the_last_layers_off_the_device():
    class G:
        def __init__(self, kind):
            self.kind = kind
    groups = [G("pre"), G("layer"), G("layer"), G("layer"), G("layer"), G("post")]
    places = ["device", "device", "host", "disk", "host", "device"]
    assert candidates_for(2, places, groups, "device") == [3, 4]
    assert candidates_for(9, places, groups, "device") == [2, 3, 4]
    assert candidates_for("auto", places, groups, "device") == [2, 3, 4]
    assert candidates_for(0, places, groups, "device") == []


def test_move_reaches_nested_tensors_and_the_cache_layer():
    meta = torch.device("meta")
    cos_sin = (torch.ones(2), torch.zeros(2))
    args, kwargs = move(((torch.ones(3),), {"position_embeddings": cos_sin, "mask": None, "n": 4}), meta)
    assert args[0].device == meta and all(t.device == meta for t in kwargs["position_embeddings"])
    assert kwargs["mask"] is None and kwargs["n"] == 4
    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 1)
    move_cache_layer(cache, 1, meta)
    assert cache.layers[1].keys.device == meta and cache.layers[1].values.device == meta
    assert cache.layers[0].keys.device.type == "cpu"
    move_cache_layer(cache, 7, meta)  # no such layer: nothing to move


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_host_layer_takes_its_cache_layer_along_whatever_the_argument_is_named(name):
    """transformers 5.2x hands a decoder layer its cache as `cache=`, earlier versions as
    `past_key_values=`: either way the layer computed on the host gets its own cache layer there."""
    from types import SimpleNamespace

    from runtime.hostcompute import HostCompute

    host = object.__new__(HostCompute)  # only what `_inputs` reads: where the host is, which layers run there
    host.host, host.device, host.active = torch.device("meta"), torch.device("cpu"), {0}
    host.candidates = {0: SimpleNamespace(index=1)}
    cache = DynamicCache()
    for layer in (0, 1):
        cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), layer)
    host._inputs(0, (torch.ones(2),), {name: cache})
    assert cache.layers[1].keys.device.type == "meta" and cache.layers[0].keys.device.type == "cpu"


def test_cli_cpu_layers_text_and_stats(tiny_converted, capsys):
    from runtime.cli import main as runtime_main

    args = ["generate", str(tiny_converted["llama"]), "--prompt", "w5 w17 w42", "--device", "cpu",
            "--max-new-tokens", "4", "--min-new-tokens", "4", "--max-cpu-memory", "0", "--stats"]
    assert runtime_main(args) == 0
    plain = capsys.readouterr().out
    assert runtime_main([*args, "--cpu-layers", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    passes = json.loads(err.strip().splitlines()[-1])["per_pass"]
    assert len(passes) == 4 and all(p["cpu_layers"] == {"layers.1": "cpu: --cpu-layers",
                                                       "layers.2": "cpu: --cpu-layers"} for p in passes)


def test_cli_bad_cpu_layers_exits_2(tiny_converted, capsys):
    from runtime.cli import main as runtime_main

    code = runtime_main(["generate", str(tiny_converted["llama"]), "-p", "w5", "--cpu-layers", "some"])
    assert code == 2
    assert "--cpu-layers 'some' is not understood; give a layer count (e.g. 8) or auto" in capsys.readouterr().err


def test_lockstep_jobs_stream_the_cpu_layers(tiny_converted):
    """score runs several forwards through one pass (runtime/lockstep.py): the CPU layers stream then."""
    from conftest import word_tokenizer

    items = [{"prompt": "w5 w6", "choices": [" w7", " w8"]}, {"text": "w1 w2 w3 w4"}]
    folder = tiny_converted["llama"]
    results = []
    for cpu_layers in (None, 1):
        with LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", max_cpu_memory=0,
                                          cpu_layers=cpu_layers) as model:
            model.tokenizer = word_tokenizer(folder)
            results.append(model.score(items, batch_size=1))
    assert results[0] == results[1]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_moe_cpu_layers_equal_the_streamed_run(moe_converted, arch):
    ids = IDS % 300
    logits = []
    for cpu_layers in (None, 2):
        with LayeredModel.from_pretrained(moe_converted[arch], device="cpu", dtype="float32", max_cpu_memory=0,
                                          cpu_layers=cpu_layers) as model:
            logits.append(model(ids).logits)
            assert cpu_layers is None or len(model.stats.per_pass[-1].cpu_layers) == 2
    assert torch.equal(logits[0], logits[1])


def test_weights_from_a_held_copy_equal_the_file_load(tiny_converted):
    """A HOST group on CUDA: the CPU computes with views of the pinned copy the device loader holds."""
    with LayeredModel.from_pretrained(tiny_converted["gpt2"], device="cpu", max_cpu_memory=0, cpu_layers=1) as model:
        host = model.host
        (i,) = host.candidates
        held = host.loader.files[i].data().clone()  # stands in for the pinned copy
        host.held = {i: held}.get
        from_file, from_held = host.loader.load(i).tensors, host.weights(i).tensors
        assert from_file.keys() == from_held.keys()
        assert all(torch.equal(from_file[k], from_held[k]) for k in from_file)
        own = [t for t in from_held.values() if t.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()]
        assert own  # views of the held bytes, not a second read of the file
        ids = IDS % 300
        want = model(ids).logits
    with LayeredModel.from_pretrained(tiny_converted["gpt2"], device="cpu", max_cpu_memory=0) as plain:
        assert torch.equal(plain(ids).logits, want)


def test_generate_batch_with_cpu_layers_equals_without(tiny_converted):
    from conftest import word_tokenizer

    folder, done = tiny_converted["llama"], []
    for cpu_layers in (None, 2):
        with LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", max_cpu_memory=0,
                                          cpu_layers=cpu_layers) as model:
            model.tokenizer = word_tokenizer(folder)
            done.append([g.tokens for g in model.generate_batch(["w5 w6 w7", "w9 w10"], max_new_tokens=5,
                                                                 do_sample=False)])
            assert bool(model.stats.per_pass[-1].cpu_layers) == bool(cpu_layers)
    assert done[0] == done[1]


@pytest.mark.parametrize("packed", [True, False])
def test_the_planner_is_told_what_the_host_expands_each_pass(tmp_path, packed):
    """A candidate's last field is the stored bytes of quantized weights the host loader expands
    (runtime/hybrid.py charges the CPU for it): none where the kernels take them as stored."""
    from transformers import LlamaConfig

    from reshard.format import quant_part_names
    from reshard.synthetic import write_random_model

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=300, tie_word_embeddings=False)
    manifest = write_random_model(config, tmp_path / "int4", dtype=torch.float32, quantize="int4", quantize_group=32)
    with LayeredModel.from_pretrained(tmp_path / "int4", device="cpu", max_cpu_memory=0, cpu_layers=1,
                                      packed=packed) as model:
        (i,) = model.host.candidates
        candidate = model.host.candidates[i]
        stored, expanded = candidate.stored, candidate.expanded
        group = manifest.groups[i]
        want = sum(model.host.loader.files[i].infos[n].nbytes
                   for p in group.quantized for n in quant_part_names(p, "int4").values())
        if packed:  # the CPU's kernels (the project's, or torch's int4pack) take every int4 weight here
            assert model.host.loader.packing.keys() >= group.quantized.keys() and expanded == 0
            assert sum(candidate.packed.values()) == want  # read by the kernels as stored
        else:
            assert expanded == want and 0 < expanded < stored and not candidate.packed


def test_quantized_host_layers_beside_an_expanding_device_are_multiplied_as_stored(tmp_path, monkeypatch):
    """Beside a GPU the device's modules expand int4 weights; a layer computed on the host gets them
    packed instead, in PackedLinear modules standing in while it runs. Here the device's packing is
    emptied (as on CUDA) at the seam: every layer on the host then computes what the all-packed CPU
    model computes, bit for bit, and the plain modules are back after the pass."""
    from transformers import LlamaConfig

    from reshard.synthetic import write_random_model
    from runtime import lowbit

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=300, tie_word_embeddings=False)
    manifest = write_random_model(config, tmp_path / "int4", dtype=torch.float32, quantize="int4", quantize_group=32)
    ids = IDS % 300
    with LayeredModel.from_pretrained(tmp_path / "int4", device="cpu", dtype="float32", max_cpu_memory=0) as plain:
        want = plain(ids).logits
    real, calls = lowbit.plan_packing, []

    def device_expands(model, manifest, device):  # the first call plans the device's modules: none packed
        calls.append(device)
        return {} if len(calls) == 1 else real(model, manifest, device)

    monkeypatch.setattr(lowbit, "plan_packing", device_expands)
    quantized = {n for g in manifest.groups for n in g.quantized}
    with LayeredModel.from_pretrained(tmp_path / "int4", device="cpu", dtype="float32", max_cpu_memory=0,
                                      cpu_layers=2) as model:
        assert model.loader.packing == {} and model.host.swapped == quantized
        layers = model.model.get_submodule(model.manifest.layers_path)
        seen = []
        for layer in layers:  # after the runtime's own hooks: what the layer computes with
            layer.register_forward_pre_hook(lambda mod, *_: seen.append(type(mod.mlp.down_proj).__name__))
        got = model(ids).logits
        assert seen == ["PackedLinear", "PackedLinear"]
        assert all(type(layer.mlp.down_proj) is torch.nn.Linear for layer in layers)  # put back
        assert set(v.split(":")[0] for v in model.stats.per_pass[-1].cpu_layers.values()) == {"cpu"}
        assert torch.equal(model(ids).logits, got)  # a second pass: the same stand-ins, this pass's weights
    assert torch.equal(got, want)
