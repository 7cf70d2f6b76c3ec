"""Every code block of README.md and docs/*.md runs, or is at least parsed, so examples cannot drift.

Fenced blocks are named ``file:line`` (the line of the opening fence). What is checked:

- ``python``: executed in a fresh namespace, in a temporary working folder; the embedded
  SmolLM2-135M-Instruct is loaded once and ``attnsteer.models.load_smollm2()`` hands that load out.
- ``bash`` / ``sh`` / ``console``: every command that invokes the CLI (``attnsteer``,
  ``.venv/bin/attnsteer``, ``python cli.py``, ``-m attnsteer.cli``) is parsed by the CLI's own
  parser (no unknown flag, an existing subcommand), then run with ``attnsteer.cli.main`` and must
  exit 0. ``...`` stands for "more arguments" and is dropped; ``> FILE`` writes the output there.
- ``yaml`` with ``interventions:``: loaded with ``attnsteer.load_recipe``, so it must validate.

A block that cannot run here carries an HTML comment on the line right above its fence, with the
reason in parentheses:

- ``<!-- docs-test: skip (reason) -->``: not run (it needs the hub, a GPU, a 7B model, data);
  Python blocks are still compiled;
- ``<!-- docs-test: parse-only (reason) -->``: Python is compiled, CLI commands are parsed, not run
  (they take longer than a few seconds);
- ``<!-- docs-test: continues (reason) -->``: a Python block that runs in the namespace the
  previous Python block of the same file left (a snippet split by prose).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import attnsteer
import attnsteer.models
from attnsteer.cli import build_parser, main
from attnsteer.cli._common import CLIError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
CHECKED = {"python", "yaml", *SHELL}
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->", re.S)
MARKER_FORM = re.compile(r"\s*(skip|parse-only|continues)\s*\((.*\S.*)\)\s*$", re.S)
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([\w+-]*)\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None = None  # skip | parse-only | continues
    reason: str = ""
    previous_python: Block | None = field(default=None, repr=False)  # for `continues`

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    last_python = None
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        block = Block(path, start + 1, lang, "\n".join(body) + "\n")
        above = lines[start - 1] if start > 0 else ""
        mm = MARKER.search(above)
        if mm:
            form = MARKER_FORM.match(mm.group(1))
            if form:
                block.marker, block.reason = form.group(1), form.group(2).strip()
        if lang == "python":
            block.previous_python = last_python
            last_python = block
        blocks.append(block)
    return blocks


BLOCKS = [b for path in DOCS for b in read_blocks(path)]


def blocks_of(*langs: str) -> list:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.lang in langs]


# ---- the shared model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_smollm2(smollm2):
    """conftest's one SmolLM2 load, as a sanity-checked (tokenizer, model)."""
    tokenizer, model = smollm2
    assert model.config.model_type == "llama"
    return tokenizer, model


@pytest.fixture
def docs_env(shared_smollm2, tmp_path, monkeypatch):
    """A temporary working folder, and ``load_smollm2()`` (hence ``--model smollm2``) returning the
    shared load for the default settings; other dtypes or attention implementations load for real."""
    real = attnsteer.models.load_smollm2

    def load_smollm2(dtype=None, attn_implementation: str = "sdpa"):
        if dtype in (None, torch.float32) and attn_implementation == "sdpa":
            return shared_smollm2
        return real(dtype=dtype, attn_implementation=attn_implementation)

    monkeypatch.setattr(attnsteer.models, "load_smollm2", load_smollm2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads made the examples ~6x slower
    yield tmp_path
    torch.set_num_threads(threads)


# ---- markers --------------------------------------------------------------------------------------
def test_every_marker_has_a_known_kind_a_reason_and_sits_right_above_a_fence():
    problems = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            for m in MARKER.finditer(line):
                where = f"{path.relative_to(ROOT)}:{n + 1}"
                if not MARKER_FORM.match(m.group(1)):
                    problems.append(f"{where}: {m.group(0)!r} is not 'skip|parse-only|continues (reason)'")
                fence = FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
                if not (fence and fence.group(3)):
                    problems.append(f"{where}: the marker is not on the line right above an opening fence")
    assert not problems, "\n".join(problems)


def test_every_block_names_a_language():
    """A fence without a language would escape every check below."""
    unnamed = [b.id for b in BLOCKS if not b.lang]
    assert not unnamed, f"fenced blocks without a language (add ```bash, ```python, ```text ...): {unnamed}"


def test_continues_follows_a_python_block():
    for b in BLOCKS:
        if b.marker == "continues":
            assert b.lang == "python" and b.previous_python is not None, f"{b.id}: nothing to continue"
        elif b.marker is not None:
            assert b.lang in CHECKED, f"{b.id}: a {b.marker} marker on a ```{b.lang} block, which is not checked"


# ---- python ----------------------------------------------------------------------------------------
def _chain(block: Block) -> list[Block]:
    chain = [block]
    while chain[0].marker == "continues":
        chain.insert(0, chain[0].previous_python)
    return chain


def _compile(block: Block):
    return compile(block.code, block.id, "exec")


@pytest.mark.parametrize("block", blocks_of("python"))
def test_python_block(block, request):
    code = _compile(block)  # every block must at least be valid Python
    chain = _chain(block)
    not_run = [b for b in chain if b.marker in ("skip", "parse-only")]
    if not_run:
        pytest.skip(f"{not_run[-1].marker}: {not_run[-1].reason}")
    request.getfixturevalue("docs_env")
    namespace: dict = {"__name__": "__docs__"}
    with torch.no_grad():
        for b in chain[:-1]:
            exec(_compile(b), namespace)
        exec(code, namespace)


# ---- shell -----------------------------------------------------------------------------------------
OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str]
    stdout_to: str | None
    text: str


