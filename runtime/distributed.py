"""Scoring and generating over datasets with Ray Data: one streaming model per worker.

A streamed model costs one read of its weights per pass whatever the pass carries, so the
way past one GPU is more workers, each with a whole block of the job per pass. Every worker
is a Ray actor that opens one `LayeredModel` in its constructor and keeps it; each call hands
it one block of items, run together: scoring reads each layer once for the block, generation
makes one pass per new token for the whole block.

- `score_dataset(ds, folder)` / `generate_dataset(ds, folder)`: Ray Data in, Ray Data out
  (`Dataset.map_batches` with the worker class, `concurrency` workers, `batch_size` items a
  block), for pipelines that already live in Ray.
- `score_items(items, folder)` / `generate_items(items, folder)`: what `runtime score` and
  `runtime generate --prompts-file` run with `--ray-workers`: items in, the same items with
  their results out, in input order, as the single-process commands give them. Here every
  row of the dataset is one whole block, so blocks are exactly `block_size` consecutive
  items, as a single process would batch them, and a retried block is redone whole.

Failures: a worker process that dies (killed, out of memory, its node gone) is restarted by
Ray and its block run again; an `OSError` or `MemoryError` raised in a worker (a shared
filesystem that hiccups, memory that another process held) is retried up to
`MAX_RETRIES` times. A block's output is taken only from the call that completed it, so
nothing is lost or written twice. Bad input is checked on the driver before any worker starts.

The folder is opened by each worker from its own path: on a cluster it must be visible at
that path on every node (a shared filesystem, or the same copy on each node), and every node
needs this package installed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from reshard.errors import ReshardError, UsageError

MAX_RETRIES = 3  # retries of a block whose worker raised a transient error (OSError, MemoryError)
RETRIED_ERRORS = [OSError, MemoryError]


def require_ray():
    """The `ray` module, or one clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships with ray[data])
    except ImportError:
        raise UsageError("--ray-workers needs Ray Data; install it with `pip install 'reshard[ray]'`") from None
    return ray


@dataclass
class BlockStats:
    """What one block cost the worker that ran it."""

    worker: str  # "host:pid" of the worker process
    items: int  # items in the block
    passes: int  # forward passes through the model for this block
    layer_loads: int  # groups put in place for compute during this block
    streamed_groups: int  # groups that stream (the rest stay resident): one weight pass loads each once
    seconds: float  # wall time of the block in the worker


class Worker:
    """One streaming model in one Ray actor; `task` is "score" or "generate".

    `model_options` go to `LayeredModel.from_pretrained` (device defaults to cuda where the
    worker sees a GPU, else cpu); `task_options` to `LayeredModel.score` or `generate_batch`.
    `threads` sets torch's CPU threads: float sums split over another number of threads round
    differently, so results are bit-identical to a single process's only with its thread count."""

    def __init__(self, folder: str, task: str, model_options: dict, task_options: dict, threads: int | None = None):
        import torch

        from .model import LayeredModel
        from .speculate import LOOKUP, open_draft

        if threads:  # else the CPUs Ray gave this worker (it sets OMP_NUM_THREADS)
            torch.set_num_threads(threads)
        self.task, self.task_options = task, dict(task_options)
        self.model = LayeredModel.from_pretrained(folder, **_with_device(model_options))
        draft = self.task_options.get("draft")
        if isinstance(draft, str) and draft != LOOKUP:  # a draft folder: opened once, whole on the worker's device
            self.task_options["draft"] = open_draft(self.model, draft)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def run(self, items: list[dict]) -> tuple[list[dict], BlockStats]:
        import time

        stats = self.model.stats
        passes, loads, t0 = stats.passes, stats.layer_loads, time.perf_counter()
        out = self._run(items)
        block = BlockStats(self.name, len(items), stats.passes - passes, stats.layer_loads - loads,
                           len(self.model.streamed), time.perf_counter() - t0)
        return out, block

    def _run(self, items: list[dict]) -> list[dict]:
        if self.task == "score":
            return self.model.score(items, **self.task_options)
        opts = dict(self.task_options)
        seed = opts.pop("seed", None)
        if seed is not None:
            import torch

            torch.manual_seed(seed)
        done = self.model.generate_batch([it["prompt"] for it in items], **opts)
        return [{**it, "completion": g.text, "new_tokens": len(g.tokens)} for it, g in zip(items, done)]


