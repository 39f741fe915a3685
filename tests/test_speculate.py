"""Tree speculative decoding (runtime/speculate.py): greedy gives plain greedy's tokens, sampling
keeps plain sampling's distribution, and the KV cache keeps exactly the accepted path."""

from __future__ import annotations

import shutil

import pytest
import torch
from scipy.stats import chisquare
from transformers import DynamicCache

from conftest import open_placed, save_tiny, save_tiny_tokenizer
from reshard.errors import UsageError
from runtime.batch import load_assistant
from runtime.cli import main as runtime_main
from runtime.sampling import Sampling, token_probs
from runtime.score import cache_arg
from runtime.lookup import lookup_tree
from runtime.speculate import TreeSpeculator, accept_child, point_mass
from runtime.tree import TokenTree
from runtime.treecost import TreeCosts

ALARM = 1e-3  # false-alarm rate of every statistical test here
PROMPT = [5, 17, 40, 9, 100, 3]
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def other_draft(tmp_path_factory):
    """A tiny llama with other random weights and the same vocabulary: most guesses are wrong."""
    return save_tiny("llama", tmp_path_factory.mktemp("draft") / "llama-seed1", seed=1)




def plain_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def tree_greedy(model, ids: list[int], n: int, draft, budget) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, draft=draft, tree_budget=budget)
    return out[0, len(ids):].tolist()


def no_eos(model) -> None:
    """Random tiny models may say end-of-sequence early; plain and tree then both stop there, but
    the tests want the full length."""
    model.generation_config.eos_token_id = None


@pytest.mark.parametrize("draft_name", ["itself", "other"])
def test_greedy_equals_plain_tiny(draft_name, placement, tiny_checkpoints, tiny_converted, other_draft):
    model = open_placed(tiny_converted["llama"], placement)
    no_eos(model)
    plain = plain_greedy(model, PROMPT, 24)
    folder = tiny_checkpoints["llama"] if draft_name == "itself" else other_draft
    draft = load_assistant(folder, device=CPU, dtype=torch.float32)
    for budget in (1, 5, 32):
        assert tree_greedy(model, PROMPT, 24, draft, budget) == plain, budget
        stats = model.speculation
        assert 0 < stats["tree_size"] <= budget  # (smaller near the end: no deeper than the tokens wanted)
        if draft_name == "itself":  # the draft's first guess is the target's: at least 2 tokens a pass
            assert stats["tokens_per_pass"] >= 2, stats
    model.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_greedy_equals_plain_moe(arch, moe_checkpoints, moe_converted, other_draft):
    """A mixture-of-experts target, streamed (only routed experts read), with a dense draft."""
    model = open_placed(moe_converted[arch], "streamed")
    no_eos(model)
    plain = plain_greedy(model, PROMPT, 16)
    for folder in (moe_checkpoints[arch], other_draft):
        draft = load_assistant(folder, device=CPU, dtype=torch.float32)
        assert tree_greedy(model, PROMPT, 16, draft, 12) == plain, folder
    assert model.speculation["target_passes"] < 16  # (the last draft is the model itself)
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("placement, size", [("streamed", "real"), ("resident", "2 layers")])
def test_greedy_equals_plain_smollm2_int4_draft(placement, size, request):
    """SmolLM2 as the target, its int4 copy as the draft: the real model streamed, and its first
    2 layers resident (the same path at a fraction of the compute)."""
    target, draft_folder = (("smollm2_converted", "smollm2_int4_converted") if size == "real" else
                            ("small_smollm2_converted", "small_smollm2_int4_converted"))
    smollm2_int4 = request.getfixturevalue(draft_folder)
    model = open_placed(request.getfixturevalue(target), placement)
    ids = model.tokenizer("The first five planets from the sun are Mercury, Venus,")["input_ids"]
    plain = plain_greedy(model, ids, 16)
    draft = load_assistant(smollm2_int4, device=CPU, dtype=torch.float32)
    assert tree_greedy(model, ids, 16, draft, 16) == plain
    assert model.speculation["tokens_per_pass"] > 1.5, model.speculation
    model.close()


