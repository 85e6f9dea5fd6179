"""Sliding-window GQA layers (``window_size`` / ``sliding_layers``: Mistral 7B v0.1, Qwen2's and Qwen3's upper
layers): the chunked training attention against the band it computes, packed documents, the decode cache and the
serving engine against ``generate``, FLOP and memory counts, and the Hugging Face config both ways as transformers
reads and writes it (its logits and greedy tokens: ``tests/test_interop_hf.py``'s mistral / *-sliding families)."""

import json
import random

import pytest
import torch
from bounds import FP32_U, decode_logit_bound
from test_memory_estimate import _attention_kept_per_row
from transformers import (AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, Qwen2Config,
                          Qwen3Config, Qwen3MoeConfig)

from flyer.cluster.costs import Layout, gqa_attention_saved_bytes, memory_per_gpu
from flyer.config import preset
from flyer.errors import ConfigError, FieldError
from flyer.infer import GenerationConfig, generate
from flyer.infer.attention import Rows, _grouped_attention, causal_slot_mask
from flyer.infer.cache import KVCache
from flyer.infer.decoder import Decoder
from flyer.interop.export import export_model
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.interop.hf_config import from_hf_config
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.model import attention
from flyer.model.attention import WINDOW_CHUNK, windowed_attention
from flyer.model.counts import attention_flops_per_token
from flyer.model.lowp import emulation
from flyer.model.transformer import Transformer
from flyer.parallel.memory import saved_bytes
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged import NULL_BLOCK, PagedCache
from tests.hf_models import make_tokenizer

V = 64


def _gqa(window: int, layers: tuple[int, ...], **over):
    return preset("tiny", vocab_size=V, attn="gqa", n_kv_heads=2, head_dim=32, window_size=window,
                  sliding_layers=layers, **over)


def _band_reference(q, k, v, scale: float, window: int, u: float = FP32_U):
    """(exact softmax attention over each query's window (B, T, H, d) in FP64, the bound on any evaluation's error
    in arithmetic of unit roundoff ``u``, FP32's by default): a score is d products and a scaling, off by at most
    (d + 1) u of its absolute terms, which moves each probability by at most 2 max|score error| of itself; the
    output sums the S keys of the query's chunk call (window + chunk - 1 at most; masked ones add exact zeros) times
    values (S roundings, and a few for exp and the normalisation)."""
    T, d = q.shape[1], q.shape[-1]
    t = torch.arange(T)
    visible = (t.view(1, -1) <= t.view(-1, 1)) & (t.view(1, -1) > t.view(-1, 1) - window)
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    p = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
    exact = (p @ vd).transpose(1, 2)
    a = scale * (qd.abs() @ kd.abs().transpose(-1, -2))
    d_max = ((d + 1) * u * a).masked_fill(~visible, 0).amax(-1, keepdim=True)
    S = min(T, window + WINDOW_CHUNK - 1)
    bound = ((2 * d_max + (S + 8) * u) * (p @ vd.abs())).transpose(1, 2)
    return exact, bound


@pytest.mark.parametrize("T, window", [(7, 7), (9, 4), (9, 1), (WINDOW_CHUNK, 40), (WINDOW_CHUNK + 1, 40),
                                       (2 * WINDOW_CHUNK + 37, 3), (600, 300), (600, 599)])
