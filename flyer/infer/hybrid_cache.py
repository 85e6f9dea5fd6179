"""DeepSeek-V4's decode cache (attn "hybrid") and the attention that runs against it.

What a hybrid layer keeps per batch row is what DeepSeek's inference keeps, not a per-token history:

- ``window`` (B, W, d): the last ``window_size`` tokens' shared key = value (after ``kv_norm`` and RoPE), token
  at position p in slot p % W;
- a compressed layer (ratio r): ``kv_state`` / ``gate_state`` (B, S, c d), FP32: the compressor's projections
  of the tokens whose entry is not complete yet (gate with its position bias ``ape`` added), token p in slot
  p % S, S = r (HCA) or 2 r (CSA: the window before the current one too, whose a-series the next entry
  pools); ``entries`` (B, max_len // r, d): the completed entries;
- CSA: the same two states at ``index_head_dim`` for the indexer's compressor (``index_kv_state`` /
  ``index_gate_state``) and its completed keys ``index_keys`` (B, max_len // r, index_head_dim).

An entry is computed once, when a row's token completes its window, with ``flyer.model.hybrid.Compressor``'s
ops in its slot order (so the same numbers but for the projections' GEMM blocking). Only a row's real tokens
(``lengths``) write state: a padded write into a ring would overwrite a token the row still needs.

Storage (``HybridCache``): the fixed-size state (window, the four rings) of a row sits in a slot, its entries and
index keys in blocks of ``block_size`` tokens (``block_size // r`` entries each) through a block table, as the
paged MLA cache addresses tokens. ``flyer generate`` gives each row one slot and one block of ``max_len`` tokens
(no indirection: the shapes above); ``flyer serve`` a pool of both, addressed per batch (``HybridCache.view``).
The attention reads and writes through ``ring`` / ``write_ring`` / ``read_entries`` / ``write_entries`` only, so an
FP8 cache (``--cache-dtype fp8``: the window and the entries as DeepSeek-V4's FP8 rows, ``flyer.infer.hybrid_fp8``;
the index keys Hadamard-rotated FP4 rows, ``flyer.infer.hybrid_index_fp4``) quantizes there on write and dequantizes
on read (the index keys scored where they lie on the CPU: ``HybridCache.index_scores``); the new tokens' keys are
attended to as it gives them back, the indexer's queries rotated and FP4-rounded as its keys are
(``HybridCache.index_queries``).

Queries see the window's keys (positions in (p - W, p]) and the complete entries (index < (p + 1) // r;
CSA: the indexer's ``index_topk`` of them, ``select_topk``), with sinks and the output un-rotation of
``HybridAttention.attend`` / ``output``. ``HybridAttention.forward`` on the whole sequence is the oracle. Past
``GATHER_OVER`` x index_topk entries a CSA query reads its picks only (``HybridCache.gather_entries``: k entries,
not N) and scores them instead of every entry masked, as the training path's gathering chunks do.

Shapes: B rows, T new tokens, W window, d head_dim, r ratio, M entries completed in one call, N entries seen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import torch
from torch import nn

from flyer import kernels
from flyer.config import ModelConfig
from flyer.infer import hybrid_fp8, hybrid_index_fp4
from flyer.model.hybrid import hybrid_rope_config, select_topk
from flyer.model.hybrid_chunks import entry_picks, gathers
from flyer.model.lowp import as_dtype
from flyer.model.rope import rope_cos_sin

Tables = dict[bool, tuple[torch.Tensor, torch.Tensor]]  # compressed layer? -> cos, sin (max_len, 1, R)
ENTRY_NAMES = ("entries", "index_keys")  # the growing tensors (blocks); the rest are a row's fixed state (slots)
FP8_NAMES = ("window", "entries")  # what an FP8 cache holds as V4's FP8 rows (``flyer.infer.hybrid_fp8``)


def mtp_hidden_spec(cfg: ModelConfig, dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of one position's main hidden state as V4's MTP module reads it: the residual streams
    (hc_mult, dim) before ``hc_head`` ((dim,) without hyper-connections), in the weights' ``dtype``; what a
    boundary snapshot keeps for the MTP entry of its last position (serve's pool, the on-disk files)."""
    return ((cfg.hc_mult, cfg.dim) if cfg.hc_mult > 1 else (cfg.dim,)), dtype


