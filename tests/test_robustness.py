"""Conversion that never loses work, and one clear line for every mistake.

Resuming after SIGKILL and a full disk, refusing a foreign OUT, the disk check, the
low-disk hub mode, and every bad input: each asserts the exit code and the error line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import reshard.format
from reshard.cli import main as reshard_main
from runtime.cli import main as runtime_main

ROOT = Path(__file__).resolve().parents[1]


def convert(*args) -> int:
    return reshard_main(["convert", *map(str, args), "--quiet"])


def assert_same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def plant_custom_code(folder: Path, marker: Path) -> Path:
    """Make `folder`'s config need its own Python code, which touches `marker` if it ever runs."""
    (folder / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    return marker


def only_error(err: str) -> str:
    """The one `Error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- SIGKILL at several points, then resume ---------------------------------------------

# One fresh interpreter imports the converter once, then for each point in argv[3:] forks a
# child that runs `reshard convert SOURCE OUT` and SIGKILLs itself at that point: half-way through
# writing file NAME ("during:NAME"), or just before or after the rename that finishes it
# ("before:NAME" / "after:NAME"): a half-written temporary file, a whole one, a finished file not
# yet recorded. (No torch op runs before a fork: no thread pool is copied half-alive.) After each
# child, a JSON line: how it ended and what OUT then holds (file sizes, the embeddings' inode).
KILLER = """
import json, os, signal, sys
import reshard.convert, reshard.format
import transformers.models.llama.modeling_llama  # what converting the llama needs, imported once
from reshard.cli import main
source, out, points = sys.argv[1], sys.argv[2], sys.argv[3:]
def kill_at(when, name):
    def writing_it(fd):
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name + ".partial"
    real_write_at, real_copy_at, real_replace = reshard.format.write_at, reshard.format.copy_at, os.replace
    def write_at(fd, data, offset):
        if when == "during" and writing_it(fd):
            view = memoryview(data).cast("B")
            real_write_at(fd, view[: len(view) // 2], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        real_write_at(fd, data, offset)
    def copy_at(src, src_offset, nbytes, fd, offset):
        if when == "during" and writing_it(fd):
            real_copy_at(src, src_offset, nbytes // 2, fd, offset)
            os.kill(os.getpid(), signal.SIGKILL)
        real_copy_at(src, src_offset, nbytes, fd, offset)
    def replace(src, dst):
        hit = os.path.basename(dst) == name
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    reshard.format.write_at, reshard.format.copy_at, os.replace = write_at, copy_at, replace
for point in points:
    pid = os.fork()
    if pid == 0:
        kill_at(*point.split(":"))
        os._exit(main(["convert", source, out, "--quiet"]))
    _, status = os.waitpid(pid, 0)
    files = {f: os.stat(os.path.join(out, f)).st_size for f in os.listdir(out)} if os.path.isdir(out) else {}
    embed = os.path.join(out, "embed.safetensors")
    print(json.dumps({"point": point, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "files": files, "embed_inode": os.stat(embed).st_ino if os.path.exists(embed) else None}),
          flush=True)
"""


def run_killed(points: list[str], source: Path, out: Path) -> list[dict]:
    """What each point's killed conversion left (KILLER's JSON lines), in order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(source), str(out), *points],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_byte_identical(tiny_checkpoints, tmp_path, capsys):
    source = tiny_checkpoints["llama"]
    assert convert(source, tmp_path / "clean") == 0
    out = tmp_path / "out"
    points = ["before:convert-progress.json",  # OUT made, nothing recorded
              "after:layers.00000.safetensors",  # file finished, not yet recorded
              "during:layers.00001.safetensors",  # temporary file half-written
              "before:layers.00002.safetensors",  # file written to its temporary name only
              "before:manifest.json"]  # every group done, no manifest
    left = run_killed(points, source, out)
    assert [r["point"] for r in left] == points
    for r in left:
        assert r["signal"] == signal.SIGKILL, r
        assert "manifest.json" not in r["files"], r
    half = left[2]["files"]["layers.00001.safetensors.partial"]
    assert 0 < half < (tmp_path / "clean" / "layers.00001.safetensors").stat().st_size
    assert "layers.00002.safetensors.partial" in left[3]["files"]
    embed_inode = left[3]["embed_inode"]
    assert convert(source, out) == 0
    assert_same_files(out, tmp_path / "clean")
    assert (out / "embed.safetensors").stat().st_ino == embed_inode  # finished work was kept
    assert reshard_main(["verify", str(out)]) == 0


# --- a full disk ------------------------------------------------------------------------

class FullDisk:
    """Patches reshard.format's writes (of memory, and of file ranges copied by the kernel) to
    raise ENOSPC once `budget` bytes are written; the part that fits lands, as on a real disk."""

    def __init__(self, budget: int, monkeypatch):
        self.budget = budget
        real_write_at, real_copy_at = reshard.format.write_at, reshard.format.copy_at

        def write_at(fd, data, offset):
            view = memoryview(data).cast("B")
            n = self._take(len(view))
            real_write_at(fd, view[:n], offset)
            self._raise_if_short(n, len(view))

        def copy_at(src, src_offset, nbytes, fd, offset):
            n = self._take(nbytes)
            real_copy_at(src, src_offset, n, fd, offset)
            self._raise_if_short(n, nbytes)

        monkeypatch.setattr(reshard.format, "write_at", write_at)
        monkeypatch.setattr(reshard.format, "copy_at", copy_at)

    def _take(self, n: int) -> int:
        n = min(n, self.budget)
        self.budget -= n
        return n

    @staticmethod
    def _raise_if_short(done: int, wanted: int) -> None:
        if done < wanted:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_mid_way_leaves_nothing_taken_for_finished(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    source = tiny_checkpoints["llama"]
    assert convert(source, tmp_path / "clean") == 0
    out = tmp_path / "out"
    # Enough for the small files, the embeddings and layer 0; layer 1 fills the disk.
    budget = sum((tmp_path / "clean" / n).stat().st_size for n in ["embed.safetensors", "layers.00000.safetensors"])
    FullDisk(budget + 60_000, monkeypatch)
    assert convert(source, out) == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: no space left on device ({out / 'layers.00001.safetensors'}); free some space and run the "
        f"same command again to resume")
    names = {p.name for p in out.iterdir()}
    assert "layers.00001.safetensors" not in names and "manifest.json" not in names
    assert not [n for n in names if n.endswith(".partial")]  # the space was given back
    recorded = json.loads((out / "convert-progress.json").read_text())["groups"]
    assert sorted(recorded) == ["embed", "layers.0"]
    monkeypatch.undo()
    assert convert(source, out) == 0
    assert_same_files(out, tmp_path / "clean")
    assert reshard_main(["verify", str(out)]) == 0


def test_not_enough_free_disk_is_refused_before_writing(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import reshard.convert

    free = 100_000
    monkeypatch.setattr(reshard.diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=free))
    out = tmp_path / "out"
    assert convert(tiny_checkpoints["llama"], out) == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {out} needs about 0.49 MB more but its disk has 0.10 MB free; free some space or choose an OUT on "
        f"another disk (for hub sources, --low-disk keeps only one source shard)")
    assert not list(out.glob("*.safetensors"))


# --- an OUT that holds something else ---------------------------------------------------

def test_out_holding_another_model_is_refused_unless_force(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(tiny_checkpoints["qwen2"], out) == 0
    capsys.readouterr()
    assert convert(tiny_checkpoints["llama"], out) == 1
    line = only_error(capsys.readouterr().err)
    qwen2, llama = tiny_checkpoints["qwen2"].resolve(), tiny_checkpoints["llama"].resolve()
    assert re.fullmatch(  # "@" the source's fingerprint
        rf"Error: {re.escape(str(out))} holds a conversion of {re.escape(str(qwen2))} @ \w{{12}} \(float32, "
        rf"Qwen2ForCausalLM\), not of {re.escape(str(llama))} @ \w{{12}} \(float32, LlamaForCausalLM\); "
        rf"choose another folder, or pass --force to replace it", line), line
    assert (out / "head.safetensors").is_file()  # refused: nothing touched
    assert convert(tiny_checkpoints["llama"], out, "--force") == 0
    assert convert(tiny_checkpoints["llama"], tmp_path / "clean") == 0
    assert_same_files(out, tmp_path / "clean")  # qwen2's head file is gone too


def test_other_dtype_or_format_version_is_refused(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(tiny_checkpoints["llama"], out) == 0
    assert convert(tiny_checkpoints["llama"], out, "--dtype", "bfloat16") == 1
    line = only_error(capsys.readouterr().err)
    assert "(float32, LlamaForCausalLM), not of " in line and "(bfloat16, LlamaForCausalLM); choose another" in line
    manifest = json.loads((out / "manifest.json").read_text())  # a finished folder: the manifest is the record
    manifest["format_version"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert convert(tiny_checkpoints["llama"], out) == 1
    llama = tiny_checkpoints["llama"].resolve()
    assert re.fullmatch(
        rf"Error: {re.escape(str(out))} holds format version 0 \(this version writes {reshard.format.FORMAT_VERSION}"
        rf"\), not of {re.escape(str(llama))} @ \w{{12}} \(float32, LlamaForCausalLM\); choose another folder, "
        rf"or pass --force to replace it", only_error(capsys.readouterr().err))


def test_non_empty_foreign_out_is_refused(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert convert(tiny_checkpoints["llama"], out) == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {out} is not empty and holds no conversion record; choose an empty folder, or pass --force "
        f"to write into it anyway")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_interrupted_output_tells_runtime_to_resume(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import reshard.convert

    def interrupted(path, text):  # Ctrl-C just before the manifest is written
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(reshard.convert, "write_text_atomic", interrupted)
    assert convert(tiny_checkpoints["llama"], out) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert runtime_main(["generate", str(out), "--prompt", "w3", "--device", "cpu"]) == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: the conversion into {out} did not finish; run the same `reshard convert` command again to resume it")
    assert convert(tiny_checkpoints["llama"], out) == 0


# --- hub sources, fetched one shard at a time ------------------------------------------

# `fake_hub` (tests/conftest.py) serves the tiny llama as every hub repo.

def test_low_disk_fetches_one_shard_at_a_time(fake_hub, tiny_checkpoints, tmp_path):
    shards = sorted(p.name for p in tiny_checkpoints["llama"].glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert convert("org/tiny-llama", tmp_path / "plain") == 0
    assert convert("org/tiny-llama", tmp_path / "low", "--low-disk") == 0
    assert_same_files(tmp_path / "low", tmp_path / "plain")
    manifest = json.loads((tmp_path / "low" / "manifest.json").read_text())
    assert manifest["source"] == {"id": "org/tiny-llama", "revision": None,
                                  "commit": "0123456789abcdef0123456789abcdef01234567"}
    low_downloads = fake_hub.downloads[len(fake_hub.downloads) // 2:]
    assert sorted(d for d in low_downloads if d.startswith("model-")) == shards  # each shard once
    assert fake_hub.peak_shards <= 2  # a group may straddle two shards, never more
    assert not (tmp_path / ".low.download").exists()  # the work folder is gone


def test_low_disk_after_a_full_disk_refetches_only_what_is_left(fake_hub, tiny_converted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # Room for embed and layer 0 (all of shard 1's tensors); layer 1 fills the disk.
    budget = sum((tiny_converted["llama"] / n).stat().st_size for n in ["embed.safetensors", "layers.00000.safetensors"])
    with monkeypatch.context() as patch:
        FullDisk(budget + 60_000, patch)
        assert convert("org/tiny-llama", out, "--low-disk") == 1
    assert "no space left on device" in only_error(capsys.readouterr().err)
    fake_hub.downloads.clear()
    assert convert("org/tiny-llama", out, "--low-disk") == 0
    assert reshard_main(["verify", str(out)]) == 0
    assert "model-00001-of-00003.safetensors" not in fake_hub.downloads  # its groups were kept
    assert "model-00002-of-00003.safetensors" in fake_hub.downloads
    assert not (tmp_path / ".out.download").exists()


def test_low_disk_needs_a_hub_source(tiny_checkpoints, tmp_path, capsys):
    assert convert(tiny_checkpoints["llama"], tmp_path / "out", "--low-disk") == 2
    assert only_error(capsys.readouterr().err) == (
        f"Error: --low-disk is for hub repo ids; {tiny_checkpoints['llama']} is a local path, convert it "
        f"without --low-disk")


# Hub errors (missing, gated, revision, unreachable): tests/test_hub.py.


# --- bad local sources ------------------------------------------------------------------

def single_file_checkpoint(tiny_checkpoints, folder: Path) -> Path:
    """The tiny llama as one model.safetensors (to edit), with its config and tokenizer."""
    src = tiny_checkpoints["llama"]
    folder.mkdir()
    tensors = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copyfile(src / name, folder / name)
    return folder


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_source(tmp_path, capsys):
    assert convert(tmp_path / "nowhere", tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {tmp_path / 'nowhere'} does not exist; give a checkpoint folder, a .gguf file or a hub repo id")


def test_unreadable_source_folder(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import reshard.source

    # Tests run as root here, where chmod cannot take read access away: ask os.access instead.
    monkeypatch.setattr(reshard.source.os, "access", lambda path, mode: False)
    assert convert(tiny_checkpoints["llama"], tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == f"Error: {tiny_checkpoints['llama']} is not readable"


def test_unreadable_weights_file(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file
    assert convert(folder, tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {folder / 'model.safetensors'} is not a readable safetensors file (header length is out of "
        f"range); download it again")
    assert not (tmp_path / "out").exists()


def test_folder_without_weights(tiny_checkpoints, tmp_path, capsys):
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copyfile(tiny_checkpoints["llama"] / "config.json", folder / "config.json")
    assert convert(folder, tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {folder} holds no weights (model.safetensors, pytorch_model.bin or their .index.json); point "
        f"SOURCE at a checkpoint folder, a .gguf file or a hub repo id")


def test_config_transformers_cannot_load(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 64}))
    assert convert(folder, tmp_path / "out") == 1
    line = only_error(capsys.readouterr().err)
    assert line.startswith(f"Error: transformers cannot read the config of {folder}: ")
    assert "no-such-model" in line


@pytest.mark.parametrize("config, message", [
    (dict(model_type="bert", vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=112),
     "Error: model type 'bert' is an encoder (is_decoder is false, no causal attention); only decoder-only "
     "causal LMs can be converted"),
    (dict(model_type="t5", vocab_size=320, d_model=64, num_layers=2, num_heads=4, d_ff=112, d_kv=16),
     "Error: model type 't5' is an encoder-decoder model; only decoder-only causal LMs can be converted"),
    (dict(model_type="vit", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112),
     None),  # no causal LM at all: transformers' own reason
])
def test_not_a_decoder_only_causal_lm(config, message, tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    (folder / "config.json").write_text(json.dumps(config))
    assert convert(folder, tmp_path / "out") == 1
    line = only_error(capsys.readouterr().err)
    if message:
        assert line == message
    else:
        assert line.startswith("Error: transformers cannot build a causal language model for model type 'vit': ")
    assert not (tmp_path / "out").exists()


def test_shard_index_pointing_outside_is_refused(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    keys = list(load_file(outside))
    index = {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert(folder, tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {folder / 'model.safetensors.index.json'} points outside {folder} ('../outside.safetensors'); "
        f"refusing to read it")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "Error: the checkpoint lacks 1 tensor(s) the model needs, e.g. 'model.layers.1.mlp.up_proj.weight'; is the "
     "config the one of these weights?"),
    (lambda t: t.__setitem__("model.layers.1.mlp.extra.weight", torch.zeros(3)),
     "Error: the checkpoint has 1 tensor(s) the model does not use, e.g. 'model.layers.1.mlp.extra.weight'; is "
     "the config the one of these weights?"),
    (lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(100, 64)),
     "Error: tensor model.layers.2.mlp.up_proj.weight has shape [100, 64] but the config needs [112, 64]; is the "
     "config the one of these weights?"),
])
def test_missing_unexpected_or_misshapen_tensor(edit, message, tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    edit_tensors(folder, edit)
    assert convert(folder, tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == message
    assert not (tmp_path / "out").exists()  # found before a byte is written


# --- safety -----------------------------------------------------------------------------

class Payload:
    """A pickle that would create a file when loaded by a plain `torch.load`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_bin_is_refused_and_nothing_runs(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**state, "model.norm.weight": Payload(marker)}, folder / "pytorch_model.bin")
    assert convert(folder, tmp_path / "out") == 1
    line = only_error(capsys.readouterr().err)
    assert line.startswith(f"Error: {folder / 'pytorch_model.bin'} cannot be read safely as weights (")
    assert not marker.exists()


def test_custom_code_needs_trust_remote_code(tiny_checkpoints, tmp_path, capsys):
    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    marker = plant_custom_code(folder, tmp_path / "pwned")
    assert convert(folder, tmp_path / "out") == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {folder} needs its own Python code to load; pass --trust-remote-code if you trust it")
    assert not marker.exists()


# --- the runtime's bad inputs -----------------------------------------------------------

def test_prompt_longer_than_the_context(tiny_converted, capsys):
    prompt = " ".join(f"w{3 + i % 300}" for i in range(140))  # max_position_embeddings is 128
    rc = runtime_main(["generate", str(tiny_converted["llama"]), "--prompt", prompt, "--device", "cpu",
                       "--max-new-tokens", "4", "--max-cpu-memory", "0"])
    assert rc == 2
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tiny_converted["llama"])(prompt)["input_ids"]) + 4
    assert only_error(capsys.readouterr().err) == (
        f"Error: prompt plus --max-new-tokens is {n} tokens, more than the model's context of 128; shorten the "
        f"prompt or lower --max-new-tokens")


@pytest.mark.parametrize("option, message", [
    (["--device", "tpu"], "Error: unknown device 'tpu'; use cpu, cuda or cuda:N"),
    (["--device", "mps"], "Error: device 'mps' is not supported; use cpu, cuda or cuda:N"),
    (["--dtype", "float8"], "Error: unknown dtype 'float8'; use auto, float16, bfloat16 or float32"),
])
def test_unknown_device_or_dtype(option, message, tiny_converted, capsys):
    rc = runtime_main(["generate", str(tiny_converted["llama"]), "--prompt", "w3", *option])
    assert rc == 2
    assert only_error(capsys.readouterr().err) == message


def test_bad_flags_are_usage_errors(tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reshard_main(["convert", str(tiny_checkpoints["llama"]), str(tmp_path / "out"), "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    from reshard.errors import SourceError

    monkeypatch.setenv("RESHARD_DEBUG", "1")
    with pytest.raises(SourceError, match="does not exist"):
        reshard_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
