"""Preallocated per-layer decode caches.

``LatentCache`` is what MLA needs with absorbed decoding: per token and layer, the normalised
latent c_KV (``kv_lora_rank``) and the rope key shared by all heads (``qk_rope_head_dim``).
``KVCache`` holds per-head keys and values: the naive MLA path (keys up-projected from the latent,
H x (qk_head_dim + v_head_dim) per token) and GQA (n_kv_heads x 2 x head_dim). Both exist so the
memory and speed of the absorbed path can be measured against a peer. A model with DeepSeek Sparse
Attention (V3.2) caches in either MLA layout one more tensor, ``index_key`` (L_i, B, S, index_head_dim):
each token's indexer key, which the indexer scores against every later query, in the L_i layers with an
indexer of their own (all L, but for GLM-5's shared layers, which keep none: ``MLA.index_row`` is a layer's
row).

``Fp8LatentCache`` (``--cache-dtype fp8``) is ``LatentCache`` in DeepSeek's FP8 rows (``flyer.infer.cache_fp8``):
per token and layer 512 E4M3 latent codes, 4 FP32 scales and 64 BF16 rope values in V3, 656 bytes against 1,152;
with DSA its index keys are DeepSeek's FP8 ones (``flyer.infer.indexer_fp8``): ``index_key`` E4M3 codes of the
Hadamard-rotated keys and ``index_key_scale`` (L_i, B, S, 1) FP32, 132 bytes at index_head_dim 128 against 256.

Every cache stores its tensors as ``(L, B, S, ...)``: L layers, B rows (sequences), S slots.
Row b's token at position p lives in slot p. Slots at or beyond a row's valid length may hold
stale values (right padding of a batched prefill, rejected speculative drafts); attention masks
them by position, so rolling back is just lowering the length.
"""

from __future__ import annotations

import torch

from flyer.config import ModelConfig
from flyer.errors import FieldError
from flyer.infer.cache_fp8 import FP8, check_fp8_cache, n_tiles, pack_rows, token_bytes, unpack_rows
from flyer.infer.indexer_fp8 import index_keys, rotation
from flyer.model.lowp import as_dtype


