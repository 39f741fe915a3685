"""Batched generation equals transformers' own `generate` on the source checkpoint, one prompt at
a time (greedy, float32); prompt lookup and assistant decoding equal plain greedy, in fewer
passes; each streamed and resident."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, assert_placed, cli_placement, open_placed, word_tokenizer
from reshard.format import read_manifest
from runtime.batch import eos_ids, generate_batch, load_assistant, pad_id, prompt_ids
from runtime.cli import main as runtime_main

GREEDY = dict(do_sample=False, max_new_tokens=12)
COPY_PROMPT = ("Repeat the following text exactly.\n\nText: The old lighthouse keeper climbed the stairs every "
               "evening, lit the lamp, and watched the ships pass the rocky coast until dawn.\n\nRepeated text:")


# A prompt generated alone gives transformers' logits bit for bit. The CPU's one-row products
# (decode steps, the last position's head) round by the weight's address alignment: every weight
# lies 64-byte aligned in our files (reshard.format._ordered), as in a fresh allocation, while
# transformers' own load leaves weights in place in its safetensors map at whatever offset the
# checkpoint has (so the same checkpoint sharded otherwise gives other bits in transformers too).
# The reference's weights are therefore moved to fresh memory (`fresh`). Batched, left padding
# changes sums' order: those are transformers' up to float32 rounding, relative to the largest
# logit (measured: up to 2e-6 on SmolLM2, 4e-7 on the tiny models).
LOGITS_RTOL = 1e-5


def fresh(model):
    """`model` with every parameter and buffer copied into fresh (aligned) memory."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


def transformers_greedy(ref, ids: list[int], *, pad: int, eos: list[int], max_new_tokens: int, **kwargs):
    """(new tokens up to the first end-of-sequence token, their logits) from transformers' own
    `generate` on one prompt."""
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=max_new_tokens, pad_token_id=pad, return_dict_in_generate=True,
                       output_logits=True, **kwargs)
    new = out.sequences[0, len(ids):].tolist()
    n = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
    return new[:n], torch.stack([step[0] for step in out.logits[:n]])


def assert_same_as_transformers(model, ref, prompts, *, chat=False, exact_alone=True, **kwargs):
    """Each prompt's tokens, batched and alone, are transformers' on that prompt alone; its logits
    alone are transformers' bit for bit (where `exact_alone`), batched up to float32 rounding
    (LOGITS_RTOL)."""
    together = generate_batch(model, prompts, chat=chat, keep_logits=True, **kwargs)
    for prompt, got in zip(prompts, together):
        ids = prompt_ids(model.tokenizer, prompt, chat=chat)
        want, want_logits = transformers_greedy(ref, ids, pad=pad_id(model), eos=eos_ids(model), **kwargs)
        [alone] = generate_batch(model, [prompt], chat=chat, keep_logits=True, **kwargs)
        assert got.prompt == prompt
        assert got.tokens == alone.tokens == want, prompt
        assert got.text == alone.text == model.tokenizer.decode(want, skip_special_tokens=True)
        scale = want_logits.abs().max().item()
        for logits in (alone.logits, got.logits):
            assert (logits - want_logits).abs().max().item() <= LOGITS_RTOL * scale, prompt
        if exact_alone:
            assert torch.equal(alone.logits, want_logits), prompt
    return together


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_transformers_tiny(arch, placement, tiny_checkpoints, tiny_converted):
    model = open_placed(tiny_converted[arch], placement)
    model.tokenizer = word_tokenizer(tiny_converted[arch])
    ref = fresh(AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=torch.float32).eval())
    prompts = ["w5 w6 w7", "w20 w21 w22 w23 w24 w25 w26 w27 w28", "w40", "w100 w101 w102 w100"]
    done = assert_same_as_transformers(model, ref, prompts, **GREEDY)
    assert len({tuple(g.tokens) for g in done}) > 1  # the prompts lead somewhere different
    assert_placed(model.stats, placement, len(model.groups))
    model.close()


