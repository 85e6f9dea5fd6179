"""Pipeline parallelism against one process: every schedule (1F1B, interleaved 1F1B, ZBV,
DualPipeV) and PP x EP x DP layouts on 4 gloo ranks (and PP2 x EP2 x DP2 on 8, slow), over several
AdamW steps.

All cases of one world size run in one spawn (cached; each case builds its own mesh and groups,
in the same order on every rank); the tests compare its results with single-process oracles computed
here. A pipeline step runs M micro-batches of B sequences on each data-parallel replica; the
oracle is the one-process model with gradient accumulation over the dp x M micro-batches in
replica order (the trainer's claim: PP x DP sees what DP alone sees with grad_accum = M).

Tolerances (FP32 throughout; only the summation order differs):

- Per step, the loss terms (next-token, MTP, balance) and every gradient after the replica and
  mirror sums equal the one-process values *at the same weights* (the pipeline's weights gathered
  before the step) within FP32_TOL relative to the oracle tensor's largest magnitude, as in
  ``test_ep_model``. Comparing at the same weights keeps the bound that of one step; the
  trajectory is checked apart:
- After the steps (global-norm clipping, router-bias update, AdamW) every parameter equals the
  one-process trajectory within ``adamw_bound`` (the gradients' tolerance carried through AdamW),
  and the router biases (gate.bias buffers, moved in exact steps of bias_update_speed) within FP32_TOL.
"""

from __future__ import annotations

import functools
import itertools
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from bounds import adamw_bound
from flyer.config import preset
from flyer.model.counts import _attention, _block_non_matmul, block_params, indexer_matmul_params, layer_flops_per_token
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.grads import MIRROR, expert_param_names
from flyer.parallel.mesh import init_distributed
from flyer.parallel.pipeline import PipelineModel
from flyer.parallel.stages import (PP_SCHEDULES, SPLIT_SCHEDULES, chunks_per_rank, end_flops, split_backward_runs,
                                   split_layers, stage_ranks)
from flyer.train.build import build_model
from oracle_cache import by_state
from ranks import needs_split_backward, run_ranks

B, T, M = 2, 12, 4  # sequences per micro-batch, tokens, micro-batches per step (the fewest V schedules on pp 2 run)
SEED, STEPS, LR, CLIP = 3, 3, 3e-3, 0.5
ADAM_EPS = 1e-3  # large enough that AdamW's update is Lipschitz in the gradients (see test_ep_model)
FP32_TOL = 1e-4

# name: (world, pp, ep, schedule); dp = world / pp. 4 layers: 4 stages at most (pp 4 runs 1F1B only).
CASES = {f"pp2-ep2-{s}": (4, 2, 2, s) for s in PP_SCHEDULES}
CASES.update({"pp2-dp2-dualpipev": (4, 2, 1, "dualpipev"), "pp4-1f1b": (4, 4, 1, "1f1b")})
# 8 ranks: EP inside a stage's replicas (expert gradients summed over expert_dp_group), one spawn, slow
CASES["pp2-ep2-dp2-dualpipev"] = (8, 2, 2, "dualpipev")


def _cfg():
    return preset("tiny", vocab_size=256, n_layers=4, max_seq_len=64, original_seq_len=64)


