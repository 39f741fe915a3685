"""Ray Data workers: the same output as one process, one weight pass per block, failures retried."""

from __future__ import annotations

import json
import os
import sys

import pytest

from runtime import distributed
from runtime.cli import main as runtime_main
from runtime.model import LayeredModel

ray = pytest.importorskip("ray", reason="Ray is installed by the test extra; see pyproject.toml")

# Each of these starts Ray actors that import torch and open a model: tens of seconds on 2 cores.
cluster = pytest.mark.slow
STREAMED = {"device": "cpu", "max_cpu_memory": 0}  # every group streams: a weight pass shows in the stats
STREAMED_FLAGS = ["--device", "cpu", "--max-cpu-memory", "0"]


def same_threads() -> int:
    """Workers use this process's torch threads, so float sums round as they do here."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module: 2 CPUs, so 2 workers run side by side."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    yield
    ray.shutdown()


def questions(n: int) -> list[dict]:
    return [{"id": k, "prompt": f"w{3 + k % 50} w{7 + k % 31} w{11 + k % 17}",
             "choices": [f" w{20 + k % 9}", f" w{40 + k % 13} w5", " w60"]} for k in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


@cluster
def test_score_cli_with_ray_writes_the_same_lines_one_weight_pass_per_block(local_ray, tiny_converted, tmp_path,
                                                                          capsys):
    folder = str(tiny_converted["llama"])
    src = write_jsonl(tmp_path / "in.jsonl", questions(20))
    common = ["score", folder, str(src), "--batch-size", "4", *STREAMED_FLAGS]
    assert runtime_main([*common, "-o", str(tmp_path / "alone.jsonl")]) == 0
    capsys.readouterr()
    assert runtime_main([*common, "-o", str(tmp_path / "ray.jsonl"), "--ray-workers", "2",
                         "--ray-threads", str(same_threads()), "--stats"]) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "alone.jsonl").read_bytes()
    blocks = stats["blocks"]
    assert [b["items"] for b in blocks] == [12, 8]  # one block per worker, in whole micro-batches of 4
    groups = len(LayeredModel.from_pretrained(folder, **STREAMED).groups)
    for b in blocks:
        assert b["streamed_groups"] == groups  # everything streams...
        assert b["layer_loads"] == groups  # ...and each group was read once for the whole block


@cluster
def test_generate_cli_with_ray_equals_one_process(local_ray, tiny_converted, tmp_path, capsys):
    folder = str(tiny_converted["llama"])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"w{3 + k} w{9 + 2 * k} w{30 + k}", "n": k}
                                                 for k in range(6)])
    common = ["generate", folder, "--prompts-file", str(prompts), "-n", "6", *STREAMED_FLAGS]
    assert runtime_main(common) == 0
    alone = capsys.readouterr().out
    assert runtime_main([*common, "--ray-workers", "2", "--ray-threads", str(same_threads()), "--stats"]) == 0
    run = capsys.readouterr()
    assert run.out == alone and len(alone.splitlines()) == 6
    blocks = json.loads(run.err.strip().splitlines()[-1])["blocks"]
    assert [b["items"] for b in blocks] == [3, 3]
    for b in blocks:  # one pass per new token for the whole block, each pass every group once
        assert b["passes"] >= 6 and b["layer_loads"] == b["passes"] * b["streamed_groups"]


class FailsTwice(distributed.BlockWorker):
    """A worker whose process dies on the first block any worker gets, and which raises a transient
    error on the next one: each once per test (marker files in `folder`)."""

    folder = ""

    def __call__(self, batch):
        died, hiccupped = os.path.join(self.folder, "died"), os.path.join(self.folder, "hiccupped")
        if not os.path.exists(died):
            open(died, "w").close()
            os._exit(1)
        if not os.path.exists(hiccupped):
            open(hiccupped, "w").close()
            raise OSError("the shared filesystem hiccupped")
        return super().__call__(batch)


@cluster
def test_failed_workers_lose_and_duplicate_nothing(local_ray, tiny_converted, tmp_path):
    """A worker process that dies is replaced and its block re-run; a block that raises a
    transient error is retried: every item once, in order."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    worker = type("FailsTwiceHere", (FailsTwice,), {"folder": str(tmp_path)})
    folder, items = tiny_converted["llama"], questions(12)
    with LayeredModel.from_pretrained(folder, **STREAMED) as lm:
        expected = lm.score(items, batch_size=4)
    out, stats = distributed.score_items(items, folder, workers=2, model_options=STREAMED, batch_size=4,
                                         threads=same_threads(), worker=worker)
    assert (tmp_path / "died").exists() and (tmp_path / "hiccupped").exists()  # both failures happened
    assert out == expected  # every item once, in order, as one process scores them
    assert sorted(s.items for s in stats) == [4, 8]