def hybrid_tables(cfg: ModelConfig, max_len: int, device) -> Tables:
    """The rope tables of both layer kinds (``hybrid_rope_config``), positions 0 .. max_len - 1."""
    tables = {}
    for i, r in enumerate(cfg.compress_ratios[:cfg.n_layers]):
        if (r > 0) not in tables:
            tables[r > 0] = rope_cos_sin(cfg.rope_dim, max_len, hybrid_rope_config(cfg, i), device)
    return tables


@dataclass
class HybridRows:
    """Where one forward's new tokens sit: row b's T tokens at positions ``start[b]`` + t, the first
    ``lengths[b]`` real (``real`` (B, T)), the rest right padding; ``cos`` / ``sin``: per layer kind the
    tables at those positions (B, T, 1, R) (padding past the context clamped to its last position);
    ``tables``: the whole tables, which entry i reads at position i r. ``memo``: what layers derive from these rows
    alone (ring slots, masks, which entries complete), made once per forward (``once``), not once per layer."""

    start: torch.Tensor
    lengths: torch.Tensor
    real: torch.Tensor
    cos: dict[bool, torch.Tensor]
    sin: dict[bool, torch.Tensor]
    tables: Tables
    memo: dict = field(default_factory=dict, repr=False)

    def once(self, key, make: Callable[[], object]):
        """``make()``, made at the first call with ``key`` of these rows (one forward) and returned again after."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def hybrid_rows(tables: Tables, max_len: int, start_B: torch.Tensor, T: int,
                lengths: list[int] | None = None) -> HybridRows:
    """``HybridRows`` of T new tokens per row from ``start_B`` (``lengths``: real tokens per row; None: all T).
    ValueError when a real token's position reaches ``max_len``."""
    dev = start_B.device
    n = torch.full_like(start_B, T) if lengths is None else torch.tensor(lengths, dtype=torch.long, device=dev)
    if int((start_B + n).max()) > max_len:
        raise ValueError(f"position {int((start_B + n).max()) - 1} exceeds the decoder's max_len {max_len}")
    t = torch.arange(T, device=dev)
    at = (start_B.view(-1, 1) + t).clamp(max=max_len - 1)
    return HybridRows(start_B, n, t < n.view(-1, 1), {k: c[at] for k, (c, _) in tables.items()},
                      {k: s[at] for k, (_, s) in tables.items()}, tables)


