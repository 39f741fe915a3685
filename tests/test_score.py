"""Scoring: equals transformers' own log-probabilities, and reads every layer once."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, assert_placed, cli_placement, open_placed, word_tokenizer
from reshard.errors import UsageError
from runtime.cli import main as runtime_main
from runtime.score import encode_pair

TOL = 1e-4

ITEMS = [  # prompts of several lengths (padding), choices of several lengths, texts between them
    {"prompt": "w5 w6 w7", "choices": [" w8", " w9 w10", " w11 w12 w13 w14"], "id": "a"},
    {"prompt": "w20 w21 w22 w23 w24 w25 w26 w27 ", "choices": ["w30 w31", "w40"]},  # trailing space moves
    {"text": "w3 w4 w5 w6 w7 w8 w9"},
    {"prompt": "w50", "choices": [" w51 w52 w53 w54 w55", " w56"]},
    {"text": "w100 w101"},
    {"prompt": "w60 w61 w62 w63", "choices": [" w64", " w65", " w66", " w67 w68"]},
    {"prompt": "", "choices": ["w70 w71", "w72"]},  # empty prompt: conditioned on end-of-text
]


def reference_scores(ref, tok, items) -> list[dict]:
    """The lm-evaluation-harness definition, one unpadded full forward per choice."""

    def logprob(ctx, cont):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = ref(ids).logits.float().log_softmax(-1)[0]
        return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))

    out = []
    for item in items:
        if "text" in item:
            ids = tok(item["text"], add_special_tokens=False)["input_ids"]
            out.append({"logprob": logprob(ids[:1], ids[1:]), "tokens": len(ids) - 1})
        else:
            out.append({"scores": [logprob(*encode_pair(tok, item["prompt"], c)) for c in item["choices"]]})
    return out


def assert_close(got: list[dict], want: list[dict], items: list[dict]) -> None:
    assert len(got) == len(items)
    for g, w, item in zip(got, want, items):
        assert {k: g[k] for k in item} == item  # input keys pass through
        if "text" in item:
            assert g["tokens"] == w["tokens"]
            assert abs(g["logprob"] - w["logprob"]) < TOL
        else:
            assert len(g["scores"]) == len(w["scores"])
            assert max(abs(a - b) for a, b in zip(g["scores"], w["scores"])) < TOL
            assert g["best"] == max(range(len(w["scores"])), key=w["scores"].__getitem__)


def open_tiny(folder, placement: str = "streamed"):
    model = open_placed(folder, placement)
    model.tokenizer = word_tokenizer(folder)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_score_equals_transformers(arch, placement, tiny_checkpoints, tiny_converted):
    """Streamed, every layer is read once for all micro-batches; resident, none is read, and
    scoring still schedules the micro-batches group by group."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=torch.float32).eval()
    model = open_tiny(tiny_converted[arch], placement)
    got = model.score(ITEMS, batch_size=2)
    assert_close(got, reference_scores(ref, model.tokenizer, ITEMS), ITEMS)
    # 4 question and 1 text micro-batches, one pass
    assert model.stats.layer_loads == (len(model.groups) if placement == "streamed" else 0)
    assert_placed(model.stats, placement, len(model.groups))
    assert model.stats.passes == 1
    model.close()


@pytest.mark.parametrize("arch", ["qwen2-sliding", "gemma2"])
def test_score_sliding_window_layers_equal_transformers(arch, placement, tmp_path):
    """Sliding-window layers (a window of 4, shorter than the prompts) mixed with full ones: the
    prompts' KV handed to the choices must carry the window's bookkeeping too."""
    import transformers as tf

    from conftest import TINY, save_tiny_tokenizer
    from reshard.convert import convert

    config = (tf.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)
              if arch == "qwen2-sliding" else tf.Gemma2Config(**TINY, head_dim=16, sliding_window=4))
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    save_tiny_tokenizer(tmp_path / "src", TINY["vocab_size"])
    convert(str(tmp_path / "src"), tmp_path / "out", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    assert "sliding_attention" in ref.config.layer_types and "full_attention" in ref.config.layer_types
    model = open_tiny(tmp_path / "out", placement)
    assert_close(model.score(ITEMS, batch_size=2), reference_scores(ref, model.tokenizer, ITEMS), ITEMS)
    assert_placed(model.stats, placement, len(model.groups))


def test_many_micro_batches_read_each_layer_once(tiny_converted):
    model = open_tiny(tiny_converted["llama"])
    items = [{"prompt": f"w{5 + n} w{9 + n}", "choices": [f" w{n + 3}", " w7 w8"]} for n in range(12)]
    items += [{"text": f"w{n + 3} w4 w{n + 5}"} for n in range(6)]
    one_each = model.score(items, batch_size=1)  # 12 prompt + 12 choice + 6 text forwards
    assert model.stats.layer_loads == len(model.groups)
    assert set(model.stats.per_group_loads.values()) == {1}
    together = open_tiny(tiny_converted["llama"]).score(items, batch_size=len(items))
    for a, b in zip(one_each, together):
        for key in ("scores", "logprob"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=TOL)


def test_shared_prompt_is_computed_once(tiny_converted):
    model = open_tiny(tiny_converted["qwen2"])
    shapes = []
    first_layer = model.model.get_submodule(model.manifest.layers_path)[0]
    first_layer.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape[:2])))
    item = {"prompt": " ".join(f"w{n}" for n in range(10, 30)), "choices": [" w3", " w4", " w5", " w6 w7"]}
    model.score([item])
    assert shapes == [(1, 20), (4, 2)]  # the 20 prompt tokens once; then 4 choices of up to 2 tokens


