"""`reshard`'s error lines that no other test module asserts: bad sources, the hub, a damaged
converted folder. Each test asserts the exit code and the whole `Error:` line; tests/test_errors.py
lists every message with the test that asserts it."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reshard.cli import main as reshard_main
from reshard.errors import FormatError, SourceError, UsageError
from runtime.cli import main as runtime_main
from test_robustness import only_error, single_file_checkpoint


def convert(capsys, *args) -> tuple[int, str]:
    """(exit code, the one `Error:` line) of `reshard convert ARGS --quiet`."""
    code = reshard_main(["convert", *map(str, args), "--quiet"])
    return code, only_error(capsys.readouterr().err)


def json_error(text: str) -> str:
    """What json says about `text` (the part of a message that quotes it)."""
    try:
        json.loads(text)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{text!r} is valid JSON")


# --- local sources ----------------------------------------------------------------------

def test_source_is_a_file(tiny_checkpoints, tmp_path, capsys):
    config = tiny_checkpoints["llama"] / "config.json"
    assert convert(capsys, config, tmp_path / "out") == (
        1, f"Error: {config} is a file; give its folder, or a .gguf file")


def test_source_without_config(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    (folder / "config.json").unlink()
    assert convert(capsys, folder, tmp_path / "out") == (
        1, f"Error: {folder} has no config.json; it is not a Hugging Face checkpoint folder")


def test_gguf_that_transformers_cannot_read(tmp_path, capsys):
    """A well-formed GGUF (gguf reads it) of an architecture transformers does not know."""
    from gguf import GGUFWriter
    from transformers import AutoConfig

    gguf = tmp_path / "model.gguf"
    writer = GGUFWriter(gguf, "nosucharch")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    try:
        AutoConfig.from_pretrained(tmp_path, gguf_file=gguf.name)
    except Exception as e:  # transformers' own reason, quoted in the line
        reason = str(e).splitlines()[0]
    assert convert(capsys, gguf, tmp_path / "out") == (
        1, f"Error: {gguf}: transformers cannot read this GGUF file ({reason})")


def shard_index(folder: Path, text: str) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(text)
    return index


def test_shard_index_that_is_not_json(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    index = shard_index(folder, "{not json")
    assert convert(capsys, folder, tmp_path / "out") == (
        1, f"Error: {index} is not a valid shard index ({json_error('{not json')})")


def test_shard_index_naming_a_missing_shard(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    index = shard_index(folder, json.dumps({"weight_map": {"model.norm.weight": "model-00009.safetensors"}}))
    assert convert(capsys, folder, tmp_path / "out") == (
        1, f"Error: {index} names model-00009.safetensors, which is missing from {folder}")


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


SHORT_HEADER = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'  # 16 bytes of data


@pytest.mark.parametrize("content, problem", [
    (b"\x01\x02\x03", "file is truncated (no header)"),
    (safetensors_bytes(b"{not json}"), "header is not valid JSON"),
    (safetensors_bytes(b'{"w": {"dtype": "F32"}}'), "header entry 'w' is malformed"),
    (safetensors_bytes(SHORT_HEADER, b"\x00" * 12),
     f"size is {8 + len(SHORT_HEADER) + 12} bytes, header describes {8 + len(SHORT_HEADER) + 16}"),
])
def test_damaged_safetensors_source(content, problem, tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    (folder / "model.safetensors").write_bytes(content)
    assert convert(capsys, folder, tmp_path / "out") == (
        1, f"Error: {folder / 'model.safetensors'} is not a readable safetensors file ({problem}); download it again")


def test_source_truncated_while_converting(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """The header was read whole, then the file shrank (a download still being written)."""
    import reshard.source

    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    path = folder / "model.safetensors"
    real_read = reshard.source.SafetensorsSource.read

    def read_after_truncation(self, keys):
        path.write_bytes(path.read_bytes()[:1000])
        return real_read(self, keys)

    monkeypatch.setattr(reshard.source.SafetensorsSource, "read", read_after_truncation)
    # float16 from a float32 source: every tensor is read and cast (same-dtype tensors are copied by
    # the kernel instead, whose truncation message tests/test_fileio.py checks)
    code, line = convert(capsys, folder, tmp_path / "out", "--dtype", "float16")
    assert code == 1
    first = line.split(" is truncated at tensor ")
    assert first[0] == f"Error: {path}" and first[1].endswith("; download it again"), line


def test_tensor_whose_read_shape_differs(monkeypatch, capsys, tiny_checkpoints, tmp_path):
    """A .bin source whose headers told no shapes: the shape is checked when the tensor is read."""
    import reshard.source

    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    real_read = reshard.source.SafetensorsSource.read
    monkeypatch.setattr(reshard.source.SafetensorsSource, "shapes", lambda self: {})

    def read(self, keys):
        out = real_read(self, keys)
        return {k: (t[:-1] if k == "model.norm.weight" else t) for k, t in out.items()}

    monkeypatch.setattr(reshard.source.SafetensorsSource, "read", read)
    assert convert(capsys, folder, tmp_path / "out", "--dtype", "float16") == (  # read and cast, not copied
        1, "Error: tensor model.norm.weight has shape [63] but the config needs [64]; is the config the one of "
           "these weights?")


def test_model_without_a_list_of_layers():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from reshard.plan import find_layers

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.config.num_hidden_layers = 7
    with pytest.raises(SourceError) as info:
        find_layers(model)
    assert str(info.value) == ("LlamaForCausalLM has no list of 7 decoder layers; only decoder-only models whose "
                               "layers sit in one ModuleList can be streamed")


def test_model_code_that_needs_trust_remote_code(monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from reshard.plan import build_empty_model

    def refuse(config, **kwargs):
        raise ValueError("The repository contains custom code; pass `trust_remote_code=True` to run it.\nMore.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", refuse)
    with pytest.raises(SourceError) as info:
        build_empty_model(tiny_config("llama"))
    assert str(info.value).splitlines()[0] == (
        "this model needs its own code; pass --trust-remote-code if you trust it (The repository contains custom "
        "code; pass `trust_remote_code=True` to run it.")


def test_out_with_a_damaged_conversion_record(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "convert-progress.json").write_text("{damaged")
    assert convert(capsys, tiny_checkpoints["llama"], out) == (
        1, f"Error: {out} holds a damaged conversion record (convert-progress.json); pass --force to convert "
           f"into it afresh")
    assert [p.name for p in out.iterdir()] == ["convert-progress.json"]  # refused: nothing touched


# --- library-only values (the CLI's choices refuse them before) --------------------------

def test_library_rejects_unknown_dtype_quantization_and_tensor_dtype(tiny_checkpoints, tmp_path):
    from reshard.convert import convert as convert_fn
    from reshard.format import build_header

    with pytest.raises(UsageError) as info:
        convert_fn(str(tiny_checkpoints["llama"]), tmp_path / "a", dtype="float8", progress=False)
    assert str(info.value) == "unknown dtype 'float8'; use auto, float16, bfloat16 or float32"
    with pytest.raises(UsageError) as info:
        convert_fn(str(tiny_checkpoints["llama"]), tmp_path / "b", quantize="int3", progress=False)
    assert str(info.value) == "unknown quantization 'int3'; use int8 or int4"
    with pytest.raises(FormatError) as info:
        build_header({"w": torch.zeros(2, dtype=torch.complex64)})
    assert str(info.value) == "tensor w has dtype torch.complex64, which the format cannot store"


# --- the hub ----------------------------------------------------------------------------

class Hub:
    """`huggingface_hub.model_info` / `hf_hub_download` over a dict of files; either can fail."""

    def __init__(self, files: dict[str, bytes], tmp: Path):
        self.files, self.tmp, self.info_error, self.download_errors = files, tmp, None, {}

    def model_info(self, repo_id, revision=None, token=None, **_):
        if self.info_error:
            raise self.info_error
        return SimpleNamespace(sha="f" * 40, siblings=[SimpleNamespace(rfilename=n, size=len(b))
                                                       for n, b in self.files.items()])

    def hf_hub_download(self, repo_id, filename, *, revision=None, token=None, local_dir=None, **_):
        if filename in self.download_errors:
            raise self.download_errors[filename]
        target = Path(local_dir or self.tmp) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.files[filename])
        return str(target)


@pytest.fixture
def hub(tiny_checkpoints, tmp_path, monkeypatch):
    """Install a Hub serving the tiny llama's files; tests edit its files or errors."""
    import huggingface_hub

    files = {p.name: p.read_bytes() for p in tiny_checkpoints["llama"].iterdir()}
    fake = Hub(files, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: fake.model_info(*a, **k))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: fake.hf_hub_download(*a, **k))
    return fake


