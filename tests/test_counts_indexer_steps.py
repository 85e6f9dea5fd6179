"""The DSA indexer's FLOP counts (``flyer.model.counts.layer_flops_per_token`` by ``--indexer-train`` mode) against
torch's FLOP counter on real FP32 steps of tiny models, comparing differences (of modes, or of configs) that isolate
the indexer's terms exactly, and DeepSeek-V4's attended keys against the real forward's visibility masks.

Terms torch counts that the plan leaves out as recomputation (``layer_flops_per_token``'s docstring), written out by
hand so that the comparisons are exact:
- ``_mla_target``: L_I's target (``indexer_loss._target``), the main attention's scores again in the absorbed
  form: 2 H nope kv_lora_rank per query (q_nope W_UK) and 2 H (kv_lora_rank + rope) per scored key;
- ``_v4_target``: a CSA layer's (``hybrid_indexer_loss._target``): 2 H head_dim per band key and per entry;
- L_I's forward of the indexer apart from the selection, where one ran (2 x its GEMM weights, its scores over the
  attended keys);
- ``_keys_again``: L_I's keys' projections, forward again in backward (DSA's wk, a CSA indexer's compressor wkv and
  wgate of 2 index_head_dim channels each)."""

import pytest
import torch

import flyer.model.hybrid as hybrid
from flyer.config import preset
from flyer.model.counts import (_attention, compress_ratio, indexer_matmul_params, layer_flops_per_token,
                                mtp_training_flops_per_token, training_flops_per_token)
from flyer.model.hybrid_chunks import Gathered
from flyer.model.indexer_loss import set_indexer_training
from flyer.model.transformer import Transformer
from test_flop_count import ATTENTION, B, T, step_counter

DSA = dict(index_n_heads=2, index_head_dim=16, v_head_dim=48)  # v = qk: the attention kernel pads no V


def _no_attention(cfg, monkeypatch, mode: str = "off") -> int:
    """torch's count of one FP32 training step less the attention kernel's (forward and backward)."""
    c = step_counter(cfg, monkeypatch, train=True, indexer_train=mode)
    g = c.get_flop_counts()["Global"]
    return c.get_total_flops() - sum(g.get(op, 0) for op in ATTENTION)


def _per_key(cfg) -> int:
    return 2 * cfg.index_n_heads * (cfg.index_head_dim + 1)


def _mla_target(cfg, keys: int) -> int:
    """Per query: L_I's target over ``keys`` keys (absorbed scores; see the module docstring)."""
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.n_heads * (cfg.qk_nope_head_dim * cfg.kv_lora_rank + latent * keys)


def _keys_again(cfg) -> int:
    """Per token of each indexed layer: its keys' projections forward again in backward."""
    return 2 * cfg.dim * cfg.index_head_dim * (2 * 2 if cfg.attn == "hybrid" else 1)


def _recomputed(cfg, layer: int, picks: int) -> int:
    """Per query: L_I's forward of the indexer again after a selection: its GEMMs and its scores over the picks."""
    return 2 * indexer_matmul_params(cfg, layer) + _per_key(cfg) * picks


@pytest.mark.parametrize("topk", [64, 8])  # 64 >= T: nothing selected (dense L_I); 8: a selection, masked form
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_mla_modes_against_torch(topk, mode, monkeypatch):
    """A step in ``mode`` less an "off" step (the attention kernel apart) is the plan's non-causal difference (its
    attention-core passes apart) plus L_I's target and, after a selection, L_I's forward again: the indexer's
    projections forward and weight gradient, L_I's scores forward and backward (3 x, dense) or backward (2 x after
    a selection), and the warm-up's frozen model forward only."""
    cfg = preset("tiny", index_topk=topk, mtp_depth=0, **DSA)
    got = _no_attention(cfg, monkeypatch, mode) - _no_attention(cfg, monkeypatch)
    core = sum(_attention(cfg, T, False, i, dense=False).core for i in range(cfg.n_layers))
    dense = sum(_attention(cfg, T, False, i, dense=True).core for i in range(cfg.n_layers))
    plan = training_flops_per_token(cfg, T, False, mode) - training_flops_per_token(cfg, T, False)
    plan -= (dense if mode == "warmup" else 3 * core) - 3 * core
    selects = mode == "sparse" and topk < T
    extra = cfg.n_layers * (_mla_target(cfg, topk if selects else T) + (_recomputed(cfg, 0, topk) if selects else 0)
                            + _keys_again(cfg))
    assert got == B * T * (plan + extra)


