"""Token shards: flat token files with a fixed, checksummed header, read by memory map.

File layout (little-endian), a 64-byte header then the payload::

    offset  size  field
         0     8  magic      b"FLYERTOK"
         8     4  version    u32, currently 1
        12     4  itemsize   u32, 2 (uint16 tokens) or 4 (uint32 tokens)
        16     8  n_tokens   u64
        24     8  vocab_size u64 (every token id is < vocab_size)
        32    32  checksum   blake2b-256 of header bytes [0, 32) followed by the payload
        64     -  payload    n_tokens * itemsize bytes

Shards are written atomically (temp file in the same directory, fsync, rename, fsync of the
directory), so a reader on any POSIX file system sees either no file or a whole one. Readers
never load a shard: ``TokenShards`` maps every file with ``numpy.memmap`` and serves any
``[start, start + length)`` range of their concatenation, the random-access pattern 3FS
serves to data loaders.
"""

from __future__ import annotations

import hashlib
import operator
import os
import struct
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from flyer.errors import DataError

MAGIC = b"FLYERTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = HEADER.size  # 64
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_CHUNK = 1 << 22  # bytes hashed per step


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype holding ids < vocab_size."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def atomic_write(path: Path, chunks: Iterator[bytes] | list[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's mode, as open() (mkstemp's: 0600)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write one shard. ``tokens``: 1-D integer array, every id in ``[0, vocab_size)``."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard: tokens must be 1-D (got shape {tokens.shape})")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):  # 1.7 was stored as 1
        raise ValueError(f"write_shard: token ids must be integers (got {tokens.dtype})")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"write_shard: token ids must be in [0, {vocab_size})")
    dtype = token_dtype(vocab_size)
    payload = np.ascontiguousarray(tokens, dtype=dtype).tobytes()
    head = HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size, vocab_size, b"")[:32]
    digest = hashlib.blake2b(head, digest_size=32)
    digest.update(payload)
    atomic_write(path, [head, digest.digest(), payload])
    return path


class ShardWriter:
    """Stream token arrays into shards ``{directory}/{prefix}-00000.bin``, ... holding
    ``shard_tokens`` tokens each (the last one fewer)."""

    def __init__(self, directory: str | Path, prefix: str, vocab_size: int, shard_tokens: int = 1 << 20):
        if shard_tokens < 1:
            raise ValueError(f"ShardWriter: shard_tokens must be >= 1 (got {shard_tokens})")
        self.directory, self.prefix = Path(directory), prefix
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.paths: list[Path] = []
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(np.asarray(tokens, dtype=np.int64))
        self._n_pending += len(tokens)
        while self._n_pending >= self.shard_tokens:
            buf = np.concatenate(self._pending)
            self._flush(buf[: self.shard_tokens])
            rest = buf[self.shard_tokens:]
            self._pending, self._n_pending = [rest], len(rest)

    def close(self) -> list[Path]:
        if self._n_pending:
            self._flush(np.concatenate(self._pending))
        self._pending, self._n_pending = [], 0
        return self.paths

    def _flush(self, tokens: np.ndarray) -> None:
        path = self.directory / f"{self.prefix}-{len(self.paths):05d}.bin"
        self.paths.append(write_shard(path, tokens, self.vocab_size))


def _open_shard(path: Path, verify: bool) -> tuple[np.ndarray, int]:
    """Map one shard; returns (tokens, vocab_size). ``DataError`` on any inconsistency."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        file_size = path.stat().st_size
    except OSError as e:
        raise DataError(f"token shard '{path}' cannot be read: {e.strerror or e}") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(f"token shard '{path}' is truncated ({file_size} bytes, header needs {HEADER_SIZE})")
    magic, version, itemsize, n, vocab_size, checksum = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"token shard '{path}' is not a flyer token shard (bad magic {magic!r})")
    if version != VERSION:
        raise DataError(f"token shard '{path}' has format version {version}; this flyer reads version {VERSION}")
    if itemsize not in _DTYPES:
        raise DataError(f"token shard '{path}' has unknown token size {itemsize} bytes (expected 2 or 4)")
    dtype = _DTYPES[itemsize]
    expected = HEADER_SIZE + n * itemsize
    if file_size != expected:
        raise DataError(f"token shard '{path}' is {file_size} bytes but its header says {expected}; "
                        "file is truncated or corrupt")
    if n == 0:
        tokens = np.empty(0, dtype=dtype)
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n,))
    if verify:
        digest = hashlib.blake2b(raw[:32], digest_size=32)
        view = memoryview(tokens).cast("B") if n else b""
        for i in range(0, len(view), _CHUNK):
            digest.update(view[i:i + _CHUNK])
        if digest.digest() != checksum:
            raise DataError(f"token shard '{path}' failed its checksum: the file is corrupt; "
                            "delete it (or the cache directory) to rebuild")
    return tokens, vocab_size


class TokenShards:
    """Read-only view of the concatenation of one or more shard files.

    ``paths``: shard files in order. ``verify``: check every checksum now (blake2b: a few MB
    cost milliseconds). ``read`` returns int64 copies; the maps stay open.
    """

    def __init__(self, paths: list[str | Path], verify: bool = True):
        self.paths: list[Path] = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("TokenShards: no shard files given")
        opened = [_open_shard(p, verify) for p in self.paths]
        self._arrays = [a for a, _ in opened]
        self.vocab_size = max(v for _, v in opened)
        lengths = np.array([len(a) for a in self._arrays], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])  # shard i covers [off[i], off[i+1])
        self._len = int(self._offsets[-1])

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenShards({len(self.paths)} file(s), {self._len} tokens)"

    def checksums(self) -> list[bytes]:
        """Each shard's checksum (its header's: blake2b of header[0:32] and the tokens), in order: the content, at
        64 bytes a file."""
        out = []
        for p in self.paths:
            with open(p, "rb") as f:
                out.append(HEADER.unpack(f.read(HEADER_SIZE))[-1])
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a new int64 array of shape (length,); the
        range may span shard files."""
        start, length = operator.index(start), operator.index(length)  # 1.5 is refused, not truncated
        if start < 0 or length < 0 or start + length > self._len:
            raise IndexError(f"TokenShards.read: range [{start}, {start + length}) outside [0, {self._len})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = 0
        while pos < length:
            a, base = self._arrays[i], int(self._offsets[i])
            lo = start + pos - base
            take = min(length - pos, len(a) - lo)
            out[pos:pos + take] = a[lo:lo + take]
            pos += take
            i += 1
        return out

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """Each shard's tokens in order (memory-mapped, native dtype): for whole-split passes."""
        yield from self._arrays
