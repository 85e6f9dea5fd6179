"""Parameter and FLOP-count edges a mutation sweep of ``flyer.model.counts`` found unpinned, each closed form against
an oracle written apart from it: the count of a model built on the meta device (GQA's per-head norms and biases,
the routed experts of the MTP blocks, LongCat-Flash-style routing with more zero experts than picks, the parameters
no GEMM takes), torch's FLOP counter on real steps (GLM-5's shared indexer layers, DeepSeek-V4's MTP projections,
causal attention in the MFU numerator), and the bytes of real FP4 index rows."""

import pytest
import torch
import torch.nn.functional as F

from flyer.config import preset
from flyer.fp8.fp4 import UE8M0_BIAS, pack_e2m1
from flyer.infer import hybrid_index_fp4
from flyer.model.counts import (_block_non_matmul, activated_params_min, attention_flops_per_token,
                                block_params, mtp_training_flops_per_token, param_counts, routed_expert_params,
                                training_flops_per_token, v4_index_fp4_row_bytes)
from flyer.model.experts import Experts
from flyer.model.info import meta_counts
from flyer.model.transformer import Transformer
from flyer.train.metrics import model_flops_per_token
from test_flop_count import ATTENTION, B, T, non_matmul_params, step_counter


@pytest.mark.parametrize("over", [{"qk_norm": True}, {"attn_bias": True}, {"qk_norm": True, "attn_bias": True}])
def test_gqa_counts_match_the_meta_model(over):
    """GQA's per-head q/k norms and biases (no preset has qk_norm): the closed form equals the built model's count.
    Mutant C3 (head_norms = cfg.head_dim)."""
    cfg = preset("tiny", attn="gqa", n_kv_heads=1, head_dim=32, mtp_depth=0, **over)
    assert param_counts(cfg) == meta_counts(cfg)


def test_routed_expert_params_are_the_experts_of_the_main_and_mtp_blocks():
    """The share expert parallelism splits (``flyer.train.build``): every routed expert's weights, the MTP modules'
    included, counted on the built model. Mutant C15 (main blocks only)."""
    for cfg in (preset("tiny"), preset("tiny", mtp_depth=2), preset("tiny-v4", vocab_size=512)):
        assert cfg.mtp_depth > 0
        with torch.device("meta"):
            model = Transformer(cfg)
        routed = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
        assert routed_expert_params(cfg) == routed


def test_activated_min_with_more_zero_experts_than_picks():
    """LongCat-Flash-like routing with Z > K zero experts: the fewest FFN experts a token runs is 0 (all K picks
    zero experts), not K - Z; the count is the built model's activated count less each MoE layer's K experts.
    Mutant C18 (skipped = n_zero_experts)."""
    cfg = preset("tiny", n_zero_experts=8, n_expert_groups=1, n_limited_groups=1, mtp_depth=0)
    K = cfg.n_activated_experts
    assert cfg.n_zero_experts > K
    with torch.device("meta"):
        model = Transformer(cfg)
    skipped = sum(K * sum(w[0].numel() for w in (m.w1, m.w2, m.w3))
                  for m in model.modules() if isinstance(m, Experts))
    assert activated_params_min(cfg) == meta_counts(cfg).activated - skipped


DSA = dict(index_topk=8, index_n_heads=2, index_head_dim=16)  # index_topk < T: the indexer selects


def test_shared_indexer_layers_score_nothing(monkeypatch):
    """GLM-5's shared DSA layers (``indexer_types`` "shared") reuse another layer's selection: no indexer
    projections and no scoring of keys. torch's count of the forward of a model whose every layer has its
    indexer, less that of the same model with two layers shared, is those two indexers' work (the counter counts
    their full T x T score products: the non-causal count). Frozen, the indexers run forward only: a training
    step's difference is the same, and so is the plan's."""
    full = preset("tiny", mtp_depth=0, **DSA)
    shared = full.replace(indexer_types=("full", "shared", "full", "shared"))
    fwd, trained = ((step_counter(full, monkeypatch, train=t).get_total_flops()
                     - step_counter(shared, monkeypatch, train=t).get_total_flops()) for t in (False, True))
    plan = training_flops_per_token(full, T, causal=False) - training_flops_per_token(shared, T, causal=False)
    assert fwd > 0 and trained == fwd and B * T * plan == fwd


