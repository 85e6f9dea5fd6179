"""Pipeline, ZeRO-1 and optimizer-state edges a mutation sweep of ``flyer.parallel.pipeline``, ``zero`` and
``optim_state`` found unpinned: the rank inside an expert part's process group, expert rows that cover a stack
once (a gap and an overlap of equal size included), malformed index entries named as such, a stage cutting a
LongCat-Flash pair, chat data's token id 0 and a micro-batch without targets, L_I's query weights, a tied head
without MTP on a 1F1B pipeline, ZeRO-1 owners past data-parallel rank 0, and saved optimizer state that does not
fit the model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.parallel.mesh import init_distributed
from flyer.parallel.optim_state import (INDEX_FILE, OPTIMIZER_FILE, SavedState, _read_index, _spans,
                                        full_optimizer_state, load_full_optimizer_state, optimizer_index,
                                        optimizer_part)
from flyer.parallel.pipeline import PipelineModel, Stage
from flyer.parallel.zero import ShardedOptimizer, shard_kinds, shard_rank
from flyer.train.build import build_model
from ranks import run_ranks
from test_pipeline import FP32_TOL, SEED, B, M, T, _batch, _cfg, _rel, accumulate
from test_pp_longcat import _cfg as longcat_cfg


# ---- zero.py -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dp, ep", [(4, 2), (8, 2), (8, 4), (6, 3), (4, 1), (4, 4)])
def test_shard_rank_is_the_index_inside_the_parts_process_group(dp, ep):
    """``mesh.expert_dp_group`` of data-parallel rank r is range(r % ep, dp, ep) (``init_distributed``: every ep-th
    rank of the stage from its EP rank); the dense part's group is the stage's dp ranks in order. An uneven split
    (8 ranks, EP 2: 4 per group) would put a rank's shard on the wrong rows with r % ep."""
    for r in range(dp):
        group = list(range(r % ep, dp, ep))
        assert shard_rank("expert", r, ep) == group.index(r)
        assert shard_rank("dense", r, ep) == r and shard_rank("all", r, ep) == r
        if ep > 1:
            assert dict(shard_kinds(dp, ep))["expert"] == len(group)


@pytest.mark.parametrize("parts", [None, "one", "three"])
def test_zero1_state_with_another_count_of_parts_is_refused(parts):
    """A ZeRO-1 shard's state holds one optimizer state per part (dense and expert here): a state with fewer or more
    parts (another layout's) is refused, not loaded part-way by ``zip``."""
    opts = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]) for _ in range(2)]
    sharded = SimpleNamespace(local_optimizers=lambda: opts)
    state = {"one": {"parts": [opts[0].state_dict()]}, "three": {"parts": [opts[0].state_dict()] * 3}}.get(parts, {})
    with pytest.raises(ValueError, match="this ZeRO-1 optimizer 2"):
        ShardedOptimizer.load_state_dict(sharded, state)
    ShardedOptimizer.load_state_dict(sharded, {"parts": [o.state_dict() for o in opts]})


# ---- optim_state.py ----------------------------------------------------------------------------------------------
def test_expert_rows_with_a_gap_and_an_overlap_of_equal_size_are_refused():
    """Rows [0, 2) and [1, 3) of a 4-row stack: 4 rows in all, but row 1 twice and row 3 never."""
    with pytest.raises(RuntimeError, match="expert rows"):
        _spans("a", [(0, 2), (1, 3)], 4)
    with pytest.raises(RuntimeError, match="expert rows"):
        optimizer_index({"x": {"a": {"shape": [4], "rows": [0, 2]}}, "y": {"a": {"shape": [4], "rows": [1, 3]}}})
    _spans("a", [(2, 4), (0, 2)], 4)  # covered once, in any order


@pytest.mark.parametrize("entry", [
    {"shape": [], "parts": [["optimizer-00000-of-00002.safetensors", 0, 2]]},  # rows of a 0-dim tensor
    {"shape": [4], "parts": [["optimizer-00000-of-00002.safetensors", 0, 2], ["optimizer-00001-of-00002.safetensors"]]},
])
def test_a_malformed_index_entry_is_a_bad_entry(tmp_path, entry):
    """Each is refused as a bad entry (ValueError naming it), not an IndexError or an unpacking error."""
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "flyer optimizer state parts",
                                                   "tensors": {"a/exp_avg": entry}}))
    with pytest.raises(ValueError, match="bad entry for 'a/exp_avg'"):
        _read_index(tmp_path / INDEX_FILE)
    with pytest.raises(ValueError, match="bad entry"):
        SavedState(tmp_path)


