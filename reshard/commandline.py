"""What the `reshard` and `runtime` command lines share (click): help layout, common options, errors.

Each option is defined once here and used by both CLIs. Options carry a `section` that groups
them in `--help`; commands carry `examples`. `run_command` is the one place that turns
exceptions into one `Error: ...` line and an exit code:
  ours and other known errors -> exit 1, a bad option value (UsageError) -> exit 2,
  a flag click cannot parse -> click's usage text and exit 2 (SystemExit, as argparse did),
  Ctrl-C -> exit 130 (`reshard` adds that running it again resumes). Set RESHARD_DEBUG=1 to see a traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from . import __version__
from .errors import ReshardError, UsageError

DEBUG_ENV = "RESHARD_DEBUG"  # set to 1 for tracebacks instead of one-line errors
DTYPES = ("auto", "float16", "bfloat16", "float32")
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


# --- running a command ------------------------------------------------------------------------

def run_command(command: click.Command, argv, prog_name: str) -> int:
    """Run `command` on `argv`; known errors become one `Error: ...` line and an exit code."""
    try:
        return command.main(args=argv, prog_name=prog_name, standalone_mode=False) or 0
    except (click.Abort, KeyboardInterrupt):
        resume = "; run the same command again to resume" if prog_name == "reshard" else ""  # runtime keeps nothing
        print(f"Error: interrupted{resume}", file=sys.stderr)
        return 130
    except click.ClickException as e:  # a flag click could not parse: usage text, then its Error line
        e.show()
        raise SystemExit(e.exit_code) from None
    except Exception as e:  # the one place that turns exceptions into messages
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"Error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


def error_line(e: BaseException) -> str:
    """One line for an exception: ours say what to do; others get a hint to debug."""
    if isinstance(e, ReshardError):
        text = e.cli or str(e)  # the message worded for the command line, where it has one
        return text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, OSError) and e.errno == 28:
        return f"no space left on device ({e.filename or 'output'}); free some space and run the same command again to resume"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{e.strerror}: {e.filename}"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)"


# --- help layout: sections of options, and examples ----------------------------------------------

class Option(click.Option):
    """A click option with a `section` (the heading it is listed under in --help)."""

    def __init__(self, *args, section: str = "Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class Command(click.Command):
    """A click command whose help lists options by section and ends with examples."""

    def __init__(self, *args, examples: tuple[str, ...] = (), **kwargs):
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)
        self.examples = examples

    def format_options(self, ctx, formatter) -> None:
        write_sections(self.get_params(ctx), ctx, formatter)

    def format_epilog(self, ctx, formatter) -> None:
        write_examples(self.examples, formatter)
        super().format_epilog(ctx, formatter)


class Group(click.Group):
    """The top-level `reshard` / `runtime` command: subcommands are `Command`s, help ends with examples."""

    command_class = Command

    def __init__(self, *args, examples: tuple[str, ...] = (), **kwargs):
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)
        self.examples = examples

    def format_epilog(self, ctx, formatter) -> None:
        write_examples(self.examples, formatter)
        formatter.write_paragraph()
        formatter.write_text(f"Set {DEBUG_ENV}=1 to see a traceback instead of a one-line error. Shell completion: "
                             f'eval "$(_{ctx.info_name.upper()}_COMPLETE=bash_source {ctx.info_name})" '
                             "(zsh_source, fish_source for those shells).")


def write_sections(params, ctx, formatter) -> None:
    """Options grouped under their `section` headings, in the order the sections first appear."""
    sections: dict[str, list] = {}
    for param in params:
        record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
        if record is not None:
            sections.setdefault(getattr(param, "section", "Options"), []).append(record)
    for name, records in sections.items():
        with formatter.section(name):
            formatter.write_dl(records)


def write_examples(examples, formatter) -> None:
    if examples:
        with formatter.section("Examples"):
            for line in examples:
                formatter.write_text(f"\b\n{line}")


def version_option(prog_name: str):
    return click.version_option(__version__, "--version", prog_name=prog_name, message="%(prog)s %(version)s")


# --- options both CLIs use ---------------------------------------------------------------------

class Choice(click.Choice):
    """click.Choice with argparse's wording (`invalid choice: 'x' (choose from a, b)`)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"invalid choice: {value!r} (choose from {', '.join(self.choices)})", param, ctx)


def trust_remote_code_option(section: str = "Options"):
    return click.option("--trust-remote-code", is_flag=True, cls=Option, section=section,
                        help="allow the model's own Python code to run")


def revision_option(section: str = "Source"):
    return click.option("--revision", default=None, cls=Option, section=section, show_default="main",
                        help="hub branch, tag or commit")


def token_option(section: str = "Source"):
    return click.option("--token", default=None, cls=Option, section=section, show_default="$HF_TOKEN",
                        help="hub token")


def folder_argument(name: str = "folder"):
    """A folder written by `reshard convert` (completes as a directory; the command's help says what it is)."""
    return click.argument(name, metavar=name.upper(), type=click.Path(file_okay=False))


def output_option(*, required: bool = False, help: str = "file to write; - writes to stdout"):
    return click.option("-o", "--output", required=required, type=click.Path(dir_okay=False, allow_dash=True),
                        cls=Option, help=help)


def open_output(path: str):
    """The file `--output` names, open for writing; `-` is stdout (left open)."""
    if path == "-":
        return click.get_text_stream("stdout")
    return open(path, "w", encoding="utf-8")