class HybridCache:
    """Per hybrid layer, the named tensors of the module docstring, in two kinds of storage: a row's fixed-size
    state (the window and the compressors' rings, (n_slots, S, C)) in its slot, its growing entries (``entries``,
    ``index_keys``: (n_blocks, block_size // r, C)) in blocks, entry i in block ``tables[b, i // (block_size //
    r)]`` at ``i % (block_size // r)``. ``HybridCache(cfg, batch, max_len)`` (``flyer generate``): one slot and one
    block of ``max_len`` tokens per row, row b's at b (``slots`` / ``tables`` None: no indirection);
    ``HybridCache.paged`` (``flyer serve``): a pool of slots and blocks, which ``view`` addresses per batch
    (``flyer.serve.paged_hybrid``). ``lengths`` (B,): each row's tokens so far, as the slot caches'
    (``flyer.infer.cache``). ``dtype`` float8_e4m3fn (``--cache-dtype fp8``): the windows and entries as V4's FP8
    rows (uint8 (..., ``hybrid_fp8.row_bytes``)), the index keys as the release's rotated FP4 rows (uint8 (...,
    ``hybrid_index_fp4.row_bytes``)), quantized on write and dequantized on read (to BF16, the index keys to FP32;
    exact); the compressors' rings FP32 as ever."""

    kind = "hybrid"

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16, device=None,
                 n_blocks: int | None = None, block_size: int | None = None, ratios: tuple[int, ...] | None = None):
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        # ``ratios``: other layers than the main model's (the MTP block's window-only one: (0,))
        self.ratios = cfg.compress_ratios[:cfg.n_layers] if ratios is None else tuple(ratios)
        self.block_size = max_len if block_size is None else block_size
        self.slots: torch.Tensor | None = None  # (B,) each row's slot; None: row b in slot b
        self.tables: torch.Tensor | None = None  # (B, n) each row's blocks; None: row b in block b
        d, W = cfg.head_dim, cfg.window_size
        self.head_dim, self.rope_dim = d, cfg.rope_dim
        self.fp8 = dtype == hybrid_fp8.FP8
        # an FP8 cache's keys and index keys: rows of bytes (``hybrid_fp8``, ``hybrid_index_fp4``)
        key, kd = (hybrid_fp8.row_bytes(d, cfg.rope_dim), torch.uint8) if self.fp8 else (d, dtype)
        di = cfg.index_head_dim
        index_key, index_dtype = (hybrid_index_fp4.row_bytes(di), torch.uint8) if self.fp8 else (di, dtype)
        self.index_dim = di
        # (di, di) FP32: the rotation an FP8 cache's index keys and the queries scored against them take; else None
        self.index_rotation = (hybrid_index_fp4.rotation(di, device)
                               if self.fp8 and any(cfg.is_csa(i) for i, r in enumerate(self.ratios) if r) else None)
        zeros, blocks = _zeros_of(batch, device), _zeros_of(batch if n_blocks is None else n_blocks, device)
        self.layers: list[dict[str, torch.Tensor]] = []
        for i, r in enumerate(self.ratios):
            state = {"window": zeros(W, key, dtype=kd)}
            if r > 0:
                csa = cfg.is_csa(i)
                c, S = (2, 2 * r) if csa else (1, r)
                state.update(kv_state=zeros(S, c * d), gate_state=zeros(S, c * d),
                             entries=blocks(self.block_size // r, key, dtype=kd))
                if csa:
                    state.update(index_kv_state=zeros(S, 2 * di), index_gate_state=zeros(S, 2 * di),
                                 index_keys=blocks(self.block_size // r, index_key, dtype=index_dtype))
            self.layers.append(state)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def paged(cls, cfg: ModelConfig, n_slots: int, n_blocks: int, block_size: int,
              dtype: torch.dtype = torch.bfloat16, device=None) -> HybridCache:
        """A pool of ``n_slots`` rows' fixed state and ``n_blocks`` blocks of ``block_size`` tokens' entries
        (``block_size`` a multiple of every ratio), addressed through ``view``."""
        return cls(cfg, n_slots, block_size, dtype, device, n_blocks=n_blocks, block_size=block_size)

    def view(self, tables: torch.Tensor, slots: torch.Tensor) -> HybridCache:
        """The same storage for one batch: row b's state in slot ``slots[b]`` (B,), its entries in the blocks
        ``tables[b]`` (B, n) (padding: any block; only entries a row completed are read unmasked or written)."""
        v = copy.copy(self)
        v.tables, v.slots, v.batch = tables, slots, int(slots.numel())
        return v

    def _packed(self, name: str) -> bool:
        return self.fp8 and name in FP8_NAMES

    def _values(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Stored tensor ``t`` of ``name`` as values: an FP8 cache's rows dequantized (BF16, exact; the index keys
        rotated, as the release scores them, in FP32, exact: the indexer scores in FP32, so no BF16 copy between)."""
        if self.fp8 and name == "index_keys":
            return hybrid_index_fp4.unpack_rows(t, self.index_dim, torch.float32)
        return hybrid_fp8.unpack_rows(t, self.head_dim, self.rope_dim, torch.bfloat16) if self._packed(name) else t

    def _stored(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Values ``x`` (..., C) as tensor ``name`` stores them: an FP8 cache's rows quantized (rows already packed,
        uint8, as they are)."""
        if not self.fp8 or x.dtype == torch.uint8:
            return x
        if name == "index_keys":
            return hybrid_index_fp4.pack_rows(x, self.index_rotation)
        return hybrid_fp8.pack_rows(x, self.rope_dim) if name in FP8_NAMES else x

    def index_queries(self, q_BTHK: torch.Tensor) -> torch.Tensor:
        """The indexer's queries (B, T, heads, di), after RoPE, as they are scored against this cache's index keys:
        an FP8 cache's rotated and FP4-rounded as the release's (``hybrid_index_fp4.round_trip``), else as given."""
        return q_BTHK if self.index_rotation is None else hybrid_index_fp4.round_trip(q_BTHK, self.index_rotation)

    def stored_and_values(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as ``name`` stores it, x as it gives it back once written, in x's dtype): an FP8 cache's rows packed
        once and unpacked; (x, x) otherwise (a BF16 cache's rounding is left to the read, as before)."""
        if not self._packed(name):
            return x, x
        rows = hybrid_fp8.pack_rows(x, self.rope_dim)
        return rows, hybrid_fp8.unpack_rows(rows, self.head_dim, self.rope_dim, x.dtype)

    def ring(self, layer: int, name: str) -> torch.Tensor:
        """The rows' ring ``name`` (B, S, C) of ``layer`` (a copy when paged)."""
        t = self.layers[layer][name]
        return self._values(name, t if self.slots is None else t[self.slots])

    def write_ring(self, layer: int, name: str, new_BTC: torch.Tensor, rows: HybridRows) -> None:
        """Each row's real new tokens into its ring ``name`` (``_write_ring``)."""
        _write_ring(self.layers[layer][name], self._stored(name, new_BTC), rows, self.slots)

    def read_entries(self, layer: int, name: str, N: int) -> torch.Tensor:
        """The rows' first N entries ``name`` (B, N, C) of ``layer`` (past a row's completed ones: any values)."""
        t = self.layers[layer][name]
        if self.tables is None:
            return self._values(name, t[:, :N])
        per = t.shape[1]
        n = -(-N // per)
        if n > self.tables.shape[1]:
            raise ValueError(f"block tables cover {self.tables.shape[1] * per} entries, need {N}")
        return self._values(name, t[self.tables[:, :n]].flatten(1, 2)[:, :N])

    def index_scores(self, layer: int, indexer: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, N: int) -> torch.Tensor:
        """The CSA ``indexer``'s scores (B, T, N) FP32 of queries x (``Indexer.scores``' arguments) against the rows'
        first N index keys of ``layer``, unmasked. On the CPU the keys are scored where they lie: an FP8 cache's FP4
        rows by ``kernels.index_scores_fp4`` (each key decoded into the kernel's tile as it is read, not all of them
        unpacked into a new tensor per step; 5-20x faster at 1-64 new tokens over 4 x 2,048 keys of 16 heads), a
        BF16 or FP32 cache's by ``kernels.index_scores`` (V3.2's, BF16 widened as read, not copied to FP32); else,
        and as their oracle, every key is read into FP32 values (``read_entries``) and ``Indexer.scores`` runs on
        them. They differ only in the order of their FP32 sums (the same products: decoded values are bit for bit
        the unpacked ones)."""
        t = self.layers[layer]["index_keys"]
        fp32 = kernels.acc_dtype(x_BTD.dtype) == torch.float32  # the kernel's; FP64 x: the oracle
        fp4 = self.fp8 and kernels.index_scores_fp4_usable(t)
        if fp32 and (fp4 or not self.fp8 and kernels.index_scores_usable(t)):
            q, w = indexer.queries(x_BTD, q_latent_BTR, cos, sin)
            tables = torch.arange(t.shape[0], device=t.device).view(-1, 1) if self.tables is None else self.tables
            score = kernels.index_scores_fp4 if fp4 else kernels.index_scores
            return score(self.index_queries(q).float(), w.float(), t, tables, 0, N, indexer.head_dim ** -0.5)
        keys = self.read_entries(layer, "index_keys", N)
        return indexer.scores(x_BTD, q_latent_BTR, cos, sin, keys, self.index_queries)

    def gather_entries(self, layer: int, name: str, picks_BTk: torch.Tensor) -> torch.Tensor:
        """Each query's picked entries ``name`` (B, T, k, C) of ``layer``: entry ``picks[b, t, j]`` of row b
        (``entry_picks``; an empty slot, -1, reads entry 0, for the attention to mask)."""
        t, i = self.layers[layer][name], picks_BTk.clamp(min=0).long()
        b = torch.arange(i.shape[0], device=i.device).view(-1, 1, 1)
        if self.tables is None:
            return self._values(name, t[b, i])
        per = t.shape[1]
        return self._values(name, t[self.tables[b, i // per], i % per])

    def write_entries(self, layer: int, name: str, b: torch.Tensor, i: torch.Tensor, values: torch.Tensor) -> None:
        """Entry ``i[k]`` of row ``b[k]`` := ``values[k]`` (K, C)."""
        t, values = self.layers[layer][name], self._stored(name, values)
        if self.tables is None:
            t[b, i] = as_dtype(values, t.dtype)
        else:
            per = t.shape[1]
            t[self.tables[b, i // per], i % per] = as_dtype(values, t.dtype)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (int64, in that order), drop the rest (finished rows leave the batch)."""
        self.layers = [{k: t.index_select(0, rows) for k, t in state.items()} for state in self.layers]
        self.batch = int(rows.numel())
        self.lengths = self.lengths.index_select(0, rows)

    def copy_slots(self, slots_R: torch.Tensor) -> list[torch.Tensor]:
        """A copy of slots ``slots_R``' (int64 (R,); ``flyer generate``'s cache: its rows) fixed state (windows and
        rings, each (R, S, C)), for ``restore_slots``: the rollback of rejected drafts, what a speculative verify
        pass writes (``flyer.infer.speculative``, ``flyer.serve.speculation``). The entries are not copied: one
        completed by a rejected token lies past the row's real tokens, unread (masked) until the real token
        completing it rewrites it."""
        return [t[slots_R] for t in self._fixed_state()]  # advanced indexing copies

    def restore_slots(self, saved: list[torch.Tensor], slots_R: torch.Tensor, rows_J: torch.Tensor | None = None):
        """Slots ``slots_R[rows_J]`` (None: all R) := their state in ``saved`` (``copy_slots(slots_R)``)."""
        for t, c in zip(self._fixed_state(), saved, strict=True):
            if rows_J is None:
                t[slots_R] = c
            else:
                t[slots_R[rows_J]] = c[rows_J]

    def _fixed_state(self) -> list[torch.Tensor]:
        """Every layer's fixed-state tensors (n_slots, S, C), as ``_slot_state`` orders one slot's."""
        return [t for state in self.layers for k, t in state.items() if k not in ENTRY_NAMES]

    def save_slot(self, slot: int, blocks_K: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> None:
        """Slot ``slot``'s fixed state (every layer's window and rings, ``window_bytes``), bit for bit, then the
        uint8 tensors ``extra`` (a snapshot's other parts: ``flyer.serve.paged_hybrid``), into the entry storage of
        the K blocks ``blocks_K`` (int64, K * ``block_bytes`` >= their bytes): a snapshot of a sequence's state kept
        in blocks, which ``load_slot`` reads back."""
        state = torch.cat([self.slot_bytes(slot), *extra])
        stores, K = self._block_bytes_views(), blocks_K.numel()
        room = K * sum(s.shape[1] for s in stores)
        if state.numel() > room:
            raise ValueError(f"{K} blocks hold {room} bytes, a slot's state is {state.numel()}")
        state, at = torch.cat([state, state.new_zeros(room - state.numel())]), 0
        for s in stores:  # block storage in order: each entry tensor's K blocks, then the next tensor's
            s[blocks_K] = state[at:at + K * s.shape[1]].view(K, -1)
            at += K * s.shape[1]

    def clear_blocks(self, blocks_K: torch.Tensor) -> None:
        """Zero the entry storage of blocks ``blocks_K`` (int64): a snapshot's bytes, once it is dropped. A request
        taking such a block reads the entries it has not completed at probability 0, and 0 times a NaN or an
        infinity is NaN: a slot's FP32 bytes read as BF16 or FP8 entries hold both."""
        for s in self._block_bytes_views():
            s[blocks_K] = 0

    def load_slot(self, slot: int, blocks_K: torch.Tensor) -> torch.Tensor:
        """Slot ``slot``'s fixed state := the one ``save_slot`` kept in ``blocks_K``; returns the bytes after it
        (uint8, a copy: ``save_slot``'s ``extra`` then zero padding)."""
        state = torch.cat([s[blocks_K].reshape(-1) for s in self._block_bytes_views()])
        n = self.window_bytes()
        self.set_slot_bytes(slot, state[:n])
        return state[n:]

    def slot_bytes(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s fixed state as bytes (uint8 (``window_bytes``,), a copy), layer by layer."""
        return torch.cat([t.reshape(-1).view(torch.uint8) for t in self._slot_state(slot)])

    def set_slot_bytes(self, slot: int, state: torch.Tensor) -> None:
        """Slot ``slot``'s fixed state := ``state`` (uint8 (``window_bytes``,), as ``slot_bytes`` gives it)."""
        at = 0
        for t in self._slot_state(slot):
            n = t.numel() * t.element_size()
            t.view(-1).view(torch.uint8).copy_(state[at:at + n])
            at += n

    def _slot_state(self, slot: int) -> list[torch.Tensor]:
        """Slot ``slot``'s fixed-state tensors (views into the pool), layer by layer."""
        return [t[slot] for t in self._fixed_state()]

    def _block_bytes_views(self) -> list[torch.Tensor]:
        """Every entry tensor as bytes per block (n_blocks, bytes of one block's entries), uint8 views."""
        return [t.view(t.shape[0], -1).view(torch.uint8) for state in self.layers for k, t in state.items()
                if k in ENTRY_NAMES]

    def bytes_per_token(self) -> int | float:
        """Bytes the cache grows by per token over all layers, from the allocated tensors: one ``entries`` row
        (and CSA's ``index_keys`` row) per r tokens. For long contexts this is the whole cache's rate, and it
        equals ``flyer.model.counts.kv_cache_bytes_per_token(cfg, element_size)`` (an FP8 cache's:
        ``kv_cache_bytes_per_token_fp8(cfg)``; a fraction where r does not divide the bytes); the rest is a constant
        per row, ``window_bytes``."""
        total = Fraction(0)
        for state, r in zip(self.layers, self.ratios):
            for name in ENTRY_NAMES:
                if name in state:
                    total += Fraction(state[name].shape[-1] * state[name].element_size(), r)
        return int(total) if total.denominator == 1 else float(total)

    def window_bytes(self) -> int:
        """Bytes per row whatever its length: the windows' keys (``flyer.model.counts.kv_window_bytes`` counts
        these; ``kv_window_bytes_fp8`` an FP8 cache's) plus the compressors' states of not-yet-complete windows
        (which it leaves out): a slot's bytes."""
        return sum(t[0].numel() * t.element_size() for state in self.layers for k, t in state.items()
                   if k not in ENTRY_NAMES)

    def block_bytes(self) -> int:
        """Bytes of one block: every compressed layer's ``block_size // r`` entries (and index keys)."""
        return sum(t[0].numel() * t.element_size() for state in self.layers for k, t in state.items()
                   if k in ENTRY_NAMES)



def _zeros_of(batch: int, device):
    """zeros(batch, *shape) on ``device``, FP32 unless told (the compressors' states: their softmax is FP32)."""
    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch, *shape, dtype=dtype, device=device)
    return zeros


def _write_ring(ring_NSC: torch.Tensor, new_BTC: torch.Tensor, rows: HybridRows, slots: torch.Tensor | None) -> None:
    """Each row's real new tokens into its ring (row b's: ``ring[slots[b]]``, slots None: ``ring[b]``) at slot
    position % S: only the last S of them (earlier ones would be overwritten in the same call, an order
    index_put does not promise), never the padding. Where they go is the same for every ring of S slots in a
    forward (``_ring_places``), so it is made once for these ``slots``."""
    S = ring_NSC.shape[1]
    made = rows.memo.get(("ring", S))
    if made is None or made[0] is not slots:  # another cache's view (its own slots): made anew
        made = rows.memo[("ring", S)] = (slots, *_ring_places(rows, S, slots))
    _, dest, at, b, t = made
    ring_NSC[dest, at] = as_dtype(new_BTC[b, t], ring_NSC.dtype)


def _ring_places(rows: HybridRows, S: int, slots: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(the ring rows, their slots, the batch rows b and token indices t) of the new tokens ``_write_ring`` keeps
    in a ring of S slots."""
    t = torch.arange(rows.real.shape[1], device=rows.start.device)
    b, t = (rows.real & (t >= (rows.lengths - S).view(-1, 1))).nonzero(as_tuple=True)
    return (b if slots is None else slots[b]), (rows.start[b] + t) % S, b, t


@dataclass
class _EntryPlan:
    """Which entries of ratio r the rows' real new tokens complete, and where their tokens lie, for a compressor of
    S slots (``_complete_entries``): the same for every such compressor of a forward, so made once.
    ``slot_r`` (B, T): each token's window slot (the ``ape`` row); M: the most entries a row completes; with M > 0,
    ``ring_order`` (B, S, 1): the states' slots in position order, ``at`` (B, M S, 1): the tokens of each row's
    entries first .. first + M - 1 in [states | new tokens], ``before`` (B, M, S, 1): their slots before position 0
    (CSA's window 0), ``cos`` / ``sin`` at the entries, and (``b``, ``m``) / ``i_done``: each complete entry's
    (row, index among the M) / its entry index."""

    slot_r: torch.Tensor
    M: int
    ring_order: torch.Tensor | None = None
    at: torch.Tensor | None = None
    before: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    b: torch.Tensor | None = None
    m: torch.Tensor | None = None
    i_done: torch.Tensor | None = None


def _entry_plan(rows: HybridRows, r: int, S: int) -> _EntryPlan:
    B, T = rows.real.shape
    dev = rows.start.device
    _, pos = rows.once("positions", lambda: _positions(rows))
    first, done = rows.start // r, (rows.start + rows.lengths) // r  # entries [first, done) complete now
    plan = _EntryPlan(pos % r, int((done - first).max()))
    M = plan.M
    if M > 0:
        # each row's positions start - S .. start + T - 1 in order: the states (slot p % S) then the new tokens
        plan.ring_order = ((rows.start.view(-1, 1) + torch.arange(S, device=dev)) % S).unsqueeze(-1)
        i = first.view(-1, 1) + torch.arange(M, device=dev)  # (B, M) entry indices
        p = (i * r - (S - r)).unsqueeze(-1) + torch.arange(S, device=dev)  # (B, M, S) their tokens
        plan.at = (p - (rows.start - S).view(-1, 1, 1)).clamp(max=S + T - 1).view(B, M * S, 1)  # rows past done: any
        plan.before = (p < 0).unsqueeze(-1)
        cos, sin = rows.tables[True]
        at_entry = (i * r).clamp(max=cos.shape[0] - 1)
        plan.cos, plan.sin = cos[at_entry], sin[at_entry]
        plan.b, plan.m = (torch.arange(M, device=dev) < (done - first).view(-1, 1)).nonzero(as_tuple=True)
        plan.i_done = i[plan.b, plan.m]
    return plan


def _complete_entries(comp: nn.Module, x_BTD: torch.Tensor, rows: HybridRows, cache: HybridCache, layer: int,
                      names: tuple[str, str, str]) -> None:
    """The entries of ``comp`` (a ``Compressor``) that the rows' real new tokens complete, written to the
    cache's ``names[2]`` (entries or index keys); then the new tokens' projections into the states ``names[:2]``
    (kv, gate: (B, S, c d)), token p in slot p % S."""
    B = x_BTD.shape[0]
    kv_state, gate_state = cache.ring(layer, names[0]), cache.ring(layer, names[1])
    r, d, S = comp.ratio, comp.head_dim, kv_state.shape[1]
    plan = rows.once(("entries", r, S), lambda: _entry_plan(rows, r, S))
    kv = comp.wkv(x_BTD)
    gate = comp.wgate(x_BTD) + comp.ape[plan.slot_r]  # the slot's bias, as Compressor adds it per window slot
    M = plan.M
    if M > 0:
        buf_kv = torch.cat([as_dtype(kv_state.gather(1, plan.ring_order.expand_as(kv_state)), kv.dtype), kv], dim=1)
        buf_gate = torch.cat([as_dtype(gate_state.gather(1, plan.ring_order.expand_as(gate_state)), gate.dtype),
                              gate], 1)
        kv_w = buf_kv.gather(1, plan.at.expand(-1, -1, kv.shape[-1])).view(B, M, S, -1)
        gate_w = buf_gate.gather(1, plan.at.expand(-1, -1, gate.shape[-1])).view(B, M, S, -1)
        if comp.overlap:  # slots [a of window i - 1 | b of window i]; window 0's a slots weigh 0, as Compressor's
            kv_w = torch.cat([kv_w[:, :, :r, :d], kv_w[:, :, r:, d:]], dim=2)
            gate_w = torch.cat([gate_w[:, :, :r, :d], gate_w[:, :, r:, d:]], dim=2)
            kv_w, gate_w = kv_w.masked_fill(plan.before, 0.0), gate_w.masked_fill(plan.before, float("-inf"))
        entries = comp.pool(kv_w, gate_w, plan.cos, plan.sin)  # (B, M, d)
        cache.write_entries(layer, names[2], plan.b, plan.i_done, entries[plan.b, plan.m])
    cache.write_ring(layer, names[0], kv, rows)
    cache.write_ring(layer, names[1], gate, rows)


def hybrid_attention(attn: nn.Module, x_BTD: torch.Tensor, rows: HybridRows, cache: HybridCache,
                     layer: int, gather: bool = True) -> torch.Tensor:
    """``HybridAttention`` (B, T, D) of the new tokens x (normed block inputs) against layer ``layer``'s state,
    which their real tokens then join (see the module docstring). ``gather``: a CSA query past ``GATHER_OVER`` x
    index_topk entries attends to its picks gathered; False: to every entry, the unselected masked (the oracle)."""
    W, r = attn.window, attn.ratio
    cos, sin = rows.cos[r > 0], rows.sin[r > 0]
    q_latent, q = attn.queries(x_BTD, cos, sin)
    kv = attn.shared_kv(x_BTD, cos, sin)  # (B, T, 1, d)

    visible = rows.once(("window", W), lambda: _window_visible(rows, W))  # (B, T, W + T)
    # an FP8 cache: the new keys attended to as it returns them (the release's act_quant), quantized once
    kv_stored, kv = cache.stored_and_values("window", kv)
    keys = torch.cat([as_dtype(cache.ring(layer, "window"), kv.dtype).unsqueeze(2), kv], dim=1)  # (B, W + T, 1, d)

    picked = ()  # a gathering CSA layer's (entries (B, T, k, d), their slots' validity (B, T, k))
    if r > 0:
        _complete_entries(attn.compressor, x_BTD, rows, cache, layer, ("kv_state", "gate_state", "entries"))
        idx = attn.indexer
        if idx is not None:
            _complete_entries(idx.compressor, x_BTD, rows, cache, layer,
                              ("index_kv_state", "index_gate_state", "index_keys"))
        N, seen = rows.once(("seen", r), lambda: _entries_seen(rows, r))
        if N > 0:
            if idx is not None and N > idx.topk:  # else every complete entry is kept
                seen = select_topk(cache.index_scores(layer, idx, x_BTD, q_latent, cos, sin, N), seen, idx.topk)
            if gather and idx is not None and gathers(N, idx.topk):  # k entries read and scored per query, not N
                picks = entry_picks(seen, idx.topk)  # (B, T, k)
                picked = (as_dtype(cache.gather_entries(layer, "entries", picks), kv.dtype), picks >= 0)
            else:
                keys = torch.cat([keys, as_dtype(cache.read_entries(layer, "entries", N), kv.dtype).unsqueeze(2)],
                                 dim=1)
                visible = torch.cat([visible, seen], dim=-1)
    out = attn.output(attn.attend(q, keys, visible, *picked), cos, sin)
    cache.write_ring(layer, "window", kv_stored[:, :, 0], rows)
    return out


def _positions(rows: HybridRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (T,) the new tokens' indices, p (B, T) their positions)."""
    t = torch.arange(rows.real.shape[1], device=rows.start.device)
    return t, rows.start.view(-1, 1) + t


def _window_visible(rows: HybridRows, W: int) -> torch.Tensor:
    """Bool (B, T, W + T): which of the ring's W slots (slot j: the latest position < start in slot j, if any) and
    of the new tokens each query sees through a window of W."""
    t, p = rows.once("positions", lambda: _positions(rows))
    T, s = t.shape[0], rows.start.view(-1, 1)
    held = s - 1 - (s - 1 - torch.arange(W, device=t.device)) % W  # (B, W) ring slots' positions (< 0: none)
    return torch.cat([(held >= 0).unsqueeze(1) & (held.unsqueeze(1) > (p - W).unsqueeze(-1)),
                      ((t.view(1, T) <= t.view(T, 1)) & (t.view(1, T) > t.view(T, 1) - W)).expand(p.shape[0], T, T)],
                     -1)


def _entries_seen(rows: HybridRows, r: int) -> tuple[int, torch.Tensor | None]:
    """(N, the entries of ratio r any row has completed once its new tokens are in; with N > 0, bool (B, T, N):
    which of them each query sees complete)."""
    N = int(((rows.start + rows.lengths) // r).max())
    if N == 0:
        return 0, None
    _, p = rows.once("positions", lambda: _positions(rows))
    return N, torch.arange(N, device=p.device).view(1, 1, N) < ((p + 1) // r).unsqueeze(-1)