def _batch(dp: int, step: int):
    """The global batch of a step: dp x M micro-batches of B sequences, replica-major."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, 256, (dp * M * B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ---- ranks --------------------------------------------------------------------------------------
def _case(rank: int, name: str) -> dict:
    _, pp, ep, schedule = CASES[name]
    cfg = _cfg()
    mesh = init_distributed(cfg, ep=ep, pp=pp, timeout_s=120)
    base = build_model(cfg, mesh, "fp32", seed=SEED, stages=(schedule, T))  # the other stages on meta
    pm = PipelineModel(base, mesh, schedule, M, B, T)
    held = {id(p) for p in pm.parameters()}
    assert all(p.is_meta for p in base.parameters() if id(p) not in held)  # no memory for other stages
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    rows = slice(mesh.dp_rank * M * B, (mesh.dp_rank + 1) * M * B)
    steps = []
    for step in range(STEPS):
        before = mesh.full_state_dict(pm)  # the whole model on rank 0
        x, y = _batch(mesh.dp, step)
        terms = pm.train_step(x[rows], y[rows])
        mesh.sync_gradients(pm)
        pm.sync_mirrors()
        terms = {k: v * pp for k, v in mesh.mean(terms).items()}  # as the trainer: each term lives on one stage
        grads = {n: p.grad.clone() for n, p in pm.named_parameters()}
        norm = float(mesh.clip_grad_norm_(pm, CLIP))
        update_router_bias(pm, group=mesh.dp_group)
        opt.step()
        opt.zero_grad()
        steps.append(dict(state=before if rank == 0 else None, terms=terms, grads=grads, norm=norm))
    first = next((st for st in pm.stages if st.first), None)
    last = next((st for st in pm.stages if st.last), None)
    return dict(steps=steps, final=mesh.full_state_dict(pm), ep_rank=mesh.ep_rank, pp_rank=mesh.pp_rank,
                experts=expert_param_names(pm), stages=[st.index for st in pm.stages],
                layers=sorted(int(i) for i in pm.layers),
                # V placement: MTP's embedding is stage 0's Parameter; loop placement: a marked mirror
                shared_embed=first is not None and last is not None and last.embed.weight is first.embed.weight,
                mirror=hasattr(pm, "embed") and getattr(pm.embed.weight, MIRROR, False),
                holds={k: hasattr(pm, k) for k in ("embed", "head", "mtp")})


def _worker(rank: int) -> dict:
    world = int(os.environ["WORLD_SIZE"])  # set by run_ranks
    out = {name: _case(rank, name) for name, case in CASES.items()
           if case[0] == world and (split_backward_runs() or case[3] not in SPLIT_SCHEDULES)}
    dist.destroy_process_group()
    return out


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_ranks(_worker, world)


# ---- single-process oracles -----------------------------------------------------------------------
def accumulate(ref: Transformer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Forward and backward of the micro-batches of B sequences in (x, y), each loss over their count;
    the mean terms (an MTP loss of 0 without an MTP module)."""
    n = x.shape[0] // B
    terms = dict.fromkeys(("loss", "main_loss", "mtp_loss", "aux_loss"), 0.0)
    for i in range(n):
        out = ref.compute_loss(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B])
        (out.loss / n).backward()
        terms["loss"] += out.loss.item() / n
        terms["main_loss"] += out.main_loss.item() / n
        terms["mtp_loss"] += torch.stack(out.mtp_losses).mean().item() / n if out.mtp_losses else 0.0
        terms["aux_loss"] += out.aux_loss.item() / n
    return terms


def _accumulate(ref: Transformer, dp: int, step: int) -> dict[str, float]:
    """``accumulate`` over the step's dp x M micro-batches."""
    return accumulate(ref, *_batch(dp, step))


@by_state  # the cases ask it about the same weights (their first step at least)
def _oracle_at(state: dict, dp: int, step: int) -> tuple[dict, dict]:
    """(loss terms, gradients) of one process at the weights ``state`` on step ``step``'s batch."""
    ref = Transformer(_cfg())
    ref.load_state_dict(state)
    terms = _accumulate(ref, dp, step)
    return terms, {n: p.grad for n, p in ref.named_parameters()}


