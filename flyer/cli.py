"""The ``flyer`` command line. Each subcommand lives beside the code it drives; a module in
``COMMAND_MODULES`` exposes ``register(subparsers)`` which adds its parser(s) and sets
``func(args) -> int | None`` as the parser default.

User errors (bad config, flags, files) print one line ``flyer: error: ...`` and exit 2. Library
code names fields (``FieldError``); here a field is worded as the flag that sets it.

Numeric flags follow one rule before a command runs: finite, and > 0, unless the command module
lists the flag's dest in ``ZERO_OK`` (>= 0) or ``SIGNED`` (any finite value); a path it lists in ``PATHS``
is not empty. Warnings print as one line ``flyer: warning: ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import warnings

from flyer.cluster import cli as cluster_cli
from flyer.errors import CheckpointError, ConfigError, FieldError, UserError, print_error
from flyer.infer import cli as infer_cli
from flyer.interop import export
from flyer.model import info
from flyer.runtime import tune_malloc
from flyer.serve import cli as serve_cli
from flyer.train import cli as train_cli

COMMAND_MODULES = [info, train_cli, infer_cli, serve_cli, export, cluster_cli]

__all__ = ["UserError", "build_parser", "flags", "main"]


class DefaultsShown(argparse.HelpFormatter):
    """Each option's default after its help, where there is one to show (not None or False) and the help does not
    say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS and "default" not in help_):
            help_ += " (default: %(default)s)"
        return help_


class Parser(argparse.ArgumentParser):
    """argparse whose errors are flyer's one line (``UserError``), not a usage block, and whose help shows defaults
    (``DefaultsShown``; a parser whose flags default to None, so that a config file can set them, names the
    defaults they leave in ``config_defaults``, a callable read when help is asked for); subcommand parsers are of
    this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)
        self.config_defaults = None

    def format_help(self) -> str:
        if self.config_defaults is not None:
            shown = self.config_defaults()
            for a in self._actions:
                v = shown.get(a.dest)
                if a.default is None and v is not None and not isinstance(v, bool) and "default" not in (a.help or ""):
                    a.help = f"{a.help or ''} (default: {str(v).replace('%', '%%')})"
            self.config_defaults = None
        return super().format_help()

    def error(self, message: str):
        raise UserError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flyer", description="DeepSeek-V3 training-efficiency stack.")
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


def numeric_actions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[argparse.Action]:
    """The int and float options of ``parser`` and of the subcommand parsers that parsed ``args``."""
    out = []
    for action in parser._actions:  # as in flags()
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None))
            if chosen is not None:
                out += numeric_actions(chosen, args)
        elif action.option_strings and action.type in (int, float):
            out.append(action)
    return out


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Raise ``FieldError`` for a numeric flag that is not finite, or <= 0 where the command
    module does not allow it (``ZERO_OK``: >= 0, ``SIGNED``: any)."""
    zero_ok = set().union(*(getattr(m, "ZERO_OK", ()) for m in COMMAND_MODULES))
    signed = set().union(*(getattr(m, "SIGNED", ()) for m in COMMAND_MODULES))
    for action in numeric_actions(parser, args):
        v = getattr(args, action.dest, None)
        if isinstance(v, int) and not -(1 << 64) < v < 1 << 64:  # math.isfinite cannot even convert 10**400
            raise FieldError(action.dest, f"must be below 2**64 in magnitude (got a {len(str(abs(v)))}-digit number)")
        if v is None or action.dest in signed and math.isfinite(v):
            continue
        if not math.isfinite(v):
            raise FieldError(action.dest, f"must be a finite number (got {v})")
        if v < 0 or (v == 0 and action.dest not in zero_ok):
            least = ">= 0" if action.dest in zero_ok else ">= 1" if action.type is int else "> 0"
            raise FieldError(action.dest, f"must be {least} (got {v})")


def check_paths(args: argparse.Namespace) -> None:
    """Raise ``FieldError`` for a path option given as "" (the command modules' ``PATHS``): it would be the
    current directory, or read as no path at all."""
    for dest in set().union(*(getattr(m, "PATHS", ()) for m in COMMAND_MODULES)):
        if getattr(args, dest, None) == "":
            raise FieldError(dest, "must be a path, not empty")


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: the message alone, no source line."""
    print(f"flyer: warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def error_line(e: Exception, flag_of: dict[str, str]) -> str:
    """The one line printed for a user error: a ``FieldError``'s field becomes its flag."""
    if isinstance(e, FieldError):
        return e.worded(flag_of.get(e.field, e.field), flag_of)
    if isinstance(e, PermissionError) and e.filename:
        return f"{e.filename}: permission denied"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the process's own warning display afterwards
        warnings.showwarning = one_line_warning
        return run(argv)


def run(argv: list[str] | None) -> int:
    tune_malloc()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as e:
        print(f"flyer: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_numbers(parser, args)
        check_paths(args)
        rc = args.func(args)
    except (ConfigError, UserError, CheckpointError, FileNotFoundError, PermissionError) as e:  # a path the user gave
        print_error(error_line(e, flags(parser, args)), e)
        return 2
    except KeyboardInterrupt:
        print("flyer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (flyer info | head): no traceback, and none at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # as the shell reports a process the signal ended
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
