"""flyer's error classes, in one place, importing nothing from flyer (every layer may raise them).

    ConfigError(ValueError)    a user-fixable configuration problem; one line naming the field
      FieldError               one named field has a bad value: ``.field``, ``.problem``
      DataError                a data problem (missing path, empty corpus, corrupt shard)
    CheckpointError(ValueError)  a checkpoint is missing, corrupt, or does not fit the model
    TrainingError(RuntimeError)  training cannot go on (too many non-finite steps)
    UserError(Exception)       a message already worded for the command line (names flags)

Library code names fields, never flags: ``FieldError("gpus", "must be >= 1 (got 0)")`` reads
``gpus: must be >= 1 (got 0)``. Only ``flyer.cli`` words a field as the flag that sets it
(``--gpus: must be >= 1 (got 0)``), and so the other fields a problem names, written ``{field}`` and listed
in ``also`` (``FieldError("dpo", "needs {init}", ("init",))``: ``--dpo: needs --init``). ``UserError`` is for
command modules, whose messages may name flags themselves.

An error every rank of a parallel run raises alike (``every_rank``) is printed by rank 0 alone (``print_error``).
"""

from __future__ import annotations

import os
import sys


def every_rank(e: BaseException) -> BaseException:
    """``e``, marked as raised alike on every rank of the job: ``print_error`` says it on rank 0 only."""
    e.every_rank = True
    return e


def print_error(line: str, e: BaseException | None = None) -> None:
    """``flyer: error: LINE`` on stderr, in one write (ranks sharing a terminal do not run their lines together);
    on a rank other than 0 not for an error ``every_rank`` marked (one line per job, not one per rank)."""
    if e is not None and getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0":
        return
    sys.stderr.write(f"flyer: error: {line}\n")
    sys.stderr.flush()


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message is one line naming the field."""


class FieldError(ConfigError):
    """``field`` has a bad value; ``problem`` says why and what is allowed. ``also``: other fields the problem
    names, each written ``{name}`` in it ("needs {init}"), which the CLI words as their flags too."""

    def __init__(self, field: str, problem: str, also: tuple[str, ...] = ()):
        super().__init__(field, problem)
        self.field, self.problem, self.also = field, problem, also

    def __str__(self) -> str:
        return self.worded(self.field)

    def worded(self, name: str, names: dict[str, str] | None = None) -> str:
        """The message with ``field`` called ``name`` and each ``{other}`` of ``also`` called ``names[other]``
        (the CLI passes the flags that set them; else the field names)."""
        problem = self.problem
        for other in self.also:
            problem = problem.replace("{" + other + "}", (names or {}).get(other, other))
        return f"{name}: {problem}"


class DataError(ConfigError):
    """A user-fixable data problem (missing or unreadable path, empty corpus, bad vocab size,
    corrupt shard). A ``ConfigError`` and so a ``ValueError``: the CLI prints its one-line
    message and exits 2."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


class UserError(Exception):
    """An error the user caused and can fix, worded for the command line; one line, exit status 2."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "FieldError", "TrainingError", "UserError"]
