"""The trainer's pre-run memory bound (``flyer.train.build.training_memory_bytes``) and the activation estimate beside
``flyer plan``'s per-rank state (``flyer.parallel.memory.activation_bytes``), checked against what nobody here
wrote: the parameters of a model built on the meta device, and the tensors autograd itself keeps for backward
(``torch.autograd.graph.saved_tensors_hooks``) in a real forward."""

import math

import pytest
import torch

from flyer.cluster.costs import (activation_bytes_per_token_layer, attention_saved_bytes, dsa_attention_saved_bytes,
                                 gqa_attention_saved_bytes, hybrid_attention_saved_bytes, hyper_connection_saved_bytes,
                                 indexer_loss_saved_bytes_per_token, mla_attention_saved_bytes)
from flyer.config import preset
from flyer.fp8 import FP8Experts, FP8Linear, FP8Recipe, convert_to_fp8
from flyer.model import documents
from flyer.model.attention import Selection
from flyer.model.dsa_chunks import dsa_gathers
from flyer.model.experts import expert_ffn_grouped_mm
from flyer.model.hybrid_chunks import CHUNK_ROWS, spans
from flyer.model.indexer_loss import set_indexer_training
from flyer.model.lowp import as_dtype, emulation, gemm_dtype
from flyer.model.recompute import set_recompute
from flyer.model.transformer import Transformer, layer_rope_tables
from flyer.parallel.memory import STEP_BYTES, activation_bytes, held_bytes, plan_state_bytes, saved_bytes
from flyer.train.build import training_memory_bytes
from flyer.train.config import TrainConfig

T = 32


