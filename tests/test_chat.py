"""`runtime chat` on SmolLM2 (its first 2 layers: the tokenizer and chat template are the point): through a pseudo-terminal (turns, history, /reset, /exit, Ctrl-C), and
with stdin a pipe (one turn per line). Every answer must equal transformers' own greedy output on
the templated conversation so far."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import sys
import time

import pytest
import torch

N = 8  # new tokens per answer
TURN1, TURN2 = "Tell me a story about a cat.", "And then?"  # turns whose second answer depends on the first


@pytest.fixture(scope="module")
def reference(small_smollm2_checkpoint):
    """answer(messages): transformers' greedy answer (float32 CPU) to a conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_smollm2_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(small_smollm2_checkpoint, dtype=torch.float32)

    def answer(messages: list[dict]) -> str:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    return answer


def conversation(*turns: str) -> list[dict]:
    """user, assistant, user, ... as messages (the strings alternate)."""
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


class Terminal:
    """`runtime chat` running on a pseudo-terminal (stdin and stdout; stderr goes to a file)."""

    def __init__(self, argv: list[str], stderr_path):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stderr to a file, so the terminal shows only the chat
            err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            os.execvpe(argv[0], argv, {**os.environ, "TERM": "dumb"})
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 180) -> str:
        """Everything up to and including `marker`; \\r\\n read as \\n."""
        end = time.monotonic() + timeout
        while marker not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} after {timeout} s; terminal shows {self.seen!r}")
            try:
                chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"chat ended before {marker!r}; terminal shows {self.seen!r}")
            self.seen += re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", chunk).replace("\r\n", "\n").replace("\r", "")
        text, _, self.seen = self.seen.partition(marker)
        return text + marker

    def read_some(self, timeout: float = 180) -> str:
        """Whatever the terminal shows next (at least one character)."""
        while not self.seen:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise AssertionError(f"nothing shown after {timeout} s")
            self.seen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", os.read(self.fd, 4096).decode("utf-8", "replace"))
        shown, self.seen = self.seen, ""
        return shown

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def answer(self, turn: str) -> str:
        """Type `turn` and Enter; the answer shown before the next prompt (the echoed turn removed)."""
        self.send(turn + "\r")
        shown = self.read_until("\n>>> ")
        echoed, _, answer = shown.partition(turn + "\n")
        assert echoed == "", shown
        return answer[: -len("\n>>> ")].strip()

    def wait(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 4096)
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("chat did not exit")


def chat_argv(folder, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "chat", str(folder), "--device", "cpu", "--dtype", "float32",
            "--max-cpu-memory", "0", *extra]


def test_chat_on_a_terminal(small_smollm2_converted, reference, tmp_path):
    term = Terminal(chat_argv(small_smollm2_converted, "-n", str(N)), tmp_path / "err.txt")
    term.read_until(">>> ")
    first = term.answer(TURN1)
    assert first == reference(conversation(TURN1))
    second = term.answer(TURN2)
    assert second == reference(conversation(TURN1, first, TURN2))  # conditioned on the first turn
    alone = reference(conversation(TURN2))
    assert second != alone
    term.send("/reset\r")
    term.read_until(">>> ")
    assert term.answer(TURN2) == alone  # the history is gone
    term.send("/exit\r")
    assert term.wait() == 0
    err = (tmp_path / "err.txt").read_text()
    assert "(conversation forgotten)" in err and "Error" not in err


def test_ctrl_c_stops_the_answer_not_the_chat(small_smollm2_converted, reference, tmp_path):
    endless = ["-n", "8000", "--min-new-tokens", "8000"]  # only Ctrl-C ends this answer
    term = Terminal(chat_argv(small_smollm2_converted, *endless), tmp_path / "err.txt")
    term.read_until(">>> ")
    turn = "Count from 1 to 300, one number per line."
    term.send(turn + "\r")
    term.read_until(turn + "\n")
    term.read_some()  # the answer has started
    term.send("\x03")
    shown = term.read_until("\n>>> ")
    assert shown[: -len("\n>>> ")].endswith("[stopped]")
    # the stopped answer stays in the conversation; a new turn is answered as usual
    term.send("/reset\r")
    term.read_until(">>> ")
    term.send("/exit\r")
    assert term.wait() == 0


def test_chat_reads_one_turn_per_line_from_a_pipe(small_smollm2_converted, reference, tmp_path):
    import subprocess

    system = "You are a terse assistant."
    done = subprocess.run(chat_argv(small_smollm2_converted, "-n", str(N), "--system", system),
                          input=f"{TURN1}\n{TURN2}\n", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    sys_msg = [{"role": "system", "content": system}]
    want_first = reference(sys_msg + conversation(TURN1))
    want_second = reference(sys_msg + conversation(TURN1, want_first, TURN2))
    assert done.stdout.split() == f"{want_first}\n{want_second}".split()  # each answer streamed, then a newline
    assert ">>>" not in done.stdout and "chat:" not in done.stderr  # no prompt or banner off a terminal


# --- the error lines (tiny model: no chat template, a context of 128) ---------------------------

def test_chat_needs_a_chat_template(tiny_converted, capsys):
    from runtime.cli import main

    assert main(["chat", str(tiny_converted["llama"]), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("Error: this folder's tokenizer has no chat template; `runtime chat` "
                                               "needs one (use `runtime generate` for plain text)")


def test_too_long_a_conversation_is_refused_and_the_chat_goes_on(tiny_converted, tmp_path, monkeypatch, capsys):
    import shutil

    from runtime.cli import main

    folder = tmp_path / "with-template"
    shutil.copytree(tiny_converted["llama"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    long_turn = " ".join(f"w{3 + i}" for i in range(140))  # 140 tokens; the context is 128
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_turn}\nw3 w4 w5\n"))
    assert main(["chat", str(folder), "--device", "cpu", "-n", "4", "--max-cpu-memory", "0"]) == 0
    out, err = capsys.readouterr()
    assert [ln for ln in err.splitlines() if ln.startswith("Error:")] == [
        "Error: the conversation plus --max-new-tokens is 144 tokens, more than the model's context of 128; "
        "/reset to start again or lower --max-new-tokens"]
    assert len(out.split()) == 4  # the short turn was answered


def test_chat_stats_give_each_answers_tokens_per_pass(tiny_converted, tiny_checkpoints, tmp_path, monkeypatch, capsys):
    """With --draft and --stats, every answer's speculation figures follow it on stderr (one JSON line each)."""
    import shutil

    from runtime.cli import main

    folder = tmp_path / "with-template"
    shutil.copytree(tiny_converted["llama"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6 w7\nw9 w8\n"))
    assert main(["chat", str(folder), "--device", "cpu", "-n", "8", "--max-cpu-memory", "0", "--draft",
                 str(tiny_checkpoints["llama"]), "--tree-budget", "8", "--stats"]) == 0
    err = capsys.readouterr().err.splitlines()
    turns = [json.loads(line)["speculation"] for line in err if line.startswith('{"speculation"')]
    assert len(turns) == 2
    for turn in turns:  # the draft is the target itself: its first guesses are right, 2+ tokens a pass
        assert turn["tree_budget"] == 8 and turn["tokens_per_pass"] >= 2 and 0 < turn["tree_size"] <= 8, turn
