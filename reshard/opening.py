"""The `Source` a SOURCE argument names: a local checkpoint folder, a `.gguf` file, a hub repo of a
transformers checkpoint (`hub.HubCheckpoint`: config first, weights once the conversion has checked
OUT and the disks), or a hub repo of GGUF files (`REPO:TAG`: downloaded first, its config is in the
file, once the disks can hold the download and, on OUT's, at least as much again)."""

from __future__ import annotations

from pathlib import Path

from . import hub
from .diskspace import check_gguf_download
from .errors import UsageError
from .gguf_source import GGUFSource
from .source import Source, open_local


def open_source(source: str, *, revision: str | None = None, token: str | None = None,
                low_disk_out: Path | None = None, out: Path | None = None,
                progress: bool = True) -> Source | hub.HubCheckpoint:
    """The checkpoint `source` names; `low_disk_out` (hub only) fetches one shard at a time; `out`, the
    conversion's folder, is checked for room before a hub GGUF downloads.

    A hub repo comes back as a `HubCheckpoint` (config and tokenizer only): `ready_source`
    downloads its weights once the conversion has checked OUT and the disks. A hub repo of GGUF
    files (`REPO:TAG`, or a repo with one GGUF model) is downloaded first (its config is in the file).
    """
    path = Path(source).expanduser()
    if path.exists() or not hub.looks_like_repo_id(source):
        if low_disk_out is not None:
            raise UsageError(f"--low-disk is for hub repo ids; {source} is a local path, convert it without --low-disk")
        if path.suffix == ".gguf" and path.is_file():
            return GGUFSource(path)
        return open_local(path)
    if hub.split_tag(source)[1] is not None:
        return _hub_gguf(source, revision=revision, token=token, out=out, progress=progress)
    if low_disk_out is not None:
        from .lowdisk import ShardedHubSource, work_folder

        return ShardedHubSource(source, revision=revision, token=token, workdir=work_folder(low_disk_out))
    checkpoint = hub.HubCheckpoint(source, revision=revision, token=token)
    return _hub_gguf(source, revision=revision, token=token, out=out, progress=progress) if checkpoint.gguf_only \
        else checkpoint


def _hub_gguf(source: str, *, revision, token, out: Path | None, progress: bool) -> GGUFSource:
    """The GGUF model of a hub repo (`hub.fetch_gguf`), its manifest source the repo at its commit."""
    cache = Path(hub.hub_constants.HF_HUB_CACHE)
    first, info = hub.fetch_gguf(source, revision=revision, token=token, progress=progress,
                                 before=lambda nbytes: check_gguf_download(cache, out, nbytes))
    src = GGUFSource(first)
    src.info = info
    return src


def ready_source(src: Source | hub.HubCheckpoint, model, *, progress: bool = True) -> Source:
    """The expensive part of opening a source: a hub repo's weights downloaded, a GGUF's names mapped."""
    if isinstance(src, hub.HubCheckpoint):
        return open_local(src.open(progress=progress), src.info)
    if isinstance(src, GGUFSource):
        src.load(model)
    return src
