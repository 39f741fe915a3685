"""`reshard convert --low-disk`: a hub checkpoint fetched one source shard at a time.

A shard is downloaded when the first group that needs it is written, and deleted as soon
as every tensor the conversion wants from it is written (or kept from an earlier run), so
the peak disk is the output plus the shard(s) in use: one, or two where a group straddles
a shard boundary. Shards go to a work folder next to OUT, which a rerun reuses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import hub
from .errors import SourceError
from .source import SIDE_FILES, BinSource, SafetensorsSource, Source


def work_folder(out: Path) -> Path:
    """Where shards are downloaded: beside OUT, on the same disk."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.download"


class ShardedHubSource(Source):
    """A hub checkpoint whose weight shards are fetched on demand and deleted after use."""

    read_ahead = False  # reading the next group early could fetch a second shard before the first goes

    def __init__(self, repo_id: str, *, revision: str | None, token: str | None, workdir: Path):
        info = hub.repo_info(repo_id, revision=revision, token=token, files_metadata=True)
        files = hub.select_files([s.rfilename for s in info.siblings or []])
        self.repo_id, self.token, self.folder = repo_id, token, Path(workdir)
        self.info = {"id": repo_id, "revision": revision, "commit": info.sha}
        self.sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name in SIDE_FILES:
                self._download(name)
        weights = [f for f in files if f not in SIDE_FILES]
        self.shards = [f for f in weights if not f.endswith(".index.json")]
        self._open: dict[str, Source] = {}  # downloaded shards (a single one is opened by _index)
        self._shard_of = self._index(weights)
        self._wanted: dict[str, set[str]] = {}  # shard -> keys still to be written from it

    @property
    def largest_shard_bytes(self) -> int:
        return max((self.sizes.get(s, 0) for s in self.shards), default=0)

    def _download(self, name: str) -> Path:
        return hub.download(self.repo_id, name, commit=self.info["commit"], token=self.token, local_dir=self.folder)

    def _index(self, weights: list[str]) -> dict[str, str]:
        """key -> shard file name, from the shard index (or the single shard's header)."""
        index = [f for f in weights if f.endswith(".index.json")]
        if not index:
            return {key: self.shards[0] for key in self._opened(self.shards[0]).keys()}
        path = self._download(index[0])
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{index[0]} of {self.repo_id} is not a valid shard index ({e})") from None
        bad = sorted({s for s in weight_map.values() if s not in self.shards})
        if bad:
            raise SourceError(f"{index[0]} of {self.repo_id} names {bad[0]!r}, which is not a top-level "
                              f"weight file of the repo; refusing to fetch it")
        return dict(weight_map)

    def _opened(self, shard: str) -> Source:
        if shard not in self._open:
            path = self._download(shard)
            kind = SafetensorsSource if shard.endswith(".safetensors") else BinSource
            self._open[shard] = kind(self.folder, [path], self.info)
        return self._open[shard]

    def keys(self):
        return list(self._shard_of)

    def want(self, keys) -> None:
        for key in keys:
            self._wanted.setdefault(self._shard_of[key], set()).add(key)

    def locate(self, key):
        return self._opened(self._shard_of[key]).locate(key)

    def read(self, keys):
        out = {}
        for key in keys:
            out.update(self._opened(self._shard_of[key]).read([key]))
        return out

    def finished(self, keys) -> None:
        for key in keys:
            shard = self._shard_of[key]
            left = self._wanted.get(shard)
            if left is not None:
                left.discard(key)
                if not left:
                    self._drop(shard)

    def _drop(self, shard: str) -> None:
        self._open.pop(shard, None)
        (self.folder / shard).unlink(missing_ok=True)

    def remove_work_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