def test_lookup_tree_merges_the_continuations_of_earlier_matches():
    tree = lookup_tree([1, 2, 3, 1, 2, 4, 1, 2], 16, depth=3)
    root = [tree.tokens[j] for j in tree.children(-1)]
    assert root == [4, 3]  # after "1 2" came 4 (the latest) and 3
    after_4 = tree.children(tree.children(-1)[0])
    assert [tree.tokens[j] for j in after_4] == [1]
    assert len(lookup_tree([1, 2, 3, 1, 2, 4, 1, 2], 2, depth=3)) == 2  # the budget bounds it


def test_prompt_lookup_tree_equals_plain_in_fewer_passes(placement, tiny_converted):
    """Random tiny models continue a loop by copying it: the case prompt lookup speeds up."""
    model = open_placed(tiny_converted["llama"], placement)
    no_eos(model)
    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7]
    plain = plain_greedy(model, loop, 20)
    assert tree_greedy(model, loop, 20, "prompt-lookup", 16) == plain
    assert model.speculation["target_passes"] < 20 and model.speculation["draft_steps"] == 0
    model.close()


BATCH = [PROMPT, [7, 7, 31], [12, 200, 45, 45, 3, 9, 80, 61, 2, 8]]  # three lengths: padded left as generate_batch does


@pytest.mark.parametrize("draft_name", ["itself", "other", "prompt-lookup"])
def test_batch_equals_plain_greedy_each_row_in_shared_passes(draft_name, placement, tiny_checkpoints, tiny_converted,
                                                             other_draft):
    """Several prompts, each row its own tree, all verified through one read of the weights per pass
    (runtime/lockstep.py): every row gets plain greedy's tokens alone, and the batch takes as many
    passes as its slowest row alone (each row's trees are the ones it grows alone)."""
    from runtime.score import pad_batch

    model = open_placed(tiny_converted["llama"], placement)
    no_eos(model)
    draft = {"itself": tiny_checkpoints["llama"], "other": other_draft}.get(draft_name, draft_name)
    if draft_name != "prompt-lookup":
        draft = load_assistant(draft, device=CPU, dtype=torch.float32)
    alone = []
    for ids in BATCH:
        assert tree_greedy(model, ids, 12, draft, 8) == plain_greedy(model, ids, 12)
        alone.append(model.speculation["target_passes"])
    ids, mask = pad_batch(BATCH, 0, left=True)
    loads = model.stats.layer_loads
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, draft=draft, tree_budget=8)
    loads = model.stats.layer_loads - loads
    assert out.shape == (3, ids.shape[1] + 12) and torch.equal(out[:, :ids.shape[1]], ids)
    for row, prompt in zip(out[:, ids.shape[1]:].tolist(), BATCH):
        assert row == plain_greedy(model, prompt, 12), prompt
    assert model.speculation["target_passes"] == max(alone), (model.speculation, alone)
    assert loads == len(model.streamed) * max(alone)  # each streamed group read once a pass
    model.close()


def test_batch_of_a_moe_target_and_generate_batch(moe_converted, moe_checkpoints):
    """A streamed mixture-of-experts target (only routed experts read, each pass's union across
    rows) and `generate_batch`'s rows with ends of sequence: each row's tokens are plain greedy's."""
    model = open_placed(moe_converted["qwen3_moe"], "streamed")
    draft = load_assistant(moe_checkpoints["qwen3_moe"], device=CPU, dtype=torch.float32)
    plain = model.generate_batch(["w5 w17 w40", "w9", "w3 w3 w3 w3 w3"], max_new_tokens=10)
    tree = model.generate_batch(["w5 w17 w40", "w9", "w3 w3 w3 w3 w3"], max_new_tokens=10, draft=draft,
                                tree_budget=6)
    assert [g.tokens for g in tree] == [g.tokens for g in plain] and [g.text for g in tree] == [g.text for g in plain]
    assert model.speculation["tokens_per_pass"] > 3, model.speculation  # three rows, the draft is the target
    with pytest.raises(UsageError, match="^keeping each token's logits cannot be combined with a draft; drop one$"):
        model.generate_batch(["w9"], max_new_tokens=2, draft=draft, keep_logits=True)
    model.close()