def test_windowed_attention_is_the_band_within_the_fp32_bound(T, window):
    """Each query attends to its last ``window`` keys (itself included), however the chunks fall: one chunk, a
    chunk's end at T, the window reaching past the previous chunk's start. In FP64 its gradients are the band's: the
    same sums in other orders, each a chain of four of at most T + d + 8 terms whose magnitudes stay below 10^3 here
    (unit normal inputs, rows of probabilities summing to 1), so they differ by at most 4 (T + d + 8) 2^-53 10^3,
    3e-10 at T = 600, within the 1e-9 asserted."""
    g = torch.Generator().manual_seed(T * 1000 + window)
    q, k, v = (torch.randn(2, T, 3, 16, generator=g) for _ in range(3))
    exact, bound = _band_reference(q, k, v, 0.25, window)
    got = windowed_attention(q, k, v, 0.25, window)
    assert got.shape == exact.shape and ((got.double() - exact).abs() <= bound).all()

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    windowed_attention(q64, k64, v64, 0.25, window).pow(2).sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in (q64, k64, v64)]
    t = torch.arange(T)
    visible = (t.view(1, -1) <= t.view(-1, 1)) & (t.view(1, -1) > t.view(-1, 1) - window)
    rq, rk, rv = (x.transpose(1, 2) for x in ref)
    p = (rq @ rk.transpose(-1, -2) * 0.25).masked_fill(~visible, float("-inf")).softmax(-1)
    (p @ rv).transpose(1, 2).pow(2).sum().backward()
    for a, b in zip((q64, k64, v64), ref):
        assert b.grad.abs().max() < 1e3 and (a.grad - b.grad).abs().max() <= 1e-9


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_windows_train_on_every_cpu_kind(emulated):
    """BF16 with its GEMMs emulated (a CPU without BF16 hardware: FP32 on the rounded inputs, rounded back) or
    native: a sliding window's additive band, in q's dtype, trains either way, and emulated it is the FP32 windowed
    attention of the same values rounded once, bit for bit (the band widened to FP32: it failed on such CPUs)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 300, 2, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with emulation(emulated):
        out = windowed_attention(q, k, v, 0.25, 9)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(x.grad is not None and x.grad.isfinite().all() for x in (q, k, v))
    if emulated:
        wide = [x.detach().float().requires_grad_() for x in (q, k, v)]
        assert torch.equal(out, windowed_attention(*wide, 0.25, 9).bfloat16())


def test_a_band_made_in_inference_mode_trains_later():
    """The shared band of a call under ``inference_mode`` with grad enabled (its float form) is no inference tensor:
    training with the same window and dtype saves it for backward (it raised "Inference tensors cannot be saved")."""
    attention._band.cache_clear()
    q, k, v = (torch.randn(1, 300, 2, 8, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in range(3))
    with torch.inference_mode(), torch.enable_grad():
        windowed_attention(q, k, v, 0.3, 5)
    assert attention._band.cache_info().currsize == 1
    windowed_attention(q, k, v, 0.3, 5).sum().backward()
    assert q.grad is not None and attention._band.cache_info().hits == 1
    # one band a window and dtype, its rows a multiple of 16 apart: CUDA's memory-efficient kernel keeps it as it is
    assert all(attention._band(w, torch.float32, torch.device("cpu")).stride()[:3] == (256 * n, 256 * n, n)
               for w, n in ((1, 256), (5, 272), (17, 272), (18, 288)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_band_is_kept_once_on_cuda():
    """On CUDA, BF16 with gradients (SDPA's memory-efficient kernel, which pads a mask whose rows are not 16-aligned
    and keeps the padded copy): backward keeps one band beside what causal attention keeps (and each call's few
    bytes of bookkeeping, the kernels' own), not a band for each of the 4 chunks; the output within the band
    reference's bound for BF16 arithmetic (unit roundoff 2^-9)."""
    T, window = 1024, 300
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, 4, 64, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    attention._band.cache_clear()
    kept = saved_bytes(lambda: windowed_attention(q, k, v, 0.125, window))
    band = attention._band(window, torch.bfloat16, q.device)
    causal = saved_bytes(lambda: attention.causal_attention(q, k, v, 0.125))
    assert 0 < kept - causal < 2 * band.untyped_storage().nbytes()
    exact, bound = _band_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), 0.125, window, 2.0**-9)
    got = windowed_attention(q, k, v, 0.125, window).float().cpu().double()
    assert ((got - exact).abs() <= bound).all()


def test_a_packed_document_slides_from_its_own_start():
    """Packed rows (``documents_BT``): each document's window counts from its own first token, as if it ran
    alone; the sliding layers and the full one each read as the unpacked model does."""
    torch.manual_seed(0)
    model = Transformer(_gqa(5, (0,))).eval()
    a, b = torch.randint(0, V, (1, 300)), torch.randint(0, V, (1, 40))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), torch.tensor([[0] * 300 + [1] * 40]))
        alone = torch.cat([model(a), model(b)], 1)
    assert (packed - alone).abs().max() <= decode_logit_bound(model, 300)


def test_the_decode_cache_and_the_engine_slide_as_the_training_forward():
    """The decode cache (a prompt prefilled in chunks, then decoded past the window) gives the training forward's
    logits; the serving engine (continuous batching, prefix sharing, preemption, MTP drafts in a cache shifted a
    slot, the fixed-shape steps CUDA graphs replay) gives each prompt's greedy tokens alone."""
    torch.manual_seed(3)
    model = Transformer(_gqa(3, (0,))).eval()
    prompts = [[(5 + 3 * i) % V for i in range(n)] for n in (2, 11, 23)] + [[(5 + 3 * i) % V for i in range(14)]]
    alone = [generate(model, [p], GenerationConfig(max_new_tokens=8, cache_dtype=torch.float32)) for p in prompts]
    ref = [r.tokens[0] for r in alone]
    row = torch.tensor([prompts[2] + ref[2]])  # 31 tokens: chunks of 4, then one at a time
    dec = Decoder(model, 1, row.shape[1], cache_dtype=torch.float32)
    steps = [(s, min(s + 4, 23)) for s in range(0, 23, 4)] + [(t, t + 1) for t in range(23, row.shape[1])]
    got = torch.cat([dec.forward(row[:, s:e], torch.tensor([s])) for s, e in steps], 1)
    with torch.no_grad():
        head = lambda h: model.head(model.norm(h))  # noqa: E731
        assert (head(got) - head(model.hidden(row))).abs().max() <= decode_logit_bound(model, row.shape[1])
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    for blocks, speculative, fixed in ((40, None, None), (9, None, None), (40, "mtp", None), (40, None, True),
                                       (40, "mtp", True)):  # fixed: the CUDA graphs' fixed-shape steps, eager here
        eng = Engine(model, EngineConfig(kv_cache_bytes=blocks * 4 * per_token, block_size=4, prefill_chunk=8,
                                         cache_dtype=torch.float32, speculative=speculative, cuda_graphs=fixed))
        outs = [[] for _ in prompts]
        for i, p in enumerate(prompts):
            eng.submit(p, SamplingOptions(max_tokens=8), lambda e, i=i: outs[i].append(e.token))
        eng.run_until_idle()
        assert outs == ref, (blocks, speculative, fixed)
        assert eng.alloc.used == 0
    assert eng.alloc.hits > 0  # the last prompt shares the third's first blocks


