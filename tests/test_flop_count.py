"""The FLOPs flyer counts (``flyer plan``, the trainer's MFU: ``flyer.model.counts``) against torch's own counter
(``torch.utils.flop_counter.FlopCounterMode``) on a real forward and backward of the model: its matmuls, the main
model's and the MTP modules', exactly. Attention's are left out of the comparison: the counter counts the
kernel's full S x S product (and its padded V) where the plan counts the causal half of the useful one."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, mm_flop, sdpa_backward_flop_count, sdpa_flop_count

from flyer.config import preset
from flyer.model import experts as experts_mod
from flyer.model.counts import (_block_non_matmul, attention_flops_per_token, mtp_training_flops_per_token,
                                param_counts, training_flops_per_token)
from flyer.model.indexer_loss import indexer_losses, set_indexer_training
from flyer.model.moe import MoE
from flyer.model.transformer import Transformer

aten = torch.ops.aten
B, T = 2, 48
# ops the counter has no formula for by default: the in-place addmm of the chunked loss's weight gradient, and the
# CPU flash attention (counted so that it can be told apart from the matmuls)
ATTENTION = (aten._scaled_dot_product_flash_attention_for_cpu,
             aten._scaled_dot_product_flash_attention_for_cpu_backward)
MAPPING = {aten.addmm_: lambda self_shape, a, b, *args, out_shape=None, **kw: mm_flop(a, b),
           ATTENTION[0]: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
           ATTENTION[1]: lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}


def non_matmul_params(cfg) -> int:
    """Norm weights, attention biases and the other parameters that are not GEMM operands: the final norm, hc_head's
    base and scale, and every main block's (``counts._block_non_matmul``)."""
    m = cfg.hc_mult
    return cfg.dim + (m + 1 if m > 1 else 0) + sum(_block_non_matmul(cfg, i) for i in range(cfg.n_layers))


def step_counter(cfg, monkeypatch, train: bool = True, indexer_train: str = "off",
                 seq_len: int = T) -> FlopCounterMode:
    """torch's FLOP counter over one FP32 step of ``cfg``'s model on B x ``seq_len`` tokens: forward and backward
    (``train``) or the forward alone without autograd, with the routed experts run one GEMM each
    (``expert_ffn_loop``: aten ops the counter sees, not flyer's fused kernel); DSA indexers trained as
    ``indexer_train`` trains them (their KL losses added to the loss, as the trainer adds them)."""
    def loop(self, x, counts):
        w1, w2, w3 = self.gemm_weights()
        return experts_mod.expert_ffn_loop(x, counts, w1, w2, w3, self.swiglu_limit)
    monkeypatch.setattr(experts_mod.Experts, "forward", loop)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    set_indexer_training(model, indexer_train)
    for m in model.modules():
        if isinstance(m, MoE):
            m.fuse_local = False
    tokens = torch.randint(0, cfg.vocab_size, (B, seq_len), generator=torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False, custom_mapping=MAPPING)
    with counter, torch.set_grad_enabled(train):
        loss = model.compute_loss(tokens, tokens).loss + sum(indexer_losses(model))
        if train:
            loss.backward()
    return counter


def _matmul_flops(cfg, monkeypatch) -> int:
    """torch's count of one FP32 training step's (forward and backward) FLOPs, attention's left out."""
    counter = step_counter(cfg, monkeypatch)
    counts = counter.get_flop_counts()["Global"]
    assert all(op in counts for op in ATTENTION)  # attention ran through the kernel left out below
    return counter.get_total_flops() - sum(counts[op] for op in ATTENTION)


@pytest.mark.parametrize("over", [{}, {"n_dense_layers": 2, "n_shared_experts": 2}, {"q_lora_rank": 0},
                                  {"attn": "gqa", "n_kv_heads": 1, "head_dim": 32, "qk_norm": True, "attn_bias": True},
                                  {"tie_embeddings": True}])
def test_matmul_flops_are_torchs_count(over, monkeypatch):
    """The main model's matmul FLOPs per token (the plan's, attention's apart: 6 x the activated GEMM parameters, the
    head's included, the embedding's not, the head's GEMM counted where it is the embedding's table) are torch's count
    exactly; each MTP module's add its block, projection and head's 6 x, on the row's positions that have a token two
    ahead."""
    base = preset("tiny", mtp_depth=0, **over)
    attention = sum(attention_flops_per_token(base, T, True, i) for i in range(base.n_layers))
    assert _matmul_flops(base, monkeypatch) == B * T * (training_flops_per_token(base, T) - 3 * attention)
    if not base.tie_embeddings:
        pc = param_counts(base)
        assert training_flops_per_token(base, T) - 3 * attention == 6 * (pc.activated - pc.embedding
                                                                          - non_matmul_params(base))
    mtp = base.replace(mtp_depth=1)
    extra = _matmul_flops(mtp, monkeypatch) - _matmul_flops(base, monkeypatch)
    # the module runs (and attends) over the T - 1 positions with a token two ahead
    attention = 3 * attention_flops_per_token(mtp, T - 1, causal=True, layer_id=mtp.n_layers) * (T - 1) / T
    assert extra == pytest.approx(B * T * (mtp_training_flops_per_token(mtp, T) - attention), rel=1e-12)
