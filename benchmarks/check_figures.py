"""Check that every figure README.md and benchmarks/RESULTS.md quote comes from a raw output.

    python benchmarks/check_figures.py [DOC ...] [--results DIR]

Prints one line per figure without a source (`FILE:LINE: FIGURE: why`) and exits 1; exits 0 when
every figure checks. Defaults: README.md and benchmarks/RESULTS.md, raw outputs in benchmarks/results/.

The convention (benchmarks/RESULTS.md repeats it):

- Raw outputs are what a benchmark script printed, saved in benchmarks/results/. A block of text
  (a paragraph or list, a table, a fenced block; blocks are separated by blank lines) names its raw
  outputs: `benchmarks/results/NAME.txt`, `results/NAME.txt`, or `NAME.txt` for a file that is in
  benchmarks/results/. A block that names none uses the ones last named in its section (up to the
  next heading). A `results/NAME.txt` that does not exist is an error.
- In a block with raw outputs, every figure must occur in one of them (as the same number: 1.7 and
  1.70 are equal, 52.7 and 52.67 are not). A figure in prose is a number with a measurement unit or
  a ratio: `0.58x`, `+0.39%`, `0.164 s`, `38.0 ms/token`, `52.67 GB/s`, `8.46 GB`, `72 MiB`,
  `64.1 tokens/s`. A ratio or a percentage must be one in the raw output too (printed with its x or %,
  or in a table column headed "vs ..." or "... ratio"). In a table, every number in a row below the
  header is a figure. A fenced block without a language (a raw excerpt) must consist of lines of the
  raw outputs, verbatim.
- A derived figure names its inputs right after it, as an expression: `0.90x (= 38.0 / 42.1)`,
  `1.09x (= median(38.0 / 42.1, 47.2 / 41.1, 44.3 / 40.7))`, `+0.39% (= 100 * (18.1754 / 18.1050 - 1))`.
  Each input must occur in the raw outputs (the constants 1, 100 and 1000 excepted), and the figure
  must equal the expression rounded to the figure's decimals (half up). Functions: median, mean,
  min, max. Once derived, a figure may be quoted again later in the same section without its inputs.
- Not measurements, so not checked: headings; anything in backticks (option values, commands);
  fenced blocks with a language (```bash); a number right after `~` (an estimate or assumption,
  e.g. "~140 GB"), or after <=, >=, <, > (a goal or a test's bound, e.g. "goal <= 1.5x"); numbers
  that are part of a name (Llama-2-70B, int8, Q4_0, H200); numbers in prose without a unit (layer
  counts, "16 tokens"); and every figure in a block that has no raw output in force.
"""

from __future__ import annotations

import argparse
import ast
import re
import statistics
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
RESULTS = ROOT / "benchmarks" / "results"

NUMBER = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?"
UNIT = r"(?:x|%)(?![\w])|\s?(?:m?s/token|m?s/pass|ms|s|GB/s|MB/s|GB|MB|KB|TB|GiB|MiB|tokens/s|items/s)(?![\w])"
CANDIDATE = re.compile(rf"(?P<sign>[+-])?(?P<num>{NUMBER})(?P<unit>{UNIT})?")
RAW_NUMBER = re.compile(rf"(?<![\w.])(?P<num>{NUMBER})(?!\.\d)")
SOURCE = re.compile(r"(?<![\w/.-])(?:(?:benchmarks/)?results/)?([\w.-]+\.txt)\b")
NAMED = re.compile(r"(?:benchmarks/)?results/([\w.-]+\.txt)\b")
BOUND = re.compile(r"(?:~|≈|<=|>=|≤|≥|<|>)\s*\Z")
CONSTANTS = {Decimal(1), Decimal(100), Decimal(1000)}
FUNCTIONS = {"median": statistics.median, "mean": statistics.mean, "min": min, "max": max}


@dataclass
class Problem:
    doc: str
    line: int
    figure: str
    why: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.figure}: {self.why}"


@dataclass
class Block:
    kind: str                  # "prose", "table" or "raw" (a fenced block without a language)
    lines: list[tuple[int, str]]


def read_raw(path: Path) -> tuple[set, set[str]]:
    """The numbers of a raw output (signed where a minus stands before one), and the stripped lines.
    A number printed as a ratio or a percentage (`0.58x`, `+0.39%`, or in a table column headed "vs" or
    "ratio") is also kept as ("x", number) or ("%", number): a quoted ratio must be one in the raw output."""
    text = path.read_text(errors="replace")
    numbers: set = set()
    for m in RAW_NUMBER.finditer(text):
        value = signed(text, m.start(), m.group("num"))
        numbers.add(value)
        if text[m.end():m.end() + 1] in ("x", "%"):
            numbers.add((text[m.end()], value))
    return numbers | ratio_columns(text), {line.strip() for line in text.splitlines()}