class BlockWorker(Worker):
    """Rows are whole blocks: {"block": n, "items": JSON list}; returns their results likewise."""

    def __call__(self, batch: dict) -> dict:
        blocks, outs, stats = list(batch["block"]), [], []
        for text in batch["items"]:
            out, block = self.run(json.loads(text))
            outs.append(json.dumps(out))
            stats.append(json.dumps(block.__dict__))
        return {"block": blocks, "items": outs, "stats": stats}


class RowWorker(Worker):
    """Rows are items (columns prompt/choices/text, or prompt); a batch is one block."""

    def __call__(self, batch):
        items = [_row_to_item(row) for row in batch.to_dict("records")]
        out, _ = self.run(items)
        import pandas as pd

        return pd.DataFrame(out)


def score_dataset(ds, folder, *, concurrency: int = 1, block_size: int = 256, num_gpus: float | None = None,
                  threads: int | None = None,
                  model_options: dict | None = None, **score_options):
    """Score every row of Ray Dataset `ds` (columns as `runtime score`'s JSONL keys) with
    `concurrency` workers, `block_size` rows a block (one weight pass each); `score_options`
    go to `LayeredModel.score` (e.g. `batch_size`, the micro-batch). Returns the dataset of
    scored rows: the input columns plus "scores"/"best" or "logprob"/"tokens". `threads`: torch
    CPU threads per worker (see `Worker`)."""
    return _map_rows(ds, folder, "score", concurrency, block_size, num_gpus, model_options, score_options, threads)


def generate_dataset(ds, folder, *, concurrency: int = 1, block_size: int = 256, num_gpus: float | None = None,
                     threads: int | None = None,
                     model_options: dict | None = None, **generate_options):
    """Generate for every row of `ds` (a "prompt" column) with `concurrency` workers, `block_size`
    prompts a block; adds "completion" and "new_tokens". `generate_options` go to `generate_batch`."""
    return _map_rows(ds, folder, "generate", concurrency, block_size, num_gpus, model_options, generate_options,
                     threads)


def score_items(items: list[dict], folder, *, workers: int, address: str | None = None,
                block_size: int | None = None, model_options: dict | None = None, threads: int | None = None,
                worker=None, **score_options) -> tuple[list[dict], list[BlockStats]]:
    """`LayeredModel.score` over `workers` Ray workers: (scored items in input order, stats per block).

    Blocks default to one per worker and are rounded up to whole micro-batches (`batch_size`),
    so each micro-batch is the one a single process makes. `threads`: torch CPU threads per
    worker (see `Worker`). `worker` is the actor class (default `BlockWorker`; a subclass may
    add behaviour)."""
    _check_score_items(folder, items)
    size = score_block_size(len(items), workers, block_size, score_options.get("batch_size", 8))
    return _run_blocks(items, folder, "score", workers, address, size, model_options, score_options, threads, worker)


def generate_items(items: list[dict], folder, *, workers: int, address: str | None = None,
                   block_size: int | None = None, model_options: dict | None = None, threads: int | None = None,
                   worker=None, **generate_options) -> tuple[list[dict], list[BlockStats]]:
    """`generate_batch` over `workers` Ray workers for items {"prompt": ...}: (items with
    "completion" and "new_tokens", in input order; stats per block)."""
    if any(not isinstance(it, dict) or not isinstance(it.get("prompt"), str) for it in items):
        raise UsageError("every item needs a \"prompt\" string")
    return _run_blocks(items, folder, "generate", workers, address, block_size, model_options, generate_options,
                       threads, worker)


