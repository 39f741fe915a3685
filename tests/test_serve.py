"""`runtime serve`'s HTTP API through the real `openai` client, on a free loopback port: answers
equal `runtime generate`'s, concurrent requests share passes, and bad requests, disconnects and
a full queue get their documented responses while the server keeps serving."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

# the serve extra (fastapi, uvicorn, openai): CI installs it; a machine without it (the GPU check's) skips this file
openai = pytest.importorskip("openai", reason="the serve extra is not installed; see pyproject.toml")
pytest.importorskip("fastapi", reason="the serve extra is not installed; see pyproject.toml")

from runtime import LayeredModel  # noqa: E402
from runtime.batch import eos_ids  # noqa: E402
from runtime.cli import main as runtime_main  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.sampling import Sampling  # noqa: E402
from runtime.server import BackgroundServer, create_app  # noqa: E402
from runtime.solo import SoloSpeculation  # noqa: E402

KEY = "sk-test"
CHATS = ["What is the capital of France?", "Write a haiku about the sea in winter.", "Hi!", "Name three colours.",
         "What is 2 + 2?", "Tell me a fun fact about octopuses.", "Translate 'good morning' to French.",
         "Give me a tip for sleeping well."]


@contextlib.contextmanager
def serving(folder, *, api_key=KEY, draft=None, **engine_options):
    """A server for `folder` (streamed, float32, CPU) on a free port; yields (url, engine). With
    `draft`, a request that runs alone decodes with tree speculation (a budget of 8)."""
    lm = LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", max_cpu_memory=0)
    solo = None if draft is None else SoloSpeculation(lm, draft, tree_budget=8, eos=eos_ids(lm))
    engine = Engine(lm, solo=solo, **engine_options)
    server = BackgroundServer(create_app(engine, model_name="m", api_key=api_key))
    try:
        yield server.url, engine
    finally:
        server.stop()
        engine.close()
        lm.close()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    is_json = resp.getheader("content-type", "").startswith("application/json")
    return resp.status, (json.loads(data) if is_json else data)


def metrics(url: str) -> dict[str, float]:
    _, text = raw(url, "GET", "/metrics")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def runtime_generate(capsys, folder, prompt: str, n: int, *chat) -> str:
    capsys.readouterr()
    assert runtime_main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", str(n), *chat,
                         "--device", "cpu", "--dtype", "float32", "--max-cpu-memory", "0"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]  # the streamer ends the text with a newline


def ask_chat(c: openai.OpenAI, prompt: str, n: int, **kwargs) -> str:
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], temperature=0,
                                  max_tokens=n, **kwargs)
    return r.choices[0].message.content


# --- the tiny model: fast checks of the API's edges -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tiny_converted):
    with serving(tiny_converted["llama"]) as (url, engine):
        yield url, engine


def assert_still_serves(url: str) -> None:
    r = client(url).completions.create(model="m", prompt="w5 w6 w7", temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


def test_models_health_metrics(tiny_server):
    url, _ = tiny_server
    assert [m.id for m in client(url).models.list()] == ["m"]
    assert raw(url, "GET", "/health") == (200, {"status": "ok", "model": "m", "active": 0, "waiting": 0})
    before = metrics(url)
    r = client(url).completions.create(model="m", prompt="w5 w6 w7", temperature=0, max_tokens=5)
    after = metrics(url)
    assert after["runtime_requests_total"] == before["runtime_requests_total"] + 1
    grew = {name: after[name] - before[name] for name in after}
    assert grew["runtime_generated_tokens_total"] == r.usage.completion_tokens
    assert grew["runtime_passes_total"] == r.usage.completion_tokens  # the prefill gives the first, n-1 decodes
    assert after["runtime_weight_bytes_streamed_total"] > before["runtime_weight_bytes_streamed_total"]
    assert after["runtime_response_bytes_total"] > before["runtime_response_bytes_total"]
    # the finished row leaves the batch at the engine's next pass boundary, just after the answer is sent
    deadline = time.monotonic() + 10
    while metrics(url)["runtime_active_sequences"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics(url)["runtime_active_sequences"] == 0


@pytest.mark.parametrize("body, status, code, words", [
    (b'{"model": "m", "prompt": "w5", "max_tokens": 4', 400, None, "not valid JSON"),
    (b'[1, 2]', 400, None, "JSON object"),
    (b'{"model": "gpt-4", "prompt": "w5"}', 404, "model_not_found", "'gpt-4' does not exist"),
    (b'{"model": "m", "prompt": "w5", "max_tokens": -3}', 400, None, "max_tokens"),
    (b'{"model": "m", "prompt": "w5 w6", "max_tokens": 127}', 400, "context_length_exceeded", "context is 128 tokens"),
    (b'{"model": "m", "prompt": "w5", "temperature": 7}', 400, None, "temperature"),
    (b'{"model": "m", "prompt": "w5", "n": 2}', 400, None, "n=1"),
])
def test_bad_requests_get_openai_errors(tiny_server, body, status, code, words):
    url, _ = tiny_server
    got, answer = raw(url, "POST", "/v1/completions", body)
    assert got == status
    assert set(answer) == {"error"} and answer["error"]["code"] == code and words in answer["error"]["message"]
    assert "Traceback" not in json.dumps(answer)
    assert_still_serves(url)


def test_bad_requests_through_the_openai_client(tiny_server):
    url, _ = tiny_server
    c = client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="nope", prompt="w5")
    with pytest.raises(openai.BadRequestError, match="context") as e:
        c.completions.create(model="m", prompt="w5 " * 100, max_tokens=100)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="m", prompt="w5", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="chat template"):  # the tiny tokenizer has none
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "w5"}])
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(url, key="wrong").completions.create(model="m", prompt="w5")
    assert raw(url, "GET", "/v1/models", headers={"Authorization": ""})[0] == 401
    status, answer = raw(url, "POST", "/v1/completions", b'{"model": "m", "prompt": "w5"}',
                         headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d without -H
    assert status == 400 and "Content-Type: application/json" in answer["error"]["message"]
    assert raw(url, "GET", "/nowhere")[1] == {"error": {"message": "Not Found", "type": "invalid_request_error",
                                                         "param": None, "code": None}}
    assert_still_serves(url)


def test_streamed_completion_is_the_whole_one(tiny_server):
    url, _ = tiny_server
    c = client(url)
    whole = c.completions.create(model="m", prompt="w9 w8 w7", temperature=0, max_tokens=12, stop=["w30"])
    chunks = list(c.completions.create(model="m", prompt="w9 w8 w7", temperature=0, max_tokens=12, stop=["w30"],
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# --- tree speculation for a request that runs alone ------------------------------------------------

def test_a_request_alone_speculates_and_answers_as_runtime_generate(tiny_converted, tiny_checkpoints, capsys):
    want = runtime_generate(capsys, tiny_converted["llama"], "w5 w6 w7", 24)
    with serving(tiny_converted["llama"], draft=tiny_checkpoints["llama"]) as (url, engine):
        before = metrics(url)
        r = client(url).completions.create(model="m", prompt="w5 w6 w7", temperature=0, max_tokens=24)
        after = metrics(url)
    grew = {name: after[name] - before[name] for name in after}
    assert r.choices[0].text == want and r.usage.completion_tokens > 4
    # the draft is the target itself: every tree's first guesses are right, 2+ tokens a pass
    passes, n = grew["runtime_passes_total"], r.usage.completion_tokens
    assert passes <= 1 + n // 2 and grew["runtime_tree_passes_total"] == passes - 1  # all but the prefill
    assert grew["runtime_tree_tokens_total"] == n - 1  # the prefill gives the first token
    assert grew["runtime_tree_nodes_total"] >= passes - 1


def test_requests_that_arrive_mid_speculation_share_passes_and_change_no_answer(tiny_converted, tiny_checkpoints,
                                                                                 capsys):
    """The first request decodes alone with trees; at its first text the other two arrive, so it goes
    back into the batch; when they finish it speculates again. Every greedy answer is its answer alone."""
    prompts = {"w5 w6": 40, "w9 w8 w7 w6 w5 w4": 6, "w3 w30 w12": 10}
    want = [runtime_generate(capsys, tiny_converted["llama"], p, n) for p, n in prompts.items()]
    texts, done = [""] * 3, [threading.Event() for _ in prompts]
    with serving(tiny_converted["llama"], draft=tiny_checkpoints["llama"]) as (url, engine):
        entered = []
        enter = engine.solo.enter
        engine.solo.enter = lambda *a: entered.append(1) or enter(*a)

        def deliver(k, ev):
            texts[k] += ev.text
            if ev.finish_reason:
                done[k].set()
            if k == 0 and len(entered) == 1 and not engine.waiting and engine.counters.requests == 1:
                for j, (p, n) in enumerate(list(prompts.items())[1:], start=1):
                    engine.submit(ids(engine, p), Sampling(max_tokens=n, temperature=0), lambda ev, j=j: deliver(j, ev))

        engine.submit(ids(engine, "w5 w6"), Sampling(max_tokens=40, temperature=0), lambda ev: deliver(0, ev))
        assert all(d.wait(120) for d in done)
    assert texts == want and all(len(t.split()) >= 4 for t in want), want
    assert len(entered) == 2, entered  # alone, then alone again after the others left


def ids(engine, prompt: str) -> list[int]:
    from runtime.batch import prompt_ids

    return prompt_ids(engine.lm.tokenizer, prompt, chat=False)


# --- SmolLM2: answers equal `runtime generate`, passes are shared, slots come back ------------------

@pytest.fixture(scope="module")
def smol_server(smollm2_converted):
    with serving(smollm2_converted, max_batch=8, max_queue=8) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def small_server(small_smollm2_converted):
    """SmolLM2's first 2 layers: its tokenizer and chat template, at a fraction of the compute."""
    with serving(small_smollm2_converted, max_batch=8, max_queue=8) as (url, engine):
        yield url, engine