def _saved_bytes(cfg, batch: int) -> int:
    """Bytes of the distinct storages autograd saves in one FP32 training forward of ``batch`` x T tokens, the
    parameters' own left out (they are counted as state)."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(1))
    return saved_bytes(lambda: model.compute_loss(tokens, tokens), skip=model)


@pytest.mark.parametrize("over", [{}, {"mtp_depth": 2, "n_dense_layers": 2}])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_the_pre_run_state_is_the_plans_but_adamws_step_scalars(over, ep):
    """FP32 weights, gradients and AdamW's moments of the model and its MTP modules, the routed experts (the MTP
    modules' too) split ``ep`` ways: the plan's per-rank bytes from a meta-device model, less the one FP32 ``step``
    scalar AdamW keeps per parameter tensor (the bound counted no MTP parameters, and split the inactive experts
    only)."""
    cfg = preset("tiny").replace(**over)
    with torch.device("meta"):
        tensors = len(list(Transformer(cfg).parameters()))
    plan = plan_state_bytes(cfg, 1, ep, ep, 0, precision="fp32")
    state = sum(plan[f"max_{k}_per_rank"] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
    assert state - training_memory_bytes(cfg, TrainConfig(batch_size=0), "fp32", ep=ep) == STEP_BYTES * tensors


def test_the_activation_estimate_counts_what_autograd_keeps_but_the_rope_tables():
    """What one forward keeps, measured at batch 1 and 2: the estimate stays under it (a lower bound), and its part
    that does not grow with the batch (each MoE block's copy of its experts' stacked w1|w3, each head's weight
    gradient, which the fused loss computes in its forward) is the measured one but for the RoPE tables (cos and
    sin of the T positions, the MTP modules' T - 1): a saved weight copy left out of the estimate (16 MiB here)
    exceeds that by far."""
    cfg = preset("tiny").replace(moe_inter_dim=256)  # experts heavy: their copies dominate the constant part
    measured = [_saved_bytes(cfg, b) for b in (1, 2)]
    estimated = [activation_bytes(cfg, 1, 0, "1f1b", T, b, "fp32") for b in (1, 2)]
    assert all(e <= m for e, m in zip(estimated, measured))
    rope_tables = 2 * (1 + cfg.mtp_depth) * T * cfg.qk_rope_head_dim * 4 + 4  # (and a 0-dim loss scale)
    constant = [2 * x[0] - x[1] for x in (measured, estimated)]
    assert 0 <= constant[0] - constant[1] <= rope_tables


@pytest.mark.parametrize("cache", ["fp8", "input"])
def test_the_fp8_per_token_estimate_is_a_lower_bound_for_either_activation_cache(cache):
    """What a batch row adds to one FP8 forward's saved bytes, against the estimate's (``--fp8-activation-cache``):
    every FFN's FP8 cache (routed, shared, dense: its input's and SwiGLU inputs' tiles) keeps about half of what the
    'input' cache does, so an estimate counting the latter under the former exceeded the measurement (1.35 x here)
    and the pre-run refusal it bounds could refuse a run that fits."""
    cfg = preset("tiny").replace(moe_inter_dim=256)
    torch.manual_seed(0)
    model = convert_to_fp8(Transformer(cfg).train(), recipe=FP8Recipe(activation_cache=cache))
    measured = []
    for b in (1, 2):
        tokens = torch.randint(0, cfg.vocab_size, (b, 2 * T), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured.append(saved_bytes(lambda: model.compute_loss(tokens, tokens), skip=model))
    estimated = [activation_bytes(cfg, 1, 0, "1f1b", 2 * T, b, "fp8", activation_cache=cache) for b in (1, 2)]
    assert 0.5 * (measured[1] - measured[0]) < estimated[1] - estimated[0] <= measured[1] - measured[0]


def test_flyer_plan_estimates_either_fp8_activation_cache(capsys):
    """``flyer plan --precision fp8 --fp8-activation-cache input|fp8``: the per-rank activation estimate the run's
    memory check uses for that cache (the plan assumed the FP8 cache for every FP8 run); another name: one line."""
    import json

    from flyer.cli import main
    cfg = preset("tiny")
    got = {}
    for cache in ("fp8", "input"):
        assert main(["plan", "--preset", "tiny", "--gpus", "1", "--precision", "fp8", "--fp8-activation-cache",
                     cache, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        got[cache] = out["activation_bytes_per_rank_estimate"]
        assert got[cache] == [activation_bytes(cfg, 1, 0, "1f1b", 4096, 1, "fp8", activation_cache=cache)]
        assert out["run_layout"]["fp8_activation_cache"] == cache
    assert got["fp8"][0] < got["input"][0]
    assert main(["plan", "--preset", "tiny", "--gpus", "1", "--precision", "fp8", "--fp8-activation-cache", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flyer: error: --fp8-activation-cache: must be one of fp8, input (got 'x')"


def test_the_fp8_activation_estimate_counts_the_experts_fp8_weights():
    """FP8 training (BF16 autocast, ``convert_to_fp8``): the estimate stays under what one forward keeps, at batch 1
    and 2, and its constant part is the measured one less what it leaves out: the other linear layers' FP8 weight
    blocks and every layer's block scales (a BF16 count of the experts' weights, as before the FP8 experts kept
    their FP8 blocks, would exceed the measurement)."""
    from flyer.fp8.quant import quantize_blocks
    cfg = preset("tiny").replace(moe_inter_dim=256)
    torch.manual_seed(0)
    model = convert_to_fp8(Transformer(cfg).train())
    measured = []
    for b in (1, 2):
        tokens = torch.randint(0, cfg.vocab_size, (b, T), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured.append(saved_bytes(lambda: model.compute_loss(tokens, tokens), skip=model))
    estimated = [activation_bytes(cfg, 1, 0, "1f1b", T, b, "fp8") for b in (1, 2)]
    assert all(e <= m for e, m in zip(estimated, measured))
    blocks = sum(sum(t.untyped_storage().nbytes() for t in quantize_blocks(m.weight.detach())[:2])
                 for m in model.modules() if isinstance(m, FP8Linear))
    experts = [m for m in model.modules() if isinstance(m, FP8Experts)]
    scales = sum(4 * w.shape[0] * -(-w.shape[1] // 128) * -(-w.shape[2] // 128)
                 for m in experts for w in (m.w1, m.w2, m.w3))
    rope_tables = 2 * (1 + cfg.mtp_depth) * T * cfg.qk_rope_head_dim * 4 + 4
    constant = [2 * x[0] - x[1] for x in (measured, estimated)]
    assert 0 <= constant[0] - constant[1] - blocks - scales <= rope_tables


DSA = dict(index_topk=8, index_n_heads=4, index_head_dim=32)


def _kept(cfg, mode: str, precision: str, T: int, batch: int = 1) -> int:
    """The bytes of the storages one training forward of ``batch`` rows of T tokens leaves alive (``held_bytes``: what
    autograd and ``torch.utils.checkpoint`` keep), under ``--indexer-train mode``, BF16 autocast for 'bf16' and
    'fp8' (``convert_to_fp8``, its FP8 activation cache). BF16 GEMMs run as a GPU's do, on whatever CPU: emulated
    through FP32 (a CPU without BF16 hardware) they keep FP32 copies the estimate does not count."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    if precision == "fp8":
        model = convert_to_fp8(model)
    set_indexer_training(model, mode)
    tokens = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"), emulation(False):
        return held_bytes(lambda: model.compute_loss(tokens, tokens), skip=model)