def _two_linears_one_stepped():
    """Two Linear layers, AdamW; only the second has a gradient, so only it has state (the first took no step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model[1](torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return model, opt


def _fresh():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


ONE_RANK = SimpleNamespace(ep=1, pp=1, dp_rank=0)


def test_a_zero1_owner_other_than_dp_rank_0_sends_its_state():
    """ZeRO-1: each parameter's state exists on its owner only, so every rank sends what it holds (dp rank 1 here);
    unsharded, dp rank 1's state is a replica of rank 0's: it sends none."""
    model, opt = _two_linears_one_stepped()
    mesh = SimpleNamespace(dp_rank=1, ep=1, pp=1)
    part = optimizer_part(model, SimpleNamespace(local_optimizers=lambda: [opt]), mesh)
    assert sorted(part) == sorted(f"1.{p}/{k}" for p in ("weight", "bias") for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(part["1.weight/exp_avg"][0], opt.state[model[1].weight]["exp_avg"])
    assert optimizer_part(model, opt, mesh) == {}


def test_gathered_expert_rows_missing_a_slice_are_refused():
    """``full_optimizer_state``: an expert stack's rows gathered from the ranks must cover it once (rows 2..3 of 4
    missing here: not left as zeros)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    parts = [{"e/exp_avg": (torch.ones(2, 3), 0, 4)}, {}]
    mesh = SimpleNamespace(dp_rank=0, ep=2, pp=1, gather_object=lambda _mine: parts)
    with pytest.raises(RuntimeError, match="expert rows"):
        full_optimizer_state(model, opt, mesh)
    parts[1] = {"e/exp_avg": (torch.full((2, 3), 2.0), 2, 4)}
    whole = full_optimizer_state(model, opt, mesh)["e/exp_avg"]
    assert torch.equal(whole, torch.cat([torch.ones(2, 3), torch.full((2, 3), 2.0)]))


def test_a_parameter_without_state_before_one_with_state_loads_in_place(tmp_path):
    """``load_full_optimizer_state``: state is keyed by each parameter's index in its group; a parameter without saved
    state (no step taken yet) still takes its index, so the next parameter's state lands on that parameter."""
    model, opt = _two_linears_one_stepped()
    names = {id(p): n for n, p in model.named_parameters()}
    save_file({f"{names[id(p)]}/{k}": v.detach().clone().contiguous() for p, s in opt.state.items()
               for k, v in s.items()}, str(tmp_path / OPTIMIZER_FILE))
    fresh, fresh_opt = _fresh()
    load_full_optimizer_state(fresh, fresh_opt, ONE_RANK, tmp_path)
    assert not fresh_opt.state.get(fresh[0].weight) and not fresh_opt.state.get(fresh[0].bias)
    for name in ("weight", "bias"):
        got, want = fresh_opt.state[getattr(fresh[1], name)], opt.state[getattr(model[1], name)]
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("case, says", [("unknown", "the model lacks"), ("shape", "has shape"),
                                        ("incomplete", "in its group")])
def test_saved_state_that_does_not_fit_the_model_is_refused(tmp_path, case, says):
    """State for a parameter the model lacks, of another shape, or missing one kind (exp_avg_sq) for one parameter
    of a group: each refused naming the problem, never loaded part-way."""
    model, opt = _two_linears_one_stepped()
    state = {f"{n}/{k}": v.detach().clone() for n, p in model.named_parameters() if p in opt.state
             for k, v in opt.state[p].items()}
    if case == "unknown":
        state["9.weight/exp_avg"] = torch.zeros(2)
    elif case == "shape":
        state["1.weight/exp_avg"] = torch.zeros(2, 5)
    else:
        del state["1.bias/exp_avg_sq"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / OPTIMIZER_FILE))
    fresh, fresh_opt = _fresh()
    with pytest.raises(ValueError, match=says):
        load_full_optimizer_state(fresh, fresh_opt, ONE_RANK, tmp_path)


# ---- pipeline.py -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [range(1, 4), range(0, 3), range(2, 5)])
def test_a_stage_cutting_a_shortcut_moe_pair_is_refused(layers):
    """LongCat-Flash: block 2i computes the MoE block 2i+1 adds; a stage starting or ending inside a pair is refused."""
    model = Transformer(longcat_cfg(n_layers=6))
    with pytest.raises(ValueError, match="cut a shortcut-MoE pair"):
        Stage(model, 1, layers, 3, 4)
    Stage(model, 1, range(2, 4), 3, 4)  # whole pairs


