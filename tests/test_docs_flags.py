"""Every flag of every ``flyer`` subcommand is named in the README or docs/ (``--help`` lists them; the docs say what
they do and where a name means something else in another command)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from flyer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:  # argparse has no public way to list a parser's options
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, (*path, name))
        elif action.option_strings and action.dest != "help":
            yield " ".join(path), max(action.option_strings, key=len)


def test_every_flag_is_documented():
    docs = "\n".join(p.read_text() for p in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))))
    flags = list(_flags(build_parser()))
    assert len(flags) > 150
    missing = [f"flyer {cmd} {flag}" for cmd, flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", docs)]
    assert not missing, missing