def _kept_per_row(cfg, mode: str, precision: str, T: int) -> int:
    """What a second batch row adds to ``_kept``; under FP8 after a forward that makes the tables the FP8 path makes
    once a process and keeps, outside the measurements."""
    if precision == "fp8":
        _kept(cfg, mode, precision, T, 1)
    return _kept(cfg, mode, precision, T, 2) - _kept(cfg, mode, precision, T, 1)


def _indexer_row_bytes(cfg, mode: str, precision: str, T: int) -> float:
    """The estimate's L_I bytes for a row of T tokens: each layer's per-token bytes times the tokens it reads (MTP
    module k the T - k it predicts from)."""
    element, fp8 = 4 if precision == "fp32" else 2, precision == "fp8"
    reads = [T - max(0, i - cfg.n_layers + 1) for i in range(cfg.n_layers + cfg.mtp_depth)]
    return sum(indexer_loss_saved_bytes_per_token(cfg, i, mode, element, t, fp8) * t for i, t in enumerate(reads))


@pytest.mark.parametrize("name,kw", [("tiny", DSA), ("tiny-v4", {})])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_the_indexer_loss_estimate_is_what_its_chunks_keep(name, kw, precision):
    """DSA layers and an MTP block, or DeepSeek-V4's CSA layers, T past one query chunk: what a batch row adds to a
    warm-up forward's kept bytes (the frozen model keeps nothing else), and to a sparse one's over the same forward
    without L_I, is the estimate to the byte. Everything is kept in the forward's dtype, the keys' projections
    recomputed: tiny's DSA layers keep 992 bytes a token under a BF16 warm-up, where FP32 copies of the inputs and
    the projections' saved tensors kept 1992. Under FP8 the blocks' linear layers keep FP8 tiles of their inputs,
    so sparse training's L_I keeps the indexer's input and the query latent itself, as the warm-up does. With one
    chunk (its scores kept instead, not estimated) the estimate stays under what is kept."""
    cfg, T = preset(name, **kw), 2 * CHUNK_ROWS
    assert _kept_per_row(cfg, "warmup", precision, T) == _indexer_row_bytes(cfg, "warmup", precision, T)
    sparse = _kept_per_row(cfg, "sparse", precision, T) - _kept_per_row(cfg, "off", precision, T)
    assert sparse == _indexer_row_bytes(cfg, "sparse", precision, T)
    for mode, t in (("warmup", T), ("warmup", CHUNK_ROWS // 2), ("sparse", CHUNK_ROWS // 2)):
        estimate = activation_bytes(cfg, 1, 0, "1f1b", t, 1, precision, indexer_train=mode)
        assert estimate <= _kept(cfg, mode, precision, t), (mode, t)


class _Scaled(torch.nn.Module):
    """A stand-in block: its output a product of its input (made, not saved), in the dtype a GEMM's output has."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return as_dtype(x, gemm_dtype(x)) * 1.0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hyper_connections_keep_their_streams_outputs_and_maps(precision):
    """A DeepSeek-V4 block (mHC) with stand-in attention and FFN, on FP32 streams (a training forward's, whatever
    the precision): besides each part's collapsed input (FP32) and its norm's inverse RMS, the two hyper-connections
    keep for backward the streams their mixes read (under BF16 also the copy the update multiplies), the parts'
    outputs, the mix and the maps' intermediates, ``hyper_connection_saved_bytes`` each a token to the byte, which
    the block's estimate counts twice (it counted the streams in the forward's dtype, 4,112 bytes a token less here
    under BF16). The mix is recomputed in backward from the streams: kept, what it saves (its normalised FP32
    streams) made this block keep 4,104 bytes a token more in FP32."""
    cfg, T = preset("tiny-v4"), 64
    element = 4 if precision == "fp32" else 2
    torch.manual_seed(0)
    block = Transformer(cfg).train().layers[1]
    block.attn, block.ffn = _Scaled(), _Scaled()
    kept = _part_kept_per_row(lambda h, _: block.residual(h, block.attn), (T, cfg.hc_mult, cfg.dim), precision)
    per_token = kept / T - 2 * (cfg.dim * 4 + 4)
    assert per_token == 2 * hyper_connection_saved_bytes(cfg, element)
    plain = [activation_bytes_per_token_layer(c, True, False, element, 1) for c in (cfg, cfg.replace(hc_mult=1))]
    assert plain[0] - plain[1] == per_token


def _csa_masks(cfg, T: int) -> int:
    """Bytes a row's CSA chunks keep of their visibility: each chunk whose queries may see more entries than the
    indexer keeps masks its band and entries, a bool a query and key (T past one chunk, none gathering here)."""
    return sum((s.stop - s.start) * (s.n_keys + s.n_entries)
               for s in spans(T, CHUNK_ROWS, cfg.window_size, cfg.csa_ratio) if s.n_entries > cfg.index_topk)


def _part_kept_per_row(part, shape: tuple[int, ...], precision: str) -> int:
    """What a second batch row adds to the bytes ``part(x, batch)`` keeps in one forward, FP32 or under BF16 autocast
    (BF16 GEMMs as a GPU's), its input x (batch, *shape) as a training forward's residual stream: FP32. The input,
    made outside, is counted, and the output, held, not."""
    kept = []
    for batch in (1, 2):
        x, out = torch.randn(batch, *shape).requires_grad_(), []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), emulation(False):
            kept.append(held_bytes(lambda: out.append(part(x, batch)) or out[0]) - out[0].untyped_storage().nbytes())
    return kept[1] - kept[0] + math.prod(shape) * 4


def _attention_kept_per_row(cfg, block, T: int, precision: str) -> int:
    """``_part_kept_per_row`` of ``block``'s attention with its norm."""
    cos, sin = layer_rope_tables(cfg, [block.layer_id], T, "cpu")[0]
    return _part_kept_per_row(lambda x, _: block.attn(block.attn_norm(x), cos, sin), (T, cfg.dim), precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hybrid_attention_keeps_what_its_estimate_counts(precision):
    """DeepSeek-V4's attention with its norm, each kind of layer (window-only, CSA, HCA, the MTP block's), T past one
    query chunk: what a batch row adds to the bytes one forward keeps is ``hybrid_attention_saved_bytes`` a token to
    the byte, but for the CSA chunks' visibility masks (counted here). Each head's query scale is recomputed in
    backward: under BF16 the FP32 copy of q its square saved made every layer keep 4 H d bytes a token more; the plan
    counted the indexer's projections, which select without autograd, and neither q nor the latents' norms and the
    compressor's softmax."""
    cfg, T = preset("tiny-v4"), 2 * CHUNK_ROWS
    element = 4 if precision == "fp32" else 2
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        masks = _csa_masks(cfg, T) if cfg.is_csa(block.layer_id) else 0
        kept = _attention_kept_per_row(cfg, block, T, precision) - masks
        assert kept == T * hybrid_attention_saved_bytes(cfg, block.layer_id, element), block.layer_id


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("over", [{}, {"q_lora_rank": 0}, {"v_head_dim": 64}])
@pytest.mark.parametrize("recompute", [False, True])
def test_mla_keeps_what_its_estimate_counts(precision, over, recompute):
    """A dense MLA layer with its norm (tiny; without a query LoRA; values wider than the query/key heads), with and
    without ``--recompute mla``: what a batch row adds to one forward's kept bytes is ``mla_attention_saved_bytes``
    a token to the byte, which the block's estimate counts. The narrower of v and q/k is zero-padded for SDPA's fused
    kernels, so q, k, v and the attention's output are kept at the wider width, besides the copy ``wo`` reads and
    the normed latents, which the plan left out: on V3 under BF16 it counted 196,992 of the 281,228 bytes a token
    the attention keeps (its input, the residual stream, in FP32)."""
    cfg, T = preset("tiny", **over), 64
    element = 4 if precision == "fp32" else 2
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    set_recompute(model, "mla" if recompute else "none")
    block = model.layers[1]
    kept = _attention_kept_per_row(cfg, block, T, precision)
    assert kept == T * mla_attention_saved_bytes(cfg, element, recompute)
    layer = [activation_bytes_per_token_layer(cfg, True, False, element, 1, r) for r in (False, True)]
    attention = [mla_attention_saved_bytes(cfg, element, r) for r in (False, True)]
    assert layer[0] - attention[0] == layer[1] - attention[1]  # the block counts it so, recomputing or not


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("over", [{}, {"qk_norm": True}, {"n_kv_heads": 4}, {"rotary_dim": 16, "attn_bias": True}])
def test_gqa_keeps_what_its_estimate_counts(precision, over):
    """A grouped-query attention layer with its norm (2 key heads for 4 query heads; Qwen3's head norms; multi-head;
    GLM-4.5's partial rotary and Qwen2's biases): what a batch row adds to one forward's kept bytes is
    ``gqa_attention_saved_bytes`` a token to the byte, which the block's estimate counts. The keys and values are
    kept repeated to every query head: the plan counted them once per key head (on Llama-3.1-405B under BF16
    135,424 of the 229,892 bytes a token the layer keeps)."""
    cfg, T = preset("tiny", **{"attn": "gqa", "n_kv_heads": 2, "head_dim": 32, **over}), 64
    element = 4 if precision == "fp32" else 2
    torch.manual_seed(0)
    block = Transformer(cfg).train().layers[1]
    assert _attention_kept_per_row(cfg, block, T, precision) == T * gqa_attention_saved_bytes(cfg, element)
    layer = activation_bytes_per_token_layer(cfg, True, False, element, 1)
    assert layer - gqa_attention_saved_bytes(cfg, element) == activation_bytes_per_token_layer(
        preset("tiny"), True, False, element, 1) - mla_attention_saved_bytes(preset("tiny"), element)  # the FFN's


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("T", [8, 64, 2 * CHUNK_ROWS])
@pytest.mark.parametrize("recompute", [False, True])
def test_dsa_keeps_what_its_estimate_counts(precision, T, recompute):
    """A DSA layer with its norm, at T = index_topk (no query selects: dense MLA), masked (T = 64, which a forward
    without autograd gathers) and gathered in query chunks (T = 256: past ``dsa_gathers``' training length, two
    chunks, which backward recomputes), and a GLM-5 pair of a full layer and a layer sharing its selection, with and
    without ``--recompute mla`` (the masked form's region keeps the bool mask): what a batch row adds to one forward's
    kept bytes is ``dsa_attention_saved_bytes`` a token to the byte, which the block's estimate and the plan's
    per-rank one count given the tokens (an MTP block its T - 1). The plan counted DSA layers generically: on V3.2
    at 4,096 tokens under BF16 196,992 of the 289,420 bytes a token the attention keeps (the visibility mask, which
    SDPA keeps as an additive bias, 8,192 of them), and `--recompute mla` none of them (it drops 155,656)."""
    element, mode = 4 if precision == "fp32" else 2, "mla" if recompute else "none"
    assert dsa_gathers(preset("tiny", **DSA), T, training=True) == (T == 2 * CHUNK_ROWS)
    cfg = preset("tiny", **DSA)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    set_recompute(model, mode)
    each = [dsa_attention_saved_bytes(cfg, i, T, element, recompute_up=recompute) for i in range(cfg.n_layers)]
    assert _attention_kept_per_row(cfg, model.layers[1], T, precision) == T * each[1]
    layer = activation_bytes_per_token_layer(cfg, True, False, element, 1, recompute, seq_len=T)
    dense = preset("tiny")  # the same FFN
    assert layer - each[1] == activation_bytes_per_token_layer(
        dense, True, False, element, 1) - mla_attention_saved_bytes(dense, element)
    reads = [T - max(0, i - cfg.n_layers + 1) for i in range(cfg.n_layers + cfg.mtp_depth)]  # MTP module k: T - k
    extra = sum(t * (dsa_attention_saved_bytes(cfg, i, t, element, recompute_up=recompute)
                     - mla_attention_saved_bytes(cfg, element, recompute)) for i, t in enumerate(reads))
    assert activation_bytes(cfg, 1, 0, "1f1b", T, 1, precision, recompute=mode) - activation_bytes(
        dense, 1, 0, "1f1b", T, 1, precision, recompute=mode) == int(extra)  # the plan's, each block its tokens

    glm = preset("tiny", **DSA, indexer_types=("full", "shared", "full", "shared"))
    torch.manual_seed(0)
    glm_model = Transformer(glm).train()
    set_recompute(glm_model, mode)
    full, shared = glm_model.layers[2:]
    cos, sin = layer_rope_tables(glm, [2], T, "cpu")[0]

    def pair(x, _):  # both read x: the input is counted once
        selection = Selection()
        return sum(b.attn(b.attn_norm(x), cos, sin, selection) for b in (full, shared))

    kept = _part_kept_per_row(pair, (T, glm.dim), precision) + 4 * T * glm.dim
    assert kept == T * sum(dsa_attention_saved_bytes(glm, i, T, element, recompute_up=recompute) for i in (2, 3))
    if recompute and T == 64:  # the indexer training: L_I reads the attention's queries and keys, none recomputed
        assert activation_bytes(cfg, 1, 0, "1f1b", T, 1, precision, recompute="mla", indexer_train="sparse") == \
            activation_bytes(cfg, 1, 0, "1f1b", T, 1, precision, indexer_train="sparse")


def test_glm5s_shared_layers_recompute_while_the_full_ones_train_their_indexers():
    """Under ``--indexer-train sparse`` a DSA layer with an indexer keeps its queries and keys (L_I reads them), but
    GLM-5's shared layers, which have none, recompute: the plan counts their saving (it counted none), all of what
    a model keeps less but the bool masks their regions keep alive (their full layers', which do not recompute)."""
    cfg, T = preset("tiny", **DSA, indexer_types=("full", "shared", "full", "shared")), 64
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    kept = {}
    for mode in ("none", "mla"):
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        set_indexer_training(model, "sparse")
        set_recompute(model, mode)
        kept[mode] = held_bytes(lambda: model.compute_loss(tokens, tokens), skip=model)
    estimated = {mode: activation_bytes(cfg, 1, 0, "1f1b", T, 1, "fp32", recompute=mode, indexer_train="sparse")
                 for mode in ("none", "mla")}
    masks = 2 * T * T  # the two shared layers' regions hold their full layers' (1, 1, T, T) bool masks
    assert estimated["none"] - estimated["mla"] == kept["none"] - kept["mla"] + masks > masks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[32, 32], [8, 8, 48]])
def test_a_packed_rows_dsa_estimate_stays_a_lower_bound(precision, lengths):
    """Packed documents (``--pack``) run DSA a document at a time, each in the form its own length picks: a masked
    document keeps a mask of its own length, not the row's. The estimate for packed rows (the least form their
    documents may take) stays under what a packed row keeps, where the row's T counted more (a visibility mask of
    T keys a query) and exceeded it: the trainer's lower bound refused runs that fit."""
    cfg, T = preset("tiny", **DSA), sum(lengths)
    element = 4 if precision == "fp32" else 2
    torch.manual_seed(0)
    block = Transformer(cfg).train().layers[1]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).view(1, T)
    positions = documents.document_positions(ids)[0]
    cos, sin = (t[positions] for t in layer_rope_tables(cfg, [1], T, "cpu")[0])

    def packed(x, batch):
        rows = [t.expand(batch, -1, -1, -1) for t in (cos, sin)]
        return block.attn(block.attn_norm(x), *rows, docs=documents.Documents(ids.expand(batch, -1)))

    kept = _part_kept_per_row(packed, (T, cfg.dim), precision)
    each = sum(n * dsa_attention_saved_bytes(cfg, 1, n, element) for n in lengths)  # the documents alone
    assert T * dsa_attention_saved_bytes(cfg, 1, T, element, packed=True) <= each <= kept
    assert T * dsa_attention_saved_bytes(cfg, 1, T, element) > kept
    assert training_memory_bytes(cfg, TrainConfig(batch_size=1, seq_len=T, pack=True), precision) < \
        training_memory_bytes(cfg, TrainConfig(batch_size=1, seq_len=T), precision)
    v32, long = preset("dsv32"), 131072  # gathered: less than a shorter document's dense MLA, the least
    assert dsa_attention_saved_bytes(v32, 5, long, 2, packed=True) == dsa_attention_saved_bytes(v32, 5, long, 2) < \
        mla_attention_saved_bytes(v32, 2)