def test_hub_repo_without_weights(hub, tmp_path, capsys):
    hub.files = {"config.json": hub.files["config.json"]}
    assert convert(capsys, "org/tiny", tmp_path / "out") == (
        1, "Error: the repo has no model.safetensors or pytorch_model.bin weights at its top level")


def test_low_disk_shard_index_that_is_not_json(hub, tmp_path, capsys):
    hub.files["model.safetensors.index.json"] = b"{not json"
    assert convert(capsys, "org/tiny", tmp_path / "out", "--low-disk") == (
        1, f"Error: model.safetensors.index.json of org/tiny is not a valid shard index ({json_error('{not json')})")


def test_low_disk_shard_index_naming_another_file(hub, tmp_path, capsys):
    index = json.loads(hub.files["model.safetensors.index.json"])
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    hub.files["model.safetensors.index.json"] = json.dumps(index).encode()
    assert convert(capsys, "org/tiny", tmp_path / "out", "--low-disk") == (
        1, "Error: model.safetensors.index.json of org/tiny names '../elsewhere.safetensors', which is not a "
           "top-level weight file of the repo; refusing to fetch it")


# --- a converted folder that is not what its manifest says -------------------------------

@pytest.fixture
def converted(tiny_converted, tmp_path) -> Path:
    out = tmp_path / "converted"
    shutil.copytree(tiny_converted["llama"], out)
    return out


