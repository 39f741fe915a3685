"""`LayeredModel`: a transformers model whose weights stream through the device group by group.

The model is transformers' own, built on `meta` from the converted folder's config, so its
forward, its KV cache and `generate` are transformers' code. Hooks on each group's modules
put that group's weights in place just before they run (from the background prefetcher)
and take them away after, so the device holds about `prefetch + 1` groups at a time.
Groups that fit the memory budget (runtime.budget) are put in place once and get no hooks:
a model that fits entirely runs as transformers' own model, with no per-pass work. Each job
(`model(...)`, `generate`, `score`, `generate_batch`) first makes room for its activations,
KV cache and logits (`fit_job`, runtime/jobmemory.py): resident groups move off the device if it
needs the space.
"""

from __future__ import annotations

import torch
from torch import nn

from reshard.errors import UsageError
from reshard.format import read_manifest
from reshard.plan import build_empty_model, read_config
from reshard.verify import verify_folder

from . import allowance, budget, embedrows, lowbit, packedexperts
from .expertcache import cache_budget
from .experts import ExpertStreamer
from .prediction import guess_allowance
from .opening import (converted_folder, group_costs, load_generation_config, load_tokenizer, pin_device,
                      place_buffers, place_groups, resolve_device, resolve_runtime_dtype, routed_tokens)
from .cpuexperts import CpuExperts, open_cpu_experts
from .hostcompute import HostCompute, open_host_compute
from .jobmemory import JobMemory
from .stream import GroupLoader, Loaded, Prefetcher, StreamStats


class _Slot:
    """Where one parameter lives in the model, and its empty (meta) stand-in."""

    __slots__ = ("module", "attr", "empty")

    def __init__(self, model: nn.Module, name: str):
        owner, _, self.attr = name.rpartition(".")
        self.module = model.get_submodule(owner)
        self.empty = self.module._parameters[self.attr]

    def put(self, tensor: torch.Tensor) -> None:
        self.module._parameters[self.attr] = nn.Parameter(tensor, requires_grad=False)

    def clear(self) -> None:
        self.module._parameters[self.attr] = self.empty