def _ffn_kept_per_row(block, T: int, precision: str) -> int:
    """``_part_kept_per_row`` of ``block``'s FFN with its norm."""
    def ffn(x, batch):
        tokens = torch.randint(0, 2048, (batch, T), generator=torch.Generator().manual_seed(batch))
        return block.ffn(block.ffn_norm(x), **({"tokens_BT": tokens} if block.hash_routed else {}))
    return _part_kept_per_row(ffn, (T, block.ffn_norm.weight.shape[0]), precision)


# What a MoE keeps a pick that its estimate leaves out, at most: the router's id and weight and the experts' row
# bookkeeping, eight 8-byte values (the fused kernel keeps 5 int64 and an FP32 a pick, torch._grouped_mm's path 2 and 1)
_PICKS = 64


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ffns_keep_what_their_estimate_counts(precision):
    """A dense FFN with its norm keeps what the block's estimate counts beside its attention, to the byte: its norm's
    input, output and inverse RMS, both projections and the product (the plan counted the normed input twice and not
    the norm's input). SiLU's output is recomputed in backward, and DeepSeek-V4's shared expert, which clamps both
    projections, keeps 3 of its width a token as well (it kept 6: the clamped projections and SiLU's output too); the
    estimate counts them. A MoE's estimate stays under what it keeps, by at most its router's picks and the experts'
    row bookkeeping (``_PICKS`` bytes a pick and 16 a token), in FP32 through the fused expert kernel and in BF16
    through ``torch._grouped_mm``, a GPU's path: the CPU's BF16 kernel pads each expert's rows, which a batch row may
    add fewer of than it adds tokens."""
    element, T = (4 if precision == "fp32" else 2), 2 * CHUNK_ROWS
    impl = "fused" if precision == "fp32" else "grouped_mm"
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg, experts_impl=impl).train()
    dense = activation_bytes_per_token_layer(cfg, False, False, element, 0) - mla_attention_saved_bytes(cfg, element)
    assert _ffn_kept_per_row(model.layers[0], T, precision) == T * dense
    moe = activation_bytes_per_token_layer(cfg, True, False, element, 1) - mla_attention_saved_bytes(cfg, element)
    picks = _PICKS * cfg.n_activated_experts + 16
    assert T * moe <= _ffn_kept_per_row(model.layers[1], T, precision) <= T * (moe + picks)
    v4 = preset("tiny-v4")
    torch.manual_seed(0)
    block = Transformer(v4, experts_impl=impl).train().layers[1]
    shared = block.ffn.shared
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    kept = []
    for batch in (1, 2):
        x = torch.randn(batch, T, v4.dim).to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), emulation(False):
            kept.append(held_bytes(lambda: shared(x), skip=shared))
    width = v4.n_shared_experts * v4.moe_inter_dim
    assert kept[1] - kept[0] == T * (3 * width + v4.dim) * element  # and its output, held
    layer = [activation_bytes_per_token_layer(c, True, False, element, 1) for c in (v4, v4.replace(n_shared_experts=0))]
    assert layer[0] - layer[1] == 3 * width * element
    moe = layer[0] - hybrid_attention_saved_bytes(v4, 1, element) - 2 * hyper_connection_saved_bytes(v4, element)
    assert T * moe <= _ffn_kept_per_row(block, T, precision) <= T * (moe + _PICKS * v4.n_activated_experts + 16)