def edit_manifest(folder: Path, edit) -> Path:
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


def info(capsys, folder) -> tuple[int, str]:
    code = reshard_main(["info", str(folder)])
    return code, only_error(capsys.readouterr().err)


def test_manifest_of_another_format(converted, capsys):
    path = edit_manifest(converted, lambda m: m.update(format="other"))
    assert info(capsys, converted) == (1, f"Error: {path} is not a reshard manifest")


def test_manifest_of_another_format_version(converted, capsys):
    path = edit_manifest(converted, lambda m: m.update(format_version=99))
    assert info(capsys, converted) == (
        1, f"Error: {path} has format version 99, this version reads 1; convert the model again with this "
           f"version's `reshard convert`")


@pytest.mark.parametrize("text", ["{not json", '{"format": "reshard", "format_version": 1}'])
def test_damaged_manifest(text, converted, capsys):
    path = converted / "manifest.json"
    path.write_text(text)
    reason = json_error(text) if text.startswith("{not") else "'groups'"
    assert info(capsys, converted) == (1, f"Error: {path} is damaged ({reason}); run `reshard convert` again")


@pytest.fixture
def quantized(tiny_checkpoints, tmp_path) -> Path:
    from reshard.convert import convert as convert_fn

    out = tmp_path / "int8"
    convert_fn(str(tiny_checkpoints["llama"]), out, quantize="int8", progress=False)
    return out


def test_quantized_groups_without_a_scheme(quantized, capsys):
    path = edit_manifest(quantized, lambda m: m.update(quantization=None))
    assert info(capsys, quantized) == (
        1, f"Error: {path}: group layers.0 has quantized tensors but the quantization scheme is None")


def test_quantized_in_a_scheme_this_version_does_not_read(quantized, capsys):
    """A folder from a newer reshard (a stored format added since) is refused at open, in one line."""
    name = "model.layers.0.mlp.down_proj.weight"
    path = edit_manifest(quantized, lambda m: m["groups"][1]["quantized"][name].update(scheme="q9_z"))
    assert info(capsys, quantized) == (
        1, f"Error: {path}: {name} is stored as 'q9_z', which this version of reshard does not read; update "
           f"reshard, or convert the model again with this version")


def test_quantized_tensor_without_its_scales(quantized, capsys):
    def drop_scales(m):
        del m["groups"][1]["tensors"]["model.layers.0.mlp.down_proj.weight.scales"]

    path = edit_manifest(quantized, drop_scales)
    assert info(capsys, quantized) == (
        1, f"Error: {path}: quantized model.layers.0.mlp.down_proj.weight lacks "
           f"model.layers.0.mlp.down_proj.weight.scales; run `reshard convert` again")


