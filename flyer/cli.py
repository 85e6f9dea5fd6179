"""The ``flyer`` command line. Each subcommand lives beside the code it drives; a module in
``COMMAND_MODULES`` exposes ``register(subparsers)`` which adds its parser(s) and sets
``func(args) -> int | None`` as the parser default.

User errors (bad config, flags, files) print one line ``flyer: error: ...`` and exit 2. Library
code names fields (``FieldError``); here a field is worded as the flag that sets it.
"""

from __future__ import annotations

import argparse
import sys

from flyer.cluster import cli as cluster_cli
from flyer.errors import CheckpointError, ConfigError, FieldError, UserError
from flyer.infer import cli as infer_cli
from flyer.interop import export
from flyer.model import info
from flyer.runtime import tune_malloc
from flyer.serve import cli as serve_cli
from flyer.train import cli as train_cli

COMMAND_MODULES = [info, train_cli, infer_cli, serve_cli, export, cluster_cli]

__all__ = ["UserError", "build_parser", "flags", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flyer", description="DeepSeek-V3 training-efficiency stack.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """dest -> the longest option string that sets it, over ``parser`` and the subcommand parsers
    that parsed ``args`` (a subcommand's own options win)."""
    out: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public way to list a parser's options
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None))
            if chosen is not None:
                out.update(flags(chosen, args))
        elif action.option_strings:
            out.setdefault(action.dest, max(action.option_strings, key=len))
    return out


def error_line(e: Exception, flag_of: dict[str, str]) -> str:
    """The one line printed for a user error: a ``FieldError``'s field becomes its flag."""
    if isinstance(e, FieldError):
        return e.worded(flag_of.get(e.field, e.field))
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (ConfigError, UserError, CheckpointError, FileNotFoundError) as e:
        print(f"flyer: error: {error_line(e, flags(parser, args))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flyer: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