@pytest.mark.parametrize("fp32", [False, True])
def test_grouped_mm_experts_keep_projections_and_product(fp32):
    """The routed experts through ``torch._grouped_mm`` (CUDA's path; BF16, or FP32 weights) keep per row what the
    fused kernel keeps and the estimate counts: h1, h3 and the product (and the output, held), SiLU's output and
    DeepSeek-V4's clamped projections recomputed in backward; they kept 6 of the width a row, not 3."""
    E, D, F_, rows = 4, 64, 32, 128
    torch.manual_seed(0)
    w1, w3, w2 = (torch.randn(*shape, requires_grad=True) for shape in ((E, F_, D), (E, F_, D), (E, D, F_)))
    element = 4 if fp32 else 2
    kept = []
    for n in (rows, 2 * rows):
        x = torch.randn(n, D, requires_grad=True)
        counts = torch.full((E,), n // E)
        kept.append(held_bytes(lambda: expert_ffn_grouped_mm(x, counts, w1, w2, w3, 10.0, fp32=fp32)))
    x_copy = 0 if fp32 else D * element  # the BF16 copy of x both GEMMs read
    assert kept[1] - kept[0] == rows * ((3 * F_ + D) * element + x_copy)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("split", [False, True])
def test_recomputation_gives_the_kept_tensors_gradients_bit_for_bit(monkeypatch, precision, split):
    """Each kind of DeepSeek-V4 block (window-only, CSA, HCA, the MTP block's; its shared expert too) with each head's
    query scale and the SwiGLUs' SiLU recomputed in backward, against the same blocks keeping them (``recomputed``
    made a plain call): the outputs and every gradient bit for bit, under plain backward and torch's split input and
    weight backward (what the zero-bubble and DualPipeV schedules run, ``torch.distributed.pipelining``)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    import flyer.model.experts as experts
    import flyer.model.hybrid as hybrid
    cfg, T = preset("tiny-v4"), 2 * CHUNK_ROWS
    torch.manual_seed(0)
    model = Transformer(cfg, experts_impl="grouped_mm").train()  # its routed SwiGLU too

    def run(block, h, tokens):
        cos, sin = layer_rope_tables(cfg, [block.layer_id], T, "cpu")[0]
        block.zero_grad(set_to_none=True)
        h = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), emulation(False):
            out = block(h, cos, sin, tokens)
        params = [p for p in block.parameters() if p.requires_grad]
        g = 0.01 + 0.1 * out.detach()
        if split:
            (gh,), groups = stage_backward_input([out], [g], [h], iter(params))
            stage_backward_weight(iter(params), groups)
        else:
            out.backward(g)
            gh = h.grad
        return [out.detach(), gh, *(p.grad for p in params)]

    kept = lambda fn, *args: fn(*args)  # noqa: E731
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        h = torch.randn(2, T, cfg.hc_mult, cfg.dim)
        tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
        with monkeypatch.context() as m:
            m.setattr(hybrid, "recomputed_if_recorded", kept)
            m.setattr(experts, "recomputed_if_recorded", kept)
            want = run(block, h, tokens)
        got = run(block, h, tokens)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(want, got)), block.layer_id


def test_the_fp8_per_row_estimate_stays_a_lower_bound_with_many_mla_heads():
    """A dense MLA model under FP8 with its FP8 activation cache: the attention's FP8 linear layers keep FP8 tiles of
    their inputs, not the copies ``mla_attention_saved_bytes`` counts, so the estimate counts them as before (which
    stays under); counted so at 64 heads the per-row estimate exceeded what a forward keeps."""
    cfg, T = preset("tiny", n_heads=64, n_routed_experts=0, n_shared_experts=0, mtp_depth=0), 64
    torch.manual_seed(0)
    model = convert_to_fp8(Transformer(cfg).train())
    measured = []
    for b in (1, 1, 2):  # the first makes the tables the FP8 path makes once a process
        tokens = torch.randint(0, cfg.vocab_size, (b, T), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16), emulation(False):
            measured.append(saved_bytes(lambda: model.compute_loss(tokens, tokens), skip=model))
    estimated = [activation_bytes(cfg, 1, 0, "1f1b", T, b, "fp8") for b in (1, 2)]
    assert estimated[1] - estimated[0] <= measured[2] - measured[1]


@pytest.mark.parametrize("T", [64, 2 * CHUNK_ROWS])
@pytest.mark.parametrize("recompute", [False, True])
def test_the_fp8_dsa_attention_estimate_stays_a_lower_bound(T, recompute):
    """A DSA layer under FP8 with its FP8 activation cache, masked and gathered, with and without ``--recompute
    mla``: the estimate stays under what a batch row keeps. The gathered form keeps less than the generic count's
    per-head q, k and v, which exceeded it (518,144 bytes a row at T = 256, of 457,728 kept)."""
    cfg = preset("tiny", **DSA)
    torch.manual_seed(0)
    model = convert_to_fp8(Transformer(cfg).train())
    set_recompute(model, "mla" if recompute else "none")
    block = model.layers[1]
    _attention_kept_per_row(cfg, block, T, "bf16")  # the tables the FP8 path makes once a process
    kept = _attention_kept_per_row(cfg, block, T, "bf16")
    assert T * attention_saved_bytes(cfg, 1, 2, mla_recompute=recompute, fp8_cache=True, seq_len=T) <= kept


@pytest.mark.parametrize("name,over,layer", [("tiny", {}, 1), ("tiny", {"score_func": "softmax"}, 1),
                                             ("tiny-v4", {}, 1), ("tiny-v4", {}, 0)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_router_keeps_its_scores_and_its_picks(name, over, layer, precision):
    """A MoE's router (FP32 whatever the precision; DeepSeek-V4's hash-routed layer too) on the FFN's FP32 normed
    input: what a batch row adds to what it keeps is the scores the estimate counts (with the logits under
    sqrt(softplus)) and its picks (int64 ids, FP32 weights and the few values they derive: at most 24 bytes a pick
    and 16 a token), which it does not."""
    cfg, T = preset(name, **over), 64
    torch.manual_seed(0)
    gate = Transformer(cfg).train().layers[layer].ffn.gate
    kept = []
    for b in (1, 2):
        x = torch.randn(b * T, cfg.dim, requires_grad=True)
        tokens = torch.randint(0, cfg.vocab_size, (b * T,), generator=torch.Generator().manual_seed(b))
        kw = {"tokens_T": tokens} if gate.hash_routed else {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), emulation(False):
            kept.append(held_bytes(lambda: gate(x, **kw), skip=gate))
    scores = 4 * cfg.n_route_columns * (2 if cfg.score_func == "sqrtsoftplus" else 1)
    assert scores <= (kept[1] - kept[0]) / T <= scores + 24 * cfg.n_activated_experts + 16
    block = [activation_bytes_per_token_layer(cfg.replace(score_func=f), True, False, 4, layer)
             for f in ("sigmoid", "sqrtsoftplus")]
    assert block[1] - block[0] == 4 * cfg.n_route_columns  # the logits, which sqrt(softplus) keeps too
