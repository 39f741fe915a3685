"""`runtime`'s error lines that no other test module asserts: bad prompts, options, input files,
folders without a tokenizer. Each test asserts the exit code and the whole `Error:` line;
tests/test_errors.py lists every message with the test that asserts it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import cli_placement, open_placed
from runtime.cli import main as runtime_main
from test_errors_convert import json_error
from test_robustness import only_error

USAGE = 2  # the exit code of a usage error (UsageError)


def run(capsys, *argv) -> tuple[int, str]:
    """(exit code, the one `Error:` line) of `runtime ARGV` on the CPU, streamed."""
    code = runtime_main([*map(str, argv), "--device", "cpu", *cli_placement("streamed")])
    return code, only_error(capsys.readouterr().err)


@pytest.fixture
def llama(tiny_converted) -> str:
    return str(tiny_converted["llama"])


@pytest.fixture
def no_tokenizer(tiny_converted, tmp_path) -> Path:
    """The converted tiny llama without its tokenizer files."""
    out = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_converted["llama"], out)
    for f in out.glob("*token*"):
        f.unlink()
    return out


# --- generate ---------------------------------------------------------------------------

def test_empty_prompt(llama, capsys):
    assert run(capsys, "generate", llama, "--prompt", "") == (USAGE, "Error: empty prompt; pass --prompt TEXT or "
                                                                     "text on stdin")


def test_chat_without_a_chat_template(llama, tmp_path, capsys):
    want = (USAGE, "Error: this tokenizer has no chat template; drop --chat")
    assert run(capsys, "generate", llama, "--prompt", "w5", "--chat") == want
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5\nw6\n")
    assert run(capsys, "generate", llama, "--prompts-file", prompts, "--chat") == want  # batched path


def test_folder_without_tokenizer(no_tokenizer, tmp_path, capsys):
    want = (USAGE, "Error: this folder has no tokenizer files; convert a checkpoint that has them")
    assert run(capsys, "generate", no_tokenizer, "--prompt", "w5") == want
    prompts = tmp_path / "p.txt"
    prompts.write_text("w5\nw6\n")
    assert run(capsys, "generate", no_tokenizer, "--prompts-file", prompts) == want
    items = tmp_path / "in.jsonl"
    items.write_text('{"text": "w5 w6"}\n')
    assert run(capsys, "score", no_tokenizer, items, "--output", tmp_path / "o.jsonl") == want


def test_library_checks_of_values_the_cli_rejects_first(tiny_converted):
    """click refuses these flags' bad values itself (tests/test_cli.py); the library says its own line."""
    from reshard.errors import UsageError
    from runtime import LayeredModel, distributed

    folder = tiny_converted["llama"]
    cases = [
        (lambda: LayeredModel.from_pretrained(folder, device="cpu", prefetch=-1, max_cpu_memory=0),
         "prefetch must be 0 or more, not -1"),
        (lambda: open_placed(folder, "streamed").score([{"text": "w5"}], batch_size=0),
         "batch size must be 1 or more, not 0"),
        (lambda: distributed.generate_items([{"text": "w5"}], folder, workers=1), 'every item needs a "prompt" string'),
        (lambda: distributed.generate_items([{"prompt": "w5"}], folder, workers=0),
         "--ray-workers must be 1 or more, not 0"),
        (lambda: distributed.generate_items([{"prompt": "w5"}], folder, workers=1, block_size=0),
         "--ray-block-size must be 1 or more, not 0"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError) as info:
            call()
        assert str(info.value) == message


def test_cuda_asked_for_without_cuda(llama, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = runtime_main(["generate", llama, "--prompt", "w5", "--device", "cuda", "--max-gpu-memory", "0"])
    assert (code, only_error(capsys.readouterr().err)) == (
        USAGE, "Error: device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu (or leave it out)")


@pytest.mark.parametrize("text, line", [
    ("", "Error: {path} holds no prompts"),
    ('{"prompt": "w5"}\n{"text": "w6"}\n', 'Error: {path} line 2 has no "prompt" string'),
    ('{"prompt": "w5"}\n{"prompt": \n', "Error: {path} line 2 is not valid JSON ({reason})"),
])
def test_bad_prompts_file(text, line, llama, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    reason = json_error('{"prompt": ') if "valid JSON" in line else ""
    assert run(capsys, "generate", llama, "--prompts-file", path) == (USAGE, line.format(path=path, reason=reason))


def test_assistant_folder_missing_weights(llama, tiny_converted, tmp_path, capsys):
    draft = tmp_path / "draft"
    shutil.copytree(tiny_converted["llama"], draft)
    manifest = json.loads((draft / "manifest.json").read_text())
    manifest["groups"] = [g for g in manifest["groups"] if g["name"] != "norm"]
    (draft / "manifest.json").write_text(json.dumps(manifest))
    assert run(capsys, "generate", llama, "--prompt", "w5", "--max-new-tokens", "2", "--assistant", draft) == (
        USAGE, f"Error: assistant {draft} lacks weights for ['model.norm.weight']; convert it again")


# --- score ------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, argv, line", [
    (['{"text": "w5"}', '["w5"]'], [], "Error: item 2 is not a JSON object"),
    (['{"text": 5}'], [], 'Error: item 1: "text" must be a string'),
    (['{"text": "' + " ".join(["w5"] * 130) + '"}'], [],
     "Error: item 1 is 130 tokens, more than the model's context of 128; shorten it"),
])
def test_bad_score_items(lines, argv, line, llama, tmp_path, capsys):
    items = tmp_path / "in.jsonl"
    items.write_text("".join(ln + "\n" for ln in lines))
    assert run(capsys, "score", llama, items, "--output", tmp_path / "o.jsonl", *argv) == (USAGE, line)
    assert not (tmp_path / "o.jsonl").exists()
