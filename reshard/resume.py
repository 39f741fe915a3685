"""Resuming `reshard convert`: which files of an earlier, interrupted run can be kept.

After writing each group, `convert` records it (file, size, sha256, tensors) in the
progress file, written atomically, next to the conversion's parameters (source, its
commit or a fingerprint of its files, dtype, format version, quantization). A rerun keeps
a file only when the parameters are the same and the file's size and sha256 match its
record; every other group is written again. The writer is deterministic, so a resumed
output is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .errors import OutputInUseError
from .format import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, PARTIAL_SUFFIX, PROGRESS, Group, file_sha256,
                     is_group_file_name, param_names, write_text_atomic)
from .source import SIDE_FILES, Source


def conversion_params(src: Source, *, dtype: str, architecture: str, quantization=None) -> dict:
    """What must be equal for a rerun to keep an earlier run's files (JSON-normalised)."""
    params = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": src.info,
        "fingerprint": source_fingerprint(src), "dtype": dtype, "architecture": architecture,
        "quantization": quantization,
    }
    return json.loads(json.dumps(params, sort_keys=True))


def source_fingerprint(src: Source) -> str:
    """The hub commit, or a hash of the local config and the names and sizes of the weight files."""
    if src.info.get("commit"):
        return src.info["commit"]
    digest = hashlib.sha256()
    config = Path(src.folder) / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(getattr(src, "files", [])):
        digest.update(f"{Path(path).name}:{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


class Progress:
    """The record of finished groups in OUT; `open` it before writing anything there."""

    def __init__(self, out: Path, params: dict, groups: dict[str, dict]):
        self.out, self.params, self.groups = out, params, groups

    @staticmethod
    def check(out: Path, params: dict, *, force: bool = False) -> set[str]:
        """What `open` would refuse, raised now without touching OUT; the groups an earlier run of
        this conversion recorded whose files still have their size (the rest is to be written)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise OutputInUseError(f"{out} is a file; OUT must be a folder")
        if not out.is_dir():
            return set()
        record = _read_record(out)
        same = record is not None and record.get("params") == params
        if not same and (record is not None or _foreign_entries(out)) and not force:
            raise OutputInUseError(_refusal(out, record, params))
        groups = record["groups"] if same else {}
        return {name for name, group in groups.items() if _has_size(out, group)}

    @classmethod
    def open(cls, out: Path, params: dict, *, force: bool = False) -> "Progress":
        """Take over OUT: refuse (unless `force`) an OUT that holds anything but this conversion."""
        out.mkdir(parents=True, exist_ok=True)
        record = _read_record(out)
        same = record is not None and record.get("params") == params
        if not same and (record is not None or _foreign_entries(out)):
            if not force:
                raise OutputInUseError(_refusal(out, record, params))
            _clear(out)
        _remove_partials(out)
        progress = cls(out, params, dict(record["groups"]) if same else {})
        progress.save()
        return progress

    def save(self) -> None:
        text = json.dumps({"params": self.params, "groups": self.groups}, indent=1, sort_keys=True) + "\n"
        write_text_atomic(self.out / PROGRESS, text)

    def kept(self, name: str, tensors) -> Group | None:
        """The recorded group `name` if its file is still what was written, else None."""
        try:
            group = Group(**self.groups[name])
        except (KeyError, TypeError):  # not recorded, or a record edited by hand
            return None
        scheme = (self.params.get("quantization") or {}).get("scheme")
        if set(param_names(group, scheme)) != set(tensors):
            return None
        if group.file is not None:
            path = self.out / group.file
            if not path.is_file() or path.stat().st_size != group.bytes or file_sha256(path) != group.sha256:
                return None
        return group

    def add(self, group: Group) -> None:
        self.groups[group.name] = asdict(group)
        self.save()

    def finish(self) -> None:
        """The manifest is written: it is the record now (see `_record_of_manifest`)."""
        (self.out / PROGRESS).unlink(missing_ok=True)

    def forget(self, name: str) -> None:
        if self.groups.pop(name, None) is not None:
            self.save()


def _has_size(out: Path, group) -> bool:
    try:
        return group["file"] is None or (out / group["file"]).stat().st_size == group["bytes"]
    except (OSError, KeyError, TypeError):
        return False


def _read_record(out: Path) -> dict | None:
    path = out / PROGRESS
    if not path.is_file():
        return _record_of_manifest(out)
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record.get("params"), dict) and isinstance(record.get("groups"), dict) else {}
    except (ValueError, AttributeError):
        return {}  # damaged: treated as a record of something else


def _record_of_manifest(out: Path) -> dict | None:
    """A finished folder keeps no progress record: its manifest says the same (None: no manifest)."""
    try:
        raw = json.loads((out / MANIFEST).read_text())
        source = dict(raw["source"])
        fingerprint = source.pop("fingerprint", None) or source.get("commit")
        params = {"format": raw.get("format"), "format_version": raw.get("format_version"), "source": source,
                  "fingerprint": fingerprint, "dtype": raw.get("dtype"), "architecture": raw.get("architecture"),
                  "quantization": raw.get("quantization")}
        return {"params": json.loads(json.dumps(params, sort_keys=True)),
                "groups": {g["name"]: g for g in raw["groups"]}}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # damaged: treated as a record of something else


def manifest_source(params: dict) -> dict:
    """The manifest's `source`: the source's info, and for a local source (no commit) the
    fingerprint that tells its versions apart."""
    source = dict(params["source"])
    if not source.get("commit"):
        source["fingerprint"] = params["fingerprint"]
    return source


def _foreign_entries(out: Path) -> list[str]:
    """Entries of OUT that no run of a conversion leaves without a record (it writes that first)."""
    return sorted(p.name for p in out.iterdir() if not p.name.endswith(PARTIAL_SUFFIX))


def _refusal(out: Path, record: dict | None, params: dict) -> str:
    if record is None:
        return f"{out} is not empty and holds no conversion record; choose an empty folder, or pass --force to write into it anyway"
    old = record.get("params") or {}
    if not old:
        return f"{out} holds a damaged conversion record ({PROGRESS}); pass --force to convert into it afresh"
    if old.get("format_version") != FORMAT_VERSION:
        what = f"format version {old.get('format_version')} (this version writes {FORMAT_VERSION})"
    else:
        what = f"a conversion of {_describe(old)}"
    return f"{out} holds {what}, not of {_describe(params)}; choose another folder, or pass --force to replace it"


def _describe(params: dict) -> str:
    src = params.get("source") or {}
    at = src.get("commit") or (params.get("fingerprint") or "")[:12]
    q = params.get("quantization") or {}
    scheme = f", {q['scheme']}" + (f" group {q['group_size']}" if q.get("group_size") else "") if q.get("scheme") else ""
    return f"{src.get('id')} @ {at} ({params.get('dtype')}{scheme}, {params.get('architecture')})"


def _clear(out: Path) -> None:
    """Remove what a conversion writes (manifest first, so nothing half-replaced looks finished)."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and (is_group_file_name(p.name) or p.name in SIDE_FILES):
            p.unlink()


def _remove_partials(out: Path) -> None:
    for p in out.iterdir():
        if p.name.endswith(PARTIAL_SUFFIX) and p.is_file():
            p.unlink()
