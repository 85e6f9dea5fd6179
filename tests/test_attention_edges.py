"""MLA and Transformer edges a mutation sweep of ``flyer.model.attention`` / ``flyer.model.transformer`` found
unpinned: norms told apart by per-channel weights, the latent norms' eps against transformers, YaRN's softmax scale on
packed rows, the indexer key norm's eps and its score formula, V3's MTP reading the final-normed state, the MTP loss's
mean, a model materialised from meta, bool ids, values wider than keys, fewer keys than k. Oracles: transformers'
logits (within ``logit_tolerance``), each document run alone (``decode_logit_bound``), FP64 formulas within the FP32
sum bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from bounds import FP32_U, decode_logit_bound
from flyer.config import preset
from flyer.interop.hf import load_hf
from flyer.model.attention import Indexer, causal_attention, select_topk
from flyer.model.rope import rope_cos_sin
from flyer.model.transformer import Transformer
from tests.hf_models import add_mtp_layer, build, reference_mtp_logits
from tests.test_hf_mistral4 import logit_tolerance
from tests.test_qwen3 import rel


@pytest.mark.parametrize("name", ["v3", "qwen3"])
def test_logits_equal_transformers_with_every_norm_weight_per_channel(tmp_path, name):
    """transformers initialises every RMSNorm weight to ones, so the tiny checkpoints cannot tell the block's
    attention norm from its FFN norm (or either from the final norm, or the latent norms apart): give each norm
    its own per-channel weight, then flyer's logits must still equal transformers' (within ``logit_tolerance``)."""
    model = build(name, tmp_path)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
    model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    flyer_model, cfg, _ = load_hf(tmp_path)
    tokens = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
        assert rel(flyer_model(tokens), want) <= logit_tolerance(cfg, 24)


def test_latent_norms_use_eps_1e6_whatever_rms_norm_eps_says(tmp_path):
    """MLA's q/kv latent RMSNorms use eps 1e-6 (transformers' DeepseekV3 q_a_layernorm / kv_a_layernorm take the
    default, not rms_norm_eps, which the "v3" tiny config sets to 1e-5). With the tiny model's O(1) latents eps is
    invisible (~1e-5 relative), so shrink the latents' down-projections until the latents' mean square (~1e-6) is
    of eps's order: a latent norm at the wrong eps then moves the logits far past ``logit_tolerance``."""
    model = build("v3", tmp_path)
    assert model.config.rms_norm_eps == 1e-5
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_a_proj.weight.mul_(1e-3)
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(1e-3)
    model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    flyer_model, cfg, _ = load_hf(tmp_path)
    tokens = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(flyer_model(tokens), ref(tokens).logits) <= logit_tolerance(cfg, 24)


@pytest.mark.parametrize("over", [dict(), dict(attn="gqa", n_kv_heads=2, head_dim=16)])
def test_packed_rows_keep_yarns_softmax_mscale(over):
    """Packed documents (``documents_BT``) attend through ``Documents.attend``, a second call of causal_attention
    with its own scale argument: each document's logits must equal that document run alone. The suite's packed
    tests run at rope_factor 1, where softmax_scale is qk_head_dim^-0.5, SDPA's default; with YaRN (factor 4,
    mscale 1: scale x (0.1 ln 4 + 1)^2 = 1.30) a packed path that dropped the mscale would move the logits by
    O(1). Both sides FP32, summed in other orders: within ``decode_logit_bound``."""
    cfg = preset("tiny", rope_factor=4.0, original_seq_len=16, mscale=1.0, **over)
    d = cfg.qk_head_dim if cfg.attn == "mla" else cfg.head_dim
    assert cfg.softmax_scale > 1.25 * d ** -0.5
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(3, cfg.vocab_size, (1, n), generator=g) for n in (10, 14))
    tokens = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 10 + [1] * 14])
    with torch.no_grad():
        packed = model(tokens, docs)
        alone = torch.cat([model(a), model(b)], 1)
    assert float((packed - alone).abs().max()) <= decode_logit_bound(model, 24)