def test_batched_generation_equals_transformers_smollm2(placement, small_smollm2_checkpoint, small_smollm2_converted):
    """SmolLM2's tokenizer, chat template and first 2 layers: prompts of different lengths, left padded."""
    model = open_placed(small_smollm2_converted, placement, dtype="float32")
    ref = fresh(AutoModelForCausalLM.from_pretrained(small_smollm2_checkpoint, dtype=torch.float32).eval())
    prompts = ["What is the capital of France?", "Write a haiku about the sea in winter, please.", "Hi!"]
    done = assert_same_as_transformers(model, ref, prompts, chat=True, **GREEDY)
    assert len({g.text for g in done}) == 3 and all(len(g.tokens) > 2 for g in done)
    assert_placed(model.stats, placement, len(model.groups))
    model.close()


def test_batch_is_one_pass_per_token(placement, tiny_converted):
    model = open_placed(tiny_converted["llama"], placement)
    generate_batch(model, ["w5 w6", "w7 w8 w9", "w10"], min_new_tokens=12, **GREEDY)
    assert model.stats.passes == 12  # the prompt pass plus 11: every pass serves all three
    assert_placed(model.stats, placement, 12 * len(model.groups))
    model.close()


# A prompt that random tiny models continue by copying (greedy decoding repeats itself), so
# prompt lookup finds its n-grams: the case it speeds up.
LOOP_PROMPT = "w5 w6 w7 w5 w6 w7"


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup_and_assistant_equal_greedy_tiny(arch, placement, tiny_checkpoints, tiny_converted):
    """Prompt lookup and an assistant (the model itself, so every draft is accepted) give plain
    greedy's tokens exactly, in fewer passes."""
    model = open_placed(tiny_converted[arch], placement)
    model.tokenizer = word_tokenizer(tiny_converted[arch])
    kwargs = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12)
    [plain] = generate_batch(model, [LOOP_PROMPT], **kwargs)
    assert model.stats.passes == len(plain.tokens) == 12
    drafts = {"prompt_lookup_num_tokens": 4,
              "assistant_model": load_assistant(tiny_checkpoints[arch], device=model.device, dtype=torch.float32)}
    for name, value in drafts.items():
        model.stats.passes = 0
        [fast] = generate_batch(model, [LOOP_PROMPT], **kwargs, **{name: value})
        assert fast.tokens == plain.tokens, name
        assert model.stats.passes < 12, name
    assert_placed(model.stats, placement, len(model.groups))
    model.close()


@pytest.mark.slow
def test_prompt_lookup_and_assistant_equal_greedy_in_fewer_passes(smollm2_checkpoint, smollm2_converted):
    """The real model (it copies the text: the case these methods speed up), streamed; the tiny
    models above cover both placements."""
    placement = "streamed"
    model = open_placed(smollm2_converted, placement)
    kwargs = dict(chat=True, do_sample=False, max_new_tokens=24)
    [plain] = generate_batch(model, [COPY_PROMPT], **kwargs)
    assert model.stats.passes == len(plain.tokens)
    assert "lighthouse keeper" in plain.text  # it does copy: the case these methods speed up
    drafts = {"prompt_lookup_num_tokens": 10,
              "assistant_model": load_assistant(smollm2_checkpoint, device=model.device, dtype=torch.float32)}
    for name, value in drafts.items():
        model.stats.passes = 0
        [fast] = generate_batch(model, [COPY_PROMPT], **kwargs, **{name: value})
        assert fast.tokens == plain.tokens, name
        assert model.stats.passes < len(fast.tokens) / 2, name
    assert_placed(model.stats, placement, len(model.groups))
    model.close()