@pytest.mark.slow
def test_score_smollm2_equals_transformers(smollm2_checkpoint, smollm2_converted):
    """The real model, streamed (the tiny models cover both placements): it must prefer the right answers."""
    placement = "streamed"
    ref = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    model = open_placed(smollm2_converted, placement)
    items = [
        {"prompt": "The capital of France is", "choices": [" Paris", " a banana", " Berlin, the capital of Germany"]},
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"prompt": "2 + 2 =", "choices": [" 4", " 5"]},
    ]
    got = model.score(items, batch_size=2)
    assert_close(got, reference_scores(ref, model.tokenizer, items), items)
    assert (got[0]["best"], got[2]["best"]) == (0, 0)  # Paris; 4
    assert model.stats.layer_loads == (len(model.groups) if placement == "streamed" else 0)


def test_cli_score(placement, tiny_converted, tmp_path, capsys):
    folder = tiny_converted["gpt2"]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    code = runtime_main(["score", str(folder), str(src), "--output", str(dst), "--batch-size", "1",
                         "--device", "cpu", "--stats", *cli_placement(placement)])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip() == str(dst)
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert_close(got, open_tiny(folder).score(ITEMS), ITEMS)
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["passes"] == 1 and stats["items"] == len(ITEMS)
    assert stats["layer_loads"] == (stats["groups"] if placement == "streamed" else 0)
    assert_placed(stats, placement, stats["groups"])
    assert "layers" not in err  # the progress bar over layers shows only on a terminal (tests/test_progress.py)


def test_cli_score_bad_lines(tiny_converted, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "w5", "choices": [" w6"]}\n{"prompt": "w5"}\n')
    code = runtime_main(["score", str(tiny_converted["llama"]), str(src), "--output", str(tmp_path / "o.jsonl"),
                         "--device", "cpu", *cli_placement("streamed")])
    assert code == 2  # usage errors exit 2
    assert capsys.readouterr().err.strip() == ('Error: item 2 needs "prompt" (a string) and "choices" '
                                               '(a list of strings), or "text" (a string)')
    src.write_text('{"text": "w5"}\nnot json\n')
    code = runtime_main(["score", str(tiny_converted["llama"]), str(src), "--output", str(tmp_path / "o.jsonl"),
                         "--device", "cpu", *cli_placement("streamed")])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"Error: {src} line 2 is not valid JSON")


def test_offloaded_activations_give_the_same_results(tiny_converted):
    from runtime.lockstep import Job, Lockstep

    model = open_tiny(tiny_converted["gemma"])
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 300, shape, generator=gen) for shape in [(2, 7), (3, 4), (1, 9)]]
    want = [model(ids).logits for ids in inputs]
    lockstep = Lockstep(model, offload=torch.device("cpu"))  # on a CPU model: moves are copies, still real
    got = lockstep.run([Job(lambda ids=ids: model.model(ids).logits) for ids in inputs])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert lockstep.offloaded_bytes >= 3 * 4 * sum(ids.numel() * 64 for ids in inputs)  # hidden states, 3 layers
    assert model.stats.layer_loads == 3 * len(model.groups) + len(model.groups)
    plain = open_tiny(tiny_converted["gemma"]).score(ITEMS, batch_size=2)
    assert model.score(ITEMS, batch_size=2, offload=True) == plain


def test_items_with_nothing_to_score(tiny_converted):
    model = open_tiny(tiny_converted["llama"])
    # "w7w8" is one unknown word, so the choice adds no token after the prompt's; "" and "w9" have no second token
    got = model.score([{"prompt": "w5 w6 w7", "choices": ["w8"]}, {"text": ""}, {"text": "w9"}])
    assert got[0]["scores"] == [0.0] and got[0]["best"] == 0
    assert (got[1]["logprob"], got[1]["tokens"], got[2]["logprob"], got[2]["tokens"]) == (0.0, 0, 0.0, 0)
    assert model.stats.layer_loads == len(model.groups)


def test_item_longer_than_the_context(tiny_converted):
    model = open_tiny(tiny_converted["llama"])
    long_prompt = " ".join(["w5"] * 126)
    with pytest.raises(UsageError, match=r"^item 2 is 129 tokens, more than the model's context of 128; shorten it$"):
        model.score([{"text": "w5 w6"}, {"prompt": long_prompt, "choices": [" w6", " w7 w8 w9"]}])
