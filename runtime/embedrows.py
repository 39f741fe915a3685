"""Streamed input embeddings: a pass brings the rows its tokens look up, not the whole matrix.

An embedding layer is a lookup: a decode pass of one token reads one row of a matrix that for a
128k-token vocabulary is 1-2 GB (more in a GGUF folder, which stores it in float32). Streamed as a
group, all of it would cross the link (or be cast) on every pass. So when the input embeddings'
group holds that weight alone (not quantized, not shared with a tied output head) and streams,
its load brings nothing (`GroupLoader.partial`), and a hook on the embedding module reads the
rows of the call's ids from the file's mapping (or the group's pinned host copy), casts them to
the compute dtype, moves them to the device, and runs the module's own forward on them with the
ids mapped to those rows: the same values as a lookup in the whole matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from reshard.format import row_gathered

from . import budget


def find(model: nn.Module, loader) -> tuple[int, str] | None:
    """(group index, weight name) of the input embeddings where their rows can be gathered: the
    folder's first group holds that weight alone (`reshard.format.row_gathered`), it is the weight of
    `model.get_input_embeddings()` (an `nn.Embedding`), and the group is not resident on the device."""
    found = row_gathered(loader.manifest)
    module = model.get_input_embeddings()
    if found is None or not isinstance(module, nn.Embedding):
        return None
    i, name, _ = found
    owner, _, attr = name.rpartition(".")
    try:
        holder = model.get_submodule(owner)
    except AttributeError:  # not a module's parameter (a buffer's group, say)
        return None
    if attr != "weight" or holder is not module or loader.places[i] == budget.DEVICE:
        return None
    return i, name


class EmbeddingRows:
    """The hooks that gather group `i`'s embedding rows per call (see the module docstring)."""

    def __init__(self, model: nn.Module, loader, i: int, name: str):
        self.loader, self.i, self.name = loader, i, name
        self.module = model.get_input_embeddings()
        self.empty = self.module._parameters["weight"]
        self.padding = self.module.padding_idx
        self.owner = next((m for m in model.modules() if any(c is self.module for c in m.children())), None)
        self.ids = None  # the ids the owner's call got (see the module docstring)
        loader.partial[i] = ((0, 0), frozenset([name]))  # the group's load brings nothing

    def install(self) -> list:
        hooks = [self.module.register_forward_pre_hook(self._gather), self.module.register_forward_hook(self._restore)]
        if self.owner is not None:
            hooks.append(self.owner.register_forward_pre_hook(self._keep_ids, with_kwargs=True))
        return hooks

    def _keep_ids(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self.ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None

    def _source(self) -> torch.Tensor:
        """The whole stored matrix on the CPU: a view of the pinned host copy or of the file's mapping."""
        gf, held = self.loader.files[self.i], self.loader.host_data(self.i)
        return gf.view_of(held, self.name) if held is not None else gf.tensor(self.name)

    def _gather(self, module, args):
        ids = args[0]
        if ids.is_meta and self.ids is not None and self.ids.shape == ids.shape:
            ids = self.ids
        unique, inverse = torch.unique(ids, return_inverse=True)
        source = self._source()
        rows = source.index_select(0, unique.to("cpu"))  # an id outside the vocabulary raises, as the lookup does
        stats = self.loader.stats
        nbytes = rows.numel() * rows.element_size()
        stats.bytes_streamed += nbytes
        if self.loader.host_data(self.i) is None:
            stats.bytes_read += nbytes
        if self.loader.device.type == "cuda":
            stats.bytes_copied += nbytes
        rows = rows.to(self.loader.dtype) if rows.dtype != self.loader.dtype else rows
        module._parameters["weight"] = nn.Parameter(rows.to(self.loader.device), requires_grad=False)
        module.padding_idx = None  # an index into the whole matrix; it only matters for gradients
        return (inverse.to(ids.device), *args[1:])

    def _restore(self, module, args, output):
        module._parameters["weight"] = self.empty
        module.padding_idx = self.padding
