"""Generation: prefill (with the on-disk prefix cache), then plain or MTP-speculative decoding.

With the prefix cache a prompt's prefill starts after its cached blocks: MLA-family caches recompute
the last loaded position (its hidden state feeds the logits and the MTP module); DeepSeek-V4's resumes
at the deepest block boundary with a snapshot and cuts its forward at the boundaries where it leaves
one (``flyer.infer.prefix_cache_hybrid``), so a run resuming there repeats its chunks bit for bit.

Prompts of different lengths batch together: each row keeps its own position, the prefill chunk
is right-padded, and padded slots are never attended (``flyer.infer.attention``). Decoding stops
per row at ``eos_id`` (or any of ``stop_ids``) or after ``max_new_tokens``; finished rows stop advancing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

import torch

from flyer.errors import FieldError
from flyer.infer.cache import ATTENTION_MODES
from flyer.infer.cache_fp8 import FP8, ROWS_LAYOUT, check_fp8_cache_flags
from flyer.infer.decoder import Decoder, PrefillState, finished, gather_rows, shrink_batch
from flyer.infer.hybrid_cache import mtp_hidden_spec
from flyer.infer.hybrid_fp8 import ROWS_LAYOUT as HYBRID_ROWS_LAYOUT
from flyer.infer.prefix_cache import PrefixCache, model_fingerprint
from flyer.infer.prefix_cache_hybrid import check_block_ratios, hybrid_layout, resume, store_blocks, store_snapshot
from flyer.infer.sampling import LogitAdjustments, SamplingParams, sample_rows
from flyer.infer.speculative import check_speculation, mtp_decode
from flyer.model.transformer import Transformer


@dataclass
class GenerationConfig(LogitAdjustments):
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()  # more ids that end a row as eos_id does (a checkpoint's list of EOS ids)
    seed: int | None = None  # in [0, 2**64): what torch's generators take, as flyer generate --seed
    attention: str = "absorbed"  # or "naive" (per-head K/V cache; MLA only)
    cache_dtype: torch.dtype = torch.bfloat16
    speculative: str | None = None  # None or "mtp"
    draft_tokens: int = 1  # MTP drafts per step (module 1, reapplied for more than one), <= max_new_tokens
    prefix_cache: PrefixCache | None = None  # from ``open_prefix_cache``
    # prompt positions per prefill forward (``flyer serve``'s default): attention's per-layer work is chunk x context,
    # not the prompt's square (DSA's indexer, DeepSeek-V4's windows, MLA's absorbed and naive forms score it)
    prefill_chunk: int = 256
    # OpenAI's logit adjustments before sampling (``LogitAdjustments``), as flyer serve applies them
    logit_bias: tuple[tuple[int, float], ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def validate(self) -> None:
        """``FieldError`` naming the first bad field."""
        if self.max_new_tokens < 1:
            raise FieldError("max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")
        check_speculation(self.speculative, self.draft_tokens)
        # a step never keeps more drafts than tokens are left to make (``mtp_decode`` clamps to that)
        if self.draft_tokens > self.max_new_tokens:
            raise FieldError("draft_tokens", f"must be <= {{max_new_tokens}} = {self.max_new_tokens} "
                                             f"(got {self.draft_tokens})", ("max_new_tokens",))
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise FieldError("seed", f"must be in [0, 2**64) (got {self.seed})")
        if self.eos_id is not None and (isinstance(self.eos_id, bool) or not isinstance(self.eos_id, int)):
            raise FieldError("eos_id", f"must be one token id (an int) or None; more ids that end a row go in "
                                       f"{{stop_ids}} (got {self.eos_id!r})", ("stop_ids",))
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.stop_ids):
            raise FieldError("stop_ids", f"must be token ids, ints (got {self.stop_ids!r})")
        if self.prefill_chunk < 1:
            raise FieldError("prefill_chunk", f"must be >= 1 (got {self.prefill_chunk})")
        if self.attention not in ATTENTION_MODES:
            raise FieldError("attention", f"must be one of {', '.join(ATTENTION_MODES)} (got {self.attention!r})")
        SamplingParams(self.temperature, self.top_p)
        self.check_adjustments()

    def stops(self) -> tuple[int, ...]:
        """The ids that end a row: ``eos_id`` (when set) and ``stop_ids``."""
        return ((self.eos_id,) if self.eos_id is not None else ()) + tuple(self.stop_ids)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (ends with the stop id when one was produced)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    cache_bytes_per_token: int  # main-model cache, from the allocated tensors
    drafted: int = 0
    accepted: int = 0
    prefix: dict | None = None  # prefix-cache statistics of this call
    mtp_cache_bytes_per_token: int = 0  # the MTP module's cache beside it (speculation), from its tensors
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # (B, V) after prefill

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of generation (prefill + decode)."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop (all but the first per row) per decode second."""
        return (self.new_tokens - len(self.tokens)) / max(self.decode_s, 1e-9)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def as_dict(self) -> dict:
        d = {"new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens,
             "tokens_per_s": round(self.tokens_per_s, 2), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
             "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
             "cache_bytes_per_token": self.cache_bytes_per_token}
        if self.mtp_cache_bytes_per_token:
            d["mtp_cache_bytes_per_token"] = self.mtp_cache_bytes_per_token
        if self.drafted:
            d.update(acceptance_rate=round(self.acceptance_rate, 4), drafted=self.drafted, accepted=self.accepted)
        if self.prefix is not None:
            d["prefix_cache"] = self.prefix
        return d