def test_chat_data_with_trained_indexers_needs_query_totals():
    """``train_step`` refuses chat data (target_totals) without query_totals while indexers train, before any work."""
    fake = SimpleNamespace(_trained_indexers=lambda: [object()], _stages=[])
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="needs query_totals"):
        PipelineModel.train_step(fake, x, x, target_totals=[8.0])


def test_token_id_0_is_a_real_token_and_a_real_target_under_chat_data():
    """Chat data: padding is ids < 0 (x) and IGNORE_INDEX (-100, y); id 0 is a token like any other. A one-stage
    ``Stage`` keeps x >= 0 as its valid mask, and ``_target_weight`` counts y >= 0; a micro-batch without a trained
    target (its mean loss 0 / 0, NaN) weighs 0, not NaN. Exact: counts and a power-of-2 share."""
    cfg = preset("tiny", vocab_size=256, n_layers=2, max_seq_len=64, original_seq_len=64)
    torch.manual_seed(0)
    st = Stage(Transformer(cfg), 0, range(0, 2), 1, 2)
    st.target_totals = [4.0] * (cfg.mtp_depth + 1)
    x = torch.tensor([[0, 7, 0, 3, -1, -1]])
    st(x.clamp(min=0), x)  # as train_step hands them: clamped input, raw ids
    tokens, valid, _, _ = st.pending.popleft()
    assert torch.equal(valid, x >= 0) and torch.equal(tokens, x.clamp(min=0))
    y = torch.tensor([[0, 9, 0, -100, -100, -100]])  # 3 trained targets, two of them id 0
    assert st._target_weight(torch.tensor(3.0), y, 0).item() == 4.5  # M x share: 2 x 3 / 4 = 1.5
    assert st._target_weight(torch.tensor(float("nan")), torch.full_like(y, -100), 0).item() == 0.0


def test_query_weight_is_m_times_the_micro_batchs_share_of_the_real_queries():
    """``Stage._query_weight``: chat data with trained indexers, a micro-batch's L_I weighs M x its share of the step's
    real queries at depth k (so ``scale`` = 1/M leaves the share); 1.0 for text; 0.0 for a depth without queries.
    Exact: small counts over a power of 2."""
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    st = SimpleNamespace(query_totals=[8.0, 4.0, 0.0], micro_batches=4)
    assert Stage._query_weight(st, valid, None, 0) == 4 * 4 / 8  # 4 real queries of the step's 8
    assert Stage._query_weight(st, valid, None, 1) == 2 * 4 / 4  # depth 1: positions 1.. : 2 real
    assert Stage._query_weight(st, valid, None, 2) == 0.0
    assert Stage._query_weight(SimpleNamespace(query_totals=None, micro_batches=4), valid, None, 0) == 1.0


def _tied_cfg():
    return _cfg().replace(tie_embeddings=True, mtp_depth=0)


def _tied_loop_worker(rank: int) -> dict:
    mesh = init_distributed(_tied_cfg(), pp=2, timeout_s=120)
    pm = PipelineModel(build_model(_tied_cfg(), mesh, "fp32", seed=SEED, stages=("1f1b", T)), mesh, "1f1b", M, B, T)
    pm.train_step(*_batch(1, 0))
    mesh.sync_gradients(pm)
    pm.sync_mirrors()
    out = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    dist.destroy_process_group()
    return out


def test_tied_embeddings_without_mtp_on_a_loop_pipeline_sum_the_head_and_embedding_gradients():
    """1F1B on 2 ranks, the head tied to the embedding and no MTP module: the last stage's rank holds a mirror of the
    embedding (as the head); after ``sync_mirrors`` both ranks' copies hold the one-process gradient (the head's and
    the embedding's summed). FP32, only the summation order differs: ``test_pipeline``'s FP32_TOL."""
    results = run_ranks(_tied_loop_worker, 2)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        ref = Transformer(_tied_cfg())
    accumulate(ref, *_batch(1, 0))
    want = ref.embed.weight.grad
    for rank, got in enumerate(results):
        assert "embed.weight" in got, rank
        assert _rel(got["embed.weight"], want) <= FP32_TOL, (rank, _rel(got["embed.weight"], want))
