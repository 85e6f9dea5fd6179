"""Decode edges a mutation sweep of ``flyer.infer.attention`` / ``decoder`` / ``cache`` found unpinned, and the FP8
absorbed decode's weight: a dense prefill chunk after the first, BF16 decode, chained MTP drafts, a batch shrunk
twice, padding that would land on a real token, an empty first row, the caches' bounds and refusals. Oracles: the
training path (within ``decode_logit_bound``), a row decoded alone, and the weight an FP8 layer's GEMMs see."""

from __future__ import annotations

import copy

import pytest
import torch

from bounds import decode_logit_bound
from flyer.config import preset
from flyer.errors import FieldError
from flyer.fp8 import convert_to_fp8
from flyer.infer import Decoder
from flyer.infer.attention import causal_slot_mask, dense_prefill_pays, dsa_gathered_core, mla_absorbed_core
from flyer.infer.cache import Fp8LatentCache, LatentCache
from flyer.infer.decoder import shrink_batch
from flyer.model.transformer import Transformer


def _model(**over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **over)).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def test_fp8_absorbed_decode_sees_the_weight_its_gemms_see():
    """Under ``--precision fp8`` wkv_b is an FP8 layer: the absorbed decode took its FP32 master weight while the
    gathered (DSA) decode and prefill see its dequantized 128x128 blocks, 3% of the output apart. Both take the
    dequantized weight now: equal, bit for bit, to the same attention with a plain layer holding that weight."""
    model = convert_to_fp8(_model())
    attn = model.layers[0].attn
    plain = copy.deepcopy(attn)
    plain.wkv_b = torch.nn.Linear(attn.kv_lora_rank, attn.wkv_b.out_features, bias=False)
    with torch.no_grad():
        plain.wkv_b.weight.copy_(attn.wkv_b.dequantized_weight())
    torch.manual_seed(1)
    B, T, S, H = 1, 2, 6, attn.n_heads
    q_nope, q_rope = torch.randn(B, T, H, attn.qk_nope_head_dim), torch.randn(B, T, H, attn.qk_rope_head_dim)
    kv = torch.randn(B, S, attn.kv_lora_rank + attn.qk_rope_head_dim)
    mask = causal_slot_mask(torch.tensor([[S - 2, S - 1]]), S)
    with torch.no_grad():
        got = mla_absorbed_core(attn, q_nope, q_rope, kv, mask)
        assert torch.equal(got, mla_absorbed_core(plain, q_nope, q_rope, kv, mask))
        one = mla_absorbed_core(attn, q_nope[:, 1:], q_rope[:, 1:], kv, mask[:, :, 1:])  # the last query alone
        every = torch.ones(B, 1, S, dtype=torch.bool)
        assert torch.equal(one, dsa_gathered_core(attn, q_nope[:, 1:], q_rope[:, 1:], kv.unsqueeze(1), every))
        assert not torch.equal(attn.wkv_b.weight, attn.wkv_b.dequantized_weight())  # the two weights differ


def test_a_dense_prefill_chunk_after_the_first_keeps_its_mask():
    """A 90-token chunk prefilled at slot 10 in the dense form attends causally over the cache (without its mask
    every query saw the whole chunk: 0.9 off)."""
    model = _model(kv_lora_rank=64)
    assert dense_prefill_pays(model.layers[0].attn, 90)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
        dec = Decoder(model, 2, 100, "absorbed", torch.float32)
        dec.forward(tokens[:, :10], torch.zeros(2, dtype=torch.long))
        got = dec.logits(dec.forward(tokens[:, 10:], torch.full((2,), 10)))
    assert _max_diff(got, ref[:, 10:]) <= decode_logit_bound(model, 100)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_bf16_decode_runs_and_gives_fp32_logits(mode):
    """A BF16 model decodes with a BF16 cache (the softmax's FP32 probabilities back in BF16 before their GEMM),
    its logits in FP32, within the n u bound of the FP32 training path for BF16's u (2^-8)."""
    model = _model()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)[:, -1]
        dec = Decoder(copy.deepcopy(model).bfloat16(), 2, 12, mode, torch.bfloat16)
        dec.forward(tokens[:, :11], torch.zeros(2, dtype=torch.long))
        got = dec.logits(dec.forward(tokens[:, 11:], torch.full((2,), 11)))[:, -1]
    assert got.dtype == torch.float32
    assert _max_diff(got, ref) <= decode_logit_bound(model, 12) * 2.0 ** 16  # FP32's u 2^-24 -> BF16's 2^-8


