"""The one error type of the data pipeline."""

from __future__ import annotations

from flyer.config import ConfigError


class DataError(ConfigError):
    """A user-fixable data problem (missing or unreadable path, empty corpus, bad vocab size,
    corrupt shard). A ``ConfigError`` and so a ``ValueError``: the CLI prints its one-line
    message and exits 2."""