def ratio_columns(text: str) -> set:
    """("x", number) for the numbers in a Markdown table's columns headed "vs ..." or "... ratio"."""
    found, header = set(), None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"\|?[\s|:-]*-[\s|:-]*", lines[i + 1].strip()):
            header = [cell.strip() for cell in line.strip().strip("|").split("|")]
        elif not line.strip().startswith("|"):
            header = None
        elif header:
            for title, cell in zip(header, line.strip().strip("|").split("|")):
                if re.search(r"\bvs\b|\bratio\b", title):
                    found |= {("x", Decimal(m.group("num"))) for m in RAW_NUMBER.finditer(cell)}
    return found


def signed(text: str, start: int, num: str) -> Decimal:
    value = Decimal(num.replace(",", ""))
    is_minus = start > 0 and text[start - 1] in "-−" and (start < 2 or not text[start - 2].isalnum())
    return -value if is_minus else value


def split_blocks(text: str) -> list[list[Block]]:
    """Sections (split at headings) of blocks; fenced blocks with a language are left out."""
    sections: list[list[Block]] = [[]]
    current: Block | None = None
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith("```"):
                fence, current = None, None
            elif fence == "":
                current.lines.append((number, line))
            continue
        if stripped.startswith("```"):
            fence = stripped[3:].strip()
            current = Block("raw", []) if fence == "" else None
            if current is not None:
                sections[-1].append(current)
            continue
        if re.match(r"#{1,6}\s", line):
            sections.append([])
            current = None
            continue
        if not stripped:
            current = None
            continue
        kind = "table" if stripped.startswith("|") else "prose"
        if current is None or current.kind != kind:
            current = Block(kind, [])
            sections[-1].append(current)
        current.lines.append((number, line))
    return sections


def blank_code_spans(text: str) -> str:
    """The text with every `code span` turned into spaces (positions and line breaks kept)."""
    return re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def closing_paren(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one before `start`, or -1."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return -1


def evaluate(expression: str) -> tuple[float, list[str]]:
    """The value of a derivation and its numeric inputs; ValueError for anything but arithmetic."""
    inputs: list[str] = []

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            inputs.append(ast.get_source_segment(expression, node))
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = value(node.left), value(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)] if not isinstance(
                node.op, ast.Div) else a / b
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            return FUNCTIONS[node.func.id]([value(arg) for arg in node.args])
        raise ValueError(f"not arithmetic: {ast.get_source_segment(expression, node)!r}")

    expression = expression.strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {expression!r}") from e
    return value(tree.body), inputs


def rounds_to(value: float, figure: Decimal) -> bool:
    places = Decimal(1).scaleb(figure.as_tuple().exponent)
    return Decimal(repr(value)).quantize(places, rounding=ROUND_HALF_UP) == figure


def is_figure(text: str, m: re.Match, after_range: bool, every_number: bool) -> bool:
    """Whether the number `m` found in `text` is a figure to check (see the rules above)."""
    before = text[max(0, m.start() - 8):m.start()]
    if not after_range and (re.search(r"[\w.]-?\Z", before)        # part of a name: Llama-2-70B, int8
                            or BOUND.search(before)                  # ~140 GB, goal <= 1.5x
                            or re.match(r"\.\d|[A-Za-z_]", text[m.end():])):   # 0.4.13, 70B, 8x7B
        return False
    return bool(m.group("unit")) or every_number


def as_printed(value: Decimal, unit: str | None):
    """What a quoted figure must match among a raw output's numbers: a ratio or percentage must be one."""
    unit = (unit or "").strip()
    return (unit, value) if unit in ("x", "%") else value