class LayeredModel(JobMemory):
    """A causal LM streamed layer by layer from a folder written by `reshard convert`.

    Calls and attributes go to the wrapped transformers model (`.model`), so
    `model(input_ids)` and `model.generate(...)` behave as transformers' do.
    """

    def __init__(self, model, manifest, loader: GroupLoader, *, device, prefetch: int, tokenizer=None,
                 expert_cache: int = 0, sparse_experts: bool = True, memory: budget.Budget | None = None,
                 costs: list[budget.GroupCost] | None = None, host: HostCompute | None = None,
                 predict_experts: bool = False, cpu_experts: CpuExperts | None = None):
        self.model, self.manifest, self.loader = model, manifest, loader
        self.device, self.tokenizer, self.memory, self.depth = device, tokenizer, memory, prefetch
        self.costs = costs if costs is not None else group_costs(loader)  # from_pretrained's, made once
        self.stats = loader.stats
        self.groups = manifest.groups
        # the names each group's loaded tensors carry: parameters (quantized ones expanded or packed), then aliases
        self._names = [loader.tensor_names(i) for i in range(len(manifest.groups))]
        self._slots = [[_Slot(model, name) for name in names] for names in self._names]
        self.places = loader.places
        self.streamed = [i for i, p in enumerate(self.places) if p != budget.DEVICE]
        self.prefetcher = Prefetcher(loader.load, self.streamed, prefetch, self.stats)
        # decoder layers the last pass never entered (Llama 3.2 Vision's cross-attention layers, which text
        # skips): left out of the read-ahead, read when a pass enters one after all
        self.idle: frozenset[int] = frozenset()
        self._entered: set[int] = set()
        self._current: Loaded | None = None
        self.lockstep = None  # set while a Lockstep runs several forwards through one pass
        self.cuda_threads = 0  # the most forward threads a job ran on CUDA: their cuBLAS handles stay (allowance)
        self._hooks: list = []  # handles of the streaming hooks, removed by close()
        self.tree_costs = None  # (draft, runtime.treecost.TreeCosts): measured at the first tree speculation
        self.speculation = None  # the last tree speculation's statistics (runtime.speculate.SpecStats)
        self._hold_resident()
        self._install_hooks()
        if (embedding := embedrows.find(model, loader)) is not None:  # a streamed lookup reads its rows alone
            self._hooks.extend(embedrows.EmbeddingRows(model, loader, *embedding).install())
        self.host = host  # layers computed on the CPU beside the device (runtime/hostcompute.py), or None
        if host is not None:
            host.enabled = lambda: self.lockstep is None
            self._hooks.extend(host.install(self.model, self.model.get_submodule(self.manifest.layers_path)))
            if host.fixed:  # those layers never cross the link: the prefetcher skips them
                self.streamed = [i for i in self.streamed if i not in host.candidates]
                self.restart_read_ahead()
        self.experts = ExpertStreamer(loader, cache_bytes=expert_cache, predict=predict_experts)  # MoE: routed experts
        if sparse_experts:
            self.experts.install(model)
        self.cpu_experts = cpu_experts  # routed experts computed on the CPU (runtime/cpuexperts.py), or None
        if cpu_experts is not None:
            self.experts.elsewhere = cpu_experts.elsewhere
            cpu_experts.on_device = self.experts.on_device
            cpu_experts.install(model)

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, prefetch: int = 1,
                        max_gpu_memory=None, max_cpu_memory=None, trust_remote_code: bool = False,
                        verify: bool = False, revision: str | None = None, token: str | None = None,
                        quantize: str | None = None, expert_cache=None,
                        sparse_experts: bool = True, packed: bool = True, cpu_layers=None,
                        predict_experts: bool = False, cpu_experts=None) -> "LayeredModel":
        """Open a converted folder. `device` defaults to cuda if torch sees a GPU, else cpu;
        `dtype` defaults to the folder's (on the CPU, a float16 or bfloat16 folder computes in
        bfloat16 where the CPU does it natively, else in float32); `prefetch` is how many groups
        the background thread reads ahead (0 reads each group when it is needed).

        `max_gpu_memory` / `max_cpu_memory` (bytes, or text like "12GiB") bound what the model
        uses on the device (CUDA: resident weights, the groups in flight while streaming and the
        job's activations, never more than the device can give) and in host RAM (on the CPU, all
        of that; on CUDA, the weights kept there); groups that fit stay, the rest stream from disk.
        The defaults come from the free memory (see runtime.budget); 0 streams everything.
        A job larger than the plan allowed for moves resident groups off the device when it starts.
        Streamed mixture-of-experts layers read only the experts their tokens use
        (runtime/experts.py); `expert_cache` (bytes or text) keeps recently used experts on the
        device, by default in what the budget leaves after placing the groups; `predict_experts`
        starts reading the next MoE layer's likely experts while a layer computes (runtime/prediction.py);
        `sparse_experts` False streams MoE layers whole (the baseline the MoE benchmark compares with).
        Every file's presence, size and header are checked against the manifest; `verify`
        also checks their sha256 (reads every byte once).

        `path` may also be a hub repo id ("org/model", at `revision`, with `token`) or a `.gguf`
        file: it is converted on first use into the cache (see reshard/cache.py), in `dtype` and
        `quantize` ("int8", "int4"), and opened from there.

        On the CPU, a quantized folder's linear weights stay packed and run through torch's
        low-bit kernels with bfloat16 activations (runtime/lowbit.py), and so do the quantized experts
        of MoE layers (runtime/packedexperts.py); `packed=False` expands them to the compute
        dtype instead (slower, but exact float32 math with dtype="float32").

        `cpu_layers` (N or "auto"; llama.cpp's -ngl seen from the other side) computes decoder
        layers on the CPU where their weights wait instead of copying them to the device: N the last
        N layers not resident on the device, "auto" each of those per pass when the planner finds the
        CPU faster at that pass's token count (runtime/hybrid.py, runtime/hostcompute.py).
        `cpu_experts` ("on", "auto", "off"; llama.cpp's --n-cpu-moe) computes the routed experts of
        streamed MoE layers on the CPU, attention, router and shared experts staying on the device:
        always, or per call where the planner finds the CPU faster (runtime/cpuexperts.py)."""
        path = converted_folder(path, dtype=dtype, revision=revision, token=token, quantize=quantize,
                                trust_remote_code=trust_remote_code)
        manifest = read_manifest(path)
        dev = resolve_device(device)
        compute_dtype = resolve_runtime_dtype(dtype, manifest.dtype, dev)
        if prefetch < 0:
            raise UsageError(f"prefetch must be 0 or more, not {prefetch}")
        verify_folder(path, checksums=verify, manifest=manifest)
        config = read_config(path, path, trust_remote_code=trust_remote_code)
        model = build_empty_model(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
        packing = lowbit.plan_packing(model, manifest, dev) if packed else {}
        lowbit.install_packed(model, packing)
        expert_packing = packedexperts.plan(model, manifest, dev) if packed and sparse_experts else {}
        packedexperts.install(model, expert_packing)
        place_buffers(model, dev)
        pin_device(model, dev)
        load_generation_config(model, path)
        loader = GroupLoader(path, manifest, dev, compute_dtype, StreamStats(), packing=packing,
                             expert_packing=expert_packing)
        memory = budget.make_budget(dev, prefetch, max_gpu_memory, max_cpu_memory)
        if predict_experts and sparse_experts:  # guesses wait in host memory (runtime/prediction.py)
            memory = budget.set_aside(memory, guess_allowance(manifest))
        costs = group_costs(loader, allowance.experts_per_token(model.config) if sparse_experts else 0, model)
        loader.places, memory = place_groups(loader, model.config, memory, costs)
        prefetch = memory.prefetch  # 0 where two groups in flight would not fit
        load_persistent_buffers(model, loader)
        cache = cache_budget(loader, costs, memory, allowance.job_bytes(model.config, compute_dtype, allowance.DEFAULT),
                             expert_cache, routed_tokens(costs, allowance.DECODE.tokens))
        host = open_host_compute(cpu_layers, path, loader, costs, lambda i: int(manifest.groups[i].name.split(".")[1]),
                                 model if packed else None)
        routed_on_cpu = open_cpu_experts(cpu_experts, loader) if sparse_experts else None
        return cls(model, manifest, loader, device=dev, prefetch=prefetch, tokenizer=load_tokenizer(path),
                   expert_cache=cache if sparse_experts else 0, sparse_experts=sparse_experts, memory=memory,
                   costs=costs, host=host, predict_experts=predict_experts, cpu_experts=routed_on_cpu)

    # --- calls go to transformers ------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        self.fit_job(allowance.shape_of_call(args, kwargs))
        with torch.inference_mode():
            return self.model(*args, **kwargs)

    def generate(self, *args, draft=None, tree_budget="auto", **kwargs):
        """transformers' `generate`; with `draft` (a model or a folder sharing the target's tokenizer),
        tree speculative decoding instead, `tree_budget` tokens checked per pass (runtime/speculate.py)."""
        if draft is not None:
            from .speculate import generate_tree

            input_ids = kwargs.pop("input_ids") if "input_ids" in kwargs else args[0]
            return generate_tree(self, input_ids, draft, tree_budget=tree_budget, **kwargs)
        chunk = self.fit_job(allowance.shape_of_generate(args, kwargs, self.model.generation_config), chunkable=True)
        if chunk and kwargs.get("prefill_chunk_size") is None:
            kwargs["prefill_chunk_size"] = chunk
        with torch.inference_mode():
            return self.model.generate(*args, **kwargs)

    def score(self, items: list[dict], **kwargs) -> list[dict]:
        """Log-probabilities of choices given prompts, or of texts, in one weight pass; see runtime/score.py."""
        from .score import score

        return score(self, items, **kwargs)

    def generate_batch(self, prompts: list[str], **kwargs):
        """Generate for all `prompts` together, each pass serving the whole batch; see runtime/batch.py."""
        from .batch import generate_batch

        return generate_batch(self, prompts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def close(self) -> None:
        """Stop the background thread and let go of every weight, on the device and in host
        memory, now rather than at the next garbage collection (the hooks that tie the
        transformers model to this object are removed too). The model cannot run after this."""
        self.prefetcher.close()
        self.experts.close()
        if self.cpu_experts is not None:
            self.cpu_experts.close()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for slots in self._slots:
            for slot in slots:
                slot.clear()
        self._current = None
        self.loader.close()

    def __enter__(self) -> "LayeredModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the streaming hooks -------------------------------------------------------------
    def _resident_bytes(self, i: int, place: str) -> int:
        """Memory group i takes where it waits: on the device what it holds in place (GroupLoader.held_bytes),
        in host RAM or on disk its file's bytes."""
        if place == budget.DEVICE:
            return self.costs[i].held
        file = self.loader.files[i]
        return file.nbytes if file is not None else 0

    def _hold_resident(self) -> None:
        """Put DEVICE groups in place for good and HOST groups in host memory, once."""
        for i, place in enumerate(self.places):
            self._count_resident(i, +1)
            if place == budget.HOST:
                self.loader.hold(i)
            elif place == budget.DEVICE:
                loaded = self.loader.load(i)
                if loaded.event is not None:
                    loaded.event.synchronize()
                for slot, name in zip(self._slots[i], self._names[i]):
                    slot.put(loaded.tensors[name])
                packedexperts.place(self.model, self.groups[i], loaded.tensors, self.loader.expert_packing,
                                    self.loader.scheme)
                self.stats.per_group_loads[i] += 1
                if self.costs[i].made_anew:  # expanded or cast: the file's pages are not used
                    self.loader.release_pages(i)
        self.loader.drop_staging()

    def _install_hooks(self) -> None:
        layers = self.model.get_submodule(self.manifest.layers_path)
        for i, group in enumerate(self.groups):
            # Resident groups keep their hooks: a Lockstep schedules by them, and when no Lockstep
            # runs, _enter returns at once for them.
            if group.kind == "layer":
                layer = layers[int(group.name.split(".")[1])]
                self._hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: self._enter(i)))
                self._hooks.append(layer.register_forward_hook(lambda *_, i=i: self._leave(i)))
                continue
            for owner in {slot.module for slot in self._slots[i]}:
                self._hooks.append(owner.register_forward_pre_hook(lambda *_, i=i: self._enter(i)))
        self._hooks.append(self.model.register_forward_pre_hook(lambda *_: self._start_pass()))
        self._hooks.append(self.model.register_forward_hook(lambda *_: self._end_pass()))

    def _enter(self, i: int) -> None:
        if self.lockstep is not None:  # several forwards share this pass (runtime/lockstep.py)
            return self.lockstep.enter(i)
        self._entered.add(i)
        if self.places[i] == budget.DEVICE:
            return  # in place for good
        if self._current is not None and self._current.index == i:
            return
        if self._current is not None:
            self._leave(self._current.index)
        if self.host is not None and i in self.host.active:
            return self._put_host_weights(i)
        self._load_group(i)

    def _put_host_weights(self, i: int) -> None:
        """Group i runs on the CPU this pass: its weights from host memory, nothing crosses the link."""
        loaded = self.host.weights(i)
        for slot, name in zip(self._slots[i], self._names[i]):
            if name in loaded.tensors and name not in self.host.swapped:
                slot.put(loaded.tensors[name])
        self.host.put_packed(self.model, i, loaded.tensors)
        self._current = loaded

    def _load_group(self, i: int) -> None:
        if self.places[i] == budget.DEVICE:
            return
        loaded = self.prefetcher.get(i)
        if loaded.event is not None:
            torch.cuda.current_stream(self.device).wait_event(loaded.event)
            for t in loaded.tensors.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        for slot, name in zip(self._slots[i], self._names[i]):
            if name in loaded.tensors:  # routed experts are put in place by runtime/experts.py
                slot.put(loaded.tensors[name])
        packedexperts.place(self.model, self.groups[i], loaded.tensors, self.loader.expert_packing, self.loader.scheme)
        self._current = loaded
        self.stats.layer_loads += 1
        self.stats.bytes_streamed += loaded.nbytes
        self.stats.per_group_loads[i] += 1

    def _leave(self, i: int) -> None:
        if self.lockstep is None and self._current is not None and self._current.index == i:
            self._unload_group(i)

    def _unload_group(self, i: int) -> None:
        if self.places[i] == budget.DEVICE:
            return
        for slot in self._slots[i]:
            slot.clear()
        packedexperts.clear(self.model, self.groups[i])
        self.experts.release(i)
        self._current = None
        if self.host is not None and i in self.host.active:
            self.host.put_plain(self.model)
            self.host.loader.release_pages(i)
        elif self.device.type == "cpu":
            self.loader.release_pages(i)

    def _start_pass(self) -> None:
        if self.lockstep is not None:
            return
        self._entered.clear()
        self.stats.start_pass()

    def _end_pass(self) -> None:
        if self.lockstep is not None:
            return
        if self._current is not None:
            self._leave(self._current.index)
        if self.device.type == "cuda":  # so that the pass's time includes its kernels
            torch.cuda.current_stream(self.device).synchronize()
        done = self.stats.end_pass()
        self._skip_idle_layers()
        if self.host is not None:
            done.cpu_layers = dict(self.host.log)
        if self.cpu_experts is not None:
            done.cpu_experts = dict(self.cpu_experts.log)

    def _skip_idle_layers(self) -> None:
        """Leave the decoder layers this pass did not enter out of the read-ahead (all of them back
        once a pass enters one): reading them ahead would read bytes no pass uses."""
        layers = [i for i in self.streamed if self.groups[i].kind == "layer"]
        idle = frozenset(i for i in layers if i not in self._entered)
        if idle == self.idle or len(idle) == len(layers):
            return  # unchanged, or a pass that entered no layer at all (nothing learned)
        self.idle = idle
        self.restart_read_ahead()


def load_persistent_buffers(model, loader) -> None:
    """Buffers the checkpoint holds (a router's score bias, say) replace the computed ones, once."""
    for i, group in enumerate(loader.manifest.groups):
        for name in group.buffers:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[attr] = loader.files[i].tensor(name).to(loader.device, copy=True)
