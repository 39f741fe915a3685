"""`reshard verify` and the runtime's checks: damaged layer files are named, never trusted."""

from __future__ import annotations

import shutil

import pytest

from reshard.cli import main as reshard_main
from runtime.cli import main as runtime_main


@pytest.fixture
def converted(tiny_converted, tmp_path):
    """A private copy of the converted tiny llama, free to damage."""
    out = tmp_path / "out"
    shutil.copytree(tiny_converted["llama"], out)
    return out


def truncate(path, nbytes=100):
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


def flip_bit(path, offset=-50):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # a single bit in the data section: header and size stay valid
    path.write_bytes(bytes(data))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


def test_verify_passes_on_a_good_folder(converted, capsys):
    assert reshard_main(["verify", str(converted)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "ok: 5 layer files" in captured.err


def test_verify_names_each_truncated_or_bit_flipped_file(converted, capsys):
    truncate(converted / "layers.00001.safetensors")
    flip_bit(converted / "layers.00002.safetensors")
    (converted / "norm.safetensors").unlink()
    assert reshard_main(["verify", str(converted)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{converted / 'layers.00001.safetensors'}: size is ")
    assert lines[1] == f"{converted / 'layers.00002.safetensors'}: checksum differs from the manifest (the file is damaged)"
    assert lines[2] == f"{converted / 'norm.safetensors'}: file is missing"
    assert captured.err.strip() == (f"Error: 3 of 5 layer files in {converted} are damaged or missing; "
                                    f"run `reshard convert` again to repair them")


def test_verify_without_checksums_misses_only_the_bit_flip(converted, capsys):
    flip_bit(converted / "layers.00002.safetensors")
    assert reshard_main(["verify", "--no-checksums", str(converted)]) == 0
    assert reshard_main(["verify", str(converted)]) == 1


def test_verify_catches_a_header_that_lies(converted, capsys):
    """Same size, but a tensor's shape in the header no longer matches the manifest."""
    path = converted / "layers.00000.safetensors"
    data = path.read_bytes()
    assert b'"shape":[64,64]' in data
    path.write_bytes(data.replace(b'"shape":[64,64]', b'"shape":[64,16]', 1))  # offsets now disagree too
    assert reshard_main(["verify", "--no-checksums", str(converted)]) == 1
    assert capsys.readouterr().out.startswith(f"{path}: ")


def test_verify_of_a_folder_without_manifest(tmp_path, capsys):
    assert reshard_main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"Error: {tmp_path} holds no manifest.json; create it with `reshard convert SOURCE {tmp_path}`")


def generate(folder, *extra):
    return runtime_main(["generate", str(folder), "--prompt", "w3 w4 w5", "--max-new-tokens", "2",
                         "--device", "cpu", "--max-cpu-memory", "0", *extra])


def test_generate_stops_on_a_truncated_file(converted, capsys):
    truncate(converted / "layers.00001.safetensors")
    assert generate(converted) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err) == [
        f"Error: {converted / 'layers.00001.safetensors'}: size is "
        f"{(converted / 'layers.00001.safetensors').stat().st_size} bytes, manifest says "
        f"{(converted / 'layers.00001.safetensors').stat().st_size + 100}; run `reshard convert` again to repair it"]


def test_generate_stops_on_a_missing_file(converted, capsys):
    (converted / "layers.00002.safetensors").unlink()
    assert generate(converted) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"Error: {converted / 'layers.00002.safetensors'}: file is missing; run `reshard convert` again to repair it"]


def test_generate_verify_stops_on_a_bit_flip(converted, capsys):
    flip_bit(converted / "layers.00002.safetensors")
    assert generate(converted, "--verify") == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing generated
    assert "Traceback" not in captured.err
    assert error_lines(captured.err) == [
        f"Error: {converted / 'layers.00002.safetensors'}: checksum differs from the manifest (the file is "
        f"damaged); run `reshard convert` again to repair it"]


def test_generate_verify_passes_on_a_good_folder(converted, capsys):
    assert generate(converted, "--verify") == 0
    assert capsys.readouterr().out.strip() != ""


def test_convert_again_repairs_damaged_files(tiny_checkpoints, converted, tiny_converted, capsys):
    truncate(converted / "layers.00001.safetensors")
    flip_bit(converted / "embed.safetensors")
    kept = (converted / "layers.00000.safetensors").stat().st_ino
    assert reshard_main(["convert", str(tiny_checkpoints["llama"]), str(converted), "--quiet"]) == 0
    assert reshard_main(["verify", str(converted)]) == 0
    for path in tiny_converted["llama"].iterdir():
        assert (converted / path.name).read_bytes() == path.read_bytes(), path.name
    assert (converted / "layers.00000.safetensors").stat().st_ino == kept  # good files are kept, not rewritten
