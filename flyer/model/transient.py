"""Module attributes that hold one forward's autograd graph (a loss a layer hands on to ``compute_loss``): not
state. Copies and pickles of a module (``copy.deepcopy`` for an EMA or a best-model copy, ``torch.save``) leave
them out; ``deepcopy`` cannot copy a tensor that is not a graph leaf, and a copy would keep the graph alive."""

from __future__ import annotations

from typing import Any


class Transients:
    """Mixin for an ``nn.Module``: the attributes named in ``TRANSIENT`` are None in its copies."""

    TRANSIENT: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # the instance's __dict__ itself: not to be changed
        return {**state, **{k: None for k in self.TRANSIENT if k in state}}