def test_a_chained_draft_is_not_normed_again(monkeypatch):
    """An MTP module's own output fed back (``from_main=False``, chained drafts) is not passed through the main
    model's final norm: it equals ``from_main=True`` with that norm the identity."""
    model = _model(mtp_depth=1)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # a uniform gain would cancel in the MTP's own norm
    h = torch.randn(1, 4, model.cfg.dim, generator=torch.Generator().manual_seed(0)) * 3
    tok, start = torch.randint(0, model.cfg.vocab_size, (1, 4)), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        chained = Decoder(model, 1, 8, "absorbed", torch.float32, with_mtp=True).mtp_forward(h, tok, start,
                                                                                             from_main=False)
        dec = Decoder(model, 1, 8, "absorbed", torch.float32, with_mtp=True)
        monkeypatch.setattr(model, "norm", torch.nn.Identity())
        assert torch.equal(chained, dec.mtp_forward(h, tok, start, from_main=True))


def test_a_batch_shrunk_twice_keeps_the_right_rows():
    """``shrink_batch`` after an earlier shrink: the live rows are by original index, the cache's by position."""
    class Caches:
        def keep_rows(self, rows):
            self.rows = rows

    caches = Caches()
    (kept,) = shrink_batch(caches, [2], [0, 2, 3], torch.tensor([10, 12, 13]))
    assert kept.tolist() == [12] and caches.rows.tolist() == [1]


def test_padding_that_would_overwrite_a_real_token_is_refused():
    """Row 0 has two real tokens at slots 6 and 7 of 8; its two padding positions, clamped into the cache, would
    land on slot 7's real token."""
    model = _model()
    dec = Decoder(model, 2, 8, "absorbed", torch.float32)
    with torch.no_grad():
        dec.forward(torch.randint(0, model.cfg.vocab_size, (2, 6)), torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="would overwrite a real token"):
            dec.forward(torch.randint(0, model.cfg.vocab_size, (2, 4)), torch.tensor([6, 2]), lengths=[2, 4])


def test_a_group_whose_first_row_is_empty():
    """A step whose first row has no real token: the other row's logits as it decoded alone."""
    model = _model()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dec = Decoder(model, 2, 8, "absorbed", torch.float32)
        both = dec.logits(dec.forward(tokens, torch.zeros(2, dtype=torch.long), lengths=[0, 3]))
        alone = Decoder(model, 1, 8, "absorbed", torch.float32)
        want = alone.logits(alone.forward(tokens[1:], torch.zeros(1, dtype=torch.long)))
    assert _max_diff(both[1:], want) <= decode_logit_bound(model, 3)


def test_the_mtp_cache_reports_its_own_bytes():
    dec = Decoder(_model(mtp_depth=1), 1, 8, "absorbed", torch.float32, with_mtp=True)
    assert dec.mtp_bytes_per_token() == dec.bytes_per_token() // dec.cfg.n_layers > 0


def test_cache_bounds_and_refusals():
    """Rows kept keep their lengths; a write at slot max_len is the cache's one-line error (an IndexError on the CPU,
    a device assert on a GPU); an FP8 cache needs a latent of a multiple of 4 and its latent and rope key together."""
    cache = LatentCache(1, 3, 4, 8, 4, torch.float32)
    cache.lengths.copy_(torch.tensor([3, 1, 2]))
    cache.keep_rows(torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [2, 3]
    with pytest.raises(ValueError, match="cache overflow"):
        LatentCache(1, 1, 4, 8, 4, torch.float32).write(0, torch.tensor([[4]]), latent=torch.ones(1, 1, 8),
                                                         rope_key=torch.ones(1, 1, 4))
    with pytest.raises(FieldError, match="cache_dtype"):
        Fp8LatentCache(1, 1, 4, 6, 4)
    with pytest.raises(ValueError, match="together"):
        Fp8LatentCache(1, 1, 4, 128, 64).write(0, torch.tensor([[0]]), latent=torch.ones(1, 1, 128))
