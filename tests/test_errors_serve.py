"""The error lines of `runtime serve` and its engine that no other test module asserts: request
values out of range, a full or closing engine, a missing extra. tests/test_errors.py lists
every message with the test that asserts it."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import open_placed, word_tokenizer
from reshard.errors import ReshardError, UsageError
from runtime.cli import main as runtime_main
from runtime.sampling import Sampling
from test_robustness import only_error


@pytest.mark.parametrize("values, message", [
    (dict(max_tokens=0), "max_tokens must be 1 or more, not 0"),
    (dict(max_tokens=4, temperature=2.5), "temperature must be between 0 and 2, not 2.5"),
    (dict(max_tokens=4, top_p=0.0), "top_p must be above 0 and at most 1, not 0.0"),
    (dict(max_tokens=4, stop=("end", "")), "stop strings must not be empty"),
])
def test_sampling_values_out_of_range(values, message):
    with pytest.raises(UsageError) as info:
        Sampling(**values)
    assert str(info.value) == message


@pytest.fixture
def engine(tiny_converted):
    from runtime.engine import Engine

    lm = open_placed(tiny_converted["llama"], "streamed")
    lm.tokenizer = word_tokenizer(tiny_converted["llama"])
    engine = Engine(lm, max_batch=2, max_queue=0)
    yield engine
    engine.close()
    lm.close()


def test_engine_refusals(engine):
    from runtime.engine import Engine

    with pytest.raises(UsageError) as info:
        Engine(engine.lm, max_batch=0, max_queue=-1)
    assert str(info.value) == "max_batch must be 1 or more and max_queue 0 or more, not 0 and -1"
    with pytest.raises(UsageError) as info:
        engine.check_length(0, 4)
    assert str(info.value) == "the prompt is empty"
    with pytest.raises(ReshardError) as info:
        engine.check_length(120, 16)
    assert str(info.value) == ("this model's context is 128 tokens, but the prompt has 120 and max_tokens asks for 16 "
                               "more; shorten the prompt or lower max_tokens")
    small = Engine(engine.lm, max_batch=1, max_queue=0)
    first = small.submit([5, 6], Sampling(max_tokens=100, temperature=0), lambda event: None)
    with pytest.raises(ReshardError) as info:  # one slot, no queue: the second request finds no room
        small.submit([5], Sampling(max_tokens=2, temperature=0), lambda event: None)
    assert re.fullmatch(r"all 1 slots are busy and [01] requests wait already; retry later", str(info.value))
    small.cancel(first)
    small.close()
    engine.close()
    with pytest.raises(ReshardError) as info:
        engine.submit([5, 6], Sampling(max_tokens=2, temperature=0), lambda event: None)
    assert str(info.value) == "the server is shutting down"


def test_serve_without_its_extra(tiny_converted, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "runtime.server", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if `reshard[serve]` were not installed
    code = runtime_main(["serve", str(tiny_converted["llama"]), "--device", "cpu", "--max-cpu-memory", "0"])
    assert (code, only_error(capsys.readouterr().err)) == (
        2, "Error: runtime serve needs fastapi; install it with: pip install 'reshard[serve]'")


def test_busy_port(monkeypatch):
    """tests/test_serve.py runs this through the CLI (exit 2); here the whole line, the OS's reason included."""
    import errno
    import os
    import socket

    from runtime.server import bind

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError) as info:
            bind("127.0.0.1", port)
    assert str(info.value) == (f"cannot listen on 127.0.0.1:{port} ({os.strerror(errno.EADDRINUSE)}); pick another "
                               f"--host or --port")