def test_answers_equal_runtime_generate(small_server, small_smollm2_converted, capsys):
    url, _ = small_server
    c = client(url)
    prompt, question = "The three primary colours are", CHATS[0]
    want = runtime_generate(capsys, small_smollm2_converted, prompt, 16)
    want_chat = runtime_generate(capsys, small_smollm2_converted, question, 16, "--chat")
    got = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16)
    streamed = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16, stream=True)
    assert got.choices[0].text == "".join(ch.choices[0].text for ch in streamed) == want
    assert ask_chat(c, question, 16) == want_chat
    chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want_chat
    assert len(want) > 20 and len(want_chat) > 10


TOKENS = [9 + k for k in range(8)]  # per chat in the concurrency test: each answer its own length


def test_eight_concurrent_chats_share_passes(small_server, small_smollm2_converted, capsys):
    url, _ = small_server
    alone = [runtime_generate(capsys, small_smollm2_converted, q, n, "--chat") for q, n in zip(CHATS, TOKENS)]
    clients, start = [client(url) for _ in CHATS], threading.Barrier(len(CHATS))

    def ask(k: int) -> str:
        start.wait()  # all 8 at once, as 8 users pressing enter together
        return ask_chat(clients[k], CHATS[k], TOKENS[k])

    before = metrics(url)["runtime_passes_total"]
    with ThreadPoolExecutor(len(CHATS)) as pool:
        together = list(pool.map(ask, range(len(CHATS))))
    passes = metrics(url)["runtime_passes_total"] - before
    assert together == alone
    assert passes <= max(TOKENS) + 8  # one at a time: sum(TOKENS)
    assert len(set(together)) == 8  # no two alike, so an answer sent to the wrong chat would show