def open_prefix_cache(model: Transformer, root: str | Path, *, attention: str = "absorbed",
                      cache_dtype: torch.dtype = torch.bfloat16, block_size: int = 64,
                      max_bytes: int = 1 << 30) -> PrefixCache:
    """A prefix cache whose entries are keyed to this model, cache layout, dtype and block size, not
    to the MTP setting: the main model's rows are the same with or without MTP speculation, and an
    entry's MTP rows serve the readers that need them (``PrefixCache.load``).
    DeepSeek-V4: ``FieldError`` naming ``prefix_block`` unless every compression ratio divides it."""
    if model.cfg.attn == "hybrid":
        check_block_ratios(model.cfg, block_size, "prefix_block")
        layout = hybrid_layout(model.cfg)
    else:
        layout = {"layout": "gqa" if model.cfg.attn == "gqa" else attention}
    if cache_dtype == FP8:  # entries hold the FP8 rows as written: keyed by their layout and scale rule too
        layout["rows"] = HYBRID_ROWS_LAYOUT if model.cfg.attn == "hybrid" else ROWS_LAYOUT
    fp = model_fingerprint(model, **layout, dtype=str(cache_dtype), block_size=block_size)
    return PrefixCache(root, fp, block_size=block_size, max_bytes=max_bytes)