def cli_commands(block: Block) -> list[Command]:
    """The CLI invocations of a shell block (continuation lines joined, comments dropped)."""
    text = block.code.replace("\\\n", " ")
    commands = []
    for raw in text.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in OPERATORS:
                segment.append(tok)
                continue
            command = _invocation(segment, line)
            if command:
                commands.append(command)
            segment = []
    return commands


def _invocation(tokens: list[str], text: str) -> Command | None:
    for i, tok in enumerate(tokens):
        if tok == "attnsteer" or tok.endswith("/attnsteer") or tok == "cli.py" or tok.endswith("/cli.py"):
            break
        if tok == "attnsteer.cli" and i > 0 and tokens[i - 1] == "-m":
            break
    else:
        return None
    env = {}
    for tok in tokens[:i]:  # FOO=1 attnsteer ...
        if re.fullmatch(r"[A-Za-z_]\w*=.*", tok):
            key, value = tok.split("=", 1)
            env[key] = value
    args, stdout_to = [], None
    rest = iter(tokens[i + 1 :])
    for tok in rest:
        if tok == ">":
            stdout_to = next(rest, None)
        elif tok != "...":  # a placeholder for more arguments
            args.append(tok)
    return Command(args, env, stdout_to, text)


def _full_flags_only(parser) -> None:
    """Refuse abbreviated flags (argparse takes ``--max_new`` for ``--max_new_tokens``): a doc that
    abbreviates breaks once another flag shares the prefix."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _full_flags_only(sub)


def parse_cli(command: Command) -> None:
    parser = build_parser()
    _full_flags_only(parser)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            args, extra = parser.parse_known_args(command.argv)
    except SystemExit as exc:  # --help, --version
        assert exc.code in (0, None), f"{command.text}: the CLI's parser exited {exc.code}: {out.getvalue()}"
        return
    except CLIError as exc:
        pytest.fail(f"{command.text}: the CLI's parser refuses it: {exc}")
    assert not extra, f"{command.text}: unknown arguments {extra}"
    assert hasattr(args, "func"), f"{command.text}: no such command"


SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in SHELL_BLOCKS])
def test_shell_block(block, request, capsys):
    commands = cli_commands(block)
    if block.marker == "skip":
        pytest.skip(f"skip: {block.reason}")
    if not commands:
        pytest.skip("no attnsteer command in this block")
    for command in commands:
        parse_cli(command)
    if block.marker == "parse-only":
        return
    request.getfixturevalue("docs_env")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for command in commands:
        for key, value in command.env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(command.argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{command.text}: exit {code}\n{out}\n{err}"
        if command.stdout_to:
            Path(command.stdout_to).write_text(out, encoding="utf-8")


def _parsers(parser, path=("attnsteer",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_help_example_parses():
    """The ``example:`` ending every ``--help`` is a command line too: the same parse check (whether
    it runs offline is listed in docs/evals.md)."""
    examples = []
    for path, parser in _parsers(build_parser()):
        lines = (parser.epilog or "").splitlines()
        assert lines and re.fullmatch(r"example( \(needs [^)]+\))?:", lines[0]), (
            f"`{' '.join(path)} --help` ends with no example"
        )
        examples += [line.strip() for line in lines[1:] if line.strip()]
    block = Block(ROOT / "README.md", 0, "bash", "\n".join(examples) + "\n")
    commands = cli_commands(block)
    assert len(commands) == len(examples)
    for command in commands:
        parse_cli(command)


# ---- yaml -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", blocks_of("yaml", "yml"))
def test_yaml_recipe_block(block):
    data = yaml.safe_load(block.code)
    if not (isinstance(data, dict) and "interventions" in data):
        pytest.skip("not a recipe")
    if block.marker in ("skip", "parse-only"):
        pytest.skip(f"{block.marker}: {block.reason}")
    recipe = attnsteer.load_recipe(data)
    assert recipe.interventions, block.id
