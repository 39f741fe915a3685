"""Ray Data workers: the same output as one process, one weight pass per block, failures retried."""

from __future__ import annotations

import os
import sys

import pytest

from runtime import distributed
from runtime.model import LayeredModel

ray = pytest.importorskip("ray", reason="Ray is installed by the test extra; see pyproject.toml")

# Each test starts Ray actors that import torch and open a model: tens of seconds on 2 cores.
cluster = pytest.mark.slow

STREAMED = {"device": "cpu", "max_cpu_memory": 0}  # every group streams: a weight pass is visible in stats


def same_threads() -> dict:
    """Workers use this process's torch threads, so float sums round as they do here."""
    import torch

    return {"threads": torch.get_num_threads()}


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


def single_process_scores(folder, items, batch_size):
    with LayeredModel.from_pretrained(folder, **STREAMED) as lm:
        return lm.score(items, batch_size=batch_size)


@cluster
def test_scores_equal_one_process_and_each_block_is_one_weight_pass(local_ray, tiny_converted):
    folder, items = tiny_converted["llama"], questions(20)
    expected = single_process_scores(folder, items, batch_size=4)
    out, stats = distributed.score_items(items, folder, workers=2, model_options=STREAMED, batch_size=4,
                                         **same_threads())
    assert out == expected  # identical lines (float scores compared exactly), in input order
    assert len(stats) == 2 and sum(s.items for s in stats) == 20
    for s in stats:
        assert s.streamed_groups == len(LayeredModel.from_pretrained(folder, **STREAMED).groups)  # all stream
        assert s.layer_loads == s.streamed_groups  # each group read once for the whole block


@cluster
def test_block_size_rounds_to_whole_micro_batches(local_ray, tiny_converted):
    """Blocks hold whole micro-batches, so every micro-batch is the one a single process makes."""
    folder, items = tiny_converted["llama"], questions(10)
    expected = single_process_scores(folder, items, batch_size=4)
    out, stats = distributed.score_items(items, folder, workers=1, block_size=5, model_options=STREAMED,
                                         batch_size=4, **same_threads())
    assert out == expected
    assert [s.items for s in stats] == [8, 2]


@cluster
def test_generate_equals_one_process(local_ray, tiny_converted):
    folder = tiny_converted["llama"]
    items = [{"prompt": f"w{3 + k} w{9 + 2 * k} w{30 + k}", "n": k} for k in range(6)]
    with LayeredModel.from_pretrained(folder, **STREAMED) as lm:
        done = lm.generate_batch([it["prompt"] for it in items], max_new_tokens=6, do_sample=False)
    expected = [{**it, "completion": g.text, "new_tokens": len(g.tokens)} for it, g in zip(items, done)]
    out, stats = distributed.generate_items(items, folder, workers=2, model_options=STREAMED,
                                            max_new_tokens=6, do_sample=False, **same_threads())
    assert out == expected
    assert [s.items for s in stats] == [3, 3]
    for s in stats:  # one pass per new token for the whole block, each pass every group once
        assert s.layer_loads == s.passes * s.streamed_groups


class DiesOnce(distributed.BlockWorker):
    """A worker whose process dies (or raises a transient error) on its first block, once per test."""

    marker = None
    how = "exit"

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.how == "exit":
                os._exit(1)
            raise OSError("the shared filesystem hiccupped")
        return super().__call__(batch)


@cluster
@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_failed_worker_loses_and_duplicates_nothing(local_ray, tiny_converted, tmp_path, how):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    worker = type("DiesOnce_" + how, (DiesOnce,), {"marker": str(tmp_path / "failed"), "how": how})
    folder, items = tiny_converted["llama"], questions(12)
    expected = single_process_scores(folder, items, batch_size=4)
    out, stats = distributed.score_items(items, folder, workers=2, model_options=STREAMED, batch_size=4,
                                         worker=worker, **same_threads())
    assert (tmp_path / "failed").exists()  # a worker did fail
    assert out == expected
    assert sorted(s.items for s in stats) == [4, 8]


def test_item_errors_are_found_before_workers_start(tiny_converted):
    with pytest.raises(distributed.UsageError, match=r"^item 2 needs \"prompt\""):
        distributed.score_items([questions(1)[0], {"prompt": "w3"}], tiny_converted["llama"], workers=2)


@cluster
def test_row_datasets_keep_their_columns(local_ray, tiny_converted):
    folder, items = tiny_converted["llama"], questions(8)
    expected = single_process_scores(folder, items, batch_size=8)
    ds = ray.data.from_items(items)
    rows = distributed.score_dataset(ds, folder, concurrency=1, block_size=8, model_options=STREAMED,
                                     batch_size=8).take_all()
    rows.sort(key=lambda r: r["id"])
    assert [r["scores"] for r in rows] == [e["scores"] for e in expected]
    assert [r["best"] for r in rows] == [e["best"] for e in expected]
    assert [r["choices"] for r in rows] == [e["choices"] for e in expected]
