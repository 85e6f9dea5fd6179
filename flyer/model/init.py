"""Deferred initialisation: modules built inside ``deferred_init()`` leave their weights as
allocated, for an owner that initialises every parameter right afterwards; ``allocate`` gives a
model built on the meta device its memory, for a checkpoint to be loaded into."""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

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


def allocate(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model``'s parameters and buffers still on the meta device allocated on ``device``,
    uninitialised (a tied weight once, still tied), then every buffer zeroed (non-persistent ones,
    such as load counters, are in no checkpoint): a model for a checkpoint to be loaded into.
    Unlike ``Module.to_empty``, tensors already allocated stay as they are, views included."""
    made: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for slots in (m._parameters, m._buffers):
            for k, t in slots.items():
                if t is not None and t.is_meta:
                    if id(t) not in made:
                        new = torch.empty_like(t, device=device)
                        made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                    slots[k] = made[id(t)]
    for b in model.buffers():
        b.zero_()
    return model
