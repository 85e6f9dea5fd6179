"""The DSA indexer in the FLOPs flyer counts (``flyer.model.counts.layer_flops_per_token``: the trainer's MFU, ``flyer
plan``) by how ``--indexer-train`` trains it, against what a real step runs: module hooks on a training step see
which projections run forward and which backward in each mode, and torch's FLOP counter counts a step exactly where
nothing is selected; the plan's terms against the same rules written out by hand for DeepSeek-V3.2."""

import json

import pytest
import torch
from torch import nn

from flyer.cli import main
from flyer.config import preset
from flyer.model.counts import (_attention, _block_non_matmul, attention_flops_per_token, block_params,
                                indexer_matmul_params, layer_flops_per_token, mtp_training_flops_per_token,
                                training_flops_per_token)
from flyer.model.indexer_loss import indexer_losses, set_indexer_training
from flyer.model.transformer import Transformer
from flyer.train.dpo import dpo_flops_per_token
from flyer.train.metrics import model_flops_per_token
from test_flop_count import ATTENTION, B, T, step_counter

DSA = dict(mtp_depth=0, index_n_heads=2, index_head_dim=16)  # tiny MLA with small indexers


def _passes(cfg, mode: str, T: int) -> dict[str, list[str]]:
    """What one training step of ``mode`` on B x T tokens ran of two Linear layers of each attention: the indexer's
    query projection ("indexer": ``indexer.wq_b``, MLA's DSA or a V4 CSA layer's) and the attention's own ("main":
    ``wq_b``): "f" a forward with autograd, "n" one without, "b" a backward that made the input's gradient, "w" one
    that made the weight's alone."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    set_indexer_training(model, mode)
    seen: dict[str, list[str]] = {"indexer": [], "main": []}

    def watch(kind: str, m: nn.Module) -> None:
        m.register_forward_hook(lambda *_: seen[kind].append("f" if torch.is_grad_enabled() else "n"))
        m.register_full_backward_hook(lambda _, grad_in, __: seen[kind].append("w" if grad_in[0] is None else "b"))

    for name, m in model.named_modules():
        if name.endswith("attn.indexer.wq_b"):
            watch("indexer", m)
        elif name.endswith("attn.wq_b"):
            watch("main", m)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    (model.compute_loss(tokens, tokens).loss + sum(indexer_losses(model))).backward()
    return {kind: sorted(v) for kind, v in seen.items()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the indexer's detached inputs: that is the point
@pytest.mark.parametrize("name,over,T,selects", [
    ("tiny", dict(index_topk=8, **DSA), 48, True), ("tiny", dict(index_topk=64, **DSA), 48, False),
    ("tiny-v4", {}, 96, True), ("tiny-v4", {}, 48, False),  # CSA: 24 / 12 entries, index_topk 16
])
def test_what_each_mode_runs(name, over, T, selects):
    """"off": the indexer runs forward without autograd where it selects (more keys or entries than index_topk) and
    not at all where nothing is selected, and the model trains; "sparse": L_I runs it again with autograd (flyer
    recomputes it apart from the selection: the plan counts one forward) and its backward makes the weights'
    gradients alone (the inputs are detached); "warmup": L_I only, and every other weight (the MTP block's too),
    frozen, runs forward without a backward. These are the passes ``layer_flops_per_token`` counts."""
    cfg = preset(name, **over)
    indexed = [i for i in range(cfg.n_layers + cfg.mtp_depth) if indexer_matmul_params(cfg, i)]
    L, A = len(indexed), cfg.n_layers + cfg.mtp_depth  # indexers; attention layers, an MTP block's included
    assert L and all(_attention(cfg, T, True, i, dense=False).selects == selects for i in indexed)  # the plan's
    off, sparse, warmup = (_passes(cfg, mode, T) for mode in ("off", "sparse", "warmup"))
    assert off == {"indexer": ["n"] * L if selects else [], "main": sorted(["f", "b"] * A)}
    assert sparse == {"indexer": sorted(["f", "w"] * L + (["n"] * L if selects else [])),
                      "main": sorted(["f", "b"] * A)}
    assert warmup == {"indexer": sorted(["f", "w"] * L), "main": ["f"] * A}


def test_unselecting_indexer_costs_nothing(monkeypatch):
    """Up to index_topk tokens a DSA model attends densely and its frozen indexers do not run: torch's count of a
    training step's matmuls (attention's kernel apart) is the plan's FLOPs less its attention, as for dense MLA.
    The plan counted the indexers' projections as trained weights (6 per parameter)."""
    cfg = preset("tiny", index_topk=64, **DSA)
    assert T <= cfg.index_topk and indexer_matmul_params(cfg, 0) > 0
    counter = step_counter(cfg, monkeypatch, train=True)
    counts = counter.get_flop_counts()["Global"]
    matmuls = counter.get_total_flops() - sum(counts[op] for op in ATTENTION)
    attention = cfg.n_layers * attention_flops_per_token(cfg, T)
    assert B * T * (training_flops_per_token(cfg, T) - 3 * attention) == matmuls
    assert training_flops_per_token(cfg, T) == training_flops_per_token(cfg.replace(index_topk=0), T)


