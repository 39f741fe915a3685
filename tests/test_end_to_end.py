"""The core promise: a converted model computes exactly what transformers computes, whether its
weights stream from the files on every pass or stay resident (each test runs both placements)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ARCHS, CLI_ARCHS, assert_placed, cli_placement, open_placed
from reshard.format import read_manifest
from runtime.cli import main as runtime_main


def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers(arch, placement, tiny_checkpoints, tiny_converted):
    ref = reference(tiny_checkpoints[arch])
    model = open_placed(tiny_converted[arch], placement)
    ids = torch.randint(3, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    for _ in range(2):  # the second pass runs on what the first left behind (prefetch, resident weights)
        got = model(ids).logits
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    assert_placed(model.stats, placement, len(model.groups))
    model.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_transformers(arch, placement, tiny_checkpoints, tiny_converted):
    ref = reference(tiny_checkpoints[arch])
    model = open_placed(tiny_converted[arch], placement)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kwargs)
    got = model.generate(ids, **kwargs)
    assert got.shape[1] == ids.shape[1] + 16
    assert torch.equal(got, want)
    # One pass over the prompt, then one per new token: the KV cache is used, not re-computed.
    assert model.stats.passes == 16
    assert_placed(model.stats, placement, 16 * len(model.groups))
    model.close()


@pytest.mark.parametrize("arch", CLI_ARCHS)
def test_cli_generate_equals_transformers(arch, placement, tiny_checkpoints, tiny_converted, capsys):
    ref = reference(tiny_checkpoints[arch])
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[arch])
    prompt = "w5 w17 w42 w99 w7"
    ids = tok(prompt, return_tensors="pt").input_ids
    want = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    want_text = tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)

    code = runtime_main(["generate", str(tiny_converted[arch]), "--prompt", prompt, "--device", "cpu",
                         "--max-new-tokens", "16", "--min-new-tokens", "16", "--stats", *cli_placement(placement)])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == want_text + "\n"
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["new_tokens"] == 16
    assert stats["passes"] == 16
    assert_placed(stats, placement, 16 * len(read_manifest(tiny_converted[arch]).groups))


def test_groups_follow_the_model(tiny_converted):
    gpt2 = read_manifest(tiny_converted["gpt2"])
    names = [g.name for g in gpt2.groups]
    assert names == ["embed", "layers.0", "layers.1", "layers.2", "norm", "head"]
    assert set(gpt2.group("embed").tensors) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert gpt2.layers_path == "transformer.h"
    # Tied head: no bytes of its own, it reads the embedding's tensor.
    assert gpt2.group("head").file is None
    assert gpt2.group("head").aliases == {"lm_head.weight": "transformer.wte.weight"}
    qwen = read_manifest(tiny_converted["qwen2"])
    assert set(qwen.group("head").tensors) == {"lm_head.weight"}


def test_checkpoint_names_are_mapped_to_the_models(tmp_path, tiny_checkpoints):
    """A checkpoint saved without the base-model prefix (as gpt2's own is) converts like transformers loads it."""
    from safetensors.torch import load_file, save_file

    from reshard.convert import convert

    src = tmp_path / "legacy"
    src.mkdir()
    for f in tiny_checkpoints["gpt2"].iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            (src / f.name).write_bytes(f.read_bytes())
    ref = reference(tiny_checkpoints["gpt2"])
    state = {}
    for name, t in ref.state_dict().items():
        if name.startswith("lm_head"):
            continue
        state[name.removeprefix("transformer.")] = t.contiguous()
    save_file(state, src / "model.safetensors")
    convert(str(src), tmp_path / "out", progress=False)
    model = open_placed(tmp_path / "out", "streamed")
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        want = reference(src)(ids).logits
        assert torch.equal(want, ref(ids).logits)
        assert torch.equal(model(ids).logits, want)
    assert "transformer.ln_f.weight" in load_file(tmp_path / "out" / "norm.safetensors")


def test_bin_checkpoint_converts(tmp_path, tiny_checkpoints):
    from reshard.convert import convert

    ref = reference(tiny_checkpoints["llama"])
    src = tmp_path / "bin"
    ref.save_pretrained(src, safe_serialization=False) if _supports_bin() else _save_bin(ref, src)
    assert not list(src.glob("*.safetensors"))
    convert(str(src), tmp_path / "out", progress=False)
    model = open_placed(tmp_path / "out", "streamed")
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _supports_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(model, folder):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save({k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"},
               folder / "pytorch_model.bin")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_checkpoint):
    """transformers' own SmolLM2, its chat prompt, and its greedy continuation (computed once)."""
    ref = reference(smollm2_checkpoint)
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = ref(ids).logits
    tokens = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    return ids, logits, tokens, tok.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_equals_transformers(placement, smollm2_reference, smollm2_converted):
    ids, want_logits, want_tokens, want_text = smollm2_reference
    model = open_placed(smollm2_converted, placement)
    assert torch.equal(model(ids).logits, want_logits)
    assert torch.equal(model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False), want_tokens)
    assert_placed(model.stats, placement, len(model.groups))
    model.close()

    if placement == "resident":
        return  # the command line's placement flags: test_batch's test_cli_prompts_file, on a tiny model
    # The real entry point, as a user runs it.
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "generate", str(smollm2_converted), "--chat", "--device", "cpu",
         "--max-new-tokens", "16", "--min-new-tokens", "16", "--stats", *cli_placement(placement)],
        input="Name three colours.", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want_text + "\n"
    assert_placed(json.loads(proc.stderr.strip().splitlines()[-1]), placement, len(model.groups))
