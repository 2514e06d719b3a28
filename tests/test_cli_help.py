"""``python -m fsdp_frozen --help`` lists every verb with one line, and each verb's ``--help`` shows examples
that are real commands (they parse, and the files they name exist)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_frozen.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _verbs() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(sub.choices)


def _help(argv: list[str], monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return out.getvalue()


def test_verbs() -> None:
    assert _verbs() == ["inspect", "estimate"]


def test_top_level_help_lists_every_verb_on_one_line(monkeypatch) -> None:
    text = _help(["--help"], monkeypatch)
    for verb in _verbs():
        lines = [line for line in text.splitlines() if re.match(rf"\s+{verb}\s{{2,}}\S", line)]
        assert len(lines) == 1, f"{verb!r} has no one-line entry in:\n{text}"
        index = text.splitlines().index(lines[0])
        following = text.splitlines()[index + 1] if index + 1 < len(text.splitlines()) else ""
        assert not re.match(r"\s{10,}\S", following), f"{verb!r}'s help wraps onto a second line:\n{text}"
    assert "COMMAND --help" in text


def _examples(text: str) -> list[list[str]]:
    """The example commands of a verb's help (continuation lines joined, comments dropped)."""
    block = text.split("examples:", 1)[1]
    block = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line.strip()) for line in block.splitlines() if line.strip().startswith("python -m fsdp_frozen")]


@pytest.mark.parametrize("verb", ["inspect", "estimate"])
def test_each_verb_shows_real_examples(verb: str, monkeypatch) -> None:
    text = _help([verb, "--help"], monkeypatch)
    assert f"usage: python -m fsdp_frozen {verb}" in text
    examples = _examples(text)
    assert examples, f"no example in {verb} --help:\n{text}"
    for argv in examples:
        assert argv[3] == verb
        build_parser().parse_args(argv[3:])  # exits (fails the test) if the example does not parse
        for token in argv:
            if token.startswith(("docs/", "recipes/")):
                assert (ROOT / token).exists(), f"{verb} --help names {token}, which does not exist"


def test_no_verb_is_a_usage_error() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "COMMAND" in err.getvalue()


def test_module_entry_point() -> None:
    """The real entry point, ``python -m fsdp_frozen`` (``__main__.py``)."""
    done = subprocess.run([sys.executable, "-m", "fsdp_frozen", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "inspect" in done.stdout and "estimate" in done.stdout
