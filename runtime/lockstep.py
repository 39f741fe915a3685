"""Several forwards through one weight pass: layers outermost, forwards innermost.

Each job is an ordinary transformers forward (`model(...)`) running in its own thread, so
every architecture transformers runs works unchanged: masks, rotary tables and caches are
the model's own code. The `LayeredModel` group hooks call `Lockstep.enter(i)` instead of
loading group i themselves, and that call is the scheduler:

- one job computes at a time (it holds the token);
- a job that reaches group i parks there; the token goes to the lowest-numbered job that
  waits for the lowest group, so group i is loaded once, every job passes through it in
  job order, and only then is it released and group i+1 loaded.

Jobs with lower numbers therefore always run a group before jobs with higher numbers,
which lets a later job use what an earlier one computed in the same group (the scorer
hands a shared prompt's KV cache to the jobs that score its choices this way).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

DONE = math.inf  # the group a finished job "waits for": never the lowest


@dataclass
class Job:
    run: Callable[[], object]  # the forward (and whatever it returns), run under inference_mode
    before_group: Callable[[int], None] | None = None  # called with group i when this job enters it


class Lockstep:
    """Runs jobs through one pass of `model`'s groups; see the module docstring."""

    def __init__(self, model, *, on_load: Callable[[int], None] | None = None,
                 on_release: Callable[[int], None] | None = None):
        self.model, self.on_load, self.on_release = model, on_load, on_release
        self.lock = threading.Lock()
        self.turns: list[threading.Condition] = []  # per job, on `lock`: woken only when it is that job's turn
        self.local = threading.local()
        self.at: list[float] = []  # per job: the group it waits for or runs in (-1: not started)
        self.holder: int | None = None  # the job that may compute now
        self.loaded: int | None = None  # the group whose weights are in place
        self.errors: list[BaseException] = []

    def run(self, jobs: list[Job]) -> list:
        """Run every job; return their results in order. Counts as one pass in `model.stats`."""
        self.jobs, self.at, results = jobs, [-1] * len(jobs), [None] * len(jobs)
        self.turns = [threading.Condition(self.lock) for _ in jobs]
        threads = [threading.Thread(target=self._work, args=(k, results), name=f"lockstep-{k}", daemon=True)
                   for k in range(len(jobs))]
        t0 = time.perf_counter()
        self.model.lockstep = self
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.model.lockstep = None
            self._release()
        self.model.stats.passes += 1
        self.model.stats.seconds += time.perf_counter() - t0
        if self.errors:
            raise self.errors[0]
        return results

    def enter(self, i: int) -> None:
        """Hook: the calling job is about to run group i."""
        k = self.local.k
        if self.at[k] == i:
            return  # another module of the group it is in
        self._wait_turn(k, i)
        if self.jobs[k].before_group is not None:
            self.jobs[k].before_group(i)

    # --- the scheduler -------------------------------------------------------------------
    def _work(self, k: int, results: list) -> None:
        self.local.k = k
        try:
            self._wait_turn(k, -1)  # even the code before the first group runs one job at a time
            with torch.inference_mode():
                results[k] = self.jobs[k].run()
        except BaseException as e:  # noqa: BLE001 - handed to the caller of run()
            self.errors.append(e)
        finally:
            with self.lock:
                self.at[k] = DONE
                self._pass_token(k)

    def _wait_turn(self, k: int, i: int) -> None:
        with self.lock:
            self.at[k] = i
            self._pass_token(k)
            self.turns[k].wait_for(lambda: self.holder is None and self._next() == k)
            self.holder = k
            if i >= 0 and self.loaded != i:
                self._release()
                self.model._load_group(i)
                self.loaded = i
                if self.on_load is not None:
                    self.on_load(i)

    def _pass_token(self, k: int) -> None:
        """Job k lets go of the token (if it has it) and wakes the job whose turn it is now."""
        if self.holder == k:
            self.holder = None
        if self.holder is None and min(self.at) != DONE:
            self.turns[self._next()].notify()

    def _next(self) -> int:
        """The job to run next: the lowest-numbered one among those waiting for the lowest group."""
        lowest = min(self.at)
        return self.at.index(lowest)

    def _release(self) -> None:
        if self.loaded is None:
            return
        self.model._unload_group(self.loaded)
        if self.on_release is not None:
            self.on_release(self.loaded)
        self.loaded = None
