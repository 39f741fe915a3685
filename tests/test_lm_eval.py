"""The lm-evaluation-harness backend: `runtime eval --model reshard` (lm_eval with the backend
registered) on SmolLM2 converted (its first 2 layers: the tokenizer is the point) gives the per-item numbers of `lm_eval --model hf` on the source
checkpoint (float32 CPU), reading each layer group once per request type.

Tasks and data are written by the test: a multiple-choice task (loglikelihood), a perplexity
task (loglikelihood_rolling, with a short max_length so texts span several windows) and a
generation task (generate_until with a stop sequence)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MC = [("The capital of France is", ["Paris", "London", "Berlin"], 0),
      ("Water freezes at a temperature of zero degrees", ["Celsius", "Kelvin", "pounds"], 0),
      ("The opposite of hot is", ["cold", "warm", "blue", "loud"], 0),
      ("Two plus two equals", ["four", "seven", "nine"], 0),
      ("A baby cat is called a", ["puppy", "kitten", "calf"], 1),
      ("The sun rises in the", ["west", "north", "east"], 2),
      # longer than MAX_LENGTH: both backends cut the context on the left
      ("In the story that the teacher read aloud to the whole class on a rainy Monday morning, the animal that "
       "could talk was a", ["fox", "spoon", "cloud"], 0)]
TEXTS = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
         "Language models assign probabilities to sequences of words.",
         "One, two, three, four, five, six, seven, eight, nine, ten."]
GEN = [("Q: What is the capital of Italy?\nA:", "Rome"), ("Q: What color is the sky?\nA:", "blue"),
       ("Q: How many legs does a dog have?\nA:", "four")]
MAX_LENGTH = 16  # tokens per rolling window (the texts above take two or more), and per scored pair
ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_tasks(folder: Path) -> list[str]:
    """Three lm-eval task YAMLs over JSONL files in `folder`; their names."""
    rows = {"mc": [{"question": q, "choices": c, "answer": a} for q, c, a in MC],
            "ppl": [{"text": t} for t in TEXTS], "gen": [{"question": q, "answer": a} for q, a in GEN]}
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: reshard_test_mc\n" + common.format(path=folder / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "ppl.yaml").write_text(
        "task: reshard_test_ppl\n" + common.format(path=folder / "ppl.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: reshard_test_gen\n" + common.format(path=folder / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  do_sample: false\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")
    return ["reshard_test_mc", "reshard_test_ppl", "reshard_test_gen"]


def samples_of(output: Path) -> dict[str, list[dict]]:
    """task -> logged samples (by doc_id) from an lm_eval --output_path folder."""
    found = {}
    for path in output.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        found[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return found


def run_lm_eval(argv: list[str], output: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "eval", *argv, "--output_path", str(output),
                           "--log_samples", "--seed", "0"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def hf_samples(checkpoint: Path, tasks: list[str], include_path: Path) -> dict[str, list[dict]]:
    """task -> samples (by doc_id) of lm-eval's own `hf` backend on `checkpoint`, run in this
    process with only the test's tasks indexed (lm_eval's CLI indexes its thousands of built-in
    tasks first: about 10 s)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    seeds = dict(random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},dtype=float32,max_length={MAX_LENGTH}",
                                  device="cpu", batch_size=1, tasks=tasks, log_samples=True, **seeds,
                                  task_manager=TaskManager(include_path=str(include_path), include_defaults=False))
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}


