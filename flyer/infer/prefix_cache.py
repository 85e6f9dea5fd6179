"""On-disk prefix cache: the role 3FS plays for DeepSeek's API (KV cache on disk).

A prompt is cut into blocks of ``block_size`` tokens. Block i of a prompt is stored in one file
keyed by a chain hash of every token up to the block's end and of the model fingerprint:

    key_0 = sha256(fingerprint, tokens[0:n]),  key_i = sha256(key_{i-1}, tokens[i*n:(i+1)*n])

so a file is only ever found by a prompt that shares the whole prefix, under the same model,
config, cache layout and dtype. A later prompt loads its leading blocks until the first miss and
recomputes the rest. DeepSeek-V4's cache (attn "hybrid") keeps a fixed-size state per sequence beside
its growing entries: its blocks hold the entries, and a SNAPSHOT of that state at a block boundary is
one more file of this cache, keyed from the block before it (``flyer.infer.prefix_cache_hybrid``).

File: ``ROOT/ab/abcdef....blk`` = magic ``FLYERPC1``, u32 header length, JSON header (format
version, fingerprint, key, the block's tokens, tensor table, sha256 of the payload), payload.
Any mismatch (magic, version, fingerprint, key, tokens, checksum, shapes, dtype) makes the entry
count as corrupt or mismatched and be ignored; the recomputed block then overwrites it.

Ownership: ``ROOT/.flyer-prefix-cache`` marks a directory as a cache. A non-empty directory without
it (and holding other names than a cache's) is refused, and eviction only ever deletes the cache's
own names (``ab/`` + 64 hex digits + ``.blk``, its temporary files), never a file a user put there.

Concurrency: writes go to a temporary file in the same directory and are renamed into place
(atomic on POSIX), so a reader sees a whole file or none. Eviction and the shared statistics file
run under an exclusive ``fcntl`` lock on ``ROOT/.lock``. A hit touches the file's mtime; when the
directory exceeds ``max_bytes``, files are deleted oldest-mtime first (least recently used).
A file evicted between listing and opening is simply a miss.

The cache is best effort: a write that fails (disk full, quota) warns once and the run goes on
without storing; a corrupt ``stats.json`` counts as absent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import struct
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from flyer.errors import FieldError

MAGIC = b"FLYERPC1"
FORMAT_VERSION = 1
# float8_e4m3fn: the latent codes of ``--cache-dtype fp8`` (``flyer.infer.cache_fp8``), kept as written; uint8:
# DeepSeek-V4's FP8 rows (``flyer.infer.hybrid_fp8``), codes, rope values and scales in one row of bytes
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
                               torch.uint8)}
MARKER = ".flyer-prefix-cache"
# an entry's MTP module rows ("mtp.*"): the main model's rows are the same whichever speculation setting wrote
# them, so a reader without MTP ignores these, and one needing them finds an entry without them a miss (``load``)
MTP_PREFIX = "mtp."
_SUBDIR = re.compile(r"[0-9a-f]{2}")
_BLOCK = re.compile(r"[0-9a-f]{64}\.blk")
_TMP_PREFIX = ".flyerpc-"
# mkstemp's 8 random characters; without "flyerpc-": the temporary names of caches written before it
_TMP = re.compile(r"\.(flyerpc-)?[a-z0-9_]{8}\.tmp")
_STATS_MAX_BYTES = 1 << 16  # stats.json is a few hundred bytes: a larger one is not ours to parse


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # blocks looked up
    hits: int = 0
    misses: int = 0  # no file, or one without the MTP rows the reader needs
    corrupt: int = 0  # unreadable, bad checksum or truncated: ignored
    mismatched: int = 0  # another model/config/layout (or a hash collision): ignored
    stored: int = 0
    evicted: int = 0
    tokens_loaded: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": round(self.hit_rate, 4)}


def chain_keys(tokens: Sequence[int], block_size: int, seed: str = "", n_blocks: int | None = None) -> list[str]:
    """Key of each full block of ``tokens`` (the first ``n_blocks``): the SHA-256 of the previous
    block's key (``seed`` for the first) and the block's token ids, so a key names a whole prefix."""
    keys, prev = [], seed.encode()
    n = block_size
    for i in range(len(tokens) // n if n_blocks is None else min(n_blocks, len(tokens) // n)):
        h = hashlib.sha256(prev)
        h.update(struct.pack(f"<{n}q", *tokens[i * n:(i + 1) * n]))
        prev = h.hexdigest().encode()
        keys.append(prev.decode())
    return keys


def model_fingerprint(model: torch.nn.Module, **extra) -> str:
    """Digest of the config, every state tensor's name/shape/dtype and all of its bytes (held FP8
    weights' block scales included), plus ``extra`` (cache layout, dtype, block size).

    Every value, not a sample: a model changed anywhere must miss, or it would reuse another
    model's KV and its tokens would differ from a cold run's. One SHA-256 pass over the weights
    per run (~0.8 GiB/s on one core: 0.013 s for the tiny preset, 0.32 s for small)."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    h.update(json.dumps(cfg.to_dict() if cfg is not None else {}, sort_keys=True).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    tensors = dict(model.state_dict())
    # held FP8 weights keep their scales in non-persistent buffers; the others are run statistics
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("scale") and n not in tensors)
    for name, t in sorted(tensors.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


class PrefixCache:
    RESCAN_S = 30.0  # how stale ``evict``'s knowledge of the directory may grow (other processes' blocks)

    def __init__(self, root: str | Path, fingerprint: str, block_size: int = 64, max_bytes: int = 1 << 30):
        if block_size < 1:
            raise FieldError("prefix_block", f"must be >= 1 (got {block_size})")
        if max_bytes < 1:
            raise FieldError("prefix_cache_size", f"must be at least 1 byte (got {max_bytes})")
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FieldError("prefix_cache", f"{self.root} is a file, not a directory") from None
        except OSError as e:
            raise FieldError("prefix_cache", f"cannot create directory {self.root}: {e.strerror or e}") from None
        # a shared cache this process may not write is used for lookups only
        self.read_only = not os.access(self.root, os.W_OK | os.X_OK)
        self.fingerprint, self.block_size, self.max_bytes = fingerprint, block_size, max_bytes
        self.stats = PrefixCacheStats()
        self.storing = True  # False after a failed write (disk full): best effort, warned once
        # the directory's bytes at the last scan plus what this process stored since (None: not scanned yet), and
        # when it was scanned: ``evict`` lists the directory only past the bound, or every RESCAN_S for other writers
        self._held: int | None = None
        self._scanned_at = 0.0
        self._last_ns = 0  # the last mtime ``_stamp`` set
        self._claim()

    def _claim(self) -> None:
        """Refuse a directory that is neither empty nor a cache: eviction deletes files and the statistics are
        written over, so they may only run where every name is the cache's. Marks an empty one (or one a version
        before the marker wrote: the cache's files alone, ``_unmarked_own``) as a cache."""
        marker = self.root / MARKER
        if marker.is_file():
            return
        try:
            with os.scandir(self.root) as it:  # stops at the first foreign name
                foreign = next((e.name for e in it if not _unmarked_own(e)), None)
        except OSError as e:
            raise FieldError("prefix_cache", f"cannot read directory {self.root}: {e.strerror or e}") from None
        if foreign is not None:
            raise FieldError("prefix_cache", f"{self.root} is not empty and is not a prefix cache (it holds "
                                             f"{foreign!r} and no {MARKER}): give an empty or new directory")
        if not self.read_only:
            with contextlib.suppress(OSError):  # FileExistsError: another process marked it first
                with open(marker, "x") as f:
                    f.write("flyer prefix cache: blocks of KV cache; files here may be deleted (LRU)\n")

    # ---- keys ----------------------------------------------------------------------------
    def block_keys(self, tokens: Sequence[int]) -> list[str]:
        """Chain-hash keys of every full block of ``tokens``."""
        return chain_keys(tokens, self.block_size, self.fingerprint)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.blk"

    # ---- read ----------------------------------------------------------------------------
    def load(self, key: str, tokens: Sequence[int], expect: dict[str, tuple[tuple[int, ...], torch.dtype]],
             count_tokens: bool = True, optional: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
             ) -> dict[str, torch.Tensor] | None:
        """The block's tensors, or None (miss / corrupt / mismatched; counted in ``stats``).

        ``tokens``: the block's own tokens; ``expect``: name -> (shape, dtype) the caller needs;
        ``count_tokens``: a hit adds ``tokens`` to ``stats.tokens_loaded`` (False: the caller counts
        the tokens it uses, DeepSeek-V4's snapshots and the blocks before them); ``optional``: name ->
        (shape, dtype) the caller takes when the entry holds them (all of them, or none).

        An entry's MTP rows (names under ``MTP_PREFIX``) that the caller neither expects nor takes are
        left out; an entry without the MTP rows ``expect`` names is a miss (the caller recomputes and
        overwrites it). Any other difference in names, and any in shape or dtype, is a mismatch."""
        self.stats.lookups += 1
        p = self.path(key)
        try:
            data = p.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self.stats.misses += 1
            return None
        except OSError:
            self.stats.corrupt += 1
            return None
        try:
            header, payload = _split(data)
        except ValueError:
            self.stats.corrupt += 1
            return None
        if (header.get("version") != FORMAT_VERSION or header.get("fingerprint") != self.fingerprint
                or header.get("key") != key or header.get("tokens") != list(tokens)):
            self.stats.mismatched += 1
            return None
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            self.stats.corrupt += 1
            return None
        try:
            tensors = _decode(header["tensors"], payload)
        except (KeyError, ValueError, TypeError, RuntimeError):
            self.stats.corrupt += 1
            return None
        optional = optional or {}
        wanted = {**optional, **expect}
        missing, extra = set(expect) - set(tensors), set(tensors) - set(wanted)
        got_optional = len(set(optional) & set(tensors))
        if (any(not k.startswith(MTP_PREFIX) for k in missing | extra) or 0 < got_optional < len(optional)
                or any(tuple(t.shape) != tuple(wanted[k][0]) or t.dtype != wanted[k][1]
                       for k, t in tensors.items() if k in wanted)):
            self.stats.mismatched += 1
            return None
        if missing:  # written without the MTP rows this reader needs
            self.stats.misses += 1
            return None
        tensors = {k: t for k, t in tensors.items() if k in wanted}
        self._stamp(p)  # least-recently-used order follows mtime
        self.stats.hits += 1
        self.stats.tokens_loaded += len(tokens) if count_tokens else 0
        return tensors

    # ---- write ---------------------------------------------------------------------------
    def store(self, key: str, tokens: Sequence[int], tensors: dict[str, torch.Tensor]) -> bool:
        """Write one block atomically (temp file + rename). Returns False if it can never fit, or
        nothing is stored (read-only, or a write failed before: warned once)."""
        if self.read_only or not self.storing:
            return False
        table, chunks, off = [], [], 0
        for name, t in tensors.items():
            b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            table.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "offset": off, "nbytes": len(b)})
            chunks.append(b)
            off += len(b)
        payload = b"".join(chunks)
        header = json.dumps({"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "key": key,
                             "tokens": list(tokens), "tensors": table,
                             "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        blob = MAGIC + struct.pack("<I", len(header)) + header + payload
        if len(blob) > self.max_bytes:
            return False
        p = self.path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.parent.is_symlink() or p.is_dir():  # not the cache's: never written through, nor over
                return False
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=_TMP_PREFIX, suffix=".tmp")
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # read-only after all: lookups only
                self.read_only = True
            else:  # a full disk, a quota
                self._write_failed("store a block", e)
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, p)
            self._stamp(p)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not isinstance(e, OSError):
                raise
            self._write_failed("store a block", e)
            return False
        self.stats.stored += 1
        if self._held is not None:
            self._held += len(blob)  # a block written over counts twice: a scan comes early, never late
        return True

    def _write_failed(self, what: str, e: OSError) -> None:
        """Stop storing after a failed write (disk full, quota), warning once: the cache is a
        speed-up, never a reason to lose the run's output."""
        if self.storing:
            self.storing = False
            warnings.warn(f"prefix cache {self.root}: cannot {what} ({e.strerror or e}); storing nothing more "
                          "this run", stacklevel=3)

    # ---- bound and bookkeeping -----------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock shared by every process using this directory."""
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def touch(self, keys: Sequence[str]) -> None:
        """Mark a prompt's chain of blocks (``keys``, head first) used, its head last, so the most recent: eviction
        then takes a chain's tail before its head (a head gone leaves the rest unreachable: lookups stop at the first
        miss). Keys with no file are passed over."""
        if self.read_only:
            return
        for key in reversed(keys):
            self._stamp(self.path(key))

    def _stamp(self, path: Path) -> None:
        """``path``'s mtime set to now, later than every stamp this process set before: a file's own time ticks
        in jiffies (milliseconds), so blocks touched in one go would tie, and ties evict in name order."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        with contextlib.suppress(OSError):  # (a symlink's own time: never a file's outside the cache)
            os.utime(path, ns=(self._last_ns, self._last_ns), follow_symlinks=False)

    def evict(self) -> int:
        """Delete least-recently-used blocks until the directory holds at most ``max_bytes``. It is listed (every
        file stat'ed: 0.1-0.3 s at 10,000 files, on a server's step) only when what this process knows it holds
        passes the bound, or ``RESCAN_S`` after the last listing (the blocks other processes sharing it wrote)."""
        removed = 0
        if self.read_only:
            return removed
        if self._held is not None and self._held <= self.max_bytes \
                and time.monotonic() - self._scanned_at < self.RESCAN_S:
            return removed
        try:
            with self.locked():
                entries, total, now = [], 0, time.time()
                for e, st, temporary in self._own_files():
                    if temporary:  # left by a killed writer
                        if now - st.st_mtime > 600:
                            with contextlib.suppress(OSError):
                                os.unlink(e.path)
                        continue
                    entries.append((st.st_mtime, st.st_size, e.path))
                    total += st.st_size
                for _, size, path in sorted(entries):
                    if total <= self.max_bytes:
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        removed += 1
                    total -= size
                self._held, self._scanned_at = total, time.monotonic()
        except OSError as e:  # the lock file cannot be made (disk full): evicted next run
            self._write_failed("evict", e)
        self.stats.evicted += removed
        return removed

    def _own_files(self) -> Iterator[tuple[os.DirEntry, os.stat_result, bool]]:
        """(entry, stat, is a temporary file) of every file the cache wrote: names it would not
        write (a user's files, links) are never listed, so never deleted."""
        with os.scandir(self.root) as top:
            subs = [e.path for e in top if _SUBDIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        for sub in subs:
            try:
                with os.scandir(sub) as it:
                    for e in it:
                        block = _BLOCK.fullmatch(e.name) and e.name[:2] == os.path.basename(sub)
                        temporary = _TMP.fullmatch(e.name)
                        if not (block or temporary) or not e.is_file(follow_symlinks=False):
                            continue
                        try:
                            yield e, e.stat(follow_symlinks=False), bool(temporary)
                        except FileNotFoundError:
                            continue
            except (FileNotFoundError, NotADirectoryError):
                continue

    def disk_bytes(self) -> int:
        return sum(st.st_size for _, st, temporary in self._own_files() if not temporary)

    def record_stats(self) -> dict:
        """Add this process's counters to ``ROOT/stats.json`` (under the lock); returns the totals
        (a read-only cache: those of the file plus this process's, the file unchanged)."""
        mine = asdict(self.stats)
        total = dict(mine)  # this process's alone, when the file cannot be reached
        path = self.root / "stats.json"
        try:
            with contextlib.nullcontext() if self.read_only else self.locked():
                shared = _read_counters(path)
                total = {k: shared.get(k, 0) + v for k, v in mine.items()}
                if not self.read_only:
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps({**total, "hit_rate": _rate(total)}))
                    os.replace(tmp, path)
        except OSError as e:
            self._write_failed("update stats.json", e)
        total["hit_rate"] = _rate(total)
        return total

    def summary(self) -> str:
        s = self.stats
        return (f"prefix cache: {s.hits}/{s.lookups} blocks hit ({100 * s.hit_rate:.1f}%), "
                f"{s.tokens_loaded} tokens loaded, {s.stored} stored, {s.evicted} evicted, "
                f"{s.corrupt} corrupt and {s.mismatched} mismatched ignored")


def _rate(counts: dict) -> float:
    return round(counts["hits"] / counts["lookups"], 4) if counts["lookups"] else 0.0


def _unmarked_own(e: os.DirEntry) -> bool:
    """Whether ``e``, at the root of a directory without the marker, is what a cache of a version before the
    marker left there: an empty ``.lock``, a statistics file of its counters alone, a subdirectory of block and
    temporary files. A name alone is no proof: a user's own ``stats.json`` would be written over."""
    if e.name == ".lock":
        return e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_size == 0
    if e.name in ("stats.json", "stats.tmp"):
        try:
            with open(e.path, "rb") as f:
                raw = json.loads(f.read(_STATS_MAX_BYTES + 1))
        except (OSError, ValueError, RecursionError):
            return False
        counters = {*asdict(PrefixCacheStats()), "hit_rate"}
        return e.is_file(follow_symlinks=False) and isinstance(raw, dict) and bool(raw) and set(raw) <= counters
    if _SUBDIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
        with os.scandir(e.path) as it:
            return all((_BLOCK.fullmatch(x.name) or _TMP.fullmatch(x.name)) and x.is_file(follow_symlinks=False)
                       for x in it)
    return False


def _read_counters(path: Path) -> dict[str, int]:
    """The counters of a shared ``stats.json``; anything but a non-negative integer (a hand edit,
    a crashed writer, a corrupt file) counts as absent, as an unreadable file does."""
    try:
        with open(path, "rb") as f:
            data = f.read(_STATS_MAX_BYTES + 1)
        raw = json.loads(data) if len(data) <= _STATS_MAX_BYTES else {}
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k in asdict(PrefixCacheStats()) if type(v := raw.get(k)) is int and v >= 0}


def _split(data: bytes) -> tuple[dict, bytes]:
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise ValueError("bad magic")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(data):
        raise ValueError("truncated header")
    try:
        header = json.loads(data[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError("bad header") from e
    if not isinstance(header, dict):
        raise ValueError("bad header")
    return header, data[start + n:]


def _decode(table: list[dict], payload: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a block file's table over its payload, laid end to end in table order as ``store`` writes
    them: the checksum covers the payload only, so a table whose offsets or sizes say otherwise (a flipped digit
    shifting a tensor onto its neighbour's bytes) is refused (ValueError), not read as another tensor."""
    out, end = {}, 0
    for e in table:
        dtype = _DTYPES[e["dtype"]]
        off, n = int(e["offset"]), int(e["nbytes"])
        if off != end or off + n > len(payload):  # (a size that does not hold the shape: reshape refuses it)
            raise ValueError("tensor table does not lay the payload out")
        raw = torch.empty(0, dtype=torch.uint8)
        if n:
            raw = torch.frombuffer(bytearray(payload[off:off + n]), dtype=torch.uint8)
        out[e["name"]] = raw.view(dtype).reshape(e["shape"])
        end = off + n
    if end != len(payload):
        raise ValueError("payload length mismatch")
    return out
