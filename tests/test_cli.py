"""The click command lines: help, version, completion, option checks before any model loads,
short flags, `-o -`, and the exit-code contract (1 known error, 2 usage, 130 interrupted)."""

from __future__ import annotations

import json

import pytest

from reshard import __version__
from reshard.cli import main as reshard_main
from runtime.cli import main as runtime_main

SUBCOMMANDS = {"reshard": (reshard_main, ["convert", "info", "list", "verify"]),
               "runtime": (runtime_main, ["chat", "generate", "score", "serve"])}
PASSED_ON = {"reshard": [], "runtime": ["eval"]}  # commands whose arguments (and --help) go to another tool


@pytest.mark.parametrize("prog", SUBCOMMANDS)
def test_help_lists_commands_examples_and_completion(prog, capsys):
    main, commands = SUBCOMMANDS[prog]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: {prog} [OPTIONS] COMMAND [ARGS]...")
    assert all(f"  {c} " in out for c in commands + PASSED_ON[prog])
    assert "Examples:" in out and f"_{prog.upper()}_COMPLETE=bash_source {prog}" in out


@pytest.mark.parametrize("prog,command", [(p, c) for p, (_, cs) in SUBCOMMANDS.items() for c in cs])
def test_every_subcommand_help_shows_examples_and_defaults(prog, command, capsys):
    main = SUBCOMMANDS[prog][0]
    assert main([command, "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: {prog} {command} [OPTIONS]")
    assert f"Examples:\n  {prog} {command} " in out


def test_generate_help_shows_every_default(capsys):
    assert runtime_main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrap
    for option, default in [("--max-new-tokens", "[default: 128; x>=0]"), ("--min-new-tokens", "[default: (none); x>=0]"),
                            ("--top-p", "[default: (off); 0<x<=1]"), ("--seed", "[default: (random)]"),
                            ("--temperature", "[default: 0.0; x>=0]"), ("--prefetch", "[default: 1; x>=0]")]:
        tail = out.split(option, 1)[1]
        assert default in tail.split(" --", 1)[0], option
    assert "-p, --prompt" in out and "-n, --max-new-tokens" in out
    assert "Generation:" in out and "Model and memory:" in out  # options grouped by section


@pytest.mark.parametrize("prog", SUBCOMMANDS)
def test_version(prog, capsys):
    assert SUBCOMMANDS[prog][0](["--version"]) == 0
    assert capsys.readouterr().out == f"{prog} {__version__}\n"


@pytest.mark.parametrize("prog", SUBCOMMANDS)
def test_completion_script_and_words(prog, monkeypatch, capsys):
    main, commands = SUBCOMMANDS[prog]
    monkeypatch.setenv(f"_{prog.upper()}_COMPLETE", "bash_source")
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == 0
    script = capsys.readouterr().out
    assert f"_{prog}_completion()" in script and f"complete -o nosort -F _{prog}_completion {prog}" in script
    monkeypatch.setenv(f"_{prog.upper()}_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", f"{prog} ")
    monkeypatch.setenv("COMP_CWORD", "1")
    with pytest.raises(SystemExit):
        main([])
    assert capsys.readouterr().out.split() == [f"plain,{c}" for c in sorted(commands + PASSED_ON[prog])]


@pytest.mark.parametrize("option, message", [
    (["--max-new-tokens", "-5"], "Invalid value for '-n' / '--max-new-tokens': -5 is not in the range x>=0."),
    (["--temperature", "-1"], "Invalid value for '--temperature': -1.0 is not in the range x>=0."),
    (["--top-p", "1.5"], "Invalid value for '--top-p': 1.5 is not in the range 0<x<=1."),
    (["--top-p", "0"], "Invalid value for '--top-p': 0.0 is not in the range 0<x<=1."),
    (["--prefetch", "-1"], "Invalid value for '--prefetch': -1 is not in the range x>=0."),
    (["-n", "many"], "Invalid value for '-n' / '--max-new-tokens': 'many' is not a valid integer range."),
    (["--prompt-lookup", "0"], "Invalid value for '--prompt-lookup': 0 is not in the range x>=1."),
])
def test_bad_values_exit_2_before_loading(option, message, tmp_path, capsys):
    # the folder does not exist: a check after loading would say so (exit 1) instead
    with pytest.raises(SystemExit) as done:
        runtime_main(["generate", str(tmp_path / "nowhere"), "-p", "w3", *option])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"Error: {message}"


@pytest.mark.parametrize("option, message", [
    (["--prompts-file", "p.txt"], "Error: --prompt and --prompts-file cannot be combined; pick one"),
    (["--min-new-tokens", "9", "-n", "4"],
     "Error: --min-new-tokens (9) is more than --max-new-tokens (4); lower it or raise --max-new-tokens"),
    (["--top-p", "0.9"], "Error: --top-p needs --temperature above 0 (0 is greedy)"),
    (["--device", "tpu"], "Error: unknown device 'tpu'; use cpu, cuda or cuda:N"),
    (["--max-gpu-memory", "lots"], "Error: memory size 'lots' is not understood; write e.g. 12GiB, 500MB or a byte count"),
    (["--dtype", "float8"], "Error: unknown dtype 'float8'; use auto, float16, bfloat16 or float32"),
])
def test_bad_combinations_exit_2_before_loading(option, message, tmp_path, capsys):
    assert runtime_main(["generate", str(tmp_path / "nowhere"), "-p", "w3", *option]) == 2
    assert capsys.readouterr().err.strip() == message


def test_score_output_dash_is_stdout(tiny_converted, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.jsonl"
    items = [{"prompt": "w3 w4", "choices": [" w5", " w6"]}, {"text": "w7 w8 w9"}]
    src.write_text("".join(json.dumps(item) + "\n" for item in items))
    monkeypatch.chdir(tmp_path)
    folder = str(tiny_converted["llama"])
    assert runtime_main(["score", folder, str(src), "-o", "-", "--device", "cpu", "--max-cpu-memory", "0"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "-").exists()
    assert runtime_main(["score", folder, str(src), "-o", "f.jsonl", "--device", "cpu", "--max-cpu-memory", "0"]) == 0
    assert capsys.readouterr().out == "f.jsonl\n"
    assert out == (tmp_path / "f.jsonl").read_text() and len(out.splitlines()) == 2


def test_short_flags_equal_long_ones(tiny_converted, capsys):
    folder = str(tiny_converted["llama"])
    common = ["--device", "cpu", "--max-cpu-memory", "0"]
    assert runtime_main(["generate", folder, "-p", "w3 w4 w5", "-n", "5", *common]) == 0
    short = capsys.readouterr().out
    assert runtime_main(["generate", folder, "--prompt", "w3 w4 w5", "--max-new-tokens", "5", *common]) == 0
    assert capsys.readouterr().out == short and len(short.split()) == 5


def test_interrupt_exits_130(tiny_converted, monkeypatch, capsys):
    import runtime.commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.commands, "open_model", interrupted)
    assert runtime_main(["generate", str(tiny_converted["llama"]), "-p", "w3", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "Error: interrupted"  # nothing to resume: runtime keeps no state


def test_missing_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        reshard_main(["info"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "Error: Missing argument 'FOLDER'."
