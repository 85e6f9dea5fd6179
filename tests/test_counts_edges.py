"""Parameter-count edges a mutation sweep of ``flyer.model.counts`` found unpinned, each closed form against the
count of a model built on the meta device: GQA's per-head norms and biases, the routed experts of the MTP blocks
too, and LongCat-Flash-style routing with more zero experts than picks."""

import pytest
import torch

from flyer.config import preset
from flyer.model.counts import activated_params_min, param_counts, routed_expert_params
from flyer.model.experts import Experts
from flyer.model.info import meta_counts
from flyer.model.transformer import Transformer


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