def test_indexer_key_layernorm_uses_eps_1e6():
    """DSA's index keys are LayerNorm(wk x) with eps 1e-6 (transformers' DeepseekV32Indexer.k_norm; DeepSeek's
    reference). The key channels past the rotary ones are not rotated, so they equal a plain F.layer_norm there.
    Inputs scaled so that wk x has a variance ~1e-6: a LayerNorm at torch's default 1e-5 is then off by ~2x. The
    oracle normalizes the module's own projection, so the two are the same FP32 operations, bit for bit."""
    cfg = preset("tiny", index_topk=4, index_n_heads=2, index_head_dim=32)
    assert cfg.qk_rope_head_dim < 32  # some channels pass unrotated
    torch.manual_seed(0)
    ix = Indexer(cfg)
    with torch.no_grad():
        for p in ix.parameters():
            p.normal_(0.0, 0.1)
        ix.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, cfg.dim) * 1e-3 / cfg.dim ** 0.5 * 10
    cos, sin = rope_cos_sin(cfg.rope_dim, 6, cfg, "cpu")
    got = ix.keys(x, cos, sin)[..., cfg.qk_rope_head_dim:]
    with torch.no_grad():
        projected = ix.wk(x)
        want = F.layer_norm(projected, (32,), ix.k_norm.weight, ix.k_norm.bias, eps=1e-6)
    assert projected.var(-1, unbiased=False).max() < 1e-5  # the regime where eps matters
    assert torch.equal(got, want[..., cfg.qk_rope_head_dim:])