class _SlotCache:
    """Named tensors of shape (L, B, S, ...) written at per-row slot positions."""

    kind = "slots"
    # (index_head_dim,)*2 FP32 where the index keys are DeepSeek's FP8 ones (``Fp8LatentCache``): ``indexer_fp8``
    index_rotation: torch.Tensor | None = None

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        first = next(iter(tensors.values()))
        self.n_layers, self.batch, self.max_len = first.shape[:3]
        self.lengths = torch.zeros(self.batch, dtype=torch.long, device=first.device)
        self._flat: dict[tuple[str, int], torch.Tensor] = {}  # ``flat_storage``'s views of the current tensors
        self._span: tuple = ()  # (slots, their flat indices) of the last ``read_slots``: every layer reads the same

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, from the allocated tensors themselves."""
        return sum(t.shape[0] * t.shape[3:].numel() * t.element_size() for t in self.tensors.values())  # (L, B, S, ...)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (int64, in that order) and drop the rest: finished rows leave
        the decode batch instead of being computed until the last row is done."""
        self.tensors = self._kept(rows)
        self._flat = {}
        self.batch = int(rows.numel())
        self.lengths = self.lengths.index_select(0, rows)

    def _kept(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t.index_select(1, rows) for k, t in self.tensors.items()}

    def write(self, layer: int, pos_BT: torch.Tensor, **values: torch.Tensor) -> None:
        """Store ``values[name]`` (B, T, ...) of layer ``layer`` at slots ``pos_BT`` (B, T)."""
        if int(pos_BT.max()) >= self.max_len:
            raise ValueError(f"cache overflow: position {int(pos_BT.max())} >= max_len {self.max_len}")
        rows = torch.arange(pos_BT.shape[0], device=pos_BT.device).unsqueeze(1)
        for name, v in self.encode(values).items():
            self.storage(name, layer)[rows, pos_BT] = v

    def encode(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``values`` (name -> (B, T, ...)) as stored: name -> (B, T, ...) in the cache's dtype (an FP8 cache
        packs a token's latent and rope key into one row), each written to ``storage(name, layer)``."""
        return {k: as_dtype(v, self.dtype) for k, v in values.items()}

    def storage(self, name: str, layer: int) -> torch.Tensor:
        """(B, S, ...): where ``encode``'s ``name`` entry of layer (or indexer row) ``layer`` is stored."""
        return self.tensors[name][layer]

    def flat_storage(self, name: str, layer: int) -> torch.Tensor:
        """``storage(name, layer)`` as (B * S, ...), indexed by flat slot (a paged pool's block * block_size +
        slot). Made once per entry and kept: every decode step writes every layer, and each view is an op."""
        flat = self._flat.get((name, layer))
        if flat is None:
            flat = self._flat[name, layer] = self.storage(name, layer).flatten(0, 1)
        return flat

    def read(self, layer: int, name: str, n_slots: int, dtype: torch.dtype, heads_first: bool = False) -> torch.Tensor:
        """Slots [0, n_slots) of every row in the compute dtype: (B, n_slots, ...), or for a
        per-head cache with ``heads_first`` (B, H, n_slots, d). One contiguous copy, but for a read of the cache's
        dtype without ``heads_first``: the strided view itself."""
        t = self.tensors[name][layer, :, :n_slots]
        if heads_first:
            t = t.transpose(1, 2)
        elif t.dtype == dtype:
            return t  # a strided view is fine for batched matmul
        return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)

    def read_slots(self, layer: int, name: str, slots_BS: torch.Tensor, dtype: torch.dtype,
                   heads_first: bool = False) -> torch.Tensor:
        """``read`` of row b's slots ``slots_BS[b]`` (int64; a sliding layer's span, ``Rows.window_read``), not
        [0, n_slots): (B, S, ...) or (B, H, S, d). A slot past the cache reads its last (the caller masks it)."""
        if not (self._span and self._span[0] is slots_BS):
            self._span = (slots_BS, self.flat_slots(slots_BS))
        t = self.flat_storage(name, layer)[self._span[1]]
        return (t.transpose(1, 2) if heads_first else t).to(dtype)

    def flat_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Row b's slots ``slots[b, ...]`` (int64) as ``flat_storage`` indices (b * max_len + slot); a slot past the
        cache names its last."""
        rows = torch.arange(slots.shape[0], device=slots.device) * self.max_len
        return slots.clamp(max=self.max_len - 1) + rows.view(-1, *[1] * (slots.dim() - 1))


def _index_keys(n_layers: int, batch: int, max_len: int, index_dim: int, dtype: torch.dtype,
                device) -> dict[str, torch.Tensor]:
    """``{"index_key": (L_i, B, S, index_dim)}`` (``n_layers``: L_i, the layers with an indexer) for a model
    with the DSA indexer (``index_dim`` > 0), else {}."""
    if not index_dim:
        return {}
    return {"index_key": torch.zeros(n_layers, batch, max_len, index_dim, dtype=dtype, device=device)}


def _or(n: int | None, default: int) -> int:
    return default if n is None else n


class LatentCache(_SlotCache):
    """MLA latent cache: ``latent`` (L, B, S, kv_lora_rank), ``rope_key`` (L, B, S, qk_rope_head_dim),
    and with ``index_dim`` (DSA) ``index_key`` (L_i, B, S, index_dim), L_i = ``index_layers`` (default L).

    The first two are views of one packed (L, B, S, kv_lora_rank + rope) tensor (V3: 512 + 64 = 576
    channels per token and layer), so attention reads a token's whole key with one copy and
    scores it with one matmul (``read_packed``); the index keys live apart, as the fused kernel
    (``kernels.mla_decode``) reads the packed tensor alone."""

    kind = "latent"

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device=None, index_dim: int = 0, index_layers: int | None = None):
        self.packed = torch.zeros(n_layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self._tables: torch.Tensor | None = None  # ``blocks``' identity tables, for the current batch size
        super().__init__({"latent": self.packed[..., :kv_lora_rank], "rope_key": self.packed[..., kv_lora_rank:],
                          **_index_keys(_or(index_layers, n_layers), batch, max_len, index_dim, dtype, device)})

    def _kept(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        C = self.tensors["latent"].shape[-1]
        self.packed = self.packed.index_select(1, rows)  # the two stay views of one packed tensor
        rest = {k: t.index_select(1, rows) for k, t in self.tensors.items() if k not in ("latent", "rope_key")}
        return {"latent": self.packed[..., :C], "rope_key": self.packed[..., C:], **rest}

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s slots as blocks and block tables (``flyer.serve.paged.PagedCache.blocks``):
        here each row's whole buffer is one block, (B, max_len, kv_lora_rank + rope), row b's table [b]."""
        B = self.packed.shape[1]
        if self._tables is None or self._tables.shape[0] != B:
            self._tables = torch.arange(B, device=self.packed.device).view(B, 1)
        return self.packed[layer], self._tables

    def storage(self, name: str, layer: int) -> torch.Tensor:
        """As ``_SlotCache.storage``; "packed" names ``packed``'s layer (B, S, kv_lora_rank + rope)."""
        return self.packed[layer] if name == "packed" else self.tensors[name][layer]

    def decode_packed(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., kv_lora_rank + rope) in ``dtype``: slots of ``packed`` (..., its last dim) as [latent | rope key]."""
        return raw if raw.dtype == dtype else raw.to(dtype)

    def read_packed(self, layer: int, n_slots: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, n_slots, kv_lora_rank + rope): [latent | rope key] of slots [0, n_slots)."""
        return self.decode_packed(self.packed[layer, :, :n_slots], dtype)

    def gather_packed(self, layer: int, slots_BTk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, k, kv_lora_rank + rope) in ``dtype``: [latent | rope key] of row b's slot ``slots[b, t, j]``
        (int64; DSA's selected slots per query, ``Rows.selected_slots``). One gather, k per query."""
        flat = self.flat_slots(slots_BTk).view(-1)
        t = self.flat_storage("packed", layer).index_select(0, flat).view(*slots_BTk.shape, -1)
        return self.decode_packed(t, dtype)


class Fp8LatentCache(LatentCache):
    """``LatentCache`` with FP8 rows: ``packed`` (L, B, S, token_bytes(C, R)) uint8 in DeepSeek's layout, seen as
    ``latent`` (L, B, S, C) float8_e4m3fn, ``latent_scale`` (L, B, S, ceil(C/128)) FP32 and ``rope_key``
    (L, B, S, R) BF16; with ``index_rotation`` (DSA: ``indexer_fp8.rotation``, (index_dim, index_dim)) apart
    ``index_key`` (L_i, B, S, index_dim) E4M3 and ``index_key_scale`` (L_i, B, S, 1) FP32, the rotated keys'
    codes and scales. Writes quantize (``pack_rows``; latent and rope key together; ``indexer_fp8.index_keys``),
    gathered reads dequantize to the compute dtype (``unpack_rows``); the fused CPU kernel (``kernels.mla_decode``)
    reads ``packed``'s rows in place, decoding them as it reads."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, device=None,
                 index_rotation: torch.Tensor | None = None, index_layers: int | None = None):
        if kv_lora_rank % 4:
            raise FieldError("cache_dtype", f"fp8 needs kv_lora_rank a multiple of 4 (got {kv_lora_rank})")
        self.kv_lora_rank = kv_lora_rank
        self.packed = torch.zeros(n_layers, batch, max_len, token_bytes(kv_lora_rank, rope_dim), dtype=torch.uint8,
                                  device=device)
        self._tables = None
        index = {}
        if index_rotation is not None:
            self.index_rotation = index_rotation
            L_i, d = _or(index_layers, n_layers), index_rotation.shape[0]
            index = {"index_key": torch.zeros(L_i, batch, max_len, d, dtype=FP8, device=device),
                     "index_key_scale": torch.zeros(L_i, batch, max_len, 1, device=device)}
        _SlotCache.__init__(self, {**self._views(self.packed), **index})

    def _views(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        C, n = self.kv_lora_rank, n_tiles(self.kv_lora_rank)
        return {"latent": packed[..., :C].view(FP8), "latent_scale": packed[..., C:C + 4 * n].view(torch.float32),
                "rope_key": packed[..., C + 4 * n:].view(torch.bfloat16)}

    def _kept(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        self.packed = self.packed.index_select(1, rows)
        rest = {k: t.index_select(1, rows) for k, t in self.tensors.items() if k.startswith("index_key")}
        return {**self._views(self.packed), **rest}

    def encode(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``values`` (latent and rope_key (B, T, ...) together; index_key) as what is stored: {"packed": FP8
        rows (B, T, token_bytes) uint8, "index_key": E4M3 codes, "index_key_scale": FP32}; ``storage`` names where
        each goes."""
        values = dict(values)
        out = {}
        if "latent" in values or "rope_key" in values:
            if not ("latent" in values and "rope_key" in values):
                raise ValueError("an FP8 latent cache writes a token's latent and rope key together")
            out["packed"] = pack_rows(values.pop("latent"), values.pop("rope_key"))
        if "index_key" in values:
            out["index_key"], out["index_key_scale"] = index_keys(values.pop("index_key"), self.index_rotation)
        return {**out, **{k: v.to(self.tensors[k].dtype) for k, v in values.items()}}

    def decode_packed(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack_rows(raw, self.kv_lora_rank, dtype)


class KVCache(_SlotCache):
    """Per-head cache: ``key`` (L, B, S, H_kv, d_k), ``value`` (L, B, S, H_kv, d_v), and with
    ``index_dim`` (naive MLA with DSA) ``index_key`` (L_i, B, S, index_dim), L_i = ``index_layers`` (default L)."""

    kind = "kv"

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, key_dim: int, value_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device=None, index_dim: int = 0, index_layers: int | None = None):
        super().__init__({
            "key": torch.zeros(n_layers, batch, max_len, n_kv_heads, key_dim, dtype=dtype, device=device),
            "value": torch.zeros(n_layers, batch, max_len, n_kv_heads, value_dim, dtype=dtype, device=device),
            **_index_keys(_or(index_layers, n_layers), batch, max_len, index_dim, dtype, device),
        })


ATTENTION_MODES = ("absorbed", "naive")


def make_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, mode: str = "absorbed",
               dtype: torch.dtype = torch.bfloat16, device=None) -> _SlotCache:
    """The cache a model with ``cfg`` needs for ``mode`` ("absorbed" or "naive"; GQA ignores it), of its
    first ``n_layers`` layers; with the DSA indexer (``index_topk`` > 0) it holds the indexer keys too, of
    the layers that have their own indexer (``MLA.index_row``). ``dtype`` float8_e4m3fn: MLA's absorbed
    latent cache in DeepSeek's FP8 rows, the index keys DeepSeek's FP8 ones (``Fp8LatentCache``; anything else a
    ``FieldError`` naming cache_dtype)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES} (got {mode!r})")
    if dtype == FP8:
        check_fp8_cache(cfg, mode)
    if cfg.attn == "gqa":
        return KVCache(n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, dtype, device)
    index_dim = cfg.index_head_dim if cfg.index_topk else 0
    # the layers with an indexer of their own keep index keys (GLM-5's shared ones none; MTP blocks have one)
    indexed = sum(map(cfg.has_indexer, range(n_layers)))
    if mode == "absorbed" and dtype == FP8:
        return Fp8LatentCache(n_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device,
                              rotation(cfg, device) if index_dim else None, indexed)
    if mode == "absorbed":
        return LatentCache(n_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device, index_dim,
                           indexed)
    return KVCache(n_layers, batch, max_len, cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim, dtype, device, index_dim,
                   indexed)
