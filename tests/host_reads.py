"""Counting the host reads of floating-point tensors (``.item()``, ``.tolist()``, ``float()``, ``bool()``) that code
under one folder makes: on a GPU each waits for the device, so a training step's loss terms should be read once."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch

READS = ("item", "tolist", "__float__", "__bool__")


@contextlib.contextmanager
def host_reads(under: str = "flyer/train/"):
    """Yields a Counter of "file:function" -> reads of floating-point tensors made from files whose path holds ``under``
    (the model's own reads, e.g. routed experts' split sizes, are integer tensors or elsewhere)."""
    reads: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(original):
        def read(self, *args):
            code = sys._getframe(1).f_code
            if self.is_floating_point() and under in code.co_filename:
                reads[f"{code.co_filename.rpartition(under)[2]}:{code.co_name}"] += 1
            return original(self, *args)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