@pytest.mark.parametrize("mode", ["off", "sparse", "warmup"])
def test_glm5_shared_layers_train_no_indexer(mode, monkeypatch):
    """GLM-5's shared layers have no indexer in any mode: a model whose every layer has its own less one with two
    shared is the plan's non-causal difference, plus those two indexers' L_I targets and recomputation."""
    full = preset("tiny", index_topk=8, mtp_depth=0, **DSA)
    shared = full.replace(indexer_types=("full", "shared", "full", "shared"))
    got = (step_counter(full, monkeypatch, True, mode).get_total_flops()
           - step_counter(shared, monkeypatch, True, mode).get_total_flops())
    plan = training_flops_per_token(full, T, False, mode) - training_flops_per_token(shared, T, False, mode)
    extra = 0 if mode == "off" else 2 * (_mla_target(full, T if mode == "warmup" else 8)
                                         + (_recomputed(full, 0, 8) if mode == "sparse" else 0) + _keys_again(full))
    assert got == B * T * (plan + extra)


@pytest.mark.parametrize("mode", ["off", "sparse", "warmup"])
def test_mtp_blocks_with_indexers_at_their_own_length(mode, monkeypatch):
    """MTP modules with DSA indexers (depth 2): the model with them less one without (the kernel apart) is, per module
    k, B (T - k) x [passes x 2 (projection + head) + its block's ``layer_flops_per_token`` at length T - k, non-causal
    (its core apart)] with L_I's target and recomputation: the warm-up freezes the projections and head, and the
    block's indexer trains as a main one's."""
    base = preset("tiny", index_topk=8, mtp_depth=0, **DSA)
    mtp = base.replace(mtp_depth=2)
    n, passes = base.n_layers, 1 if mode == "warmup" else 3
    got = _no_attention(mtp, monkeypatch, mode) - _no_attention(base, monkeypatch, mode)
    want = 0
    for k in (1, 2):
        S = T - k
        block = layer_flops_per_token(mtp, S, n, False, mode) - passes * _attention(mtp, S, False, n,
                                                                                   mode == "warmup").core
        extra = 0 if mode == "off" else _mla_target(mtp, S if mode == "warmup" else 8) + (
            _recomputed(mtp, n, 8) if mode == "sparse" else 0) + _keys_again(mtp)
        want += B * S * (passes * 2 * (2 * mtp.dim ** 2 + mtp.vocab_size * mtp.dim) + block + extra)
    assert got == want


def test_an_mtp_block_selects_at_its_own_length(monkeypatch):
    """At T = index_topk + 1 the main layers select, but MTP module 1 runs on T - 1 = index_topk positions: its
    indexer never runs (torch counts nothing under the MTP block's indexer), and the plan counts none."""
    cfg = preset("tiny", index_topk=T - 1, mtp_depth=1, **DSA)
    counts = step_counter(cfg, monkeypatch, train=True).get_flop_counts()
    assert not sum(sum(v.values()) for k, v in counts.items() if k.startswith("MTPModule.block.attn.indexer"))
    assert any(sum(v.values()) for k, v in counts.items() if k.startswith("Block.attn.indexer"))
    unselecting = cfg.replace(index_topk=T + 16)  # the same MTP block, selecting at no length here
    assert mtp_training_flops_per_token(cfg, T) == mtp_training_flops_per_token(unselecting, T)


