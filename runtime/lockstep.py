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

With `offload`, a job parked before a decoder layer keeps its activations (the layer's
tensor inputs: hidden states, mask, position embeddings) in host memory until its turn:
the tensors themselves are moved (`t.data = ...`), so the references the model's own
forward holds follow them and the device copies are freed.
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
                 on_release: Callable[[int], None] | None = None, offload: torch.device | None = None):
        self.model, self.on_load, self.on_release, self.offload = model, on_load, on_release, offload
        self.offloaded_bytes = 0  # activation bytes moved to host memory and back
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
        hooks = self._watch_layer_inputs() if self.offload is not None else []
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.model.lockstep = None
            for h in hooks:
                h.remove()
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
        parked = self._to_host(getattr(self.local, "inputs", None))
        self.local.inputs = None
        self._wait_turn(k, i)
        for t in parked:
            t.data = t.data.to(self.model.device)
        if self.jobs[k].before_group is not None:
            self.jobs[k].before_group(i)

    # --- activations in host memory ---------------------------------------------------------
    def _watch_layer_inputs(self) -> list:
        """Hooks that note each decoder layer's tensor inputs before the layer's group is entered."""
        layers = self.model.model.get_submodule(self.model.manifest.layers_path)
        keep = {id(t) for t in self.model.model.buffers()}

        def note(module, args, kwargs):
            found = [*args, *kwargs.values()]
            found += [x for v in kwargs.values() if isinstance(v, tuple) for x in v]  # (cos, sin)
            self.local.inputs = [t for t in found if isinstance(t, torch.Tensor) and id(t) not in keep]

        return [layer.register_forward_pre_hook(note, with_kwargs=True, prepend=True) for layer in layers]

    def _to_host(self, inputs: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if not inputs:
            return []
        seen, moved = set(), []
        for t in inputs:
            if id(t) not in seen and t.device == self.model.device:
                seen.add(id(t))
                t.data = t.data.to(self.offload, copy=True)
                self.offloaded_bytes += t.numel() * t.element_size()
                moved.append(t)
        return moved

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
