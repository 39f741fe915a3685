"""`reshard verify`: check every file of a converted folder against its manifest.

Each layer file must be present, of the recorded size, with a valid header listing the
recorded tensors (names, dtypes, shapes), and (unless `checksums=False`) the recorded sha256.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CorruptFileError
from .format import Manifest, check_group_file, read_manifest


def find_bad_files(folder: str | Path, *, checksums: bool = True, manifest: Manifest | None = None) -> list[CorruptFileError]:
    """One `CorruptFileError` per bad layer file, in manifest order (empty if all hold)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    bad = []
    for group in manifest.groups:
        if group.file is None:
            continue
        try:
            check_group_file(folder / group.file, group, checksum=checksums)
        except CorruptFileError as e:
            bad.append(e)
    return bad


def verify_folder(folder: str | Path, *, checksums: bool = True, manifest: Manifest | None = None) -> None:
    """Raise the first bad file's `CorruptFileError` (saying how many are bad) if any."""
    bad = find_bad_files(folder, checksums=checksums, manifest=manifest)
    if bad:
        more = f" ({len(bad) - 1} more damaged file(s); `reshard verify` lists them)" if len(bad) > 1 else ""
        raise CorruptFileError(bad[0].path, bad[0].problem + more)