def rewrite_header(path: Path, edit) -> None:
    """Edit a layer file's header in place, keeping its length (so the file size stays)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text + b" " * (n - len(text)) + data[8 + n:])


def generate(capsys, folder) -> tuple[int, str]:
    code = runtime_main(["generate", str(folder), "--prompt", "w3 w4", "--max-new-tokens", "2", "--device", "cpu",
                         "--max-cpu-memory", "0"])
    return code, only_error(capsys.readouterr().err)


def test_layer_file_whose_header_describes_another_size(converted, capsys):
    path = converted / "layers.00000.safetensors"
    size = path.stat().st_size

    def shorten_last(header):
        last = max((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][1])
        last["data_offsets"][1] -= 4

    rewrite_header(path, shorten_last)
    assert generate(capsys, converted) == (
        1, f"Error: {path}: size is {size} bytes, header describes {size - 4}; run `reshard convert` again to "
           f"repair it")


def test_layer_file_whose_tensors_differ(converted, capsys):
    path = converted / "layers.00001.safetensors"
    rewrite_header(path, lambda h: h.update({"model.layers.1.mlp.up_proj.weighX":
                                             h.pop("model.layers.1.mlp.up_proj.weight")}))
    assert generate(capsys, converted) == (
        1, f"Error: {path}: tensors differ from the manifest (missing ['model.layers.1.mlp.up_proj.weight'], "
           f"extra ['model.layers.1.mlp.up_proj.weighX']); run `reshard convert` again to repair it")


def test_layer_file_whose_tensor_shape_differs(converted, capsys):
    path = converted / "layers.00000.safetensors"
    rewrite_header(path, lambda h: h["model.layers.0.self_attn.q_proj.weight"].update(shape=[16, 256]))
    assert generate(capsys, converted) == (
        1, f"Error: {path}: tensor model.layers.0.self_attn.q_proj.weight is F32[16, 256], manifest says "
           f"F32[64, 64]; run `reshard convert` again to repair it")


def test_runtime_names_the_first_damaged_file_and_counts_the_rest(converted, capsys):
    first, second = converted / "layers.00000.safetensors", converted / "norm.safetensors"
    first.unlink()
    second.unlink()
    assert generate(capsys, converted) == (
        1, f"Error: {first}: file is missing (1 more damaged file(s); `reshard verify` lists them); run `reshard "
           f"convert` again to repair it")


# --- OUT, the hub's layout, mixtures of experts -------------------------------------------

def test_out_that_is_a_file(tiny_checkpoints, tmp_path):
    """The CLI's OUT argument refuses a file itself (click); the library says why."""
    from reshard.convert import convert as convert_fn
    from reshard.errors import OutputInUseError

    out = tmp_path / "a-file"
    out.write_text("mine")
    with pytest.raises(OutputInUseError) as info:
        convert_fn(str(tiny_checkpoints["llama"]), out, progress=False)
    assert str(info.value) == f"{out} is a file; OUT must be a folder"
    assert out.read_text() == "mine"


def test_hub_repo_without_config(hub, tmp_path, capsys):
    del hub.files["config.json"]
    assert convert(capsys, "org/tiny", tmp_path / "out") == (
        1, "Error: org/tiny has no config.json at its top level; it is not a transformers checkpoint")


def test_expert_tensor_of_the_wrong_size(moe_converted, tmp_path, capsys):
    from reshard.format import Group, expert_tensors

    folder = tmp_path / "moe"
    shutil.copytree(moe_converted["mixtral"], folder)
    found = []

    def grow_first_expert_tensor(m):
        g = next(g for g in m["groups"] if g.get("experts"))
        name, count = next(iter(expert_tensors(Group(**g)).items()))
        g["tensors"][name]["shape"][0] = count + 1
        found.append((g["name"], name, count))

    path = edit_manifest(folder, grow_first_expert_tensor)
    [(group, name, count)] = found
    assert info(capsys, folder) == (
        1, f"Error: {path}: expert tensor {name} of group {group} is not [{count}, ...]; run `reshard convert` again")


def test_expert_conversion_that_transformers_cannot_do(moe_checkpoints, tmp_path, monkeypatch, capsys):
    from transformers.core_model_loading import WeightConverter

    def fail(self, *args, **kwargs):
        raise ValueError("shapes do not stack\nmore")

    monkeypatch.setattr(WeightConverter, "convert", fail)
    code, line = convert(capsys, moe_checkpoints["mixtral"], tmp_path / "out")
    assert code == 1
    assert re.fullmatch(r"Error: transformers' conversion of '[\w.]+' and \d+ more tensor\(s\) into '[\w.]+' failed "
                        r"\(ValueError: shapes do not stack\); is the config the one of these weights\?", line), line


def test_expert_conversion_that_makes_an_unplanned_tensor(moe_checkpoints, tmp_path, monkeypatch, capsys):
    import reshard.fusion

    real_run = reshard.fusion.Fusion.run

    def run_and_make_more(self, raw, model, dtype):
        return {**real_run(self, raw, model, dtype), "model.extra.weight": torch.zeros(1)}

    monkeypatch.setattr(reshard.fusion.Fusion, "run", run_and_make_more)
    code, line = convert(capsys, moe_checkpoints["mixtral"], tmp_path / "out")
    assert code == 1
    assert re.fullmatch(r"Error: transformers' conversion into '[\w.]+' also makes 'model.extra.weight', which is "
                        r"not a parameter of group layers\.0; this checkpoint cannot be converted", line), line


def test_low_disk_conversion_that_does_not_fit(hub, tmp_path, monkeypatch, capsys):
    """With --low-disk already asked for, the line does not suggest it."""
    import reshard.convert

    monkeypatch.setattr(reshard.diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=100_000))
    out = tmp_path / "out"
    code, line = convert(capsys, "org/tiny", out, "--low-disk")
    assert code == 1
    assert re.fullmatch(rf"Error: {re.escape(str(out))} needs about \d+\.\d\d MB more but its disk has 0\.10 MB free; "
                        rf"free some space or choose an OUT on another disk", line), line
