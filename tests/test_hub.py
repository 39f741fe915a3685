"""What `reshard convert <repo id>` says when the hub cannot serve the repo: one line each for an
unreachable hub, a repo that is not there, a gated repo and a missing revision."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class HubReplies(BaseHTTPRequestHandler):
    """Answers every request with the server's `reply`: (status, X-Error-Code), as the hub does."""

    def do_GET(self):
        status, code = self.server.reply
        if self.path.startswith("/api/models/"):  # (the client also asks other endpoints about itself)
            self.server.paths.append(self.path.split("?")[0])
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def error_hub(monkeypatch):
    """A local stand-in for the hub's HTTP API that huggingface_hub's own client talks to."""
    import huggingface_hub
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), HubReplies)
    server.reply, server.paths = (404, "RepoNotFound"), []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # read once at import; this process imported it already
    monkeypatch.setattr(huggingface_hub, "model_info", huggingface_hub.HfApi(endpoint=url).model_info)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    server.url = url
    yield server
    server.shutdown()
    server.server_close()


def convert_error(args: list[str], capsys) -> tuple[int, str]:
    from reshard.cli import main

    code = main(["convert", *args, "--quiet"])
    return code, capsys.readouterr().err


def test_repo_not_found(error_hub, tmp_path, capsys):
    code, err = convert_error(["org/tpyo", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"Error: org/tpyo is neither a local path nor a repo on {error_hub.url} (HF_ENDPOINT) "
                              f"that you can see (check the name; a private repo needs --token or HF_TOKEN)\n")
    assert error_hub.paths == ["/api/models/org/tpyo"]
    assert not (tmp_path / "out").exists()


def test_gated_repo(error_hub, tmp_path, capsys):
    error_hub.reply = (403, "GatedRepo")
    code, err = convert_error(["meta-llama/Llama-2-70b-hf", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"Error: meta-llama/Llama-2-70b-hf is gated: accept its terms at "
                              f"{error_hub.url}/meta-llama/Llama-2-70b-hf, then pass --token or set HF_TOKEN\n")


def test_revision_not_found(error_hub, tmp_path, capsys):
    error_hub.reply = (404, "RevisionNotFound")
    code, err = convert_error(["org/model", str(tmp_path / "out"), "--revision", "v9"], capsys)
    assert (code, err) == (1, f"Error: org/model on {error_hub.url} (HF_ENDPOINT) has no revision 'v9'; "
                              f"pass an existing branch, tag or commit to --revision\n")
    assert error_hub.paths == ["/api/models/org/model/revision/v9"]


def test_library_words_errors_for_the_api(error_hub, tmp_path):
    from reshard.convert import convert
    from reshard.errors import SourceError

    error_hub.reply = (404, "RevisionNotFound")
    with pytest.raises(SourceError) as e:
        convert("org/model", tmp_path / "out", revision="v9", progress=False)
    assert str(e.value) == (f"org/model on {error_hub.url} (HF_ENDPOINT) has no revision 'v9'; "
                            f"pass an existing branch, tag or commit as revision=...")


def test_hub_outage_names_the_status(error_hub, tmp_path, capsys):
    error_hub.reply = (503, "")
    code, err = convert_error(["org/model", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"Error: the hub at {error_hub.url} (HF_ENDPOINT) answered HTTP 503 for org/model; "
                              f"run the same command again later, or check the name and HF_TOKEN\n")
    assert error_hub.paths == ["/api/models/org/model"]


def test_download_connection_error(fake_hub, tmp_path, monkeypatch, capsys):
    """hf_hub_download wraps a connection failure in LocalEntryNotFoundError; the line names the cause."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def hf_hub_download(repo_id, filename, **kw):
        if not filename.endswith(".safetensors"):
            return fake_hub.hf_hub_download(repo_id, filename, **kw)
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    code, err = convert_error(["org/model", str(tmp_path / "out")], capsys)
    assert (code, err) == (1, f"Error: cannot reach the hub at {constants.ENDPOINT} to fetch "
                              f"model-00001-of-00003.safetensors from org/model ([Errno 104] Connection reset by peer); "
                              f"check the network, then run the same command again to resume\n")
    assert not (tmp_path / "out").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["closed port", "offline"])
def test_unreachable_hub_from_the_command_line(case, tmp_path):
    """The real client, a fresh process: HF_ENDPOINT at a closed port, or HF_HUB_OFFLINE=1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"))
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
        want = ("Error: cannot fetch org/model: HF_HUB_OFFLINE is set; unset it to download, "
                "or use a local folder or .gguf file")
    else:
        env["HF_ENDPOINT"] = url = f"http://127.0.0.1:{closed_port()}"
        want = (f"Error: cannot reach the hub at {url} (HF_ENDPOINT) to fetch org/model ([Errno 111] Connection "
                f"refused); check the network and HF_ENDPOINT, or use a local folder or .gguf file")
    run = subprocess.run([sys.executable, "-m", "reshard.cli", "convert", "org/model", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert (run.returncode, run.stderr.splitlines(), run.stdout) == (1, [want], "")
    assert not (tmp_path / "out").exists()