def _by_hand(cfg, S: int, mode: str, backward: bool = True) -> float:
    """The FLOPs per token of ``cfg`` (MLA with DSA in every layer, MTP aside), training (``backward``) or forward,
    from the rules: GEMMs 2 per weight forward, 4 backward; a query at position t in [0, S] attends min(t, k) keys,
    or t in the warm-up, at 2 H (qk + v) each; a query past k keys has the indexer score all t at 2 H_i (d + 1)
    each, forward once (no gradient); L_I scores the attended keys, reusing the selection's scores where there is
    one (queries t <= k have none: t keys each), its backward twice that, and adds the indexer's weight gradients.
    Warm-up: the rest forward only."""
    k, H, Hi = cfg.index_topk, cfg.n_heads, cfg.index_n_heads
    per_key, per_index = 2 * H * (cfg.qk_head_dim + cfg.v_head_dim), 2 * Hi * (cfg.index_head_dim + 1)
    idx = cfg.q_lora_rank * Hi * cfg.index_head_dim + cfg.dim * cfg.index_head_dim + cfg.dim * Hi
    selects = k < S and mode != "warmup"
    attended = k - k * k / (2 * S) if selects else S / 2
    scored = (S * S - k * k) / (2 * S) if selects else 0
    unscored = k * k / (2 * S) if selects else attended
    passes = 3 if backward and mode != "warmup" else 1
    total = passes * 2 * cfg.vocab_size * cfg.dim
    for i in range(cfg.n_layers):
        gemm = block_params(cfg, i, activated=True) - _block_non_matmul(cfg, i) - idx
        total += passes * (2 * gemm + per_key * attended) + per_index * scored
        if mode == "off" or not backward:
            total += 2 * idx if selects else 0
        else:
            total += 4 * idx + per_index * (2 * attended + unscored)
    return total


@pytest.mark.parametrize("S", [1024, 2048, 4096, 131072])
@pytest.mark.parametrize("mode", ["off", "sparse", "warmup"])
def test_plan_counts_each_mode_by_its_rules(mode, S):
    """DeepSeek-V3.2 (index_topk 2048) with its MTP module left out: the plan's training FLOPs in each mode are the
    rules' (``_by_hand``). The plan counted every indexer trained, 3 x forward, in every mode, the warm-up's frozen
    model too."""
    cfg = preset("dsv32", mtp_depth=0)
    assert training_flops_per_token(cfg, S, indexer_train=mode) == pytest.approx(_by_hand(cfg, S, mode), rel=1e-12)


def test_warmup_counts_the_frozen_mtp_forward_only():
    """The warm-up freezes the MTP modules too: their projection and head forward only, their block as a main
    block's (its indexer trained), in the trainer's MFU as in the plan."""
    cfg = preset("dsv32")
    S = 4096
    share = (S - 1) / S  # the module runs on the S - 1 positions with a token two ahead
    gemm = (2 * cfg.dim * cfg.dim + cfg.vocab_size * cfg.dim)
    for mode, passes in (("off", 3), ("sparse", 3), ("warmup", 1)):
        block = layer_flops_per_token(cfg, S - 1, cfg.n_layers, indexer_train=mode)
        mtp = mtp_training_flops_per_token(cfg, S, mode)
        assert mtp == pytest.approx(share * (passes * 2 * gemm + block), rel=1e-12)
        # the trainer's MFU numerator: the main model's and the MTP modules', both as the mode trains them
        assert model_flops_per_token(cfg, S, mode) == training_flops_per_token(cfg, S, indexer_train=mode) + mtp
    assert mtp_training_flops_per_token(cfg, S, "sparse") > mtp_training_flops_per_token(cfg, S)  # its L_I


def test_dpo_counts_the_references_forward():
    """A DPO step: the policy's training and the frozen reference's forward, each indexer forward once in both (the
    policy's frozen too): twice their forward, where the four-forwards rule (4 / 3 x training) gives 4 / 3 x."""
    cfg = preset("dsv32", mtp_depth=0)
    S = 8192
    want = _by_hand(cfg, S, "off") + _by_hand(cfg, S, "off", backward=False)
    assert dpo_flops_per_token(cfg, S) == pytest.approx(want, rel=1e-12)
    assert dpo_flops_per_token(cfg, S) > 4 / 3 * training_flops_per_token(cfg, S)
    dense = preset("dsv3", mtp_depth=0)
    assert dpo_flops_per_token(dense, S) == pytest.approx(4 / 3 * training_flops_per_token(dense, S), rel=1e-12)


def test_an_unknown_mode_is_refused():
    """A misspelt mode would count as some other one: refused, naming the field."""
    with pytest.raises(ValueError, match="indexer_train"):
        training_flops_per_token(preset("dsv32"), 4096, indexer_train="warm-up")


def test_plan_counts_the_indexers_as_the_run_trains_them(capsys):
    """``flyer plan --indexer-train`` counts the FLOPs (and so MFU and GPU-hours at a given MFU) as ``flyer train``
    with that flag runs; a model without indexers, or an unknown mode, is refused naming the flag."""
    def plan(*flags):
        assert main(["plan", "--preset", "dsv32", "--seq-len", "65536", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    cfg = preset("dsv32")
    off, sparse, warmup = plan(), plan("--indexer-train", "sparse"), plan("--indexer-train", "warmup")
    for out, mode in ((off, "off"), (sparse, "sparse"), (warmup, "warmup")):
        assert out["indexer_train"] == mode
        assert out["flops_per_token_causal"] == training_flops_per_token(cfg, 65536, indexer_train=mode)
        assert out["flops_per_token_mtp"] == mtp_training_flops_per_token(cfg, 65536, mode)
    assert off["training_gpu_hours"] < sparse["training_gpu_hours"]  # at MFU 0.4: more FLOPs, more hours
    assert main(["plan", "--preset", "dsv32", "--indexer-train", "sparse"]) == 0
    assert "indexers sparse" in capsys.readouterr().out
    for argv in (["--preset", "dsv3", "--indexer-train", "sparse"], ["--preset", "dsv32", "--indexer-train", "on"]):
        assert main(["plan", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flyer: error: --indexer-train: "), err