@pytest.mark.slow
def test_reshard_backend_equals_hf_backend(small_smollm2_checkpoint, small_smollm2_converted, tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    tasks = ",".join(write_tasks(tmp_path))
    ours = run_lm_eval(["--model", "reshard", "--model_args",
                        f"pretrained={small_smollm2_converted},device=cpu,dtype=float32,max_cpu_memory=0,batch_size=4,"
                        f"max_length={MAX_LENGTH},stats=true",
                        "--tasks", tasks, "--include_path", str(tmp_path)], tmp_path / "ours")
    got, want = samples_of(tmp_path / "ours"), hf_samples(small_smollm2_checkpoint, tasks.split(","), tmp_path)
    assert sorted(got) == sorted(want) == sorted(tasks.split(","))

    # multiple choice: every choice's log-likelihood to 1e-4, the same greedy flags and accuracy
    for a, b in zip(got["reshard_test_mc"], want["reshard_test_mc"], strict=True):
        ours_ll = [float(r[0]) for r in a["filtered_resps"]]  # logged as strings
        hf_ll = [float(r[0]) for r in b["filtered_resps"]]
        assert ours_ll == pytest.approx(hf_ll, abs=1e-4), a["doc_id"]
        assert [str(r[1]) for r in a["filtered_resps"]] == [str(r[1]) for r in b["filtered_resps"]]
        assert a["acc"] == b["acc"]

    # perplexity: each text's rolling log-likelihood (several windows each) to 1e-4
    for a, b in zip(got["reshard_test_ppl"], want["reshard_test_ppl"], strict=True):
        assert float(a["filtered_resps"][0]) == pytest.approx(float(b["filtered_resps"][0]), abs=1e-4)

    # generation: the same text, cut at the same stop sequence
    assert [s["resps"] for s in got["reshard_test_gen"]] == [s["resps"] for s in want["reshard_test_gen"]]

    # each request type read every layer group once (streamed: max_cpu_memory=0)
    runs = {r["request_type"]: r for r in map(json.loads, (ln for ln in ours.stderr.splitlines()
                                                            if ln.startswith('{"request_type"')))}
    assert runs["loglikelihood"]["requests"] == sum(len(c) for _, c, _ in MC)
    for kind in ("loglikelihood", "loglikelihood_rolling"):
        assert runs[kind]["passes"] == 1 and runs[kind]["layer_loads"] == runs[kind]["groups"], runs[kind]
    assert runs["generate_until"]["requests"] == len(GEN)


# --- without SmolLM2 -----------------------------------------------------------------------------

def test_registered_next_to_lm_evals_own_models():
    from importlib.metadata import entry_points, requires

    from lm_eval.api.registry import get_model
    from packaging.requirements import Requirement

    from runtime.lm_eval_backend import ReshardLM

    assert get_model("reshard") is ReshardLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's own
    # the installed package's entry point (what plugin loaders resolve) loads the backend class itself
    [entry] = [e for e in entry_points(group="lm_eval.models") if e.name == "reshard"]
    assert entry.load() is ReshardLM
    # installing the test (and eval) extra brings lm-eval
    wanted = [Requirement(r) for r in requires("reshard")]
    for extra in ("test", "eval"):
        assert any(r.name == "lm-eval" and r.marker and r.marker.evaluate({"extra": extra}) for r in wanted), extra


def test_model_args_pass_through_and_are_checked(tiny_converted):
    from reshard.errors import UsageError
    from runtime.lm_eval_backend import ReshardLM

    lm = ReshardLM.create_from_arg_string(
        f"pretrained={tiny_converted['llama']},device=cpu,dtype=float32,batch_size=3,max_cpu_memory=0,prefetch=0",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda"})  # lm_eval's own flags lose to model_args
    assert (lm.batch_size, lm.model.device.type, lm.model.prefetcher.depth) == (3, "cpu", 0)
    assert set(lm.model.places) == {"disk"}
    with pytest.raises(UsageError, match="unknown model_args for the reshard backend: colour"):
        ReshardLM(str(tiny_converted["llama"]), device="cpu", colour="red")
    with pytest.raises(UsageError, match="batch_size must be 1 or more, not 0"):
        ReshardLM(str(tiny_converted["llama"]), device="cpu", batch_size=0)


def test_loglikelihood_equals_the_scorer_and_reads_each_layer_once(tiny_converted):
    from lm_eval.api.instance import Instance

    from runtime.lm_eval_backend import ReshardLM

    lm = ReshardLM(str(tiny_converted["llama"]), device="cpu", dtype="float32", max_cpu_memory=0, batch_size=2)
    pairs = [("w3 w4", " w5"), ("w3 w4", " w6 w7"), ("w8", " w9"), ("", "w10 w11"), ("w3 w4 ", "w5")]
    requests = [Instance("loglikelihood", {}, pair, n) for n, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    want = lm.model.score([{"prompt": "w3 w4", "choices": [" w5", " w6 w7"]}, {"prompt": "w8", "choices": [" w9"]},
                           {"prompt": "", "choices": ["w10 w11"]}, {"prompt": "w3 w4 ", "choices": ["w5"]}])
    assert [ll for ll, _ in got] == pytest.approx([*want[0]["scores"], *want[1]["scores"], *want[2]["scores"],
                                                   *want[3]["scores"]], abs=1e-5)
    assert all(isinstance(greedy, bool) for _, greedy in got)
    run = lm.runs[-1]
    assert (run["request_type"], run["requests"], run["passes"], run["layer_loads"]) == \
        ("loglikelihood", 5, 1, len(lm.model.groups))


def test_generation_options_read_as_lm_eval_reads_them():
    from runtime.lm_eval_backend import cut_at_stop, generation_options

    options, until, max_new = generation_options({"until": "\n\n", "max_gen_toks": 7, "do_sample": False,
                                                  "temperature": 0.0}, 256, "</s>")
    assert (options, until, max_new) == ({"do_sample": False}, ["\n\n", "</s>"], 7)
    options, until, max_new = generation_options({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, 256, None)
    assert (options, until, max_new) == ({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, [], 256)
    assert cut_at_stop("Rome.\nQ: next", ["\n", "."]) == "Rome"


# --- the error lines, through `runtime eval` -------------------------------------------------------

@pytest.mark.parametrize("args, line", [
    ("batch_size=lots", "Error: batch_size must be a whole number or auto, not 'lots'"),
    ("batch_size=0", "Error: batch_size must be 1 or more, not 0"),
    ("colour=red", "Error: unknown model_args for the reshard backend: colour; see `runtime eval --help`"),
])
def test_bad_model_args_are_one_error_line(args, line, tiny_converted, tmp_path, capsys, monkeypatch):
    from runtime.cli import main

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    write_tasks(tmp_path)
    argv = ["eval", "--model_args", f"pretrained={tiny_converted['llama']},device=cpu,{args}",
            "--tasks", "reshard_test_mc", "--include_path", str(tmp_path)]
    assert main(argv) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Error:")] == [line]


def test_bad_model_args_are_refused_in_python_too(tiny_converted):
    """lm_eval.simple_evaluate(model="reshard", model_args=...) builds the backend without `runtime
    eval`'s early check: the backend gives the same lines."""
    from reshard.errors import UsageError
    from runtime.lm_eval_backend import ReshardLM

    with pytest.raises(UsageError, match="^unknown model_args for the reshard backend: colour; "):
        ReshardLM.create_from_arg_string(f"pretrained={tiny_converted['llama']},device=cpu,colour=red")
    with pytest.raises(UsageError, match="^batch_size must be 1 or more, not 0$"):
        ReshardLM.create_from_arg_string(f"pretrained={tiny_converted['llama']},device=cpu,batch_size=0")


def test_folder_without_a_tokenizer_is_refused(tiny_converted, tmp_path):
    import shutil

    from reshard.errors import UsageError
    from runtime.lm_eval_backend import ReshardLM

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_converted["llama"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(UsageError) as refused:
        ReshardLM(str(folder), device="cpu")
    assert str(refused.value) == f"{folder} has no tokenizer files; convert a checkpoint that has them"


def test_eval_without_lm_eval_installed(monkeypatch, capsys):
    from runtime.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "runtime.lm_eval_backend", raising=False)
    assert main(["eval", "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == "Error: lm-eval is not installed; pip install 'reshard[eval]'"


def test_pairs_longer_than_max_length_are_cut_on_the_left():
    """As lm-eval's hf backend: the last max_length + 1 tokens of context and continuation are kept."""
    from reshard.errors import UsageError
    from runtime.lm_eval_backend import fit_window

    assert fit_window([1, 2, 3], [4, 5], 4) == ([1, 2, 3], [4, 5])  # 5 tokens: the model sees 4
    assert fit_window([1, 2, 3, 4], [5, 6], 4) == ([2, 3, 4], [5, 6])
    assert fit_window([], [1, 2, 3], 4) == ([], [1, 2, 3])
    # an empty continuation predicts nothing: the model sees the context's last max_length tokens
    assert fit_window([1, 2, 3, 4, 5, 6], [], 4) == ([3, 4, 5, 6], [])
    assert fit_window([1, 2], [], 4) == ([1, 2], [])
    with pytest.raises(UsageError, match=r"^a continuation of 5 tokens is longer than max_length 4$"):
        fit_window([1], [1, 2, 3, 4, 5], 4)


def test_an_empty_continuation_scores_zero_and_greedy(tiny_converted):
    """As lm-eval's hf backend: no tokens to predict, log-likelihood 0 and greedy, whatever the
    context's length; the other requests score as they do alone."""
    from lm_eval.api.instance import Instance

    from runtime.lm_eval_backend import ReshardLM

    lm = ReshardLM(str(tiny_converted["gpt2"]), device="cpu", dtype="float32", max_cpu_memory=0, max_length=4)
    long = " ".join(f"w{i}" for i in range(3, 12))
    pairs = [("w3 w4", ""), (long, ""), (long, " w5"), ("w3 w4", " w5")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, n) for n, pair in enumerate(pairs)])
    alone = lm.loglikelihood([Instance("loglikelihood", {}, pair, n) for n, pair in enumerate(pairs[2:])])
    assert got[:2] == [(0.0, True), (0.0, True)]
    assert got[2:] == alone


def test_max_batch_size_caps_the_batches(tiny_converted, monkeypatch):
    """lm-eval's max_batch_size: no batch larger, with batch_size auto or a number; checked like batch_size."""
    from lm_eval.api.instance import Instance

    from reshard.errors import UsageError
    from runtime import lm_eval_backend
    from runtime.lm_eval_backend import ReshardLM

    folder = str(tiny_converted["llama"])
    batches = []

    def spy(model, seqs, **kwargs):
        batches.append(len(seqs))
        return generate_ids(model, seqs, **kwargs)

    generate_ids = lm_eval_backend.generate_ids
    monkeypatch.setattr(lm_eval_backend, "generate_ids", spy)
    requests = [Instance("generate_until", {}, (f"w{5 + n} w{6 + n}", {"until": ["w1"], "max_gen_toks": 2}), n)
                for n in range(5)]
    for batch_size, cap, want in [("auto", 2, [2, 2, 1]), (4, 3, [3, 2]), (2, 8, [2, 2, 1]), ("auto", None, [5])]:
        lm = ReshardLM.create_from_arg_string(f"pretrained={folder},device=cpu,dtype=float32,max_cpu_memory=0,"
                                              f"batch_size={batch_size}", {"max_batch_size": cap})
        batches.clear()
        lm.generate_until(requests)
        assert batches == want, (batch_size, cap)
    with pytest.raises(UsageError, match=r"^max_batch_size must be 1 or more, not 0$"):
        ReshardLM(folder, device="cpu", max_batch_size=0)
    with pytest.raises(UsageError, match=r"^max_batch_size must be a whole number, not 'many'$"):
        ReshardLM(folder, device="cpu", max_batch_size="many")
