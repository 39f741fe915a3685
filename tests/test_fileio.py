"""reshard.fileio: positional writes, kernel copies (and their fallback), the background sha256."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

import reshard.fileio as fileio


@pytest.fixture
def source(tmp_path):
    data = os.urandom(3 * 65536 + 123)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, data


def write_pieces(path, pieces) -> str:
    """Header bytes, then (file, offset, n) ranges, as write_group_file writes them; returns the digest."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with fileio.Digest() as digest:
            offset = 0
            for piece in pieces:
                if isinstance(piece, bytes):
                    digest.update(piece)
                    fileio.write_at(fd, piece, offset)
                    offset += len(piece)
                else:
                    src, at, n = piece
                    digest.update_from_file(src, at, n)
                    fileio.copy_at(src, at, n, fd, offset)
                    offset += n
            return digest.hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "fallback"])
def test_copies_and_digest_equal_the_bytes(tmp_path, source, monkeypatch, kernel_copy):
    path, data = source
    if not kernel_copy:  # a file system or kernel without copy_file_range between these files
        def refuse(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(fileio, "WINDOW", 65536)  # several hashing windows, none aligned to the ranges
    monkeypatch.setattr(fileio, "FALLBACK_CHUNK", 50000)
    pieces = [b"header!", (path, 1, 70000), (path, 70001, len(data) - 70001), b"", (path, 0, 5)]
    want = b"header!" + data[1:70001] + data[70001:] + data[:5]
    sha = write_pieces(tmp_path / "out.bin", pieces)
    assert (tmp_path / "out.bin").read_bytes() == want
    assert sha == hashlib.sha256(want).hexdigest()


def test_a_source_shorter_than_its_range_is_an_error(tmp_path, source):
    from reshard.errors import SourceError

    path, data = source
    with pytest.raises(SourceError, match="ends before byte"):
        write_pieces(tmp_path / "out.bin", [(path, len(data) - 10, 20)])


def test_digest_reports_a_failed_hash(tmp_path):
    with fileio.Digest() as digest:
        digest.update_from_file(tmp_path / "missing.bin", 0, 10)
        with pytest.raises(FileNotFoundError):
            digest.hexdigest()


def test_source_shrunk_before_its_tensors_are_copied(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """The header was read whole, then the file shrank before its bytes were copied."""
    import reshard.source
    from reshard.cli import main
    from test_robustness import only_error, single_file_checkpoint

    folder = single_file_checkpoint(tiny_checkpoints, tmp_path / "src")
    path = folder / "model.safetensors"
    real_locate = reshard.source.SafetensorsSource.locate

    def locate_after_truncation(self, key):
        if path.stat().st_size > 1000:
            path.write_bytes(path.read_bytes()[:1000])
        return real_locate(self, key)

    monkeypatch.setattr(reshard.source.SafetensorsSource, "locate", locate_after_truncation)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--quiet"]) == 1
    line = only_error(capsys.readouterr().err)
    first = line.split(" ends before byte ")
    assert first[0] == f"Error: {path}" and first[1].endswith("; was it changed during the conversion?"), line
