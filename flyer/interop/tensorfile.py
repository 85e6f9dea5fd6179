"""Streaming safetensors I/O: one tensor at a time, straight into (or out of) its destination.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Reading a tensor here is one ``readinto`` into
the parameter that will hold it; writing is one ``write`` per tensor after a header computed up
front. Unlike a memory map (whose touched pages count as resident until it is closed), the
process then holds one copy of the model plus at most one tensor in flight.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from flyer.errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
          "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class TensorFile:
    """The header of one safetensors file; tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (n,) = struct.unpack("<Q", f.read(8))
                # a corrupt length must not become a huge read: the header lies inside the file
                header = json.loads(f.read(n)) if n <= size - 8 else None
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        if header is None:
            raise CheckpointError(f"{self.path}: not a safetensors file (header length {n}, file size {size})")
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (its header is not a JSON object of tensors)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries: dict[str, dict] = header
        for name, e in header.items():
            self._check_entry(name, e)

    def _check_entry(self, name: str, e) -> None:
        """A header entry is {dtype, shape, data_offsets} whose byte range holds the shape's bytes."""
        if not isinstance(e, dict):
            raise CheckpointError(f"{self.path}: tensor {name}: header entry is not an object (got {e!r:.40})")
        dt, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {dt!r:.40}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{self.path}: tensor {name} has a bad shape {shape!r:.40}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]
                or offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dt].itemsize):
            raise CheckpointError(f"{self.path}: tensor {name} has data_offsets {offsets!r:.40} that do not hold "
                                  f"its shape {shape} of {dt}")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Fill ``out`` (contiguous CPU, the stored shape and dtype) with tensor ``name``; ``rows``
        (lo, hi): only those of its first dimension (one contiguous range of the file)."""
        lo, hi = self.entries[name]["data_offsets"]
        if rows is not None:
            row = (hi - lo) // max(self.shape(name)[0], 1)
            lo, hi = lo + rows[0] * row, lo + rows[1] * row
        buf = out.detach().reshape(-1).view(torch.uint8)
        if buf.numel() != hi - lo:
            raise CheckpointError(f"{self.path}: tensor {name} holds {hi - lo} bytes, expected {buf.numel()}")
        with open(self.path, "rb") as f:
            f.seek(self.base + lo)
            if f.readinto(buf.numpy()) != hi - lo:
                raise CheckpointError(f"{self.path}: tensor {name} is truncated")
        return out

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        shape = self.shape(name)
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        return self.read_into(name, torch.empty(shape, dtype=self.dtype(name)), rows)


def header(cache: dict[Path, TensorFile], path: Path) -> TensorFile:
    """``path``'s ``TensorFile`` from ``cache``, made there once: parsing a shard's header for each of
    its tensors made loading quadratic in the tensors per file (5 s for 835 in one file)."""
    tf = cache.get(path)
    if tf is None:
        tf = cache[path] = TensorFile(path)
    return tf


def write_tensors(path: str | Path, items: Iterable[tuple[str, tuple[int, ...], torch.dtype, object]],
                  metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from (name, shape, dtype, make) items; ``make()`` returns the tensor
    only when its bytes are written, so at most one converted tensor exists at a time. Returns
    the bytes of tensor data written."""
    items = list(items)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in items:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in items:
            t = make()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, announced {tuple(shape)} {dtype}")
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy())
    return offset


__all__ = ["DTYPES", "TensorFile", "header", "write_tensors"]