def test_mtp_loss_is_lambda_over_depth_times_the_sum():
    """DeepSeek-V3 (eq. 25): L_MTP = lambda / D * sum_k L_MTP^k. At depth 2 a sum (or a last-module-only loss)
    differs from the mean. The loss is the same FP32 values combined: a few roundings (8 u)."""
    cfg = preset("tiny", mtp_depth=2, mtp_loss_weight=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(3, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        out = model.compute_loss(x, y)
    assert len(out.mtp_losses) == 2 and out.aux_loss is None and not out.indexer_losses
    assert abs(out.mtp_losses[0] - out.mtp_losses[1]) > 1e-3  # a sum and a mean, or either alone, differ
    want = out.main_loss + 0.3 * (out.mtp_losses[0] + out.mtp_losses[1]) / 2
    assert abs(float(out.loss) - float(want)) <= 8 * FP32_U * float(want)


def test_indexer_scores_are_transformers_formula():
    """Index scores I[t, s] = sum_h w_h(t) relu(q_h(t) . k(s) / sqrt(d_I)), w = weights_proj(x) / sqrt(H_I), as
    transformers' DeepseekV32Indexer (and DeepSeek's reference) compute them, written here in plain torch with the
    rotation made the identity (cos 1, sin 0). The selection alone cannot see a positive factor on every score, but
    the indexer's KL loss (a softmax of these scores) and the decode kernel's scores can. Oracle in FP64, within the
    FP32 bound of sums of d and H terms, n u of their absolute values."""
    cfg = preset("tiny", index_topk=4, index_n_heads=2, index_head_dim=16)
    torch.manual_seed(0)
    ix = Indexer(cfg)
    with torch.no_grad():
        for p in ix.parameters():
            p.normal_(0.0, 0.3)
    B, T, H, d = 2, 7, 2, 16
    x, ql = torch.randn(B, T, cfg.dim), torch.randn(B, T, cfg.q_lora_rank)
    cos, sin = rope_cos_sin(cfg.rope_dim, T, cfg, "cpu")
    cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    k = ix.keys(x, cos, sin)
    got = ix.scores(x, ql, k, cos, sin)
    q = (ql.double() @ ix.wq_b.weight.double().T).view(B, T, H, d)
    kr = k.double()  # the keys as flyer computed them (their norm is the test above's)
    s = torch.relu(torch.einsum("bthd,bsd->bths", q, kr) * d ** -0.5)
    w = (x.double() @ ix.weights_proj.weight.double().T) * H ** -0.5
    want = torch.einsum("bth,bths->bts", w, s)
    q_abs = (ql.double().abs() @ ix.wq_b.weight.double().abs().T).view(B, T, H, d)
    s_abs = torch.einsum("bthd,bsd->bths", q_abs, kr.abs()) * d ** -0.5
    w_abs = (x.double().abs() @ ix.weights_proj.weight.double().abs().T) * H ** -0.5
    bound = (cfg.q_lora_rank + cfg.dim + d + H + 8) * FP32_U * torch.einsum("bth,bths->bts", w_abs, s_abs)
    assert ((got.double() - want).abs() <= bound).all()


def test_v3_mtp_reads_the_final_normed_hidden_state_with_a_per_channel_norm(tmp_path):
    """V3's first MTP module takes the main model's final-normed h (transformers' last_hidden_state; DeepSeek's
    layout). Its own hnorm is an RMSNorm, and RMSNorm(RMSNorm(h)) == RMSNorm(h) when the final norm's weight is all
    ones (transformers' init): the existing MTP test cannot tell a skipped final norm. Per-channel final norm
    weights; within ``logit_tolerance``."""
    ref = build("v3", tmp_path)
    with torch.no_grad():
        gain = torch.rand(ref.model.norm.weight.shape, generator=torch.Generator().manual_seed(5))
        ref.model.norm.weight.copy_(gain * 1.5 + 0.25)
    ref.save_pretrained(tmp_path)
    w, layer = add_mtp_layer(ref, tmp_path)
    model, cfg, _ = load_hf(tmp_path)
    tokens = torch.randint(3, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    want = reference_mtp_logits(ref, w, layer, tokens)
    with torch.no_grad():
        h1 = model.mtp_hidden(model.hidden(tokens), tokens)[0]
        got = model.head(model.mtp[0].norm(h1))
    assert rel(got, want) <= logit_tolerance(cfg, 20)


@pytest.mark.parametrize("over", [dict(attn="gqa", n_kv_heads=2, head_dim=16, attn_bias=True),
                                  dict(index_topk=4, index_n_heads=2, index_head_dim=16)])
def test_init_weights_overwrites_every_tensor_of_a_model_materialised_from_meta(over):
    """A model built on the meta device and moved with to_empty holds uninitialised memory; ``init_weights`` must
    set every tensor: Linear biases (GQA's attn_bias) zero, norm weights one (and the indexer's LayerNorm bias
    zero), every buffer zero, and with the same generator the very weights of a model built directly. Built
    directly, biases and buffers are already zero, so the suite's fresh-model checks cannot see a skipped reset."""
    cfg = preset("tiny", **over)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(7.0) if t.is_floating_point() else t.fill_(7)
    model.init_weights(torch.Generator().manual_seed(0))
    fresh = Transformer(cfg)
    fresh.init_weights(torch.Generator().manual_seed(0))
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, m in fresh.named_modules():
        if isinstance(m, torch.nn.RMSNorm) or isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all(), name
        if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
            assert not m.bias.any(), name
    assert all(not b.any() for b in model.buffers())


def test_bool_token_ids_are_a_one_line_value_error():
    """Bool ids are refused as the float and 1-D ones are (``last_residual``'s check), not left to nn.Embedding."""
    model = Transformer(preset("tiny"))
    bad = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"tokens_BT: \(B, T\) integer token ids"):
        model(bad)


def test_causal_attention_with_values_wider_than_keys_is_plain_softmax_attention():
    """``causal_attention`` zero-pads q and k when the value head is wider (dv > dk): the padding must be zeros
    after the real channels of both, so q.k is unchanged. Oracle: softmax(q k^T scale + causal) v in FP64; FP32's
    error there: each score off by dk u of its terms' absolute sum, moving a probability by that relatively (twice,
    through the normalization), and the weighted sum of S values S u."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, d, generator=g) for d in (8, 8, 12))
    got = causal_attention(q, k, v, 0.4)
    causal = ~torch.ones(6, 6, dtype=torch.bool).tril()
    s = (torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * 0.4).masked_fill(causal, float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v.double())
    s_abs = torch.einsum("bthd,bshd->bhts", q.double().abs(), k.double().abs()) * 0.4
    bound = float(v.abs().max()) * (2 * 8 * FP32_U * float(s_abs.max()) + (2 * 6 + 8) * FP32_U)
    assert got.shape == want.shape and float((got.double() - want).abs().max()) <= bound


def test_select_topk_with_fewer_keys_than_k_selects_every_visible_one():
    """With fewer keys than k (a short row, few compressed entries) every visible key is selected, and no other."""
    scores = torch.tensor([[[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]]])
    visible = torch.tensor([[[True, True, False], [True, True, True]]])
    assert torch.equal(select_topk(scores, visible, 5), visible)
