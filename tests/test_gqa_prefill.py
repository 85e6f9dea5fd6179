"""GQA attention against a decode cache for more than one new token (prefill chunks, MTP drafts): one fused
attention (``flyer.infer.attention._fused_grouped``: SDPA reading the KV heads grouped, or each head its KV head's copy
where the expert threads split heads) within the FP32 bound of the exact sums, never the eager (H x T x S) scores;
a prompt's first chunk causal, a sliding layer's in windowed chunks (``windowed_attention``)."""

import pytest
import torch
from bounds import FP32_U, decode_logit_bound

from flyer import kernels
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, attention, generate
from flyer.infer.attention import Rows, _fused_grouped, causal_slot_mask
from flyer.infer.decoder import Decoder
from flyer.model.transformer import Transformer


def _exact(q, k, v, visible, scale):
    """(exact attention (B, T, H, d) in FP64, the bound on an FP32 evaluation's error): a score is d products and a
    scaling, off by (d + 1) u of its absolute terms, which moves each probability by at most 2 max|score error| of
    itself; the output sums S keys, and an online softmax rescales its running sums at most once per key."""
    group = q.shape[2] // k.shape[1]
    qd = q.double().transpose(1, 2)
    kd, vd = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = qd @ kd.transpose(-1, -2) * scale
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    a = scale * (qd.abs() @ kd.abs().transpose(-1, -2))
    d_max = ((q.shape[-1] + 1) * FP32_U * a).masked_fill(~visible, 0).amax(-1, keepdim=True)
    S = k.shape[2]
    bound = (2 * d_max + (2 * S + 16) * FP32_U) * (p @ vd.abs())
    return (p @ vd).transpose(1, 2), bound.transpose(1, 2)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_the_fused_grouped_attention_is_each_querys_within_the_fp32_bound(monkeypatch, split, group):
    """Causal from slot 0 (no mask: ATen's causal kernel) and rows at other positions (their mask), each KV head
    serving ``group`` query heads, on torch's thread or split over the expert threads (forced either way)."""
    monkeypatch.setattr(kernels, "splits", lambda: split)
    torch.manual_seed(0)
    B, T, Hkv, d, S = 2, 24, 2, 16, 40
    q = torch.randn(B, T, Hkv * group, d) * 3
    k, v = torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    pos = torch.arange(S - T, S).expand(B, T).clone()
    pos[1] -= 5
    for mask, kk, vv in ((None, k[:, :, :T], v[:, :, :T]), (causal_slot_mask(pos, S), k, v)):
        visible = causal_slot_mask(torch.arange(T).expand(B, T), T) if mask is None else mask
        with torch.no_grad():
            assert kernels.attention_splits(q.transpose(1, 2), q, q) == (split and kernels.cpu_ops() is not None)
            got = _fused_grouped(q, kk, vv, mask, d ** -0.5, group).view(B, T, Hkv * group, d)
        exact, bound = _exact(q, kk, vv, visible, d ** -0.5)
        assert ((got.double() - exact).abs() <= bound).all()


def _gqa(window: int = 0) -> Transformer:
    sliding = dict(window_size=window, sliding_layers=(0, 1)) if window else {}
    torch.manual_seed(1)
    return Transformer(preset("tiny", vocab_size=64, attn="gqa", n_kv_heads=2, head_dim=32, **sliding)).eval()


@pytest.mark.parametrize("window", [0, 5, 100])
def test_prefill_chunks_attend_fused_and_decode_steps_eagerly(monkeypatch, window):
    """A whole prompt (causal; a sliding layer's band in windowed chunks where the window is shorter), a later
    chunk and decode steps give the training forward's logits within the bound, and only the decode steps (one
    token) score eagerly."""
    model = _gqa(window)
    calls = {"eager": [], "windowed": 0}
    eager, windowed = attention._grouped_attention, attention.windowed_attention

    def counted_eager(q, *args):
        calls["eager"].append(q.shape[1])
        return eager(q, *args)

    def counted_windowed(*args):
        calls["windowed"] += 1
        return windowed(*args)

    monkeypatch.setattr(attention, "_grouped_attention", counted_eager)
    monkeypatch.setattr(attention, "windowed_attention", counted_windowed)
    row = torch.randint(0, 64, (1, 48))
    with torch.no_grad():
        want = model.head(model.norm(model.hidden(row)))
    # a later chunk within the window's reach of slot 0 reads every slot, its window masked
    for steps in ([(0, 30), (30, 46), (46, 47), (47, 48)], [(0, 3), (3, 48)]):
        dec = Decoder(model, 1, 48, cache_dtype=torch.float32)
        got = torch.cat([dec.forward(row[:, s:e], torch.tensor([s])) for s, e in steps], 1)
        with torch.no_grad():
            assert (model.head(model.norm(got)) - want).abs().max() <= decode_logit_bound(model, 48), steps
    assert calls["eager"] == [1] * (2 * model.cfg.n_layers)
    assert calls["windowed"] == (len(model.cfg.sliding_layers) if window == 5 else 0)  # 30 tokens > 5 only


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_a_prompts_first_chunk_makes_no_mask(monkeypatch, attn):
    """The causal mask (T x n_slots bools, the square of a whole prompt) is made only where an attention reads it,
    once per forward: not for a prompt's first chunk (its fused attention is causal); for a later GQA chunk (an MLA
    one the CPU kernel reads by position, where it runs, makes none)."""
    torch.manual_seed(0)
    # MLA with a latent wide enough that 60 queries take the compute-bound form (``dense_prefill_pays``)
    model = _gqa() if attn == "gqa" else Transformer(preset("tiny", vocab_size=64, kv_lora_rank=128)).eval()
    made, init = [], Rows.__init__

    def kept(self, *args, **kw):
        init(self, *args, **kw)
        made.append(self)

    monkeypatch.setattr(Rows, "__init__", kept)
    dec = Decoder(model, 1, 64, cache_dtype=torch.float32)
    row = torch.randint(0, 64, (1, 64))
    dec.forward(row[:, :60], torch.tensor([0]))
    assert len(made) == 1 and made[0].given_mask is None
    if attn == "gqa":
        made.clear()
        monkeypatch.setattr(attention, "causal_slot_mask", lambda *a: made_masks.append(a) or causal_slot_mask(*a))
        made_masks = []
        dec.forward(row[:, 60:63], torch.tensor([60]))
        assert made[0].given_mask.shape == (1, 1, 3, 63) and len(made_masks) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("masked", [False, True])