@cluster
def test_row_datasets_keep_their_columns(local_ray, tiny_converted):
    folder, items = tiny_converted["llama"], questions(8)
    with LayeredModel.from_pretrained(folder, **STREAMED) as lm:
        expected = lm.score(items, batch_size=8)
    rows = distributed.score_dataset(ray.data.from_items(items), folder, concurrency=1, block_size=8,
                                     model_options=STREAMED, threads=same_threads(), batch_size=8).take_all()
    rows.sort(key=lambda r: r["id"])
    assert [r["choices"] for r in rows] == [e["choices"] for e in expected]
    assert [r["best"] for r in rows] == [e["best"] for e in expected]
    assert [r["scores"] for r in rows] == [e["scores"] for e in expected]


def test_blocks_cut_where_micro_batches_are_cut():
    assert distributed.score_block_size(20, 2, None, 4) == 12
    assert distributed.score_block_size(10, 1, 5, 4) == 8
    assert distributed.score_block_size(3, 4, None, 8) == 8
    assert distributed.score_block_size(9, 3, None, 1) == 3


def test_item_errors_are_found_before_workers_start(tiny_converted):
    with pytest.raises(distributed.UsageError, match=r"^item 2 needs \"prompt\""):
        distributed.score_items([questions(1)[0], {"prompt": "w3"}], tiny_converted["llama"], workers=2)


def test_without_ray_the_flag_says_what_to_install(tiny_converted, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    src = write_jsonl(tmp_path / "in.jsonl", questions(2))
    code = runtime_main(["score", str(tiny_converted["llama"]), str(src), "-o", str(tmp_path / "o.jsonl"),
                         "--ray-workers", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == \
        "Error: --ray-workers needs Ray Data; install it with `pip install 'reshard[ray]'`"


def test_ray_workers_need_a_prompts_file(tiny_converted, capsys):
    assert runtime_main(["generate", str(tiny_converted["llama"]), "-p", "w3", "--ray-workers", "2"]) == 2
    assert capsys.readouterr().err.strip() == \
        "Error: --ray-workers needs --prompts-file (one prompt runs on one model)"


def test_prompts_are_checked_before_any_worker_starts(tiny_converted, tmp_path, monkeypatch, capsys):
    """--ray-workers gets the one-process checks of a --prompts-file on the driver, before Ray is needed:
    a prompt of no tokens, and one too long for the model's context, are usage errors (exit 2)."""
    monkeypatch.setitem(sys.modules, "ray", None)  # nothing may reach Ray
    folder = str(tiny_converted["llama"])
    common = ["--ray-workers", "2", "--device", "cpu", "--max-cpu-memory", "0"]
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "w3 w4"}, {"prompt": " "}])
    assert runtime_main(["generate", folder, "--prompts-file", str(empty), "-n", "2", *common]) == 2
    assert capsys.readouterr().err.strip() == \
        f"Error: {empty} line 2: the prompt encodes to no tokens (only whitespace?); pass some text"
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "w3"}, {"prompt": " ".join(["w5"] * 140)}])
    assert runtime_main(["generate", folder, "--prompts-file", str(long), "-n", "4", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: prompt plus --max-new-tokens is ") and "more than the model's context of 128" in err


def test_a_worker_opens_the_draft_once_and_gives_plain_completions(tiny_converted, tiny_checkpoints):
    """What `--draft` hands each worker (runtime.commands.ray_speculation): the folder, opened once
    in the worker, whole on its device; every block then speculates with it (no Ray needed here)."""
    import torch

    folder = str(tiny_converted["llama"])
    items = [{"prompt": p} for p in ("w5 w17 w40", "w6", "w7 w8 w7 w8")]
    plain = distributed.Worker(folder, "generate", STREAMED, {"max_new_tokens": 6}).run(items)[0]
    worker = distributed.Worker(folder, "generate", STREAMED,
                                {"max_new_tokens": 6, "draft": str(tiny_checkpoints["llama"]), "tree_budget": 4})
    draft = worker.task_options["draft"]
    assert isinstance(draft, torch.nn.Module)
    out, block = worker.run(items)
    assert out == plain and worker.task_options["draft"] is draft
    assert block.passes < 6 and worker.model.speculation["tree_budget"] == 4  # several rows' tokens per pass