class Checker:
    def __init__(self, results: Path):
        self.results = results
        self.cache: dict[str, tuple[set[Decimal], set[str]]] = {}
        self.problems: list[Problem] = []
        self.checked = 0
        self.derived: set = set()   # figures derived (and checked) earlier in the current section

    def raw(self, name: str) -> tuple[set[Decimal], set[str]]:
        if name not in self.cache:
            self.cache[name] = read_raw(self.results / name)
        return self.cache[name]

    def sources_named(self, doc: str, block: Block) -> list[str]:
        names: list[str] = []
        for number, line in block.lines:
            for m in NAMED.finditer(line):
                if not (self.results / m.group(1)).is_file():
                    self.problems.append(Problem(doc, number, m.group(0), f"no such raw output in {self.results}"))
            names += [m.group(1) for m in SOURCE.finditer(line) if (self.results / m.group(1)).is_file()]
        return list(dict.fromkeys(names))

    def check_doc(self, path: Path, label: str) -> None:
        for section in split_blocks(path.read_text()):
            sources: list[str] = []
            self.derived = set()
            for block in section:
                sources = self.sources_named(label, block) or sources
                if sources:
                    self.check_block(label, block, sources)

    def check_block(self, doc: str, block: Block, sources: list[str]) -> None:
        if block.kind == "raw":
            lines = set().union(*(self.raw(name)[1] for name in sources))
            for number, line in block.lines:
                self.checked += 1
                if line.strip() and line.strip() not in lines:
                    self.problems.append(Problem(doc, number, line.strip()[:60], "this line of a raw excerpt is "
                                                 f"not in {', '.join(sources)}"))
            return
        header = {block.lines[i - 1][0] for i, (_, line) in enumerate(block.lines)
                  if i and re.fullmatch(r"\|?[\s|:-]*-[\s|:-]*", line.strip())}
        if block.kind == "prose":   # one text, so that a derivation may run on to the next line
            self.check_text(doc, block.lines[0][0], "\n".join(line for _, line in block.lines), sources, False)
            return
        for number, line in block.lines:
            if number not in header and not re.fullmatch(r"[\s|:-]*", line):
                self.check_text(doc, number, line, sources, every_number=True)

    def check_text(self, doc: str, first: int, text: str, sources: list[str], every_number: bool) -> None:
        """Check the figures of `text`, whose first line is line `first` of the document."""
        text = blank_code_spans(text)
        last_end, pos = -2, 0
        while (m := CANDIDATE.search(text, pos)) is not None:
            pos = m.end()
            start = m.start("num")
            number = first + text.count("\n", 0, m.start())
            after_range = last_end >= 0 and text[last_end:start] == "-"    # 0.79x-1.02x: both figures
            if not is_figure(text, m, after_range, every_number):
                continue
            last_end = m.end()
            sign = "" if after_range else (m.group("sign") or "")
            figure = " ".join((sign + m.group("num") + (m.group("unit") or "")).split())
            value = Decimal(m.group("num").replace(",", "")) * (-1 if sign == "-" else 1)
            self.checked += 1
            derivation = re.match(r"\**\s*\(=", text[m.end():])   # **1.09x** (= ...) too
            if derivation:
                open_at = m.end() + derivation.end()
                close_at = closing_paren(text, open_at)
                if close_at < 0:
                    self.problems.append(Problem(doc, number, figure, "its derivation `(= ...` is not closed"))
                    return
                expression = text[open_at:close_at - 1].replace("\n", " ")
                if self.check_derived(doc, number, figure, value, expression, sources):
                    self.derived.add(as_printed(value, m.group("unit")))
                pos = last_end = close_at
            elif as_printed(value, m.group("unit")) not in self.derived and not any(
                    as_printed(value, m.group("unit")) in self.raw(name)[0] for name in sources):
                self.problems.append(Problem(doc, number, figure, f"not in {', '.join(sources)} (the raw outputs "
                                             "in force here); quote it as printed or derive it: `FIGURE (= ...)`"))

    def check_derived(self, doc: str, number: int, figure: str, value: Decimal, expression: str,
                      sources: list[str]) -> bool:
        """Whether `figure` is what `expression` of raw figures gives; each problem recorded."""
        try:
            result, inputs = evaluate(expression)
        except (ValueError, ZeroDivisionError, TypeError, statistics.StatisticsError) as e:
            self.problems.append(Problem(doc, number, figure, f"its derivation cannot be evaluated: {e}"))
            return False
        before = len(self.problems)
        for text in inputs:
            given = Decimal(text)
            if given not in CONSTANTS and not any(given in self.raw(name)[0] for name in sources):
                self.problems.append(Problem(doc, number, figure, f"input {text} of its derivation is not in "
                                             f"{', '.join(sources)}"))
        if not rounds_to(result, value):
            self.problems.append(Problem(doc, number, figure, f"its derivation gives {result:.6g}, "
                                         f"not {value} when rounded"))
        return len(self.problems) == before


def check(docs: list[Path], results: Path, root: Path = ROOT) -> Checker:
    checker = Checker(results)
    for doc in docs:
        label = str(doc.relative_to(root)) if doc.is_relative_to(root) else str(doc)
        checker.check_doc(doc, label)
    return checker


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: README.md, benchmarks/RESULTS.md)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of raw outputs (default: %(default)s)")
    args = ap.parse_args()
    docs = [d.resolve() for d in args.docs] or DOCS
    checker = check(docs, args.results.resolve(), root=Path.cwd().resolve())
    for problem in checker.problems:
        print(problem)
    print(f"check_figures: {checker.checked} figures in {len(docs)} files, {len(checker.problems)} without a "
          "source", file=sys.stderr)
    return 1 if checker.problems else 0


if __name__ == "__main__":
    sys.exit(main())
