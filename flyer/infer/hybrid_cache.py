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

Queries see the window's keys (positions in (p - W, p]) and the complete entries (index < (p + 1) // r;
CSA: the indexer's ``index_topk`` of them, ``select_topk``), with sinks and the output un-rotation of
``HybridAttention.attend`` / ``output``. ``HybridAttention.forward`` on the whole sequence is the oracle.

Shapes: B rows, T new tokens, W window, d head_dim, r ratio, M entries completed in one call, N entries seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from flyer.config import ModelConfig
from flyer.model.hybrid import hybrid_rope_config, select_topk
from flyer.model.rope import rope_cos_sin

Tables = dict[bool, tuple[torch.Tensor, torch.Tensor]]  # compressed layer? -> cos, sin (max_len, 1, R)


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
    ``tables``: the whole tables, which entry i reads at position i r."""

    start: torch.Tensor
    lengths: torch.Tensor
    real: torch.Tensor
    cos: dict[bool, torch.Tensor]
    sin: dict[bool, torch.Tensor]
    tables: Tables


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
    """Per hybrid layer, the named tensors of the module docstring, batch rows first; ``lengths`` (B,): each
    row's tokens so far, as the slot caches' (``flyer.infer.cache``)."""

    kind = "hybrid"

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16, device=None):
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.ratios = cfg.compress_ratios[:cfg.n_layers]
        d, W = cfg.head_dim, cfg.window_size
        zeros = _zeros_of(batch, device)
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.n_layers):
            r = cfg.compress_ratios[i]
            state = {"window": zeros(W, d, dtype=dtype)}
            if r > 0:
                csa = cfg.is_csa(i)
                c, S = (2, 2 * r) if csa else (1, r)
                state.update(kv_state=zeros(S, c * d), gate_state=zeros(S, c * d),
                             entries=zeros(max_len // r, d, dtype=dtype))
                if csa:
                    di = cfg.index_head_dim
                    state.update(index_kv_state=zeros(S, 2 * di), index_gate_state=zeros(S, 2 * di),
                                 index_keys=zeros(max_len // r, di, dtype=dtype))
            self.layers.append(state)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (int64, in that order), drop the rest (finished rows leave the batch)."""
        self.layers = [{k: t.index_select(0, rows) for k, t in state.items()} for state in self.layers]
        self.batch = int(rows.numel())
        self.lengths = self.lengths.index_select(0, rows)

    def bytes_per_token(self) -> int | float:
        """Bytes the cache grows by per token over all layers, from the allocated tensors: one ``entries`` row
        (and CSA's ``index_keys`` row) per r tokens. For long contexts this is the whole cache's rate, and it
        equals ``flyer.model.counts.kv_cache_bytes_per_token(cfg, element_size)`` (a fraction where r does not
        divide the bytes); the rest is a constant per row, ``window_bytes``."""
        total = Fraction(0)
        for state, r in zip(self.layers, self.ratios):
            for name in ("entries", "index_keys"):
                if name in state:
                    total += Fraction(state[name].shape[-1] * state[name].element_size(), r)
        return int(total) if total.denominator == 1 else float(total)

    def window_bytes(self) -> int:
        """Bytes per row whatever its length: the windows' keys (``flyer.model.counts.kv_window_bytes`` counts
        these) plus the compressors' states of not-yet-complete windows (which it leaves out)."""
        return sum(t[0].numel() * t.element_size() for state in self.layers for k, t in state.items()
                   if k not in ("entries", "index_keys"))


def _zeros_of(batch: int, device):
    """zeros(batch, *shape) on ``device``, FP32 unless told (the compressors' states: their softmax is FP32)."""
    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch, *shape, dtype=dtype, device=device)
    return zeros


def _write_ring(ring_BSC: torch.Tensor, new_BTC: torch.Tensor, rows: HybridRows) -> None:
    """Each row's real new tokens into ``ring`` at slot position % S: only the last S of them (earlier ones
    would be overwritten in the same call, an order index_put does not promise), never the padding."""
    S, T = ring_BSC.shape[1], new_BTC.shape[1]
    t = torch.arange(T, device=new_BTC.device)
    b, t = (rows.real & (t >= (rows.lengths - S).view(-1, 1))).nonzero(as_tuple=True)
    ring_BSC[b, (rows.start[b] + t) % S] = new_BTC[b, t].to(ring_BSC.dtype)


