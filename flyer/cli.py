"""The ``flyer`` command line. Each subcommand lives beside the code it drives; a module in
``COMMAND_MODULES`` exposes ``register(subparsers)`` which adds its parser(s) and sets
``func(args) -> int | None`` as the parser default.

User errors (bad config, flags, files) print one line ``flyer: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flyer.config import ConfigError

COMMAND_MODULES = [
    "flyer.model.info",
    "flyer.train.cli",
    "flyer.infer.cli",
    "flyer.cluster.cli",
]


class UserError(Exception):
    """An error the user caused and can fix; reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flyer", description="DeepSeek-V3 training-efficiency stack.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flyer.runtime import tune_malloc

    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from flyer.train.checkpoint import CheckpointError

    try:
        rc = args.func(args)
    except (ConfigError, UserError, CheckpointError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"flyer: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flyer: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