def test_assistant_from_converted_folder_equals_transformers(tiny_checkpoints, tiny_converted):
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()
    draft = load_assistant(tiny_converted["llama"], device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(draft(ids).logits, ref(ids).logits)
    assert draft.lm_head.weight is draft.model.embed_tokens.weight or torch.equal(
        draft.lm_head.weight, draft.model.embed_tokens.weight)


def test_cli_prompts_file(placement, tiny_converted, tmp_path, capsys):
    folder = tiny_converted["llama"]
    prompts = [{"prompt": "w5 w6 w7", "id": 1}, {"prompt": "w9 w10 w11 w12 w13", "id": 2}, {"prompt": "w3", "id": 3}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    code = runtime_main(["generate", str(folder), "--prompts-file", str(path), "--max-new-tokens", "6",
                         "--device", "cpu", "--stats", *cli_placement(placement)])
    out, err = capsys.readouterr()
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    want = generate_batch(open_placed(folder, "streamed"), [p["prompt"] for p in prompts],
                          max_new_tokens=6, do_sample=False)
    assert [ln["id"] for ln in lines] == [1, 2, 3]
    assert [ln["completion"] for ln in lines] == [w.text for w in want]
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["passes"] == 6 and stats["new_tokens"] == sum(len(w.tokens) for w in want)
    assert_placed(stats, placement, 6 * len(read_manifest(folder).groups))


def test_cli_prompts_file_text_lines_and_errors(tiny_converted, tmp_path, capsys):
    folder = str(tiny_converted["llama"])
    path = tmp_path / "p.txt"
    path.write_text("w5 w6\n\nw7 w8 w9\n")
    args = ["generate", folder, "--prompts-file", str(path), "--device", "cpu", *cli_placement("streamed")]
    assert runtime_main(args + ["--max-new-tokens", "3"]) == 0
    assert [json.loads(ln)["prompt"] for ln in capsys.readouterr().out.splitlines()] == ["w5 w6", "w7 w8 w9"]
    code = runtime_main(args + ["--prompt-lookup", "3"])
    assert code == 2  # a usage error
    assert capsys.readouterr().err.strip() == ("Error: --prompt-lookup and --assistant work on one prompt at a "
                                               "time; drop --prompts-file")


def test_cli_prompt_lookup_fewer_passes(placement, tiny_converted, capsys):
    # Random weights make greedy decoding repeat itself, which prompt lookup can copy.
    args = ["generate", str(tiny_converted["gpt2"]), "--prompt", LOOP_PROMPT, "--max-new-tokens", "12",
            "--min-new-tokens", "12", "--device", "cpu", "--stats", *cli_placement(placement)]
    assert runtime_main(args) == 0
    plain_out, plain_err = capsys.readouterr()
    assert runtime_main(args + ["--prompt-lookup", "4"]) == 0
    out, err = capsys.readouterr()
    assert out == plain_out
    plain, fast = json.loads(plain_err.splitlines()[-1]), json.loads(err.splitlines()[-1])
    assert plain["passes"] == plain["new_tokens"] == fast["new_tokens"] == 12
    assert fast["passes"] < 12
    assert_placed(fast, placement, fast["passes"] * len(read_manifest(tiny_converted["gpt2"]).groups))


@pytest.mark.parametrize("draft", ["checkpoint", "converted"])
def test_cli_assistant_same_text_fewer_passes(draft, placement, tiny_checkpoints, tiny_converted, capsys):
    # The model as its own draft: every proposed token is accepted, so passes drop the most.
    folders = {"checkpoint": tiny_checkpoints["llama"], "converted": tiny_converted["llama"]}
    args = ["generate", str(tiny_converted["llama"]), "--prompt", "w5 w6 w7", "--max-new-tokens", "12",
            "--min-new-tokens", "12", "--device", "cpu", "--stats", *cli_placement(placement)]
    assert runtime_main(args) == 0
    plain_out, _ = capsys.readouterr()
    assert runtime_main(args + ["--assistant", str(folders[draft])]) == 0
    out, err = capsys.readouterr()
    assert out == plain_out
    stats = json.loads(err.splitlines()[-1])
    assert stats["new_tokens"] == 12 and stats["passes"] < 12
    assert_placed(stats, placement, stats["passes"] * len(read_manifest(tiny_converted["llama"]).groups))


def test_cli_assistant_errors(tiny_converted, tmp_path, capsys):
    args = ["generate", str(tiny_converted["llama"]), "--prompt", "w5", "--max-new-tokens", "4", "--device", "cpu",
            *cli_placement("streamed")]
    assert runtime_main(args + ["--assistant", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"Error: assistant {tmp_path} is neither a converted folder nor a "
                                               f"transformers checkpoint folder")
    assert runtime_main(args + ["--assistant", str(tmp_path), "--prompt-lookup", "2"]) == 2
    assert capsys.readouterr().err.strip() == "Error: --prompt-lookup and --assistant cannot be combined; pick one"
