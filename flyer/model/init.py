"""Deferred initialisation: modules built inside ``deferred_init()`` leave their weights as
allocated, for an owner that initialises every parameter right afterwards."""

from __future__ import annotations

import contextlib
import contextvars

_DEFER_INIT = contextvars.ContextVar("flyer_defer_init", default=False)


@contextlib.contextmanager
def deferred_init():
    """Gate and Experts built inside leave their weights as allocated, for an owner that initialises
    every parameter right afterwards (``Transformer.init_weights``): building then draws nothing
    from the RNG, so a seed gives the same model with or without their own initialisation."""
    token = _DEFER_INIT.set(True)
    try:
        yield
    finally:
        _DEFER_INIT.reset(token)


def init_deferred() -> bool:
    """Whether a module being built should leave its weights uninitialised (``deferred_init``)."""
    return _DEFER_INIT.get()