def _pad(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    T = max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        if r:
            out[b, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def mtp_span(i: int, n: int) -> tuple[int, int]:
    """MTP cache positions stored with block i: entry j needs token t_{j+1}, so block i (tokens
    [i*n, (i+1)*n)) carries entries [max(i*n - 1, 0), (i+1)*n - 1)."""
    return max(i * n - 1, 0), (i + 1) * n - 1


def _load_prefix(dec: Decoder, pc: PrefixCache, b: int, prompt: Sequence[int], need_mtp: bool) -> int:
    """Copy row b's leading cached blocks into the decoder's caches (``need_mtp``: the MTP cache's
    rows too, which entries without them miss); returns tokens loaded."""
    n, hit = pc.block_size, 0
    for i, key in enumerate(pc.block_keys(prompt)):
        expect = {k: ((t.shape[0], n, *t.shape[3:]), t.dtype) for k, t in dec.cache.tensors.items()}
        lo, hi = mtp_span(i, n)
        if need_mtp:
            expect.update({f"mtp.{k}": ((1, hi - lo, *t.shape[3:]), t.dtype) for k, t in dec.mtp_cache.tensors.items()})
        blk = pc.load(key, prompt[i * n:(i + 1) * n], expect)
        if blk is None:
            break
        for k, t in dec.cache.tensors.items():
            t[:, b, i * n:(i + 1) * n] = blk[k]
        if need_mtp:
            for k, t in dec.mtp_cache.tensors.items():
                t[:, b, lo:hi] = blk[f"mtp.{k}"]
        hit = (i + 1) * n
    return hit


def _store_prefix(dec: Decoder, pc: PrefixCache, b: int, prompt: Sequence[int], first_block: int) -> None:
    n = pc.block_size
    keys = pc.block_keys(prompt)
    for i, key in enumerate(keys):
        if i < first_block:
            continue
        blk = {k: t[:, b, i * n:(i + 1) * n] for k, t in dec.cache.tensors.items()}
        if dec.mtp_cache is not None:
            lo, hi = mtp_span(i, n)
            blk.update({f"mtp.{k}": t[:, b, lo:hi] for k, t in dec.mtp_cache.tensors.items()})
        pc.store(key, prompt[i * n:(i + 1) * n], blk)
    pc.touch(keys)  # the loaded blocks too, the head most recent


def _chunked(forward, T: int, start_B: torch.Tensor, lengths: list[int], chunk: int) -> torch.Tensor:
    """``forward(off, width, start, lengths)``'s outputs over T positions from ``start_B`` fed ``chunk`` at a time,
    joined on dim 1: positions [off, off + width) of each row, its real tokens there (none once its own end)."""
    if T <= chunk:
        return forward(0, T, start_B, lengths)
    return torch.cat([forward(off, min(chunk, T - off), start_B + off, [min(max(n - off, 0), chunk) for n in lengths])
                      for off in range(0, T, chunk)], dim=1)


@torch.inference_mode()
def prefill(dec: Decoder, prompts: Sequence[Sequence[int]], prefix_cache: PrefixCache | None = None,
            need_mtp: bool | None = None, chunk: int = GenerationConfig.prefill_chunk) -> PrefillState:
    """Fill the caches with every prompt (loading what the prefix cache has) and return the
    logits at each prompt's last token. With an MTP cache, its entries for positions
    [0, len - 1) are filled too (entry j needs token t_{j+1}).

    ``need_mtp``: whether the MTP cache must be whole (speculation drafts from it; None: when there
    is one), so the prefix cache's entries without MTP rows miss. False: an MTP cache is filled only
    to store its rows: loaded where an entry has them (DeepSeek-V4's snapshots) or left out (MLA,
    GQA: an MTP cache entry is its own position's projection, so the rows the prefill computes past
    the loaded blocks are stored whole either way). The prompts run ``chunk`` positions a forward (not DeepSeek-V4's
    with a prefix cache, which cuts its forwards at its snapshot boundaries)."""
    need_mtp = dec.mtp_cache is not None and need_mtp is not False
    if prefix_cache is not None and dec.cfg.attn == "hybrid":
        return _prefill_hybrid(dec, prompts, prefix_cache, need_mtp)
    device = dec.model.embed.weight.device
    hits = [_load_prefix(dec, prefix_cache, b, p, need_mtp) if prefix_cache else 0 for b, p in enumerate(prompts)]
    # recompute the last loaded position: its hidden state feeds the MTP module and the logits
    start = torch.tensor([max(h - 1, 0) for h in hits], dtype=torch.long, device=device)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    rows = [p[int(s):] for p, s in zip(prompts, start)]
    tok_BT = _pad(rows, device)
    h = _chunked(lambda off, w, at, n: dec.forward(tok_BT[:, off:off + w], at, n), tok_BT.shape[1], start,
                 [len(r) for r in rows], chunk)
    if dec.mtp_cache is not None:
        nxt = [p[int(s) + 1:] for p, s in zip(prompts, start)]  # t_{j+1} for j in [start, len-1)
        if max(len(r) for r in nxt) > 0:
            nxt_BT = _pad(nxt, device)
            _chunked(lambda off, w, at, n: dec.mtp_forward(h[:, off:off + w], nxt_BT[:, off:off + w], at, lengths=n),
                     nxt_BT.shape[1], start, [len(r) for r in nxt], chunk)
        dec.mtp_cache.lengths.copy_(lens - 1)
    dec.cache.lengths.copy_(lens)
    logits = dec.logits(gather_rows(h, lens - 1 - start))
    if prefix_cache is not None:
        for b, p in enumerate(prompts):
            _store_prefix(dec, prefix_cache, b, p, hits[b] // prefix_cache.block_size)
        prefix_cache.evict()
    return PrefillState(h, start, logits, hits)


@torch.inference_mode()
def _prefill_hybrid(dec: Decoder, prompts: Sequence[Sequence[int]], pc: PrefixCache, need_mtp: bool) -> PrefillState:
    """``prefill`` of a DeepSeek-V4 model with the prefix cache (``flyer.infer.prefix_cache_hybrid``): row b
    resumes at its deepest snapshot and feeds its prompt in passes cut at its ``Resume.cuts``, storing each
    snapshot as its cut is reached; a row with fewer cuts feeds nothing in the first passes, so every row's last
    token is in the last pass. A row resumed from a snapshot without the MTP part (``need_mtp`` False) stores its
    snapshots without it too: its MTP cache lacks the positions before."""
    device = dec.model.embed.weight.device
    mtp = dec.mtp_cache is not None
    keys = [pc.block_keys(p) for p in prompts]
    hidden = mtp_hidden_spec(dec.cfg, dec.model.embed.weight.dtype)
    found = [resume(pc, k, p, dec.cache, b, dec.mtp_cache, hidden if mtp else None, need_mtp)
             for b, (k, p) in enumerate(zip(keys, prompts))]
    bounds = [[r.tokens, *r.cuts, len(p)] for r, p in zip(found, prompts)]
    S = max(len(x) for x in bounds)
    bounds = [[x[0]] * (S - len(x)) + x for x in bounds]  # a row's empty passes first
    carry = [r.hidden for r in found]  # each row's main hidden state before its pass, for the MTP cache
    for k in range(S - 1):
        a, e = [x[k] for x in bounds], [x[k + 1] for x in bounds]
        start = torch.tensor(a, dtype=torch.long, device=device)
        h = dec.forward(_pad([p[s:t] for p, s, t in zip(prompts, a, e)], device), start,
                        [t - s for s, t in zip(a, e)])
        if mtp:
            _mtp_pass(dec, h, prompts, a, e, carry)
        for b, r in enumerate(found):
            if e[b] in r.cuts:
                store_snapshot(pc, keys[b], prompts[b], e[b], dec.cache, b, dec.mtp_cache if r.mtp else None, carry[b])
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    if mtp:
        dec.mtp_cache.lengths.copy_(lens - 1)
    dec.cache.lengths.copy_(lens)
    logits = dec.logits(gather_rows(h, lens - 1 - start))
    for b, (k, p, r) in enumerate(zip(keys, prompts, found)):
        store_blocks(pc, k, p, dec.cache, b, r.found)
        pc.touch(k)  # the head most recent (``PrefixCache.touch``)
    pc.evict()
    return PrefillState(h, start, logits, [r.tokens for r in found])


def _mtp_pass(dec: Decoder, h: torch.Tensor, prompts: Sequence[Sequence[int]], a: list[int], e: list[int],
              carry: list[torch.Tensor | None]) -> None:
    """The MTP cache over one prefill pass of a V4 model: positions [a - 1, e - 1) of each row (from a = 0: [0,
    e - 1)) from the pass's hidden states h (B, T, ...) at a .. e - 1 and ``carry`` (each row's at a - 1), which
    it then advances to e - 1. So the MTP cache stops one position behind the main one at a pass's end, where
    a snapshot keeps the state of both and the hidden state at the boundary's last position."""
    B, T = h.shape[:2]
    c = [int(x is not None) for x in carry]
    lo = [s - ci for s, ci in zip(a, c)]  # each row's first MTP position
    m = [max(t - 1 - j, 0) for t, j in zip(e, lo)]
    if max(m) > 0:
        before = torch.stack([h.new_zeros(h.shape[2:]) if x is None else x for x in carry]).unsqueeze(1)
        shift = torch.tensor([1 - ci for ci in c], device=h.device).view(-1, 1)  # no carry: start at h[:, 0]
        idx = shift + torch.arange(T, device=h.device)
        h_in = torch.cat([before, h], dim=1)[torch.arange(B, device=h.device).view(-1, 1), idx]
        nxt = _pad([p[j + 1:j + 1 + mi] for p, j, mi in zip(prompts, lo, m)], h.device)
        dec.mtp_forward(h_in[:, :nxt.shape[1]], nxt, torch.tensor(lo, device=h.device), lengths=m)
    for b in range(B):
        if e[b] > a[b]:
            carry[b] = h[b, e[b] - a[b] - 1].clone()


def prompt_lists(prompts) -> list[list[int]]:
    """``prompts`` as lists of ints: a list of token-id lists (or 1-D tensors), or a (B, T) integer tensor;
    ``TypeError`` naming anything else (a flat list of ids, text, floats)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise TypeError(f"prompts: a (B, T) integer tensor or a list of token-id lists (got a {prompts.dim()}-D "
                            f"{prompts.dtype} tensor)")
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: a list of token-id lists (got {type(prompts).__name__}; encode text first)")
    out = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) and p.dim() == 1 else p
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"prompts[{i}]: a list of token ids (got {type(p).__name__}; one prompt goes in a list "
                            "of its own, [ids])")
        row = []
        for t in ids:
            if isinstance(t, (bool, float)) or not hasattr(t, "__index__"):
                raise TypeError(f"prompts[{i}]: token ids are ints (got {t!r})")
            row.append(t.__index__())
        out.append(row)
    return out


def _check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    V = model.cfg.vocab_size
    for p in prompts:
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V}) (vocab_size)")
    gen.check_adjustments(V)
    for name, ids in (("eos_id", () if gen.eos_id is None else (gen.eos_id,)), ("stop_ids", gen.stop_ids)):
        if (bad := next((i for i in ids if not 0 <= i < V), None)) is not None:  # it could never end a row
            raise FieldError(name, f"token ids must be in [0, {V}) (vocab_size; got {bad})")
    if cache_length(prompts, gen) > model.cfg.max_seq_len:
        longest = max(len(p) for p in prompts)
        raise FieldError("max_new_tokens", f"{gen.max_new_tokens} new tokens after a {longest}-token prompt exceed "
                                           f"the model's max_seq_len {model.cfg.max_seq_len}")


def check_hybrid_flags(cfg, prefix_cache: object, prefix_block: int | None) -> None:
    """For a DeepSeek-V4 model (attn "hybrid") with an on-disk ``prefix_cache``: ``FieldError`` naming
    ``prefix_block`` unless every compression ratio divides it (``check_block_ratios``: blocks of whole compressed
    entries and boundary snapshots, ``flyer.infer.prefix_cache_hybrid``; ``flyer serve`` checks its
    ``block_size``, which is its cache's block size, the same way)."""
    if cfg.attn != "hybrid" or prefix_cache is None:  # a PrefixCache may be empty (falsy), still checked
        return
    check_block_ratios(cfg, prefix_block, "prefix_block")


def cache_length(prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> int:
    """Positions the decoder's caches hold: the longest prompt and its new tokens. Speculative
    steps fit in it too: ``mtp_decode`` drafts no further than the last new token's position."""
    return max(len(p) for p in prompts) + gen.max_new_tokens


def generate(model: Transformer, prompts: Sequence[Sequence[int]],
             gen: GenerationConfig | None = None) -> GenerationResult:
    """Generate up to ``gen.max_new_tokens`` tokens after each prompt (lists of token ids). A row ends at one of
    ``gen.stops()`` (none by default: pass the tokenizer's, ``eos_id=tok.eos_id(), stop_ids=tok.eos_ids()``). The
    model runs in eval mode and is handed back in the mode it came in (sampling amid training leaves it training)."""
    gen = gen or GenerationConfig()
    if not isinstance(gen, GenerationConfig):
        raise TypeError(f"gen: a GenerationConfig (got {type(gen).__name__}: GenerationConfig(**fields) from a dict)")
    gen.validate()
    prompts = prompt_lists(prompts)
    _check_prompts(model, prompts, gen)
    check_hybrid_flags(model.cfg, gen.prefix_cache, None if gen.prefix_cache is None else gen.prefix_cache.block_size)
    check_fp8_cache_flags(model.cfg, gen.cache_dtype, gen.attention)
    training = model.training
    try:
        return _generate(model.eval(), prompts, gen)
    finally:
        model.train(training)


def _generate(model: Transformer, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> GenerationResult:
    params = SamplingParams(gen.temperature, gen.top_p)
    spec = gen.speculative == "mtp"
    K = gen.draft_tokens if spec else 0
    # a model with MTP stores its MTP rows in the prefix cache either way, so a speculating run finds them
    with_mtp = spec or (gen.prefix_cache is not None and len(model.mtp) > 0)
    dec = Decoder(model, len(prompts), cache_length(prompts, gen), gen.attention, gen.cache_dtype, with_mtp=with_mtp)
    generators = None  # prompt b draws from its own generator, seeded seed + b: the others do not move its draws
    if gen.seed is not None:
        generators = [torch.Generator(device=model.embed.weight.device).manual_seed((gen.seed + b) % (1 << 64))
                      for b in range(len(prompts))]
    stats_before = dict(gen.prefix_cache.stats.as_dict()) if gen.prefix_cache else None

    t0 = time.perf_counter()
    state = prefill(dec, prompts, gen.prefix_cache, need_mtp=spec, chunk=gen.prefill_chunk)
    adjust = gen.adjust if gen.adjusts else None
    logits = state.logits  # kept as they are for the result's first_logits
    if adjust is not None:
        logits = logits.clone()
        for row in logits:
            adjust(row, [])
    first = sample_rows(logits, params, generators, range(len(prompts)))
    t1 = time.perf_counter()
    if spec:
        out, drafted, accepted = mtp_decode(dec, prompts, first, state, params, gen.max_new_tokens, gen.stops(),
                                            K, generators, adjust)
    else:
        out = _plain_decode(dec, first, params, gen.max_new_tokens, gen.stops(), generators, adjust)
        drafted = accepted = 0
    t2 = time.perf_counter()
    prefix = None
    if gen.prefix_cache is not None:
        now = gen.prefix_cache.stats.as_dict()
        prefix = {k: (v - stats_before[k] if k != "hit_rate" else None) for k, v in now.items()}
        prefix["hit_rate"] = round(prefix["hits"] / prefix["lookups"], 4) if prefix["lookups"] else 0.0
    return GenerationResult(out, sum(len(p) for p in prompts), t1 - t0, t2 - t1, dec.bytes_per_token(),
                            drafted, accepted, prefix, dec.mtp_bytes_per_token(), state.logits)


@torch.inference_mode()
def _plain_decode(dec: Decoder, first: torch.Tensor, params: SamplingParams, max_new: int,
                  stop_ids: Collection[int], generators, adjust=None) -> list[list[int]]:
    """One token per live row per step; a row that finishes (at any of ``stop_ids``, or ``max_new``
    tokens) leaves the batch (``keep_rows``).
    ``adjust``: (logits (V,), tokens generated before them) -> adjusted in place, applied to each row's
    logits first (``GenerationConfig.adjust``), or None."""
    out = [[int(t)] for t in first]
    live = [b for b, o in enumerate(out) if not finished(o, max_new, stop_ids)[1]]  # batch rows still decoding
    n = dec.cache.lengths.clone()  # valid cache length = position of the pending token
    cur = first.clone()
    n, cur = shrink_batch(dec, live, range(len(out)), n, cur)
    while live:
        logits = dec.logits(dec.forward(cur.view(-1, 1), n))[:, 0]
        if adjust is not None:
            for i, b in enumerate(live):
                adjust(logits[i], out[b])
        nxt = sample_rows(logits, params, generators, live)
        n += 1
        still = []
        for b, t in zip(live, nxt.tolist()):
            out[b], done = finished(out[b] + [t], max_new, stop_ids)
            if not done:
                still.append(b)
        n, cur = shrink_batch(dec, still, live, n, nxt)
        live = still
    return out