def test_cache_after_partly_accepted_tree_equals_plain_decoding(placement, tiny_checkpoints, tiny_converted):
    """After one verified tree grown by a draft, the target's cache holds the prompt and the accepted
    path only: what plain decoding of the same tokens (one forward each) leaves, to float32 rounding.

    Why not bit for bit: a token's K/V row comes out of a matmul over all the forward's tokens, and
    BLAS computes full tiles of rows and the edge tile with different kernels (a different order of
    summation); plain decoding runs one row at a time (a matrix-vector product). So the same token at
    another row, or alone, can differ in the last bits: here about 1e-7 per layer, at values of
    about 1 (float32's epsilon is 1.2e-7). The tolerance, 1e-6, is a few such roundings per layer of
    the tiny model's 3. With the accepted path at the same rows as in a plain forward, the cache is
    bit-identical (next test)."""
    model = open_placed(tiny_converted["llama"], placement)
    draft = load_assistant(tiny_checkpoints["llama"], device=CPU, dtype=torch.float32)
    spec = TreeSpeculator(model, draft, budget=24, sampling=Sampling(max_tokens=8, temperature=0))
    tree = spec.grow(DynamicCache(config=draft.config), PROMPT)
    cache = DynamicCache(config=model.config)
    new, path = spec.verify(cache, PROMPT, tree)
    assert 1 <= len(path) < len(tree)  # partly accepted
    assert path != list(range(len(path)))  # the accepted nodes are not the first rows of the tree
    assert [tree.tokens[j] for j in path] == new[:-1]
    plain = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([PROMPT]), **cache_arg(model, plain), use_cache=True)
        for token in new[:-1]:
            model(input_ids=torch.tensor([[token]]), **cache_arg(model, plain), use_cache=True)
    assert cache.get_seq_length() == plain.get_seq_length() == len(PROMPT) + len(path)
    for mine, theirs in zip(cache.layers, plain.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.values, theirs.values, rtol=0, atol=1e-6)
    model.close()


def test_cache_after_partly_accepted_tree_is_bit_identical_at_the_same_rows(placement, tiny_converted):
    """A tree whose accepted path is its first nodes (plain greedy's next 3 tokens in a chain, then a
    wrong guess below them and a wrong sibling): the accepted tokens sit at the same rows of the
    forward as in one plain forward over the prompt and the whole tree's tokens (same M, causal), so
    the kept cache equals that forward's first columns bit for bit: the tree mask, the positions and
    the columns kept add nothing of their own."""
    model = open_placed(tiny_converted["llama"], placement)
    no_eos(model)
    greedy = plain_greedy(model, PROMPT, 4)
    wrong = [(t + 1) % model.config.vocab_size for t in greedy]
    tree = TokenTree()
    for parent, token in [(-1, greedy[0]), (0, greedy[1]), (1, greedy[2]), (2, wrong[3]), (-1, wrong[0])]:
        tree.add(token, parent, 0.0)
    spec = TreeSpeculator(model, None, budget=len(tree), sampling=Sampling(max_tokens=8, temperature=0))
    cache = DynamicCache(config=model.config)
    new, path = spec.verify(cache, PROMPT, tree)
    assert (new, path) == (greedy, [0, 1, 2])
    plain = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([PROMPT + tree.tokens]), **cache_arg(model, plain), use_cache=True)
    kept = len(PROMPT) + len(path)
    assert cache.get_seq_length() == kept
    for mine, theirs in zip(cache.layers, plain.layers):
        assert torch.equal(mine.keys, theirs.keys[:, :, :kept]) and torch.equal(mine.values, theirs.values[:, :, :kept])
    model.close()


