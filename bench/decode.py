"""Decode benchmark: the absorbed-MLA latent cache against its peers, MTP speculation, prefix cache.

1. Decode tokens/s and cache bytes per token at 512 and 2048 tokens of context for
   - absorbed MLA (latent + rope key cache),
   - naive MLA (the same model, full per-head K/V cache),
   - GQA: a model of similar size built from the same code (attn="gqa", 4 KV heads).
   The caches are filled with random entries up to the context length (decode cost does not
   depend on their values), then ``--steps`` decode steps are timed for a batch of ``--batch``,
   the paths interleaved for ``--rounds`` rounds, best of each kept. Also absorbed MLA with its
   cache gathered per layer instead of read in place by ``kernels.mla_decode``
   (``speedup_in_place_vs_gathered``).
2. MTP speculative decoding on a trained checkpoint: ``flyer train --preset tiny`` (``--mtp-preset
   tiny-v4``: DeepSeek-V4's MTP module, its hybrid cache rolled back by snapshot) for ``--train-steps``
   steps (or ``--ckpt`` of an existing run), greedy with and without ``--speculative mtp``: identical
   tokens, acceptance rate, tokens/s ratio. ``--mtp-only`` runs this part alone.
3. Prefix cache: prefill of a long prompt cold versus loaded from the on-disk cache. ``--prefix-only
   [--prefix-preset tiny-v4]`` runs this part alone on a random model of the preset (DeepSeek-V4: blocks of
   compressed entries and the slot snapshot at the last block boundary before the prompt's last token).
4. DeepSeek Sparse Attention (V3.2: the MLA model above with an indexer keeping ``--dsa-topk`` slots per
   query): decode tokens/s at ``--dsa-contexts`` with each query's selected latents gathered
   (``dsa_gathered``) against every slot read with the unselected masked (``dsa_masked``), the two
   interleaved as in 1 (``speedup_dsa_gathered_vs_masked``); and gathered with the indexer scoring a new FP32
   copy of the index keys in place of the BF16 keys where they lie (``speedup_dsa_index_in_place_vs_copy``).
   ``--dsa-only`` runs this part alone.
5. DSA prefill through the decode cache (``--dsa-prefill``, alone): prompts of ``--dsa-prompts`` tokens fed in
   chunks of ``--dsa-chunk`` (one row, BF16 cache), each chunk's queries attending to their selected latents
   gathered (``dsa_gathered``, in sub-chunks within ``GATHER_BUDGET``) against every cached slot read and the
   unselected masked (``dsa_masked``, the compute-bound form), interleaved, best of ``--rounds``
   (``speedup_dsa_prefill_gathered_vs_masked``); the last chunk's hidden states' relative difference.
6. FP8 latent cache (``--fp8-only``, alone): decode tokens/s of the MLA model above at V3's latent widths
   (512 + 64) with ``--cache-dtype fp8`` (DeepSeek's FP8 rows read in place by the kernel, decoded as read)
   against BF16 read in place, BF16 gathered and FP8 gathered (dequantized per layer, then the eager path),
   interleaved, best of ``--rounds`` (``speedup_fp8_vs_bf16``, ``speedup_fp8_vs_bf16_gathered``,
   ``speedup_fp8_in_place_vs_gathered``), and the bytes per token of each.
7. DSA's indexer scores alone (``--dsa-index``): one layer's ``dsa_index_scores`` for a decode step (one new token
   per row of ``--batch``) over ``--dsa-contexts`` slots at V3.2's indexer size (64 heads of 128), milliseconds a
   call: the FP8 keys (``--cache-dtype fp8``) read in place by the kernel against the BF16 keys read in place
   (``speedup_dsa_index_fp8_vs_bf16``) and the FP8 keys gathered into FP32 values, its eager oracle
   (``speedup_dsa_index_fp8_in_place_vs_gathered``), interleaved, best of ``--rounds``.
8. DeepSeek-V4's FP8 cache (``--v4-fp8``, alone): decode tokens/s of a ``tiny-v4`` model at dsv4-flash's
   attention widths (``V4_FP8_BENCH``: head_dim 512 with 64 rope, window 128, CSA / HCA ratios 4 / 128, indexer
   keys of 128) with ``--cache-dtype fp8`` (the window and entries as 584-byte FP8 rows, unpacked as read, the index
   keys as 68-byte rotated FP4 rows, scored in place by ``kernels.index_scores_fp4``) against BF16, at
   ``--v4-contexts`` (the caches filled with random rows),
   interleaved, best of ``--rounds`` (``speedup_fp8_vs_bf16``): at 2,048 tokens each CSA query scores every entry
   masked, at 8,192 it gathers its index_topk picks.

All times are compared with a peer measured in the same run. Prints one JSON object.
    python bench/decode.py [--threads 1] [--ckpt RUN_DIR] [--dsa-only]
    python bench/decode.py --mtp-only [--mtp-preset tiny-v4]
    python bench/decode.py --prefix-only [--prefix-preset tiny-v4]
    python bench/decode.py --dsa-prefill [--dsa-prompts 4096,8192] [--dsa-chunk 256] [--rounds 2]
    python bench/decode.py --fp8-only [--contexts 512,2048]
    python bench/decode.py --dsa-index [--dsa-contexts 2048,8192] [--batch 1]
    python bench/decode.py --v4-fp8 [--v4-contexts 2048,8192] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flyer import kernels
from flyer.config import preset
from flyer.infer import Decoder, GenerationConfig, attention, generate
from flyer.infer.attention import Rows, causal_slot_mask, dsa_index_scores
from flyer.infer.cache import make_cache
from flyer.infer.cache_fp8 import FP8
from flyer.infer.generate import open_prefix_cache
from flyer.infer.hybrid_cache import ENTRY_NAMES
from flyer.interop.load import load_pretrained
from flyer.model.attention import MLA
from flyer.model.counts import kv_cache_bytes_per_token, param_counts
from flyer.model.rope import rope_cos_sin
from flyer.model.transformer import Transformer
from flyer.runtime import tune_malloc

# "small" with V3-shaped attention: many heads over one small latent (V3: 128 heads, latent 512)
MLA_BENCH = dict(n_heads=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, kv_lora_rank=64,
                 max_seq_len=4096, original_seq_len=4096)
GQA_BENCH = dict(attn="gqa", n_heads=16, n_kv_heads=4, head_dim=32, max_seq_len=4096, original_seq_len=4096)
# MLA_BENCH with DSA's indexer (V3.2: 64 heads of 128 keeping 2048; here 8 of 64), contexts up to 16K
DSA_BENCH = dict(MLA_BENCH, index_n_heads=8, index_head_dim=64, max_seq_len=16384, original_seq_len=16384)
FP8_BENCH = dict(MLA_BENCH, kv_lora_rank=512, qk_rope_head_dim=64)  # V3's latent widths: 4 scale tiles a row
# tiny-v4 at dsv4-flash's attention widths (head_dim 512 / rope 64, window 128, index keys 128, ratios 4 and 128;
# 16 heads of its 64, index_topk 128 of its 512 so that 8,192 tokens' 2,048 CSA entries take the gathered path)
V4_FP8_BENCH = dict(head_dim=512, qk_rope_head_dim=64, window_size=128, index_head_dim=128, index_n_heads=16,
                    index_topk=128, n_heads=16, compress_ratios=(0, 4, 128, 4), max_seq_len=16384,
                    original_seq_len=16384)
DSA_INDEX_BENCH = dict(index_n_heads=64, index_head_dim=128, max_seq_len=16384, original_seq_len=16384)  # V3.2's


def best_of(runs: dict[str, DecodeRun], rounds: int) -> dict[str, float]:
    """Each run's best tokens/s over ``rounds`` rounds of all of them in turn (interleaved, best of rounds: robust
    to a shared, loaded machine), after one warm-up call each."""
    for run in runs.values():
        run.tokens_per_s()
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run.tokens_per_s())
    return best


class DecodeRun:
    """A decoder whose cache is filled with ``ctx`` random entries per row (decode cost does not
    depend on the values), timed over ``steps`` decode steps from position ``ctx``."""

    def __init__(self, model: Transformer, mode: str, ctx: int, batch: int, steps: int, gathered: bool = False,
                 switch: contextlib.AbstractContextManager | None = None, cache_dtype: torch.dtype = torch.bfloat16):
        self.dec = Decoder(model, batch, ctx + steps + 1, mode, cache_dtype)
        if cache_dtype == FP8:  # rows written as the model writes them: quantized, scales and all
            cfg, pos = model.cfg, torch.arange(ctx).expand(batch, ctx)
            for layer in range(cfg.n_layers):
                self.dec.cache.write(layer, pos, latent=torch.randn(batch, ctx, cfg.kv_lora_rank),
                                     rope_key=torch.randn(batch, ctx, cfg.qk_rope_head_dim))
        else:
            for t in self.dec.cache.tensors.values():
                t[:, :, :ctx].normal_()
        self.ctx, self.batch, self.steps, self.vocab = ctx, batch, steps, model.cfg.vocab_size
        self.switch = gathered_attention if gathered else switch or contextlib.nullcontext

    @torch.inference_mode()
    def tokens_per_s(self) -> float:
        n = torch.full((self.batch,), self.ctx)
        tok = torch.randint(0, self.vocab, (self.batch, 1))
        with self.switch():
            t0 = time.perf_counter()
            for _ in range(self.steps):
                tok = self.dec.logits(self.dec.forward(tok, n)).argmax(-1)
                n += 1
            return self.batch * self.steps / (time.perf_counter() - t0)


@contextlib.contextmanager
def gathered_attention():
    """Absorbed attention's eager read of the latent cache (every attended slot gathered into a new
    tensor per layer, then matmuls) in place of the kernel's one pass over the cache as it lies
    (``kernels.mla_decode``): the peer of ``absorbed`` in ``speedup_in_place_vs_gathered``."""
    usable = kernels.mla_decode_usable
    kernels.mla_decode_usable = lambda pool: False
    try:
        yield
    finally:
        kernels.mla_decode_usable = usable


@contextlib.contextmanager
def forced_selection(gathered: bool):
    """Every DSA call with a selection gathered (``dsa_gathered``) or, for False, over every attended slot with the
    unselected masked (``dsa_masked``), whatever ``dsa_gather_pays`` says: the two sides of
    ``speedup_dsa_gathered_vs_masked`` and ``speedup_dsa_prefill_gathered_vs_masked``."""
    pays = attention.dsa_gather_pays
    attention.dsa_gather_pays = lambda *args: gathered
    try:
        yield
    finally:
        attention.dsa_gather_pays = pays


masked_selection = functools.partial(forced_selection, False)
gathered_selection = functools.partial(forced_selection, True)


@contextlib.contextmanager
def copied_index_keys():
    """DSA's indexer scoring a new FP32 copy of every cached index key (``Indexer.scores``, the oracle) in place of
    the kernel's scoring of the BF16 keys where they lie (``kernels.index_scores``): the peer in
    ``speedup_dsa_index_in_place_vs_copy``."""
    usable = kernels.index_scores_usable
    kernels.index_scores_usable = lambda pool: False
    try:
        yield
    finally:
        kernels.index_scores_usable = usable


def bench_dsa(contexts: list[int], topk: int, batch: int, steps: int, rounds: int) -> dict:
    """Decode tokens/s of the DSA model, gathered against masked, per context (interleaved, best of rounds)."""
    torch.manual_seed(0)
    model = Transformer(preset("small", **DSA_BENCH, index_topk=topk)).eval()
    attn = model.layers[0].attn
    out: dict = {"dsa_model": {"params": param_counts(model.cfg).total, "index_topk": topk, **DSA_BENCH},
                 "dsa_batch": batch, "dsa_steps": steps, "dsa_rounds": rounds}
    for ctx in contexts:
        if not attention.dsa_gather_pays(attn, batch, 1, ctx):
            raise SystemExit(f"--dsa-contexts: {ctx} slots do not pay for gathering {topk} (dsa_gather_pays)")
        runs = {"gathered": DecodeRun(model, "absorbed", ctx, batch, steps),
                "masked": DecodeRun(model, "absorbed", ctx, batch, steps, switch=masked_selection)}
        if kernels.cpu_ops() is not None:
            runs["gathered_index_copy"] = DecodeRun(model, "absorbed", ctx, batch, steps, switch=copied_index_keys)
        best = best_of(runs, rounds)
        for name in runs:
            out[f"tokens_per_s_dsa_{name}_ctx{ctx}"] = round(best[name], 1)
        out[f"speedup_dsa_gathered_vs_masked_ctx{ctx}"] = round(best["gathered"] / best["masked"], 3)
        if "gathered_index_copy" in best:
            copy = best["gathered_index_copy"]
            out[f"speedup_dsa_index_in_place_vs_copy_ctx{ctx}"] = round(best["gathered"] / copy, 3)
        del runs
    return out


class PrefillRun:
    """One row's prompt of ``length`` random tokens prefilled through a decoder's BF16 cache in chunks of
    ``chunk``, under ``switch``."""

    def __init__(self, model: Transformer, length: int, chunk: int, switch):
        self.dec = Decoder(model, 1, length, "absorbed", torch.bfloat16)
        self.tokens = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        self.chunk, self.switch = chunk, switch

    @torch.inference_mode()
    def run(self) -> tuple[float, torch.Tensor]:
        """(tokens/s, the last chunk's hidden states)."""
        L = self.tokens.shape[1]
        with self.switch():
            t0 = time.perf_counter()
            for s in range(0, L, self.chunk):
                h = self.dec.forward(self.tokens[:, s:s + self.chunk], torch.tensor([s]))
            return L / (time.perf_counter() - t0), h


def bench_dsa_prefill(prompts: list[int], chunk: int, topk: int, rounds: int) -> dict:
    """Prefill tokens/s of the DSA model through the decode cache, gathered against masked, per prompt length
    (interleaved, best of rounds); how many of the chunks ``dsa_gather_pays`` would gather."""
    torch.manual_seed(0)
    model = Transformer(preset("small", **DSA_BENCH, index_topk=topk)).eval()
    attn = model.layers[0].attn
    out: dict = {"dsa_model": {"params": param_counts(model.cfg).total, "index_topk": topk, **DSA_BENCH},
                 "dsa_prefill_chunk": chunk, "dsa_rounds": rounds}
    for L in prompts:
        runs = {"gathered": PrefillRun(model, L, chunk, gathered_selection),
                "masked": PrefillRun(model, L, chunk, masked_selection)}
        best, last = dict.fromkeys(runs, 0.0), {}
        for _ in range(rounds):
            for name, run in runs.items():
                tps, last[name] = run.run()
                best[name] = max(best[name], tps)
        for name in runs:
            out[f"prefill_tokens_per_s_dsa_{name}_prompt{L}"] = round(best[name], 1)
        out[f"speedup_dsa_prefill_gathered_vs_masked_prompt{L}"] = round(best["gathered"] / best["masked"], 3)
        g, m = last["gathered"].float(), last["masked"].float()
        out[f"dsa_prefill_rel_diff_prompt{L}"] = float((g - m).norm() / m.norm())
        ends = range(min(chunk, L), L + chunk, chunk)  # slots each chunk's last query sees
        out[f"dsa_prefill_chunks_rule_gathers_prompt{L}"] = \
            f"{sum(e > topk and attention.dsa_gather_pays(attn, 1, chunk, e, 4) for e in ends)}/{len(ends)}"
        del runs
    return out


def bench_attention(contexts: list[int], batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    mla = Transformer(preset("small", **MLA_BENCH)).eval()
    gqa = Transformer(preset("small", **GQA_BENCH)).eval()
    out: dict = {"model": {"mla": {"params": param_counts(mla.cfg).total, **MLA_BENCH},
                           "gqa": {"params": param_counts(gqa.cfg).total, **GQA_BENCH},
                           "base_preset": "small", "batch": batch, "steps": steps, "rounds": rounds,
                           "cache_dtype": "bf16"}}
    peers = (("absorbed", mla, "absorbed"), ("naive", mla, "naive"), ("gqa", gqa, "absorbed"))
    for ctx in contexts:
        runs = {name: DecodeRun(model, mode, ctx, batch, steps) for name, model, mode in peers}
        if kernels.cpu_ops() is not None:
            runs["absorbed_gathered"] = DecodeRun(mla, "absorbed", ctx, batch, steps, gathered=True)
        for name, run in runs.items():
            bpt = run.dec.bytes_per_token()
            assert bpt == kv_cache_bytes_per_token(run.dec.cfg, absorbed=name != "naive")  # == flyer info
            if name != "absorbed_gathered":
                out[f"cache_bytes_per_token_{name}"] = bpt
                out[f"cache_mib_{name}_ctx{ctx}"] = round(bpt * ctx * batch / 2**20, 2)
        best = best_of(runs, rounds)
        for name in runs:
            out[f"tokens_per_s_{name}_ctx{ctx}"] = round(best[name], 1)
        for peer in ("naive", "gqa"):
            out[f"speedup_absorbed_vs_{peer}_ctx{ctx}"] = round(best["absorbed"] / best[peer], 3)
        if "absorbed_gathered" in best:
            out[f"speedup_in_place_vs_gathered_ctx{ctx}"] = round(best["absorbed"] / best["absorbed_gathered"], 3)
        del runs
    top = max(contexts)  # the headline keys: the longest context
    for name in ("absorbed", "naive", "gqa"):
        out[f"tokens_per_s_{name}"] = out[f"tokens_per_s_{name}_ctx{top}"]
    out["headline_context"] = top
    for peer in ("naive", "gqa"):
        out[f"cache_ratio_{peer}_vs_absorbed"] = round(out[f"cache_bytes_per_token_{peer}"]
                                                       / out["cache_bytes_per_token_absorbed"], 2)
    out["cache_bytes_per_token_dsv3"] = kv_cache_bytes_per_token(preset("dsv3"))
    return out


def bench_fp8_cache(contexts: list[int], batch: int, steps: int, rounds: int) -> dict:
    """Part 6: the FP8 latent cache read in place against BF16 read in place, BF16 gathered and FP8 gathered, at
    V3's latent widths."""
    torch.manual_seed(0)
    model = Transformer(preset("small", **FP8_BENCH)).eval()
    out: dict = {"model": {"params": param_counts(model.cfg).total, **FP8_BENCH, "base_preset": "small",
                           "batch": batch, "steps": steps, "rounds": rounds}}
    for name in ("dsv3", "small"):
        cfg = preset(name)
        for dt, key in ((torch.bfloat16, "bf16"), (FP8, "fp8")):
            out[f"cache_bytes_per_token_{name}_{key}"] = make_cache(cfg, cfg.n_layers, 1, 1, "absorbed", dt,
                                                                    "meta").bytes_per_token()
    for ctx in contexts:
        runs = {"bf16": DecodeRun(model, "absorbed", ctx, batch, steps),
                "bf16_gathered": DecodeRun(model, "absorbed", ctx, batch, steps, gathered=True),
                "fp8": DecodeRun(model, "absorbed", ctx, batch, steps, cache_dtype=FP8),
                "fp8_gathered": DecodeRun(model, "absorbed", ctx, batch, steps, gathered=True, cache_dtype=FP8)}
        best = best_of(runs, rounds)
        for name in runs:
            out[f"tokens_per_s_{name}_ctx{ctx}"] = round(best[name], 1)
        out[f"speedup_fp8_vs_bf16_ctx{ctx}"] = round(best["fp8"] / best["bf16"], 3)
        out[f"speedup_fp8_vs_bf16_gathered_ctx{ctx}"] = round(best["fp8"] / best["bf16_gathered"], 3)
        out[f"speedup_fp8_in_place_vs_gathered_ctx{ctx}"] = round(best["fp8"] / best["fp8_gathered"], 3)
        del runs
    return out


class V4DecodeRun(DecodeRun):
    """``DecodeRun`` of a DeepSeek-V4 model: its ``HybridCache`` filled with ``ctx`` tokens' random state (windows,
    rings, entries and index keys; an FP8 cache's rows packed as the model writes them)."""

    def __init__(self, model: Transformer, ctx: int, batch: int, steps: int, cache_dtype: torch.dtype):
        self.dec = Decoder(model, batch, ctx + steps + 1, cache_dtype=cache_dtype)
        cache = self.dec.cache
        for layer, (state, r) in enumerate(zip(cache.layers, cache.ratios)):
            for name, t in state.items():
                n = ctx // r if name in ENTRY_NAMES else t.shape[1]
                if t.dtype != torch.uint8:
                    t[:, :n].normal_()
                    continue
                # packed as the model writes them (write_entries quantizes; the window's slots alike, row b at b)
                width = cache.index_dim if name == "index_keys" else cache.head_dim
                b, i = torch.arange(batch).repeat_interleave(n), torch.arange(n).repeat(batch)
                cache.write_entries(layer, name, b, i, torch.randn(batch * n, width))
        cache.lengths.fill_(ctx)
        self.ctx, self.batch, self.steps, self.vocab = ctx, batch, steps, model.cfg.vocab_size
        self.switch = contextlib.nullcontext


def bench_v4_fp8(contexts: list[int], batch: int, steps: int, rounds: int) -> dict:
    """Part 8: DeepSeek-V4's FP8 / FP4 cache against BF16, decode tokens/s at ``V4_FP8_BENCH``'s widths."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny-v4", **V4_FP8_BENCH)).eval()
    out: dict = {"model": {"params": param_counts(model.cfg).total, **V4_FP8_BENCH, "base_preset": "tiny-v4",
                           "batch": batch, "steps": steps, "rounds": rounds}}
    for ctx in contexts:
        runs = {"bf16": V4DecodeRun(model, ctx, batch, steps, torch.bfloat16),
                "fp8": V4DecodeRun(model, ctx, batch, steps, FP8)}
        best = best_of(runs, rounds)
        for name, run in runs.items():
            out[f"tokens_per_s_{name}_ctx{ctx}"] = round(best[name], 1)
            out[f"cache_bytes_per_token_{name}"] = run.dec.cache.bytes_per_token()
        out[f"speedup_fp8_vs_bf16_ctx{ctx}"] = round(best["fp8"] / best["bf16"], 3)
        del runs
    return out


@torch.inference_mode()
def index_call_ms(attn: MLA, x: torch.Tensor, q_latent: torch.Tensor, rows: Rows, cache, switch, calls: int) -> float:
    """Milliseconds a call of ``dsa_index_scores`` under ``switch``, over ``calls`` calls."""
    with switch():
        t0 = time.perf_counter()
        for _ in range(calls):
            dsa_index_scores(attn, x, q_latent, rows, cache)
        return (time.perf_counter() - t0) / calls * 1e3


def bench_dsa_index(contexts: list[int], batch: int, rounds: int, calls: int = 10) -> dict:
    """Part 7: one layer's indexer scores of a decode step, FP8 keys in place against BF16 keys in place and FP8 keys
    gathered (ms a call over ``calls`` calls, interleaved, best of ``rounds``)."""
    torch.manual_seed(0)
    cfg = preset("tiny", index_topk=2048, **DSA_INDEX_BENCH)
    attn = MLA(cfg, layer_id=0).eval()
    out: dict = {"dsa_index_model": {"base_preset": "tiny", **DSA_INDEX_BENCH}, "dsa_index_batch": batch,
                 "dsa_index_calls": calls, "dsa_index_rounds": rounds}
    for ctx in contexts:
        cos, sin = rope_cos_sin(cfg.qk_rope_head_dim, ctx, cfg)
        x = torch.randn(batch, ctx, cfg.dim)
        pos = torch.arange(ctx).expand(batch, ctx)
        new = pos[:, -1:]
        rows = Rows(new, cos[new], sin[new], ctx, causal_slot_mask(new, ctx), 0)
        caches = {}
        with torch.inference_mode():
            keys = attn.indexer.keys(x, cos, sin)
            for dt in (torch.bfloat16, FP8):  # the FP8 cache quantizes the keys as the model writes them
                caches[dt] = make_cache(cfg, 1, batch, ctx, "absorbed", dt)
                caches[dt].write(0, pos, index_key=keys)
            x, q_latent = x[:, -1:], attn.query_latent(x[:, -1:])
        runs = {"bf16": (caches[torch.bfloat16], contextlib.nullcontext), "fp8": (caches[FP8], contextlib.nullcontext),
                "fp8_gathered": (caches[FP8], copied_index_keys)}
        args = (attn, x, q_latent, rows)
        for cache, switch in runs.values():  # warm-up
            index_call_ms(*args, cache, switch, 1)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for name, (cache, switch) in runs.items():
                best[name] = min(best[name], index_call_ms(*args, cache, switch, calls))
        for name in runs:
            out[f"ms_dsa_index_{name}_ctx{ctx}"] = round(best[name], 3)
        out[f"speedup_dsa_index_fp8_vs_bf16_ctx{ctx}"] = round(best["bf16"] / best["fp8"], 3)
        out[f"speedup_dsa_index_fp8_in_place_vs_gathered_ctx{ctx}"] = round(best["fp8_gathered"] / best["fp8"], 3)
    return out


def train_checkpoint(run: Path, steps: int, threads: int, preset_name: str = "tiny") -> None:
    cmd = [sys.executable, "-m", "flyer", "train", "--preset", preset_name, "--steps", str(steps), "--out", str(run),
           "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3", "--warmup", "10", "--precision", "fp32",
           "--eval-every", str(steps), "--ckpt-every", str(steps), "--threads", str(threads),
           "--no-plots", "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def bench_mtp(ckpt: Path, new_tokens: int, draft_tokens: int) -> dict:
    model, cfg, text_tok = load_pretrained(ckpt)
    tok = text_tok.tok
    texts = ["ROMEO:\nWhat light", "First Citizen:\nBefore we proceed any further, hear me",
             "KING HENRY:\nOnce more unto", "To be, or not to be"]
    prompts = [tok.encode(t, add_special_tokens=False).ids or [0] for t in texts]
    out: dict = {"mtp_checkpoint": str(ckpt), "mtp_new_tokens": new_tokens}
    plain_s = spec_s = 0.0
    total = 0
    res = {}
    for k in [1] + ([draft_tokens] if draft_tokens > 1 else []):
        drafted = accepted = 0
        spec_s = plain_s = 0.0
        total = 0
        for p in prompts:  # one prompt at a time: speculation helps latency-bound decoding
            g = dict(max_new_tokens=new_tokens, cache_dtype=torch.bfloat16)
            plain = generate(model, [p], GenerationConfig(**g))
            spec = generate(model, [p], GenerationConfig(**g, speculative="mtp", draft_tokens=k))
            if spec.tokens != plain.tokens:
                raise AssertionError("speculative greedy output differs from plain greedy")
            plain_s += plain.decode_s
            spec_s += spec.decode_s
            drafted += spec.drafted
            accepted += spec.accepted
            total += plain.new_tokens - 1
        sfx = "" if k == 1 else f"_k{k}"
        res[f"mtp_acceptance_rate{sfx}"] = round(accepted / drafted, 4)
        res[f"tokens_per_s_plain{sfx}"] = round(total / plain_s, 1)
        res[f"tokens_per_s_mtp{sfx}"] = round(total / spec_s, 1)
        res[f"mtp_speedup{sfx}"] = round(plain_s / spec_s, 3)
    out.update(res)
    out["mtp_greedy_identical"] = True
    return out


def bench_prefix(ckpt: Path | None, prompt_len: int, block: int, preset_name: str = "tiny") -> dict:
    if ckpt is not None:
        model = load_pretrained(ckpt)[0]
    else:
        torch.manual_seed(0)
        model = Transformer(preset(preset_name, max_seq_len=4096, original_seq_len=4096)).eval()
    torch.manual_seed(1)
    prompt_len = min(prompt_len, model.cfg.max_seq_len - 1)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,)).tolist()
    g = dict(max_new_tokens=1, cache_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        pc = open_prefix_cache(model, d, block_size=block)
        cold = min(generate(model, [prompt], GenerationConfig(**g)).prefill_s for _ in range(3))
        store = generate(model, [prompt], GenerationConfig(**g, prefix_cache=pc))
        hits = [generate(model, [prompt], GenerationConfig(**g, prefix_cache=pc)) for _ in range(3)]
        hit = min(h.prefill_s for h in hits)
        same = all(h.tokens == store.tokens for h in hits)
        disk = pc.disk_bytes()
    return {"prefix_model": model.cfg.attn, "prefix_prompt_tokens": prompt_len, "prefix_block": block,
            "prefix_tokens_loaded": hits[-1].prefix["tokens_loaded"],
            "prefill_s_cold": round(cold, 4), "prefill_s_cold_and_store": round(store.prefill_s, 4),
            "prefill_s_prefix_hit": round(hit, 4), "prefix_hit_speedup": round(cold / hit, 2),
            "prefix_hit_rate": hits[-1].prefix["hit_rate"], "prefix_hit_same_tokens": same,
            "prefix_disk_bytes_per_token": round(disk / (prompt_len // block * block), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurements per path (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt", help="a trained run/step directory for the MTP part (default: train tiny now)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--mtp-tokens", type=int, default=96)
    ap.add_argument("--draft-tokens", type=int, default=2, help="also measure this many drafts per step")
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--prefix-only", action="store_true", help="run the prefix-cache part (3.) alone")
    ap.add_argument("--prefix-preset", default="tiny", choices=("tiny", "tiny-v4"),
                    help="the preset of the prefix-cache part's random model (alone, without --ckpt)")
    ap.add_argument("--skip-mtp", action="store_true")
    ap.add_argument("--mtp-only", action="store_true", help="run the MTP part (2.) alone")
    ap.add_argument("--mtp-preset", default="tiny", choices=("tiny", "tiny-v4"),
                    help="the preset the MTP part trains (without --ckpt)")
    ap.add_argument("--dsa-contexts", default="2048,8192")
    ap.add_argument("--dsa-topk", type=int, default=256, help="the DSA model's index_topk")
    ap.add_argument("--dsa-only", action="store_true", help="run the DSA part (4.) alone")
    ap.add_argument("--dsa-prefill", action="store_true", help="run the DSA prefill part (5.) alone")
    ap.add_argument("--dsa-prompts", default="4096,8192", help="prompt lengths of the DSA prefill part")
    ap.add_argument("--dsa-chunk", type=int, default=256, help="prefill chunk of the DSA prefill part")
    ap.add_argument("--fp8-only", action="store_true", help="run the FP8 cache part (6.) alone")
    ap.add_argument("--dsa-index", action="store_true", help="run the DSA indexer-score part (7.) alone")
    ap.add_argument("--v4-fp8", action="store_true", help="run DeepSeek-V4's FP8 cache part (8.) alone")
    ap.add_argument("--v4-contexts", default="2048,8192", help="contexts of the V4 FP8 cache part")
    args = ap.parse_args()
    tune_malloc()  # as flyer's CLI and Trainer do
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out: dict = {"threads": args.threads}
    dsa_contexts = [int(c) for c in args.dsa_contexts.split(",")]
    if args.prefix_only:
        out.update(bench_prefix(Path(args.ckpt) if args.ckpt else None, args.prefix_tokens, 64, args.prefix_preset))
        out["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out))
        return 0
    if args.dsa_prefill:
        prompts = [int(n) for n in args.dsa_prompts.split(",")]
        out.update(bench_dsa_prefill(prompts, args.dsa_chunk, args.dsa_topk, args.rounds))
        out["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out))
        return 0
    if args.fp8_only:
        out.update(bench_fp8_cache([int(c) for c in args.contexts.split(",")], args.batch, args.steps, args.rounds))
        out["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out))
        return 0
    if args.v4_fp8:
        out.update(bench_v4_fp8([int(c) for c in args.v4_contexts.split(",")], args.batch, args.steps, args.rounds))
        out["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out))
        return 0
    if args.dsa_index:
        if kernels.cpu_ops() is None:
            raise SystemExit("--dsa-index: flyer's CPU kernels are not built (the part measures them)")
        out.update(bench_dsa_index(dsa_contexts, args.batch, args.rounds))
        out["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out))
        return 0
    if args.dsa_only:
        out.update(bench_dsa(dsa_contexts, args.dsa_topk, args.batch, args.steps, args.rounds))
        out["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out))
        return 0
    if not args.mtp_only:
        out.update(bench_attention([int(c) for c in args.contexts.split(",")], args.batch, args.steps, args.rounds))
    ckpt = Path(args.ckpt) if args.ckpt else None
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_mtp:
            if ckpt is None:
                t1 = time.perf_counter()
                ckpt = Path(d) / "run"
                train_checkpoint(ckpt, args.train_steps, args.threads, args.mtp_preset)
                out["mtp_preset"], out["mtp_train_steps"] = args.mtp_preset, args.train_steps
                out["mtp_train_s"] = round(time.perf_counter() - t1, 1)
            out.update(bench_mtp(ckpt, args.mtp_tokens, args.draft_tokens))
        if args.mtp_only:
            out["bench_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(out))
            return 0
        out.update(bench_prefix(ckpt, args.prefix_tokens, 64))
    out.update(bench_dsa(dsa_contexts, args.dsa_topk, args.batch, args.steps, args.rounds))
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
