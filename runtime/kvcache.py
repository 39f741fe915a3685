"""`BatchCache`: the KV cache of sequences that decode together and come and go.

Rows are left-aligned by padding: every row's newest token sits in the last column, so one
decode step appends one column for all rows, and transformers' own `DynamicCache` (whose
layers are plain tensors (B, heads, L, head_dim)) holds the batch. `mask` (B, L) marks each
row's real columns; positions come from it, so a padded row computes what it computes alone.
A newly prefilled batch joins by padding whichever side is shorter on the left; finished rows
leave by row selection, and columns that are padding in every remaining row are dropped.
Sliding-window layers keep only their last columns: the right ends stay aligned, and their
`cumulative_length` (the length the masks are built for) is the longest of the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# what a forward names the cache it is passed: transformers 5.2x `cache`, earlier versions `past_key_values`
CACHE_ARGS = ("cache", "past_key_values")


def passed_cache(kwargs: dict):
    """The cache a forward call (of the model or of one of its layers) was given, by either name, or None."""
    return next((kwargs[a] for a in CACHE_ARGS if kwargs.get(a) is not None), None)


class BatchCache:
    """A `DynamicCache` of B rows and its (B, L) mask of real columns."""

    def __init__(self, cache, mask: torch.Tensor):
        self.cache = cache  # transformers' DynamicCache, filled by the forwards that used it
        self.mask = mask  # (B, L) long, 1 where a row has a real token

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def next_positions(self) -> torch.Tensor:
        """(B, 1): the position of each row's next token (its count of real tokens so far)."""
        return self.mask.sum(-1, keepdim=True)

    def grow_mask(self) -> torch.Tensor:
        """The mask with one more real column for every row: what a decode step attends over."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=-1)
        return self.mask

    def extend(self, other: "BatchCache") -> None:
        """Append `other`'s rows (after this batch's rows), padding the shorter one on the left."""
        if self.rows == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if not theirs.is_initialized:
                continue
            if not mine.is_initialized:
                raise ValueError("cannot merge a cache layer that holds nothing into one that holds rows")
            stored = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_pad_left(mine.keys, stored, -2), _pad_left(theirs.keys, stored, -2)])
            mine.values = torch.cat([_pad_left(mine.values, stored, -2), _pad_left(theirs.values, stored, -2)])
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = max(mine.cumulative_length, theirs.cumulative_length)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); drop the columns that are now padding in all of them."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        self._drop_empty_columns()

    def _drop_empty_columns(self) -> None:
        if self.rows == 0 or any(hasattr(layer, "cumulative_length") for layer in self.cache.layers):
            return  # sliding layers count their columns themselves; their masks must keep the full length
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def keep_columns(cache, index: torch.Tensor) -> None:
    """Keep only the columns `index` (1D, in order) of every layer of a one-sequence `DynamicCache`:
    what tree speculation keeps of a verified tree (the prefix and the accepted path)."""
    from reshard.errors import UsageError

    for layer in cache.layers:
        if hasattr(layer, "cumulative_length"):
            raise UsageError("tree speculation does not support sliding-window attention layers; "
                             "generate without a draft")
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` padded with zeros at the start of dimension `dim` (1 or -2) to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    if dim == 1:  # a (B, L) mask
        return F.pad(t, (missing, 0))
    return F.pad(t, (0, 0, missing, 0))  # (B, heads, L, head_dim)