def test_the_fused_grouped_attention_on_cuda_is_each_querys_within_the_fp32_bound(masked):
    """On CUDA (each head its KV head's copy where a mask is given, for the memory-efficient kernel; SDPA grouped
    for causal), FP32, against the exact sums."""
    torch.manual_seed(0)
    B, T, Hkv, group, d, S = 2, 24, 2, 4, 16, 40
    q = torch.randn(B, T, Hkv * group, d, device="cuda") * 3
    k, v = torch.randn(B, Hkv, S, d, device="cuda"), torch.randn(B, Hkv, S, d, device="cuda")
    pos = torch.arange(S - T, S, device="cuda").expand(B, T).clone()
    pos[1] -= 5
    mask, kk, vv = (causal_slot_mask(pos, S), k, v) if masked else (None, k[:, :, :T], v[:, :, :T])
    visible = mask if masked else causal_slot_mask(torch.arange(T, device="cuda").expand(B, T), T)
    with torch.no_grad():  # FP32 (TF32 is off unless a user turns it on)
        got = _fused_grouped(q, kk, vv, mask, d ** -0.5, group).view(B, T, Hkv * group, d)
    exact, bound = _exact(q.cpu(), kk.cpu(), vv.cpu(), visible.cpu(), d ** -0.5)
    assert ((got.cpu().double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("name, speculative", [("tiny", "mtp"), ("gqa", None), ("tiny-v4", "mtp"), ("dsa", None)])
def test_generate_prefills_in_chunks_as_it_does_whole(monkeypatch, name, speculative):
    """``GenerationConfig.prefill_chunk``: prompts of different lengths (a short one has no tokens in the later
    chunks) fed 7 positions a forward, the MTP module's cache too, give the first logits of the whole prompts in one
    forward within the bound, and the same greedy tokens; no forward takes more than 7 positions."""
    over = {"gqa": dict(attn="gqa", n_kv_heads=2, head_dim=32), "dsa": dict(index_topk=8)}.get(name, {})
    torch.manual_seed(2)
    model = Transformer(preset("tiny-v4" if name == "tiny-v4" else "tiny", vocab_size=64, **over)).eval()
    prompts = [[(3 + 5 * i) % 64 for i in range(n)] for n in (30, 4, 17)]
    widths, mtp_widths = [], []
    forward, mtp_forward = Decoder.forward, Decoder.mtp_forward

    def counted(self, tokens, start, lengths=None):
        widths.append((tokens.shape[1], lengths))
        return forward(self, tokens, start, lengths)

    def mtp_counted(self, h, tokens, *args, **kw):
        mtp_widths.append(tokens.shape[1])
        return mtp_forward(self, h, tokens, *args, **kw)

    runs = {}
    for chunk in (7, 256):
        gen = GenerationConfig(max_new_tokens=6, cache_dtype=torch.float32, speculative=speculative,
                               prefill_chunk=chunk)
        widths.clear()
        mtp_widths.clear()
        monkeypatch.setattr(Decoder, "forward", counted)
        monkeypatch.setattr(Decoder, "mtp_forward", mtp_counted)
        runs[chunk] = generate(model, prompts, gen)
        monkeypatch.setattr(Decoder, "forward", forward)
        monkeypatch.setattr(Decoder, "mtp_forward", mtp_forward)
        if chunk == 7:
            # each row's real tokens per chunk (none once its own end), then the decode steps
            assert widths[:5] == [(7, [7, 4, 7]), (7, [7, 0, 7]), (7, [7, 0, 3]), (7, [7, 0, 0]), (2, [2, 0, 0])]
            # its MTP entries (positions 0 .. 28: each needs the next token) in chunks too
            assert mtp_widths[:5] == ([7, 7, 7, 7, 1] if speculative else [])
    whole, chunked = runs[256], runs[7]
    assert (whole.first_logits - chunked.first_logits).abs().max() <= decode_logit_bound(model, 30)
    assert whole.tokens == chunked.tokens


def test_a_prefill_chunk_under_one_is_refused_naming_it():
    with pytest.raises(FieldError, match="prefill_chunk"):
        GenerationConfig(prefill_chunk=0).validate()