@pytest.mark.parametrize("paged", [False, True])
def test_a_sliding_layer_reads_each_rows_windows_alone(paged):
    """A sliding layer past its window reads each row's last window + T - 1 slots (``Rows.window_read``), through a
    contiguous cache or a paged one's tables, and attends as each query's exact window does, within the FP32 bound
    of that sum (``_band_reference``'s). Rows: a chunk deep in the context, a short row (its span from slot 0), and
    a row whose padding is clamped at the last slot (its span runs past ``n_slots``, masked, not read twice).
    What lies behind each span is NaN (a paged row's blocks there given back to the null block): never read."""
    torch.manual_seed(0)
    W, T, Hkv, group, d, bs, S = 6, 4, 2, 2, 8, 4, 40
    pos = torch.tensor([[30, 31, 32, 33], [2, 3, 4, 5], [37, 38, 39, 39]])
    lo = (pos[:, 0] - W + 1).clamp(min=0)
    keys, values = torch.randn(3, S, Hkv, d), torch.randn(3, S, Hkv, d)
    q = torch.randn(3, T, Hkv * group, d)
    for b in range(3):
        keys[b, :lo[b]], values[b, :lo[b]] = float("nan"), float("nan")
    if paged:
        tables = torch.stack([torch.randperm(S // bs * 3)[:S // bs] + 1 for _ in range(3)])
        for b in range(3):
            tables[b, :lo[b] // bs] = NULL_BLOCK  # given back behind the window
        cache = PagedCache(KVCache(1, 3 * S // bs + 1, bs, Hkv, d, d, torch.float32)).view(tables)
        cache.pool.tensors["key"].fill_(float("nan"))  # the null block and every block no row holds
        cache.pool.tensors["value"].fill_(float("nan"))
        live = torch.arange(S).expand(3, S)[:, lo.min():]
        live = torch.where(live >= lo.view(-1, 1), live, pos[:, :1])  # rewrite a real slot, never the null block
        rows_b = torch.arange(3).view(-1, 1)
        cache.write(0, live, key=keys[rows_b, live], value=values[rows_b, live])
    else:
        cache = KVCache(1, 3, S, Hkv, d, d, torch.float32)
        cache.tensors["key"][0], cache.tensors["value"][0] = keys, values
    rows = Rows(pos, torch.zeros(1), torch.zeros(1), S, causal_slot_mask(pos, S))
    slots, mask = rows.window_read(W)
    assert slots.shape == (3, W + T - 1) and slots[1, 0] == 0 and slots[2, -1] == S
    k, v = (cache.read_slots(0, name, slots, torch.float32, heads_first=True) for name in ("key", "value"))
    got = _grouped_attention(q, k, v, mask, d ** -0.5, group, torch.nn.Identity()).view(3, T, Hkv * group, d)
    for b in range(3):
        for t in range(T):
            p = int(pos[b, t])
            seen = slice(max(0, p - W + 1), p + 1)
            kk, vv = (x[b, seen].repeat_interleave(group, dim=1).transpose(0, 1).double() for x in (keys, values))
            qq = q[b, t].double().unsqueeze(1)  # (H, 1, d)
            prob = (qq @ kk.transpose(-1, -2) * d ** -0.5).softmax(-1)
            exact = (prob @ vv).squeeze(1)
            d_max = ((d + 1) * FP32_U * d ** -0.5 * (qq.abs() @ kk.abs().transpose(-1, -2))).amax(-1)
            bound = (2 * d_max + (W + T - 1 + 8) * FP32_U) * (prob @ vv.abs()).squeeze(1)
            assert ((got[b, t].double() - exact).abs() <= bound).all(), (b, t)


def test_a_model_sliding_every_layer_gives_back_the_blocks_behind_its_window(tmp_path):
    """Every layer sliding (Mistral 7B v0.1's kind): the engine gives back each request's blocks wholly behind its
    next token's window, so requests whose whole rows need 37 blocks run at once in 22 without preemption (kept,
    they preempt), with each prompt's greedy tokens alone; a prefix a finished request left cached (its given-back
    blocks among them) is shared by a later one, and the disk tier serves it to a new engine. A wider window in a
    tight pool admits as many as the most each holds lets fit (none preempted), and a request preempted holding
    given-back entries frees every block it holds. With MTP drafts (whose block attends fully) nothing is given back,
    and the tokens are the same."""
    prompts = [[(7 + 5 * i + j) % V for i in range(n)] for j, n in enumerate((9, 14, 6, 11))]

    def build(window):
        torch.manual_seed(5)
        model = Transformer(_gqa(window, (0, 1, 2, 3))).eval()
        return model, [generate(model, [p], GenerationConfig(max_new_tokens=26, cache_dtype=torch.float32)).tokens[0]
                       for p in prompts]

    model, ref = build(3)
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4

    def run(blocks, keep=False, **over):
        eng = Engine(model, EngineConfig(kv_cache_bytes=blocks * 4 * per_token, block_size=4, prefill_chunk=8,
                                         cache_dtype=torch.float32, **over))
        eng.window = 0 if keep else eng.window
        outs = [[] for _ in prompts]
        for i, p in enumerate(prompts):
            eng.submit(p, SamplingOptions(max_tokens=26), lambda e, i=i: outs[i].append(e.token))
        eng.run_until_idle()
        assert outs == ref and eng.alloc.used == 0 and eng.alloc.refs[0] == 0, over  # the null block never taken
        return eng

    assert sum(-(-(len(p) + 26) // 4) for p in prompts) == 37
    assert run(23, keep=True).metrics.preemptions._value.get() > 0
    eng = run(23)  # 22 blocks and the null one
    assert eng.window and eng.metrics.preemptions._value.get() == 0
    eng, again = run(60), []  # room to keep the given-back blocks cached
    eng.submit(prompts[1], SamplingOptions(max_tokens=26), lambda e: again.append(e.token))
    eng.run_until_idle()
    assert again == ref[1] and eng.alloc.hits > 0
    assert run(23, prefix_cache=open_disk_prefix_cache(model, tmp_path, torch.float32, 4)).window  # fills the tier
    disk = open_disk_prefix_cache(model, tmp_path, torch.float32, 4)  # a new server, the same directory
    assert run(23, prefix_cache=disk).window and disk.stats.hits == sum((len(p) - 1) // 4 for p in prompts)
    spec = run(60, speculative="mtp")
    assert not spec.window
    model, ref = build(13)
    assert run(12).metrics.preemptions._value.get() == 0  # each holds up to 6 of the 11 blocks: one at a time
    eng, out = Engine(model, EngineConfig(kv_cache_bytes=40 * 4 * per_token, block_size=4, prefill_chunk=8,
                                          cache_dtype=torch.float32)), []
    eng.submit(prompts[1], SamplingOptions(max_tokens=26), lambda e: out.append(e.token))
    while not eng.running or eng.running[0].released < 2:
        eng.step()
    eng._preempt(eng.running[0])  # preempted holding given-back entries: recomputed, and every block freed after
    eng.run_until_idle()
    assert out == ref[1] and eng.alloc.used == 0


def test_rows_longer_than_the_pool_run_in_their_windows_blocks():
    """Every layer sliding, a request holds at most ``window_blocks`` at once (a prefill chunk's positions and the
    window - 1 before them), so a row the whole pool could not hold is served: admitted where that many fit beside
    what the running requests may still take, its blocks taken as its prefill reaches them, each prompt's greedy
    tokens those it gets alone, and never more than that many held. A long cached prefix is held in its window's
    blocks only, from admission. Where every prefilling row waits on a block another holds, the most recently
    admitted is preempted and all finish. A window the pool cannot hold is refused, naming max_tokens."""
    torch.manual_seed(7)
    model = Transformer(_gqa(3, (0, 1, 2, 3))).eval()
    prompts = [[(3 + 7 * i + j) % V for i in range(n)] for j, n in enumerate((41, 37, 29))]
    ref = [generate(model, [p], GenerationConfig(max_new_tokens=30, cache_dtype=torch.float32)).tokens[0]
           for p in prompts]
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4

    def engine(blocks):  # blocks of 4, the null one among them
        return Engine(model, EngineConfig(kv_cache_bytes=blocks * 4 * per_token, block_size=4, prefill_chunk=8,
                                          cache_dtype=torch.float32))

    def run(eng, subset=range(len(prompts))):
        outs, most, together = {i: [] for i in subset}, 0, 0
        for i in subset:
            eng.submit(prompts[i], SamplingOptions(max_tokens=30), lambda e, i=i: outs[i].append(e.token))
        for _ in range(2000):
            if not eng.busy:
                break
            eng.step()
            most = max([most] + [len(eng._held(r)) for r in eng.running])
            together = max(together, len(eng.running))
        assert [outs[i] for i in subset] == [ref[i] for i in subset] and eng.alloc.used == 0
        assert most <= eng.window_blocks and eng.metrics.preemptions._value.get() == 0
        return together

    eng = engine(5)
    # the window 3 and chunks of 8 reach 10 positions: 4 blocks, however they fall
    assert eng.window_blocks == 4 == eng.alloc.capacity and -(-(41 + 30) // 4) == 18
    assert run(eng) == 1  # one at a time, the next admitted as the one before ends
    assert run(engine(9)) == 2
    eng = engine(30)
    run(eng, [0])  # cached: its full blocks stay in the pool
    eng.submit(prompts[0] + ref[0][:5], SamplingOptions(max_tokens=1), lambda e: None)
    eng.admit()
    r = eng.running[0]
    # 11 blocks cached before its last token, 10 of them wholly behind position 44's window
    assert (r.n_cached, r.released, len(eng._held(r)), eng.alloc.used) == (44, 10, 1, 1)
    eng.run_until_idle()

    eng = engine(9)  # both prefilling, and every free block taken elsewhere (as blocks another request shares)
    outs = {i: [] for i in (0, 1)}
    for i in (0, 1):
        eng.submit(prompts[i], SamplingOptions(max_tokens=30), lambda e, i=i: outs[i].append(e.token))
    eng.step()
    taken, reserve = [], eng._reserve_decode_slots

    def reserve_then_take():  # once the step has given back what is behind the windows
        rows = reserve()
        taken.extend(eng.alloc.allocate() for _ in range(eng.alloc.available))
        return rows

    eng._reserve_decode_slots = reserve_then_take
    eng.step()  # neither can go on: the later one goes back to the queue, and the first goes on with its blocks
    eng._reserve_decode_slots = reserve
    assert eng.metrics.preemptions._value.get() == 1 and [r.id for r in eng.running] == [0]
    assert eng.running[0].n_cached > 8
    eng.alloc.release(taken)
    eng.run_until_idle()
    assert outs == {0: ref[0], 1: ref[1]} and eng.alloc.used == 0

    wide = Engine(Transformer(_gqa(13, (0, 1, 2, 3))).eval(), EngineConfig(
        kv_cache_bytes=5 * 4 * per_token, block_size=4, prefill_chunk=8, cache_dtype=torch.float32))
    assert wide.window_blocks == 6 and wide.limits.room == 16
    wide.check([1] * 12, SamplingOptions(max_tokens=4))
    with pytest.raises(FieldError, match="max_tokens.*need 5 cache blocks; the server's cache holds 4"):
        wide.check([1] * 12, SamplingOptions(max_tokens=5))
    assert engine(5).limits.room == model.cfg.max_seq_len  # its 4 blocks hold a window, so any row


def test_the_disk_tier_continues_a_prompt_longer_than_the_pool(tmp_path):
    """Every layer sliding, a new server continues a stored 61-token prompt from disk in a pool that holds its
    window's blocks only: the blocks behind the window are given back as they are read, and the room asked for is
    what the request may still take (it asked for the whole rest of the prompt: a pool under 16 blocks read none)."""
    torch.manual_seed(0)
    model = Transformer(_gqa(3, (0, 1, 2, 3))).eval()
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    prompt = [(5 + 7 * i) % V for i in range(61)]  # 15 full blocks of 4 before its last token

    def run(blocks):
        disk = open_disk_prefix_cache(model, tmp_path, torch.float32, 4)
        eng = Engine(model, EngineConfig(kv_cache_bytes=(blocks + 1) * 4 * per_token, block_size=4, prefill_chunk=8,
                                         cache_dtype=torch.float32, prefix_cache=disk))
        out = []
        eng.submit(prompt, SamplingOptions(max_tokens=4), out.append)
        eng.run_until_idle()
        assert eng.alloc.used == 0 and eng.alloc.refs[0] == 0  # the null entries never released
        return [e.token for e in out], out[0].cached_tokens, disk.stats.hits

    tokens, cached, _ = run(40)  # stores it
    assert cached == 0
    for blocks in (15, 8, 4):
        assert run(blocks) == (tokens, 60, 15), blocks


def test_a_chain_given_back_behind_the_window_leaves_the_cache_tail_first():
    """A request gives its blocks back a step at a time from the head: at its end the chain is put in the order a
    cached chain leaves, its tail first, so a later prompt's blocks take the tail and a prompt with the same prefix
    still finds its head (before, the head went first and the 15 blocks left were cached and unreachable)."""
    torch.manual_seed(0)
    model = Transformer(_gqa(3, (0, 1, 2, 3))).eval()
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    eng = Engine(model, EngineConfig(kv_cache_bytes=21 * 4 * per_token, block_size=4, prefill_chunk=8,
                                     cache_dtype=torch.float32))
    long, other = [(5 + 7 * i) % V for i in range(61)], [(11 + 3 * i) % V for i in range(20)]
    answers = []
    for prompt in (long, other, long):
        events = []
        eng.submit(prompt, SamplingOptions(max_tokens=4), events.append)
        eng.run_until_idle()
        answers.append((events[0].cached_tokens, [e.token for e in events]))
    # the long row's 16 full blocks cached, 4 blocks free: the other prompt's 6 blocks take the 4, then the blocks it
    # gives back behind its own window (evicted first), not the long chain's: the long prompt finds all 15 it can use
    assert [c for c, _ in answers] == [0, 0, 60] and answers[2][1] == answers[0][1]


def test_identical_rows_longer_than_the_pool_share_the_head_of_the_chain():
    """Identical prompts longer than the pool, submitted together: the later ones wait for the first's prefill and
    share the head of its chain, which stays cached while the blocks given back behind the window are evicted
    first (before, the head went first: they waited for nothing and shared no block)."""
    torch.manual_seed(0)
    model = Transformer(_gqa(3, (0, 1, 2, 3))).eval()
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    prompt = [(5 + 7 * i) % V for i in range(71)]
    ref = generate(model, [prompt], GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32)).tokens[0]
    eng = Engine(model, EngineConfig(kv_cache_bytes=16 * 4 * per_token, block_size=4, prefill_chunk=8,
                                     cache_dtype=torch.float32))
    events = [[] for _ in range(3)]
    for ev in events:
        eng.submit(prompt, SamplingOptions(max_tokens=10), ev.append)
    eng.run_until_idle()
    assert all([e.token for e in ev] == ref for ev in events) and eng.alloc.used == 0
    assert events[0][0].cached_tokens == 0 and min(ev[0].cached_tokens for ev in events[1:]) > 0


def test_blocks_given_back_behind_a_window_are_evicted_first_deepest_first():
    """``release(evict_first=True)`` (``_release_behind``): a chain's blocks given back behind a window leave the
    cache before other cached blocks, the deepest first, one call's as several calls'; a prompt waiting for a
    running one's chain stops waiting once its head is evicted (it would share none of it)."""
    from flyer.serve.paged import BlockAllocator  # the allocator alone

    alloc = BlockAllocator(7, 4)
    blocks = [alloc.allocate() for _ in range(6)]
    for i, b in enumerate(blocks):
        alloc.register(b, f"k{i}")
    alloc.release(blocks[5:])  # another prompt's, cached before
    alloc.release(blocks[:2], evict_first=True)
    alloc.release(blocks[2:4], evict_first=True)
    assert [alloc.allocate() for _ in range(5)] == [blocks[i] for i in (3, 2, 1, 0, 5)]

    torch.manual_seed(0)
    model = Transformer(_gqa(3, (0, 1, 2, 3))).eval()
    per_token = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    eng = Engine(model, EngineConfig(kv_cache_bytes=16 * 4 * per_token, block_size=4, prefill_chunk=8,
                                     cache_dtype=torch.float32))
    prompt = [(5 + 7 * i) % V for i in range(71)]
    eng.submit(prompt, SamplingOptions(max_tokens=4), lambda e: None)
    while not eng.running or eng.running[0].released < 2:
        eng.step()
    eng.submit(prompt, SamplingOptions(max_tokens=4), lambda e: None)
    assert eng.admit() == 1  # the second waits for the first's blocks
    taken = [eng.alloc.allocate() for _ in range(eng.alloc.available)]  # every cached block evicted, the head too
    eng.alloc.release(taken)
    assert eng.admit() == 2
    eng.run_until_idle()
    assert eng.alloc.used == 0


def test_flyer_serve_hands_the_window_to_the_http_side_and_says_when_the_cache_holds_less(tmp_path, monkeypatch,
                                                                                         capsys):
    """``flyer serve --ckpt`` of a Mistral checkpoint (window 5): the HTTP side's ``Limits`` know the most a request
    holds, so any row up to the context is taken where the cache holds that; where it holds less, the one running
    the server is told once what is refused and which flags help (clients see only the refusals)."""
    from served import handed_to_serve_http  # the serve CLI, stopped where it would start its HTTP process

    from tests.hf_models import build  # a tiny random transformers Mistral

    build("mistral", tmp_path / "m")
    flags = ("--block-size", "4", "--prefill-chunk", "8")
    for memory, capacity in (("12K", 3), ("16K", 4)):
        limits = handed_to_serve_http(monkeypatch, "--kv-cache-memory", memory, *flags,
                                      source=("--ckpt", str(tmp_path / "m")))[0]
        # the window 5 and chunks of 8 reach 12 positions: 4 blocks of 4, however they fall
        assert (limits.capacity, limits.window_blocks) == (capacity, 4)
        assert limits.room == (capacity * 4 if capacity < 4 else limits.max_seq_len)
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flyer serve: every layer")]
        assert said == ([] if capacity == 4 else [
            "flyer serve: every layer slides: a request holds up to 4 blocks (its window and a --prefill-chunk of 8), "
            "more than the cache's 3, so rows past 3 blocks are refused: raise --kv-cache-memory or lower "
            "--prefill-chunk"])


def test_sliding_flops_count_each_querys_window():
    """A sliding layer's attention FLOPs per token: 2 H (qk + v) times the mean of min(window, t + 1) over the
    positions (non-causal: min(window, S)); the full layer and the MTP block as before."""
    cfg = _gqa(7, (0,))
    per_key = 2 * cfg.n_heads * 2 * cfg.head_dim
    for S in (1, 6, 7, 8, 100):
        assert attention_flops_per_token(cfg, S, layer_id=0) == per_key * sum(min(7, t + 1) for t in range(S)) / S
        assert attention_flops_per_token(cfg, S, causal=False, layer_id=0) == per_key * min(7, S)
        full = per_key * S / 2
        assert attention_flops_per_token(cfg, S, layer_id=1) == attention_flops_per_token(cfg, S) == full
        assert attention_flops_per_token(cfg, S, layer_id=cfg.n_layers) == full


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("window, T", [(8, 64), (8, 600), (100, 600), (600, 600)])
def test_a_sliding_layer_keeps_what_its_estimate_counts(monkeypatch, precision, window, T):
    """What a batch row adds to a sliding layer's kept bytes is ``gqa_attention_saved_bytes`` a token to the byte:
    one chunk as the full layer, several their outputs besides the copy ``wo`` reads. The visibility band, one
    tensor shared by chunks and layers whatever the batch, is made afresh on each call here, so that the runs of
    one and two rows keep as many and it cancels."""
    monkeypatch.setattr(attention, "_band", attention._band.__wrapped__)
    cfg = _gqa(window, (0, 1))
    torch.manual_seed(0)
    block = Transformer(cfg).train().layers[1]
    element = 4 if precision == "fp32" else 2
    kept = _attention_kept_per_row(cfg, block, T, precision)
    assert kept == T * gqa_attention_saved_bytes(cfg, element, 1, T)
    assert (kept > T * gqa_attention_saved_bytes(cfg, element)) == (T > max(window, WINDOW_CHUNK))


def test_the_plan_counts_a_sliding_layer_where_it_keeps_more():
    """``flyer plan``'s heaviest stage prices its layers as the heaviest kind: a sliding one past a query chunk keeps
    its chunks' outputs too, so a model sliding its upper layers (Qwen2's) counts as one sliding every layer (it was
    priced as its full first layer)."""
    base = dict(attn="gqa", n_kv_heads=2, head_dim=32, mtp_depth=0, n_routed_experts=0, n_dense_layers=4)
    upper, every = (preset("tiny", window_size=64, sliding_layers=s, **base) for s in ((1, 2, 3), (0, 1, 2, 3)))
    lay = Layout(1, recompute=False)  # what flyer keeps without the recipe's recomputation
    assert memory_per_gpu(upper, lay, 4096, 80) == memory_per_gpu(every, lay, 4096, 80)
    assert memory_per_gpu(upper, lay, 4096, 80) != memory_per_gpu(upper.replace(window_size=0, sliding_layers=()),
                                                                  lay, 4096, 80)


def test_bad_sliding_fields_are_one_line():
    for over, field in ((dict(window_size=4), "sliding_layers"), (dict(sliding_layers=(0,)), "sliding_layers"),
                        (dict(window_size=4, sliding_layers=(1, 0)), "sliding_layers"),
                        (dict(window_size=4, sliding_layers=(0, 0)), "sliding_layers"),
                        (dict(window_size=4, sliding_layers=(4,)), "sliding_layers"),
                        (dict(window_size=-1, sliding_layers=()), "window_size")):
        with pytest.raises(ConfigError, match=f"config field '{field}'"):
            _gqa(over.get("window_size", 0), over.get("sliding_layers", ()))
    with pytest.raises(ConfigError, match="'sliding_layers': applies to gqa attention only"):
        preset("tiny", sliding_layers=(0,))


_CLASSES = {"mistral": MistralConfig, "mixtral": MixtralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
            "qwen3_moe": Qwen3MoeConfig}


def _random_config(rng: random.Random, mt: str) -> dict:
    n = rng.randint(1, 6)
    d = {"model_type": mt, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": n,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": rng.choice([64, 128])}
    if mt in ("mixtral", "qwen3_moe"):
        d.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    if rng.random() < 0.8:
        d["sliding_window"] = rng.choice([None, 1, 2, 5, 63, 64, 127, 128, 4096])
    if mt in ("qwen2", "qwen3", "qwen3_moe") and rng.random() < 0.8:
        d["use_sliding_window"] = rng.random() < 0.7
    if mt in ("qwen2", "qwen3") and rng.random() < 0.7:
        d["max_window_layers"] = rng.randint(0, n + 1)
    if mt in ("qwen2", "qwen3") and rng.random() < 0.4:
        d["layer_types"] = [rng.choice(["full_attention", "sliding_attention"]) for _ in range(n)]
    return d


def test_sliding_layers_are_read_as_transformers_config_classes_slide_them():
    """Random config files of the five families with sliding fields: flyer slides exactly the layers transformers
    5's classes do (``layer_types`` where the class has it, else every layer when ``sliding_window`` is set), by
    its window (none where it reaches past every position); a file listing sliding layers with a null window,
    which transformers cannot build a mask for, is one line naming ``layer_types``. A window past every position is
    kept: a longer row (``train --init --seq-len``) slides, as in transformers (below); one past any row flyer runs
    (``SIZE_LIMITS``) reads as none."""
    rng = random.Random(0)
    read = refused = sliding = 0
    for case in range(400):
        mt = rng.choice(list(_CLASSES))
        d = _random_config(rng, mt)
        ref = _CLASSES[mt](**{k: v for k, v in d.items() if k != "model_type"})
        types = getattr(ref, "layer_types", None) or ["sliding_attention"] * d["num_hidden_layers"]
        want = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if want and ref.sliding_window is None and getattr(ref, "layer_types", None) and "layer_types" in d:
            with pytest.raises(ConfigError, match="field 'layer_types'"):
                from_hf_config(d)
            refused += 1
            continue
        if ref.sliding_window is None:
            want = []
        got = from_hf_config(d)
        assert list(got.get("sliding_layers", ())) == want, (case, d)
        assert got.get("window_size", 0) == (ref.sliding_window if want else 0), (case, d)
        read, sliding = read + 1, sliding + bool(want)
    assert read > 300 and sliding > 100 and refused > 5
    d = _random_config(random.Random(1), "mistral")
    for window, kept in ((1 << 30, 1 << 30), ((1 << 30) + 1, 0)):  # past any row flyer runs: full attention
        assert from_hf_config({**d, "sliding_window": window}).get("window_size", 0) == kept


_DENSE = dict(n_routed_experts=0, n_dense_layers=4)  # tiny's 4 layers
_SOFTMAX_MOE = dict(n_routed_experts=4, n_activated_experts=2, n_shared_experts=0, n_expert_groups=1,
                    n_limited_groups=1, score_func="softmax", router_bias=False, route_scale=1.0, moe_inter_dim=16)
_ALL = (0, 1, 2, 3)


def _mistral(path, **config) -> MistralForCausalLM:
    """A random 2-layer Mistral (``config``: its window and context) saved with a tokenizer under ``path``."""
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          initializer_range=0.2, **config)).eval()
    hf.save_pretrained(path)
    make_tokenizer(path)
    return hf


def test_a_window_as_long_as_the_context_slides_a_longer_row(tmp_path):
    """Mistral with a window equal to max_position_embeddings: rows past it (a run's longer ``--seq-len``) slide as
    transformers' do (read as full attention, positions 16 on saw key 0 and the logits were 5 off)."""
    hf = _mistral(tmp_path, max_position_embeddings=16, sliding_window=16)
    model, cfg, _ = load_hf(tmp_path)
    assert (cfg.window_size, cfg.sliding_layers) == (16, (0, 1))
    x = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= decode_logit_bound(model, 40)


def test_a_window_of_one_decodes_as_transformers_forward_without_a_cache(tmp_path):
    """Window 1, each query seeing itself alone: ``generate``'s greedy tokens are those of transformers' forward over
    the whole row at each step (its own ``generate`` with a sliding cache disagrees with that forward here, 5.25)."""
    hf = _mistral(tmp_path, max_position_embeddings=256, sliding_window=1)
    prompt = [5, 17, 33, 90]
    row = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            row.append(int(hf(torch.tensor([row]), use_cache=False).logits[0, -1].argmax()))
    got = generate(load_hf(tmp_path)[0], [prompt], GenerationConfig(max_new_tokens=8, cache_dtype=torch.float32))
    assert got.tokens[0] == row[len(prompt):]


@pytest.mark.parametrize("over, model_type", [
    (dict(window_size=5, sliding_layers=_ALL, **_DENSE), "mistral"),
    (dict(window_size=5, sliding_layers=(1, 2), attn_bias=True, **_DENSE), "qwen2"),
    (dict(window_size=4, sliding_layers=(0, 3), qk_norm=True, **_DENSE), "qwen3"),
    (dict(window_size=6, sliding_layers=_ALL, n_dense_layers=0, **_SOFTMAX_MOE), "mixtral"),
    (dict(window_size=6, sliding_layers=_ALL, n_dense_layers=1, qk_norm=True, norm_topk_prob=False, **_SOFTMAX_MOE),
     "qwen3_moe"),
])
def test_export_writes_the_window_transformers_slides(tmp_path, over, model_type):
    """A sliding flyer model exports as the architecture that slides the same layers (a Llama sliding every layer:
    Mistral; Qwen2 and Qwen3 with layer_types): transformers' logits over a row past the window are flyer's, and
    flyer reads the export back as the same config."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=320, attn="gqa", n_kv_heads=2, head_dim=16, rope_type="default", rope_factor=1.0,
                 mscale=0.0, mtp_depth=0, init_std=0.1, **over)
    model = Transformer(cfg).eval()
    make_tokenizer(tmp_path / "tok")
    export_model(model, load_tokenizer(tmp_path / "tok", {}), tmp_path / "out", "fp32")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == model_type == hf_model_type(cfg)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - back(x).logits).abs().max() <= decode_logit_bound(model, 30)
    read = load_hf(tmp_path / "out")[1]
    assert (read.window_size, read.sliding_layers) == (cfg.window_size, cfg.sliding_layers)


@pytest.mark.parametrize("over, name", [
    (dict(window_size=5, sliding_layers=(1,), **_DENSE), "Llama or Mistral"),
    (dict(window_size=5, sliding_layers=(0, 1, 2), n_dense_layers=0, **_SOFTMAX_MOE), "Mixtral"),
    (dict(window_size=5, sliding_layers=_ALL), "GLM-4.5"),  # tiny's sigmoid router with its bias
])
def test_what_no_architecture_slides_is_one_line(tmp_path, over, name):
    """Sliding layers no transformers architecture of that kind slides: a ``ConfigError`` naming the field (the CLI's
    one line), before anything is written."""
    cfg = preset("tiny", attn="gqa", n_kv_heads=2, head_dim=32, mtp_depth=0, **over)
    with pytest.raises(ConfigError, match=f"'sliding_layers': a GQA model of this kind exports as {name}"):
        hf_model_type(cfg)
    make_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match="'sliding_layers'"):
        export_model(Transformer(cfg), load_tokenizer(tmp_path / "tok", {}), tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()
