"""The old home of ``DataError``; ``flyer.errors`` defines it (import it from there)."""

from flyer.errors import DataError

__all__ = ["DataError"]