def adamw_trajectory(cfg, accumulate_step) -> dict:
    """The one-process run of ``cfg`` from the trainer's init (SEED): STEPS of ``accumulate_step(ref, step)``,
    clipping, router-bias update and AdamW; its final state and each parameter's largest gradient per step."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        ref = Transformer(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    # frozen parameters (DeepSeek-V4's indexers) get no gradient and no update: compared as buffers
    grad_max: dict[str, list[float]] = {n: [] for n, p in ref.named_parameters() if p.requires_grad}
    for step in range(STEPS):
        accumulate_step(ref, step)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        for n, p in ref.named_parameters():
            if n in grad_max:
                grad_max[n].append(float(p.grad.abs().max()))
        update_router_bias(ref)
        opt.step()
        opt.zero_grad()
    return dict(state=ref.state_dict(), grad_max=grad_max)


@functools.lru_cache(maxsize=None)
def _trajectory(dp: int) -> dict:
    return adamw_trajectory(_cfg(), lambda ref, step: _accumulate(ref, dp, step))


def check_trajectory(final: dict, ref: dict, name: str) -> None:
    """Every parameter after the steps within ``adamw_bound`` of the one-process trajectory ``ref``
    (``adamw_trajectory``), the router biases (no gradient) within FP32_TOL."""
    errs = {k: (float((final[k] - v).abs().max()),
                adamw_bound(ref["grad_max"][k], float(v.abs().max()), LR, ADAM_EPS, FP32_TOL)
                if k in ref["grad_max"] else FP32_TOL)
            for k, v in ref["state"].items()}
    worst = max(errs, key=lambda k: errs[k][0] / errs[k][1])
    assert errs[worst][0] <= errs[worst][1], (name, worst, errs[worst])


def term_failures(got: dict[str, float], want: dict[str, float], where: str) -> list[str]:
    """The loss terms (next-token, MTP, balance) of ``got`` off the one-process ``want`` by more than FP32_TOL."""
    return [f"{where} {k}: {got[k]} vs {want[k]}" for k in ("main_loss", "mtp_loss", "aux_loss")
            if abs(got[k] - want[k]) > FP32_TOL * abs(want[k])]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise difference relative to the oracle's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ---- stage split and placement (no processes) -----------------------------------------------------
def stage_costs(cfg, split: list[range], seq_len: int, indexer_train: str = "off") -> list[float]:
    """Each stage's training FLOPs per token: its blocks', the last stage's head and MTP modules' too."""
    out = [sum(layer_flops_per_token(cfg, seq_len, i, True, indexer_train) for i in r) for r in split]
    out[-1] += end_flops(cfg, seq_len, indexer_train)
    return out


def brute_force_best(cfg, n_stages: int, seq_len: int, indexer_train: str = "off") -> float:
    """The smallest largest-stage cost over every contiguous split into non-empty stages."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, cfg.n_layers), n_stages - 1):
        bounds = (0, *cuts, cfg.n_layers)
        split = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        best = min(best, max(stage_costs(cfg, split, seq_len, indexer_train)))
    return best


@pytest.mark.parametrize("n_layers,n_dense,mtp,vocab", [(4, 1, 1, 256), (7, 1, 1, 8192), (8, 3, 2, 256),
                                                        (6, 0, 0, 32768)])
def test_split_layers_is_the_flop_optimal_contiguous_split(n_layers, n_dense, mtp, vocab):
    cfg = preset("tiny", vocab_size=vocab, n_layers=n_layers, n_dense_layers=n_dense, mtp_depth=mtp)
    seq = 256
    cost = [layer_flops_per_token(cfg, seq, i) for i in range(n_layers)]
    assert len(set(cost)) > 1 or n_dense == 0  # dense and MoE blocks differ: the split has something to balance
    for n in range(1, n_layers + 1):
        split = split_layers(cfg, n, seq)
        assert len(split) == n and all(len(r) for r in split)
        assert [i for r in split for i in r] == list(range(n_layers))  # contiguous, every layer once
        got = max(sum(cost[i] for i in r) + (end_flops(cfg, seq) if s == n - 1 else 0) for s, r in enumerate(split))
        assert got == pytest.approx(brute_force_best(cfg, n, seq), rel=1e-12), (n, split)


def _gemm_flops(cfg, layer_id: int) -> float:
    """6 per activated GEMM weight of block ``layer_id``, its DSA indexer's left out (it runs without gradient)."""
    return 6 * (block_params(cfg, layer_id, activated=True) - _block_non_matmul(cfg, layer_id)
                - indexer_matmul_params(cfg, layer_id))