def score_block_size(n_items: int, workers: int, block_size: int | None, micro_batch: int) -> int:
    """Items per block: `block_size`, or enough for one block per worker, rounded up to whole
    micro-batches so that blocks cut the items where a single process cuts its micro-batches."""
    size = block_size or math.ceil(n_items / max(workers, 1))
    return math.ceil(size / micro_batch) * micro_batch if micro_batch > 0 else size


# --- the mechanism ---------------------------------------------------------------------------

def _run_blocks(items, folder, task, workers, address, block_size, model_options, task_options, threads, worker):
    if workers < 1:
        raise UsageError(f"--ray-workers must be 1 or more, not {workers}")
    if block_size is not None and block_size < 1:
        raise UsageError(f"--ray-block-size must be 1 or more, not {block_size}")
    if not items:
        return [], []
    ray = require_ray()
    size = block_size or math.ceil(len(items) / workers)  # default: one weight pass per worker
    blocks = [{"block": n, "items": json.dumps(items[k:k + size])} for n, k in enumerate(range(0, len(items), size))]
    started = _connect(ray, address)
    try:
        ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
        rows = _map(ds, worker or BlockWorker, folder, task, workers, 1, None, model_options, task_options,
                    threads, batch_format="numpy").take_all()
    except Exception as e:
        raise _project_error(e) or e
    finally:
        if started:
            ray.shutdown()
    rows.sort(key=lambda r: int(r["block"]))
    out = [item for r in rows for item in json.loads(str(r["items"]))]
    stats = [BlockStats(**json.loads(str(r["stats"]))) for r in rows]
    return out, stats


def _map_rows(ds, folder, task, concurrency, block_size, num_gpus, model_options, task_options, threads):
    require_ray()
    return _map(ds, RowWorker, folder, task, concurrency, block_size, num_gpus, model_options, task_options,
                threads, batch_format="pandas")


def _map(ds, cls, folder, task, concurrency, batch_size, num_gpus, model_options, task_options, threads, *,
         batch_format):
    import ray.data

    ds.context.actor_task_retry_on_errors = RETRIED_ERRORS
    gpus = _gpus_per_worker() if num_gpus is None else num_gpus
    # one block at a time per worker: a block is a whole weight pass, so queueing a second one
    # behind it on the same worker would only keep an idle worker idle
    pool = ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1)
    return ds.map_batches(
        cls, fn_constructor_args=(str(folder), task, dict(model_options or {}), dict(task_options), threads),
        batch_size=batch_size, batch_format=batch_format, compute=pool,
        num_gpus=gpus, max_task_retries=MAX_RETRIES)


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one; True if we started it."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", ignore_reinit_error=True)
    return True


def _gpus_per_worker() -> float:
    """One GPU per worker where the cluster has GPUs, none otherwise."""
    import ray

    return 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0


def _with_device(options: dict) -> dict:
    if options.get("device"):
        return options
    import torch

    return {**options, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _row_to_item(row: dict) -> dict:
    """A dataset row as the item dict: Arrow gives every column to every row, so the keys that
    select the kind of item are dropped where this row has none."""
    item = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
    for key in ("text", "prompt", "choices"):
        if key in item and (item[key] is None or (isinstance(item[key], float) and math.isnan(item[key]))):
            del item[key]
    return item


def _project_error(e: BaseException) -> ReshardError | None:
    """The project's own error a worker raised, from inside Ray's wrappers, if that is what failed."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ReshardError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _check_score_items(folder, items: list[dict]) -> None:
    """Item errors are the caller's to fix: find them here, before any worker starts."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from reshard.source import TOKENIZER_FILES

    from .score import encode_item

    if not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError("this folder has no tokenizer files; convert a checkpoint that has them")
    tok = AutoTokenizer.from_pretrained(str(folder))
    for n, item in enumerate(items):
        encode_item(tok, item, n)
