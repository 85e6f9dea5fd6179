"""What autograd keeps for backward while a function runs: the bytes of the distinct storages its saved tensors
hold (``torch.autograd.graph.saved_tensors_hooks``), those of ``skip`` (a model's parameters) left out."""

from __future__ import annotations

import torch


def saved_bytes(fn, skip: torch.nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, ``skip``'s parameters' left out."""
    params = {p.untyped_storage().data_ptr() for p in skip.parameters()} if skip is not None else set()
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