def test_layer_flops_count_the_keys_each_layer_attends():
    """A layer's attention term is what its queries see: dense MLA every earlier token, DSA its top-k,
    DeepSeek-V4's window-only, CSA and HCA layers their window and entries (``counts``' exact means), trained
    (3 x forward), and the indexer's selection forward only. Before, every layer was charged dense causal attention:
    the V4 split balanced layers that cost alike as if they did not, and the other way round."""
    seq = 65536
    dense, sparse = preset("dsv3"), preset("dsv32")  # V3.2 attends 2048 of 65536 keys
    dense_attention = 6 * dense.n_heads * (dense.qk_head_dim + dense.v_head_dim) * seq / 2
    assert layer_flops_per_token(dense, seq, 5) == pytest.approx(_gemm_flops(dense, 5) + dense_attention, rel=1e-12)
    k, H, Hi = sparse.index_topk, sparse.n_heads, sparse.index_n_heads
    sparse_attention = 6 * H * (sparse.qk_head_dim + sparse.v_head_dim) * (k - k * k / (2 * seq))
    selection = 2 * Hi * (sparse.index_head_dim + 1) * (seq * seq - k * k) / (2 * seq)  # queries past k keys
    assert layer_flops_per_token(sparse, seq, 5) == pytest.approx(
        _gemm_flops(sparse, 5) + 2 * indexer_matmul_params(sparse, 5) + sparse_attention + selection, rel=1e-12)
    assert sparse_attention + selection < 0.15 * dense_attention
    v4 = preset("dsv4-flash")
    kinds = {}
    for i in range(v4.n_layers):
        a = _attention(v4, seq, True, i, dense=False)
        attention = layer_flops_per_token(v4, seq, i) - _gemm_flops(v4, i) - 2 * indexer_matmul_params(v4, i)
        assert attention == pytest.approx(3 * a.core + a.selection, rel=1e-12)
        kinds.setdefault(v4.compress_ratios[i], set()).add(round(attention))
    assert len(kinds) == 3 and all(len(v) == 1 for v in kinds.values())  # window only, CSA, HCA: one cost each
    window, csa, hca = (kinds[r].pop() for r in (0, v4.csa_ratio, 128))
    assert window < hca < csa
    # the dense causal attention the split charged before: about 20x even a CSA layer's at 64K tokens
    assert 6 * v4.n_heads * 2 * v4.head_dim * seq / 2 > 15 * csa


def test_split_layers_refuses_more_stages_than_layers():
    from flyer.errors import FieldError

    with pytest.raises(FieldError) as e:
        split_layers(_cfg(), 5)
    assert e.value.field == "pp"


def test_stages_left_on_meta_are_refused():
    """A model built for another layout (its stages here still on the meta device): one error naming
    the module, before any process group or P2P."""
    with torch.device("meta"):
        model = Transformer(_cfg())
    mesh = SimpleNamespace(pp=2, pp_rank=0)
    with pytest.raises(ValueError, match=r"layers: on the meta device, built for another pipeline layout"):
        PipelineModel(model, mesh, "1f1b", M, B, T)