# --- sampling: the output distribution is the target's -------------------------------------
def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of `counts` drawn from `probs` (cells of probability 0 must be empty)."""
    live = probs > 0
    assert counts[~live].sum() == 0, "drew a token of probability 0"
    expected = probs[live].double() * counts.sum()
    return float(chisquare(counts[live].double().numpy(), expected.numpy()).pvalue)


P = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03], dtype=torch.float64)
Q = torch.tensor([0.05, 0.10, 0.40, 0.30, 0.10, 0.05], dtype=torch.float64)
DRAWS = 20000


@pytest.mark.parametrize("children", ["top", "sampled"])
def test_acceptance_rule_keeps_the_target_distribution(children):
    """Children as the tree makes them (the draft's top tokens, each a point mass) and as SpecInfer
    draws them (independently from q): the next token is distributed as p either way."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(P))
    for _ in range(DRAWS):
        if children == "top":
            cands = [2, 3, 1]
            rows = [point_mass(t, len(P)) for t in cands]
        else:
            cands = torch.multinomial(Q, 3, replacement=True, generator=g).tolist()
            rows = [Q] * 3
        _, token = accept_child(P, cands, rows, g)
        counts[token] += 1
    assert chi_square_p(counts, P) > ALARM


def probs(logits, sampling) -> torch.Tensor:
    p = token_probs(logits, sampling).double()
    return p / p.sum()


def test_walk_samples_the_target_distribution_two_tokens_deep():
    """The whole walk down a tree, with temperature and top-p: the first two tokens of a pass are
    distributed as plain sampling's (the root's distribution, then the chosen child's)."""
    vocab = 5
    logits = torch.tensor([[0.1, 0.35, 0.1, 0.3, 0.15],  # after the root, then after nodes 0, 1, 2
                           [0.3, 0.1, 0.2, 0.2, 0.2],
                           [0.05, 0.05, 0.6, 0.2, 0.1],
                           [0.2, 0.2, 0.2, 0.2, 0.2]]).log()
    sampling = Sampling(max_tokens=4, temperature=0.8, top_p=0.9)
    tree = TokenTree()
    for token, parent in ((1, -1), (3, -1), (0, 0)):
        tree.add(token, parent, 0.0)
    spec = TreeSpeculator.__new__(TreeSpeculator)
    spec.sampling, spec.generator, spec.eos = sampling, torch.Generator().manual_seed(2), set()
    root, after = probs(logits[0], sampling), {1: probs(logits[1], sampling), 3: probs(logits[2], sampling)}
    stop = vocab  # the second cell "no second token": the first was the target's own
    expected = torch.zeros(vocab, vocab + 1, dtype=torch.float64)
    for x in range(vocab):
        if x in after:
            expected[x, :vocab] = root[x] * after[x]
        else:
            expected[x, stop] = root[x]
    counts = torch.zeros(vocab, vocab + 1)
    for _ in range(DRAWS):
        new, _ = spec.walk(tree, logits)
        counts[new[0], new[1] if len(new) > 1 else stop] += 1
    assert chi_square_p(counts.flatten(), expected.flatten()) > ALARM


# --- the budget --------------------------------------------------------------------------
def test_budget_is_large_when_streaming_dominates_and_small_when_compute_does():
    streaming = TreeCosts(target_fixed=1.5, target_per_token=2e-5, draft_fixed=0.01, draft_per_token=1e-5)
    compute = TreeCosts(target_fixed=0.05, target_per_token=0.01, draft_fixed=0.005, draft_per_token=1e-4)
    assert streaming.best_budget() >= 256
    assert compute.best_budget() <= 8


# --- the CLI -----------------------------------------------------------------------------
def test_cli_draft_gives_plain_text_and_stats(tiny_converted, tiny_checkpoints, capsys):
    args = ["generate", str(tiny_converted["llama"]), "-p", "w5 w17 w40", "-n", "10", "--device", "cpu",
            "--max-cpu-memory", "0"]
    assert runtime_main(args) == 0
    plain = capsys.readouterr().out
    assert runtime_main(args + ["--draft", str(tiny_checkpoints["llama"]), "--tree-budget", "8", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert '"speculation": {"target_passes": ' in captured.err and '"tree_budget": 8}' in captured.err


@pytest.mark.parametrize("draft", ["checkpoint", "prompt-lookup"])
def test_cli_draft_with_a_prompts_file_gives_plain_completions_and_stats(draft, tiny_converted, tiny_checkpoints,
                                                                        tmp_path, capsys):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w17 w40\nw6\nw7 w8 w7 w8 w7 w8\n")
    args = ["generate", str(tiny_converted["llama"]), "--prompts-file", str(prompts), "-n", "8", "--device", "cpu",
            "--max-cpu-memory", "0"]
    assert runtime_main(args) == 0
    plain = capsys.readouterr().out
    draft = str(tiny_checkpoints["llama"]) if draft == "checkpoint" else draft
    assert runtime_main(args + ["--draft", draft, "--tree-budget", "6", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and len(plain.splitlines()) == 3
    stats = json.loads(captured.err.strip().splitlines()[-1])
    assert stats["speculation"]["tree_budget"] == 6 and stats["speculation"]["target_passes"] == stats["passes"]


def test_cli_draft_errors(tiny_converted, tiny_checkpoints, tmp_path, capsys):
    args = ["generate", str(tiny_converted["llama"]), "-p", "w5", "-n", "4", "--device", "cpu"]
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_checkpoints["llama"], other)
    save_tiny_tokenizer(other, 300)
    assert runtime_main(args + ["--draft", str(other)]) == 2
    assert capsys.readouterr().err.strip() == (f"Error: draft {other} uses a different tokenizer than the target; "
                                               "tree speculation needs a draft with the same tokenizer (for a "
                                               "different one, use --assistant)")
    assert runtime_main(args + ["--draft", str(other), "--prompt-lookup", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("Error: --draft cannot be combined with --prompt-lookup or "
                                               "--assistant; pick one")
    with pytest.raises(SystemExit) as exit_:
        runtime_main(args + ["--draft", str(other), "--tree-budget", "0"])
    assert exit_.value.code == 2
    assert "'0' is neither a number of tokens (1 or more) nor auto" in capsys.readouterr().err


def save_shuffled_draft(folder, vocab_size: int = 300):
    """A tiny llama with its own vocabulary size and a word tokenizer whose ids are shuffled: the
    same words as the target's, other ids."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.vocab_size = vocab_size
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    words = {f"w{i}": 3 + (i - 3) * 7 % (vocab_size - 3) for i in range(3, vocab_size)}  # 7 is prime to 297
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, **words}, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    path = folder / "tokenizer_config.json"  # AutoTokenizer loads this class, not the architecture's default
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_a_draft_with_another_tokenizer(tiny_converted, tmp_path, capsys):
    """Tree speculation refuses it with one line; --assistant translates through text (transformers'
    universal assisted decoding, given both tokenizers) and gives plain greedy's text."""
    import json

    draft = save_shuffled_draft(tmp_path / "shuffled")
    args = ["generate", str(tiny_converted["llama"]), "-p", "w5 w6 w30 w7", "-n", "12", "--device", "cpu",
            "--max-cpu-memory", "0", "--stats"]
    assert runtime_main(args) == 0
    plain = capsys.readouterr()
    assert runtime_main(args + ["--assistant", str(draft)]) == 0
    translated = capsys.readouterr()
    assert translated.out == plain.out and len(plain.out.split()) == 12
    assert json.loads(translated.err.strip().splitlines()[-1])["new_tokens"] == 12
    assert runtime_main(args + ["--draft", str(draft)]) == 2
    assert capsys.readouterr().err.strip() == (f"Error: draft {draft} uses a different tokenizer than the target; "
                                               "tree speculation needs a draft with the same tokenizer (for a "
                                               "different one, use --assistant)")


def test_cli_draft_conflicts_are_one_error_line(tiny_converted, tiny_checkpoints, tmp_path, capsys):
    args = ["generate", str(tiny_converted["llama"]), "-n", "4", "--device", "cpu", "--max-cpu-memory", "0",
            "--draft", str(tiny_checkpoints["llama"])]
    assert runtime_main(args + ["-p", "w5", "--min-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.strip() == "Error: --min-new-tokens cannot be combined with --draft; drop one"


def test_api_draft_refusals(tiny_checkpoints, tiny_converted):
    import transformers as tf

    from runtime.kvcache import keep_columns

    model = open_placed(tiny_converted["llama"], "resident")
    ids, draft = torch.tensor([PROMPT]), tiny_checkpoints["llama"]
    with pytest.raises(UsageError, match="^min_new_tokens is not supported with a draft; drop it or generate "
                                         "without --draft$"):
        model.generate(input_ids=ids, draft=draft, tree_budget=4, min_new_tokens=2)
    with pytest.raises(UsageError) as refused:
        model.generate(input_ids=ids, draft=draft, tree_budget=0)
    assert str(refused.value) == "tree budget must be a number of tokens (1 or more) or 'auto', not 0"
    with pytest.raises(UsageError, match="^a streamer takes one sequence, not 2; stream one prompt at a time$"):
        model.generate(input_ids=torch.tensor([PROMPT, PROMPT]), draft=draft, tree_budget=4,
                       streamer=tf.TextStreamer(model.tokenizer))
    with pytest.raises(UsageError, match="^tree budget must be 1 or more, not 0$"):
        TreeSpeculator(model, None, budget=0, sampling=Sampling(max_tokens=4))
    model.close()
    sliding = DynamicCache(config=tf.MistralConfig(num_hidden_layers=2, sliding_window=16))
    with pytest.raises(UsageError, match="^tree speculation does not support sliding-window attention layers; "
                                         "generate without a draft$"):
        keep_columns(sliding, torch.arange(0))