def test_v4_mtp_projection_flops_are_torchs_count(monkeypatch):
    """DeepSeek-V4's MTP module projects the embedding (e_proj, D x D) and each of the m hyper-connection streams
    (h_proj, m D x D): (1 + m) D^2 weights, not V3's 2 D^2, and collapses its streams with its own hc_head (fn:
    m x m D). torch's count of those three modules over a training step (on the T - 1 positions with a token two
    ahead) is the plan's MTP FLOPs less its block, head and attention terms (over those T - 1 positions)."""
    cfg = preset("tiny-v4")
    assert cfg.hc_mult > 2 and cfg.mtp_depth == 1
    counts = step_counter(cfg, monkeypatch, train=True).get_flop_counts()
    counted = sum(sum(counts[f"HyperMTPModule.{name}"].values()) for name in ("e_proj", "h_proj", "hc_head"))
    n = cfg.n_layers
    block = block_params(cfg, n, activated=True) - _block_non_matmul(cfg, n)
    attn = attention_flops_per_token(cfg, T - 1, causal=True, layer_id=n)
    rest = (T - 1) / T * 3 * (2 * (block + cfg.vocab_size * cfg.dim) + attn)
    assert B * T * (mtp_training_flops_per_token(cfg, T) - rest) == pytest.approx(counted, rel=1e-12)


@pytest.mark.parametrize("over", [DSA, dict(DSA, indexer_types=("full", "shared", "full", "shared")), {},
                                  {"attn": "gqa", "n_kv_heads": 1, "head_dim": 32, "qk_norm": True, "attn_bias": True}])
def test_non_matmul_params_are_the_models_vectors(over):
    """The parameters the FLOP count leaves out (no GEMM operand: norm weights, the DSA indexer's k_norm weight and
    bias, GQA's biases and head norms) are exactly the main model's 1-D parameters, counted on the meta device."""
    cfg = preset("tiny", mtp_depth=0, **over)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert non_matmul_params(cfg) == sum(p.numel() for p in model.parameters() if p.ndim == 1)


@pytest.mark.parametrize("di", [8, 32, 40, 64, 72, 128])
def test_v4_index_fp4_row_bytes_are_the_rows_bytes(di):
    """A row holds di E2M1 codes two to a byte and one UE8M0 scale byte per tile of 32 channels, a partial tile's
    included: the bytes of the real tensors quantized from a row (zero-padded to whole tiles, which leaves each
    tile's scale as the row's values set it), and of ``pack_rows``' row where di is a whole number of tiles."""
    TILE = hybrid_index_fp4.TILE
    x = torch.randn(3, di, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (0, -di % TILE))
    codes, exps = hybrid_index_fp4.quantize(padded)
    row = pack_e2m1(codes[..., :di]), (exps + UE8M0_BIAS).to(torch.uint8)
    assert v4_index_fp4_row_bytes(di) == sum(t[0].nbytes for t in row)
    if di % TILE == 0 and di & (di - 1) == 0:
        packed = hybrid_index_fp4.pack_rows(x, hybrid_index_fp4.rotation(di, x.device))
        assert packed.dtype == torch.uint8 and packed.shape[-1] == v4_index_fp4_row_bytes(di)


def test_model_flops_per_token_count_causal_attention(monkeypatch):
    """The trainer's MFU numerator (main model, MTP excluded here) is torch's count of a training step's matmuls
    plus 3 x the attention kernel's forward count halved: the kernel computes the full T x T product, a causal
    query uses its half (v_head_dim = qk_head_dim: the kernel pads no V). 3 x forward, as the plan counts
    training: the counter's own backward count adds a recomputation of the scores (2 T^2 qk_head_dim per head)."""
    cfg = preset("tiny", mtp_depth=0, v_head_dim=48)
    assert cfg.qk_head_dim == cfg.v_head_dim
    counter = step_counter(cfg, monkeypatch, train=True)
    counts = counter.get_flop_counts()["Global"]
    matmuls = counter.get_total_flops() - sum(counts[op] for op in ATTENTION)
    assert B * T * model_flops_per_token(cfg, T) == matmuls + 3 * counts[ATTENTION[0]] // 2