def test_stage_ranks_loop_and_v_placement():
    assert stage_ranks("1f1b", 4) == [0, 1, 2, 3]
    assert stage_ranks("interleaved", 2) == [0, 1, 0, 1]  # loop: stage s on rank s mod pp
    assert stage_ranks("interleaved", 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    for s in ("zb", "dualpipev"):  # V: rank r holds stages r and 2 pp - 1 - r; first and last on rank 0
        assert stage_ranks(s, 2) == [0, 1, 1, 0]
        assert stage_ranks(s, 4) == [0, 1, 2, 3, 3, 2, 1, 0]
    for s in PP_SCHEDULES:
        assert stage_ranks(s, 1) == [0] and chunks_per_rank(s, 1) == 1


# ---- the 4-rank runs --------------------------------------------------------------------------------
def _params():
    return [pytest.param(n, marks=[*([pytest.mark.slow] if c[0] > 4 else []),
                                   *([needs_split_backward] if c[3] in SPLIT_SCHEDULES else [])])
            for n, c in CASES.items()]


@pytest.mark.parametrize("name", _params())
def test_pipeline_steps_match_single_process(name):
    """Loss terms and every gradient at each step, then the weights and router biases after the steps."""
    world, pp, ep, schedule = CASES[name]
    dp = world // pp
    results = [r[name] for r in _results(world)]
    failures = []
    for step in range(STEPS):
        terms, grads = _oracle_at(results[0]["steps"][step]["state"], dp, step)
        for rank, res in enumerate(results):
            got = res["steps"][step]
            failures += term_failures(got["terms"], terms, f"step {step} rank {rank}")
            for pname, g in got["grads"].items():
                want = grads[pname]
                if pname in res["experts"]:  # this rank's shard of the expert stack
                    n = g.shape[0]
                    want = want[res["ep_rank"] * n:(res["ep_rank"] + 1) * n]
                if not _rel(g, want) <= FP32_TOL:
                    failures.append(f"step {step} rank {rank} grad {pname}: {_rel(g, want):.2e}")
    assert not failures, "\n".join(failures[:20])
    # every parameter's gradient is produced on some rank (the pipeline's ranks hold the whole model)
    held = set().union(*(r["steps"][0]["grads"] for r in results))
    assert held == set(grads)

    ref = _trajectory(dp)
    final = results[0]["final"]
    assert set(final) == set(ref["state"])
    biases = [k for k in final if k.endswith("gate.bias")]
    assert biases and all(final[k].abs().max() > 0 for k in biases)  # router biases moved and are compared
    check_trajectory(final, ref, name)


# the last stage using a weight twice on one path: a second MTP module reads the embedding after the first's nodes, a
# tied embedding is the head the MTP module writes through (torch's split weight backward freed those nodes)
REUSED = {"mtp2": dict(mtp_depth=2), "tied-mtp1": dict(tie_embeddings=True)}


def _reused_worker(rank: int) -> dict:
    out = {}
    for name, over in REUSED.items():
        for schedule in SPLIT_SCHEDULES:
            cfg = _cfg().replace(**over)
            mesh = init_distributed(cfg, pp=2, timeout_s=120)
            pm = PipelineModel(build_model(cfg, mesh, "fp32", seed=SEED, stages=(schedule, T)), mesh, schedule, M, B, T)
            x, y = _batch(1, 0)
            terms = pm.train_step(x, y)
            mesh.sync_gradients(pm)
            pm.sync_mirrors()
            out[name, schedule] = dict(terms={k: v * 2 for k, v in mesh.mean(terms).items()},
                                       grads={n: p.grad.clone() for n, p in pm.named_parameters()})
    dist.destroy_process_group()
    return out


@needs_split_backward
def test_split_schedules_train_a_last_stage_that_reuses_a_weight():
    """zb and DualPipeV on 2 ranks with 2 MTP modules, or 1 and a tied embedding: the step's loss terms and every
    gradient equal one process's (the last stage's backward runs whole: ``_weight_reused``)."""
    results = run_ranks(_reused_worker, 2)
    failures = []
    for name, over in REUSED.items():
        cfg = _cfg().replace(**over)
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            ref = Transformer(cfg)
        terms = accumulate(ref, *_batch(1, 0))
        grads = {n: p.grad for n, p in ref.named_parameters()}
        for schedule in SPLIT_SCHEDULES:
            for rank, res in enumerate(results):
                got = res[name, schedule]
                failures += term_failures(got["terms"], terms, f"{name} {schedule} rank {rank}")
                failures += [f"{name} {schedule} rank {rank} grad {n}: {_rel(g, grads[n]):.2e}"
                             for n, g in got["grads"].items() if not _rel(g, grads[n]) <= FP32_TOL]
            assert set().union(*(r[name, schedule]["grads"] for r in results)) == set(grads)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("name", _params())
def test_stages_hold_their_split_and_share_the_embedding(name):
    """Each pipeline rank holds the stages ``stage_ranks`` gives it and exactly their layers; under V
    placement the last stage (MTP) uses stage 0's embedding Parameter itself on pipeline rank 0, under
    loop placement the last stage's rank holds a marked mirror."""
    world, pp, _, schedule = CASES[name]
    placement = stage_ranks(schedule, pp)
    split = split_layers(_cfg(), len(placement), T)
    for res in (r[name] for r in _results(world)):
        mine = [s for s, r in enumerate(placement) if r == res["pp_rank"]]
        assert sorted(res["stages"]) == mine
        assert res["layers"] == sorted(i for s in mine for i in split[s])
        holds_last = len(placement) - 1 in mine
        # the embedding with the first stage (and MTP's input with the last), head and MTP with the last
        assert res["holds"] == {"embed": 0 in mine or holds_last, "head": holds_last, "mtp": holds_last}
        if schedule in ("zb", "dualpipev"):
            assert holds_last == (res["pp_rank"] == 0) and res["shared_embed"] == holds_last
            assert not res["mirror"]
        else:
            assert not res["shared_embed"] and res["mirror"] == (holds_last and pp > 1)