@pytest.mark.slow
def test_disconnect_mid_stream_frees_the_slot(smol_server):
    url, engine = smol_server
    before = metrics(url)
    stream = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": CHATS[1]}],
                                                 max_tokens=500, temperature=0, stream=True)
    pieces = [next(stream) for _ in range(4)]  # the role, then text
    assert pieces[1].choices[0].delta.content
    stream.close()
    deadline = time.monotonic() + 60
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    generated = metrics(url)["runtime_generated_tokens_total"] - before["runtime_generated_tokens_total"]
    assert generated < 100  # cancelled, not run to its 500 tokens
    assert ask_chat(client(url), CHATS[2], 8)


@pytest.mark.slow
def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(smol_server):
    url, engine = smol_server
    before = metrics(url)["runtime_generated_tokens_total"]
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"model": "m", "messages": [{"role": "user", "content": CHATS[1]}], "max_tokens": 500, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while not engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 1
    conn.close()  # gone before the answer, while tokens keep coming (the check must not wait for a pause)
    deadline = time.monotonic() + 60
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    assert metrics(url)["runtime_generated_tokens_total"] - before < 100
    assert ask_chat(client(url), CHATS[2], 8)


@pytest.mark.slow
def test_full_queue_gets_429_and_recovers(smollm2_converted):
    with serving(smollm2_converted, max_batch=1, max_queue=1) as (url, engine):
        c = client(url)
        busy = c.chat.completions.create(model="m", messages=[{"role": "user", "content": CHATS[1]}],
                                         max_tokens=400, temperature=0, stream=True)
        next(busy), next(busy)  # running: it holds the only slot
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(ask_chat, c, CHATS[2], 8)  # waits in the queue's one place
            deadline = time.monotonic() + 60
            while engine.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError, match="slots are busy") as e:
                ask_chat(c, CHATS[3], 8)
            assert e.value.status_code == 429 and e.value.code == "queue_full"
            assert metrics(url)["runtime_requests_rejected_total"] == 1
            busy.close()  # frees the slot: the queued request runs
            assert queued.result(timeout=300)
        assert ask_chat(c, CHATS[3], 8)


# --- the command ------------------------------------------------------------------------------

@pytest.mark.slow  # starts a Python with torch in a subprocess
def test_cli_serves_until_interrupted(tiny_converted):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "runtime.cli", "serve", str(tiny_converted["llama"]), "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--max-cpu-memory", "0", "--api-key", KEY, "--model-name", "m"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        assert f"serving 'm' on http://127.0.0.1:{port}/v1" in line, line
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):  # the line comes just before uvicorn listens
            with contextlib.suppress(OSError):
                if raw(url, "GET", "/health")[0] == 200:
                    break
            time.sleep(0.05)
        assert_still_serves(url)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_cli_serve_on_a_busy_port_is_one_error_line(tiny_converted, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = runtime_main(["serve", str(tiny_converted["llama"]), "--port", str(port), "--device", "cpu",
                             "--max-cpu-memory", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"Error: cannot listen on 127.0.0.1:{port} (") and err[-1].endswith("--port")
