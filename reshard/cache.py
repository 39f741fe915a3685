"""The conversion cache: hub repos and GGUF files converted on first use, and reused after.

`LayeredModel.from_pretrained("org/model")`, a `.gguf` path, and `runtime generate org/model`
convert into a folder of the cache, keyed by what decides its bytes: the source (repo id and
commit, or the GGUF file's path, size and modification time), the dtype and the quantization.
A finished folder (it has its manifest) is reused; an interrupted one is resumed by the next
use, as `reshard convert` resumes. When the hub cannot be reached, a repo's folder converted
earlier at the commit its revision last resolved to is used. `reshard list` shows the cache.

The cache is $RESHARD_CACHE, else `reshard/` in the Hugging Face cache folder ($HF_HOME).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import HubUnreachableError
from .format import MANIFEST, PROGRESS, write_text_atomic

CACHE_ENV = "RESHARD_CACHE"
COMMIT = re.compile(r"[0-9a-f]{40}")


def cache_root() -> Path:
    """Where converted models are kept: $RESHARD_CACHE, else `reshard/` under $HF_HOME."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "reshard"


def is_cacheable(source: str | os.PathLike) -> bool:
    """True for what the cache converts: a `.gguf` file, or a hub repo id that is not a local path."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return True
    return not path.exists() and hub.looks_like_repo_id(str(source))


@dataclass
class ConvertOptions:
    """What a cached conversion is keyed by besides its source (see `reshard.convert.convert`)."""
    dtype: str = "auto"  # dtype of the written weights; auto: the checkpoint's
    quantize: str | None = None  # "int8" or "int4"
    quantize_group: int = 32  # int4: input columns per scale/zero group
    quantize_embeddings: bool = False  # the embeddings and head quantized too

    def variant(self) -> str:
        """The folder name part for these options, e.g. `float16-int4g32`."""
        name = self.dtype
        if self.quantize:
            name += f"-{self.quantize}" + (f"g{self.quantize_group}" if self.quantize == "int4" else "")
            name += "-emb" if self.quantize_embeddings else ""
        return name


def open_cached(source: str | os.PathLike, *, options: ConvertOptions | None = None, revision: str | None = None,
                token: str | None = None, trust_remote_code: bool = False, progress: bool = True) -> Path:
    """The converted folder of `source` (hub repo id or `.gguf` file), converted into the cache
    first if it is not there yet; what happens is said on stderr."""
    from .convert import check_dtype_name, convert
    from .quant import check_scheme

    options = options or ConvertOptions()
    check_dtype_name(options.dtype)
    if options.quantize:
        check_scheme(options.quantize, options.quantize_group)
    folder, label, pinned = _locate(str(source), options, revision=revision, token=token)
    if (folder / MANIFEST).is_file():
        print(f"reshard: using {folder} ({label}, converted earlier)", file=sys.stderr)
        return folder
    verb = "resuming the conversion of" if (folder / PROGRESS).is_file() else "converting"
    print(f"reshard: {verb} {label} into {folder} (once; later runs reuse it)", file=sys.stderr)
    convert(str(source), folder, revision=pinned, dtype=options.dtype, token=token,
            trust_remote_code=trust_remote_code, progress=progress, quantize=options.quantize,
            quantize_group=options.quantize_group, quantize_embeddings=options.quantize_embeddings)
    if pinned is not None and pinned != revision:  # a hub repo asked for by branch or tag
        _remember_ref(folder.parent.parent, revision or "main", pinned)
    return folder


def _locate(source: str, options: ConvertOptions, *, revision, token) -> tuple[Path, str, str | None]:
    """(cache folder, label for messages, commit to convert at) of `source`."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        stat = path.resolve().stat()
        key = hashlib.sha256(f"{path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        folder = cache_root() / "gguf" / f"{_safe(path.stem)}--{key}" / options.variant()
        return folder, f"{path} ({options.variant()})", None
    repo = cache_root() / "hub" / _safe(source.replace("/", "--"))  # a GGUF repo's TAG kept in the name
    commit = _resolve_commit(hub.split_tag(source)[0], repo, options, revision=revision, token=token)
    return repo / commit / options.variant(), f"{source} @ {commit[:12]} ({options.variant()})", commit


def _resolve_commit(repo_id: str, repo: Path, options: ConvertOptions, *, revision, token) -> str:
    """The commit `revision` names now; offline, the one it named when last converted (if still cached)."""
    if revision is not None and COMMIT.fullmatch(revision):
        return revision
    try:
        return hub.repo_info(repo_id, revision=revision, token=token).sha
    except HubUnreachableError:
        ref = repo / "refs" / _safe(revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else None
        if commit is None or not (repo / commit / options.variant() / MANIFEST).is_file():
            raise
        print(f"reshard: the hub is not reachable; {repo_id} {revision or 'main'} was {commit[:12]} when "
              f"last converted", file=sys.stderr)
        return commit


def _remember_ref(repo: Path, revision: str, commit: str) -> None:
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(repo / "refs" / _safe(revision), commit + "\n")


def _safe(name: str) -> str:
    """`name` usable as one folder name."""
    return re.sub(r"[^\w.-]", "_", name)


# --- what the cache holds --------------------------------------------------------------------------

@dataclass
class CachedModel:
    folder: Path
    source: str  # repo id or GGUF path
    commit: str | None
    variant: str  # dtype and quantization, e.g. "float16-int4g32"
    bytes: int  # on disk
    finished: bool  # False: an interrupted conversion, resumed by the next use


def list_cached(root: Path | None = None) -> list[CachedModel]:
    """Every converted (or partly converted) model in the cache, by source."""
    root = Path(root) if root is not None else cache_root()
    found = []
    for variant in sorted([*root.glob("hub/*/*/*"), *root.glob("gguf/*/*")]):
        if variant.is_dir() and variant.parent.name != "refs":
            found.append(_describe(variant))
    return sorted((m for m in found if m is not None), key=lambda m: (m.source, m.commit or "", m.variant))


def _describe(folder: Path) -> CachedModel | None:
    finished = (folder / MANIFEST).is_file()
    record = folder / (MANIFEST if finished else PROGRESS)
    try:
        raw = json.loads(record.read_text())
    except (OSError, ValueError):
        return None  # not (yet) a conversion: nothing was written
    source = raw.get("source") or (raw.get("params") or {}).get("source") or {}
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return CachedModel(folder, str(source.get("id")), source.get("commit"), folder.name, size, finished)