def _complete_entries(comp: nn.Module, x_BTD: torch.Tensor, rows: HybridRows, kv_state: torch.Tensor,
                      gate_state: torch.Tensor, store_BND: torch.Tensor) -> None:
    """The entries of ``comp`` (a ``Compressor``) that the rows' real new tokens complete, written to
    ``store``; then the new tokens' projections into the states (B, S, c d), token p in slot p % S."""
    B, T, _ = x_BTD.shape
    r, d, S = comp.ratio, comp.head_dim, kv_state.shape[1]
    pos = rows.start.view(-1, 1) + torch.arange(T, device=x_BTD.device)
    kv = comp.wkv(x_BTD)
    gate = comp.wgate(x_BTD) + comp.ape[pos % r]  # the slot's bias, as Compressor adds it per window slot
    first, done = rows.start // r, (rows.start + rows.lengths) // r  # entries [first, done) complete now
    M = int((done - first).max())
    if M > 0:
        # each row's positions start - S .. start + T - 1 in order: the states (slot p % S) then the new tokens
        u = (rows.start.view(-1, 1) + torch.arange(S, device=x_BTD.device)) % S
        buf_kv = torch.cat([kv_state.gather(1, u.unsqueeze(-1).expand_as(kv_state)).to(kv.dtype), kv], dim=1)
        buf_gate = torch.cat([gate_state.gather(1, u.unsqueeze(-1).expand_as(gate_state)).to(gate.dtype), gate], 1)
        i = first.view(-1, 1) + torch.arange(M, device=x_BTD.device)  # (B, M) entry indices
        p = (i * r - (S - r)).unsqueeze(-1) + torch.arange(S, device=x_BTD.device)  # (B, M, S) their tokens
        at = (p - (rows.start - S).view(-1, 1, 1)).clamp(max=S + T - 1).view(B, M * S, 1)  # rows past done: any
        kv_w = buf_kv.gather(1, at.expand(-1, -1, kv.shape[-1])).view(B, M, S, -1)
        gate_w = buf_gate.gather(1, at.expand(-1, -1, gate.shape[-1])).view(B, M, S, -1)
        if comp.overlap:  # slots [a of window i - 1 | b of window i]; window 0's a slots weigh 0, as Compressor's
            kv_w = torch.cat([kv_w[:, :, :r, :d], kv_w[:, :, r:, d:]], dim=2)
            gate_w = torch.cat([gate_w[:, :, :r, :d], gate_w[:, :, r:, d:]], dim=2)
            before = (p < 0).unsqueeze(-1)
            kv_w, gate_w = kv_w.masked_fill(before, 0.0), gate_w.masked_fill(before, float("-inf"))
        cos, sin = rows.tables[True]
        at_entry = (i * r).clamp(max=cos.shape[0] - 1)
        entries = comp.pool(kv_w, gate_w, cos[at_entry], sin[at_entry])  # (B, M, d)
        b, m = (torch.arange(M, device=x_BTD.device) < (done - first).view(-1, 1)).nonzero(as_tuple=True)
        store_BND[b, i[b, m]] = entries[b, m].to(store_BND.dtype)
    _write_ring(kv_state, kv, rows)
    _write_ring(gate_state, gate, rows)


def hybrid_attention(attn: nn.Module, x_BTD: torch.Tensor, rows: HybridRows, cache: HybridCache,
                     layer: int) -> torch.Tensor:
    """``HybridAttention`` (B, T, D) of the new tokens x (normed block inputs) against layer ``layer``'s state,
    which their real tokens then join (see the module docstring)."""
    B, T, _ = x_BTD.shape
    W, r = attn.window, attn.ratio
    state = cache.layers[layer]
    cos, sin = rows.cos[r > 0], rows.sin[r > 0]
    q_latent, q = attn.queries(x_BTD, cos, sin)
    kv = attn.shared_kv(x_BTD, cos, sin)  # (B, T, 1, d)

    # the window: the ring's W slots (slot j: the latest position < start in slot j, if any) then the new tokens
    dev = x_BTD.device
    t = torch.arange(T, device=dev)
    p = rows.start.view(-1, 1) + t  # (B, T) query positions
    s = rows.start.view(-1, 1)
    held = s - 1 - (s - 1 - torch.arange(W, device=dev)) % W  # (B, W) ring slots' positions (< 0: none)
    visible = torch.cat([(held >= 0).unsqueeze(1) & (held.unsqueeze(1) > (p - W).unsqueeze(-1)),
                         ((t.view(1, T) <= t.view(T, 1)) & (t.view(1, T) > t.view(T, 1) - W)).expand(B, T, T)], -1)
    keys = torch.cat([state["window"].to(kv.dtype).unsqueeze(2), kv], dim=1)  # (B, W + T, 1, d)

    if r > 0:
        _complete_entries(attn.compressor, x_BTD, rows, state["kv_state"], state["gate_state"], state["entries"])
        idx = attn.indexer
        if idx is not None:
            _complete_entries(idx.compressor, x_BTD, rows, state["index_kv_state"], state["index_gate_state"],
                              state["index_keys"])
        N = int(((rows.start + rows.lengths) // r).max())
        if N > 0:
            seen = torch.arange(N, device=dev).view(1, 1, N) < ((p + 1) // r).unsqueeze(-1)  # (B, T, N) complete
            if idx is not None and N > idx.topk:  # else every complete entry is kept
                seen = select_topk(idx.scores(x_BTD, q_latent, cos, sin, state["index_keys"][:, :N]), seen, idx.topk)
            keys = torch.cat([keys, state["entries"][:, :N].to(kv.dtype).unsqueeze(2)], dim=1)
            visible = torch.cat([visible, seen], dim=-1)
    out = attn.output(attn.attend(q, keys, visible), cos, sin)
    _write_ring(state["window"], kv[:, :, 0], rows)
    return out