def _v4_target(cfg, T_: int) -> int:
    """Per query of each CSA layer: L_I's target over the window band (the whole row, one chunk) and the entries, and
    its keys' projections again."""
    return sum(2 * cfg.n_heads * cfg.head_dim * (T_ + T_ // cfg.csa_ratio) + _keys_again(cfg)
               for i in range(cfg.n_layers) if cfg.is_csa(i))


@pytest.mark.parametrize("T_", [48, 96])  # CSA entries 12 (<= index_topk 16: no selection) and 24 (selects)
def test_v4_sparse_against_torch(T_, monkeypatch):
    """DeepSeek-V4 (tiny-v4, its MTP module included): a sparse step less an "off" step is the plan's non-causal
    difference plus, per CSA layer, L_I's target, the masked form's scores of the unselected entries (3 x, forward
    and backward, N - k a query: they are masked, not skipped) and, after a selection, L_I's forward again."""
    cfg = preset("tiny-v4")
    got = (step_counter(cfg, monkeypatch, True, "sparse", T_).get_total_flops()
           - step_counter(cfg, monkeypatch, True, "off", T_).get_total_flops())
    plan = (training_flops_per_token(cfg, T_, False, "sparse") - training_flops_per_token(cfg, T_, False)
            + mtp_training_flops_per_token(cfg, T_, "sparse") - mtp_training_flops_per_token(cfg, T_))
    k, N, extra = cfg.index_topk, T_ // cfg.csa_ratio, _v4_target(cfg, T_)
    for i in range(cfg.n_layers):
        if cfg.is_csa(i):
            extra += 3 * _per_key(cfg) * (N - min(k, N)) + (_recomputed(cfg, i, k) if N > k else 0)
    assert got == B * T_ * (plan + extra)


def test_v4_warmup_is_the_frozen_forward_plus_the_loss(monkeypatch):
    """DeepSeek-V4 (tiny-v4, T = 48: 12 entries, none selected in "off"): a warm-up step is a third of an "off"
    step (the frozen model and MTP module forward only, attending to every complete entry as "off" does at this
    length) plus the CSA indexers' L_I: the plan's warm-up less a third of its "off", and L_I's target."""
    cfg = preset("tiny-v4")
    off = step_counter(cfg, monkeypatch, True, "off").get_total_flops()
    warm = step_counter(cfg, monkeypatch, True, "warmup").get_total_flops()
    plan = (training_flops_per_token(cfg, T, False, "warmup") + mtp_training_flops_per_token(cfg, T, "warmup")
            - (training_flops_per_token(cfg, T, False) + mtp_training_flops_per_token(cfg, T)) / 3)
    assert warm - off / 3 == pytest.approx(B * T * (plan + _v4_target(cfg, T)), rel=1e-12)


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("T_", [48, 101])
@pytest.mark.parametrize("mode", ["off", "warmup"])
def test_hybrid_attended_keys_are_the_masks(mode, T_, chunk, monkeypatch):
    """``_hybrid_attention``'s core is exact: per layer, core x T / (2 H 2 head_dim) is the number of (query, key)
    pairs the real forward lets attend (window tokens and the selected, or all, complete entries, summed over its
    chunks' visibility masks or gathered picks), chunked or not, T a multiple of the ratios or not."""
    seen, attend = [], hybrid.chunked_attention

    def record(fn, plan, q, kv, entries, visible, params=()):
        seen.append(sum(int(m.band[0].sum() + (m.picks[0] >= 0).sum()) if isinstance(m, Gathered)
                        else int(m[0].sum()) for m in visible))
        return attend(fn, plan, q, kv, entries, visible, params)

    monkeypatch.setattr(hybrid, "chunked_attention", record)
    if chunk:
        monkeypatch.setattr(hybrid, "query_chunk", lambda *a, **kw: chunk)
    cfg = preset("tiny-v4", mtp_depth=0, index_topk=4)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    set_indexer_training(model, mode)
    tokens = torch.randint(0, cfg.vocab_size, (1, T_))
    with torch.no_grad():
        model.compute_loss(tokens, tokens)
    plan = [_attention(cfg, T_, True, i, dense=mode == "warmup").core * T_ / (4 * cfg.n_heads * cfg.head_dim)
            for i in range(cfg.n_layers)]
    assert seen == pytest.approx(plan, abs=1e-6)


def test_sparse_counts_the_first_queries_loss_forward():
    """In "sparse" L_I's forward reuses the selection's scores, but a query seeing at most index_topk entries is not
    selected for: its L_I forward is its first scoring, counted. Exact against an enumeration over positions of
    DeepSeek-V4's CSA layers (tiny-v4, T = 96: 24 entries, k = 16): the selection's n_u entries of each query with
    n_u > k, the unselected queries' n_u, and L_I's backward over min(k, n_u)."""
    cfg = preset("tiny-v4")
    S, k = 96, cfg.index_topk
    for i in range(cfg.n_layers):
        if not cfg.is_csa(i):
            continue
        r, sel, fresh, att = compress_ratio(cfg, i), 0, 0, 0
        for u in range(1, S + 1):
            n = u // r
            att += min(k, n)
            sel, fresh = (sel + n, fresh) if n > k else (sel, fresh + n)
        scoring = (layer_flops_per_token(cfg, S, i, indexer_train="sparse") - layer_flops_per_token(cfg, S, i)
                   - 2 * indexer_matmul_params(cfg, i) + _attention(cfg, S, True, i, dense=False).selection)
        assert scoring == pytest.approx(_per_key(cfg) * (sel + fresh + 2 * att) / S, rel=1e-12)
