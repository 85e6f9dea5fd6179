"""Expert parallelism end to end on gloo: the whole model (tiny preset, 3 layers + MTP) on 2 and
4 ranks, as one node and as two nodes, against the same model in one process on the
concatenation of all ranks' batches (computed once, here in the test process).

Each layout is one spawn (module fixture) running every case; the tests compare its results.
Tolerances:

- FP32 wire (local, flat, hierarchical): 1e-4 relative to the largest magnitude of the oracle
  tensor -- only the FP32 summation order differs.
- FP8 dispatch (hierarchical with an FP32 combine, flat and hierarchical with the default BF16
  combine), against the single-process model with the same wire roundings (``LocalDispatcher``'s
  FP8 round trip and combine rounding), normwise: ``wire_bound``. The FP8 quantisation of a token
  does not depend on where it travels, but its input does differ in the last FP32 bits (other
  summation orders upstream), and an element that lies that close to an E4M3 rounding boundary
  rounds to the neighbouring code: one E4M3 spacing. So the bound is a share of the wire's whole
  effect on that tensor (oracle with wire roundings against the plain FP32 oracle), see
  ``wire_bound``; a wrong tile, scale or token moves a tensor by the whole effect or more.
- Training (4 ranks as 2 nodes x 2): parameters and router biases after 3 AdamW steps, with the
  router-bias update and global-norm clipping, equal the single-process run within ``adamw_bound``:
  the gradients' FP32 tolerance carried through AdamW's update.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist

from bounds import FP32_U
from flyer.config import preset
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.dispatch import comm_stats, dispatcher_factory
from flyer.parallel.grads import (broadcast_parameters, clip_grad_norm_, expert_param_names, full_state_dict,
                                  init_like_single_process, load_full_state_dict, sync_gradients)
from flyer.parallel.mesh import init_distributed
from ranks import run_ranks

B, T = 2, 12  # sequences and tokens per rank
SEED, STEPS, LR, CLIP = 3, 3, 3e-3, 0.5
# AdamW's eps, large enough that its update lr * m / (sqrt(v) + eps) is Lipschitz in the gradients
# (the default 1e-8 turns a last-bit difference of a gradient near zero into a whole step)
ADAM_EPS = 1e-3


def _cfg():
    return preset("tiny", vocab_size=256, n_layers=3, max_seq_len=64, original_seq_len=64)


def _batch(world: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (world * B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise difference relative to the oracle's largest magnitude."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-8)) if b.numel() else 0.0


def _nrel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative difference."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) if b.numel() else 0.0


FP32_TOL = 1e-4
# FP8 boundary flips. A flip moves one element by one E4M3 spacing s, at most 2x its own rounding
# error; the wire's effect is every element's rounding error, rms s/sqrt(12) each. With m of n
# elements flipped the normwise ratio is at most sqrt(12 m / n). An FP32 discrepancy of d ulps
# flips an element with probability about d 2^-24 / 2^-4 = d 2^-20, so even d = 2^10 (a long
# sum's worst case) gives sqrt(12 * 2^-10) = 0.11.
FLIP_SHARE = 0.11
# Hierarchical BF16 combine: a (token, node) pair is summed in FP32 and rounded once, dispatch's gradients
# are rounded at both hops (combine's travel in FP8, rounded once on the token's rank, as the oracle's), where
# the oracle rounds each copy once: two independent sets of BF16 roundings of the same size as the oracle's one,
# whose difference has sqrt(1 + 1 + 1) times its norm.
REROUND_SHARE = 3**0.5


def wire_bound(share: float):
    """The bound of an FP8-dispatched tensor's normwise error against its wire-rounded oracle:
    FP32_TOL plus ``share`` of ``effect``, the normwise difference the wire roundings make to that
    tensor in the oracle itself (wire-rounded oracle against the plain FP32 one). A wrong tile,
    scale, weight or token moves a tensor by the whole effect or more."""
    return lambda effect: FP32_TOL + share * effect


# name: (dispatcher, ep (0 = world), fp8, combine dtype, metric, tolerance or wire_bound)
CASES = {
    "local": ("local", 1, False, None, _rel, FP32_TOL),
    "flat": ("flat", 0, False, None, _rel, FP32_TOL),
    "hierarchical": ("hierarchical", 0, False, None, _rel, FP32_TOL),
    "hierarchical-fp8": ("hierarchical", 0, True, torch.float32, _nrel, wire_bound(FLIP_SHARE)),
    "flat-fp8-bf16": ("flat", 0, True, None, _nrel, wire_bound(FLIP_SHARE)),  # rounds each copy as the oracle
    "hierarchical-fp8-bf16": ("hierarchical", 0, True, None, _nrel, wire_bound(REROUND_SHARE)),
    "hierarchical-ep2": ("hierarchical", 2, False, None, _rel, FP32_TOL),  # 4 ranks: EP groups + expert DP
}
LAYOUTS = {"2x1node": (2, 2), "2x2nodes": (2, 1), "4x1node": (4, 4), "4x2nodes": (4, 2)}
TRAIN = {"train-hierarchical-ep4": ("hierarchical", 4), "train-flat-ep2": ("flat", 2)}  # on 4x2nodes


def _cases(world: int) -> list[str]:
    return [n for n, c in CASES.items() if c[1] in (0, 1) or c[1] < world]


# ---- ranks --------------------------------------------------------------------------------------
def _equivalence(rank: int, world: int, rpn: int, name: str) -> dict:
    kind, ep, fp8, cdt, _, _ = CASES[name]
    cfg = _cfg()
    mesh = init_distributed(cfg, ep=ep or world, ranks_per_node=rpn, timeout_s=60)
    x, y = _batch(world)
    xr, yr = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
    model = Transformer(cfg, dispatcher_factory(cfg, mesh, kind, fp8, cdt))
    load_full_state_dict(model, _init_state(), mesh)
    logits = model(xr)
    loss = model.compute_loss(xr, yr).loss
    loss.backward()
    sync_gradients(model, mesh)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    stats = comm_stats(model, reset=False)
    job = comm_stats(model, group=dist.group.WORLD)  # summed over ranks
    return dict(job_bytes=job["inter_node_bytes"] + job["intra_node_bytes"],
                rank_bytes=stats["inter_node_bytes"] + stats["intra_node_bytes"], logits=logits.detach(),
                loss=float(mean_loss) / world, ep_rank=mesh.ep_rank,
                grads={n: p.grad for n, p in model.named_parameters()}, experts=expert_param_names(model),
                inter_node_bytes=stats["inter_node_bytes"], n_layers_counted=len(stats["layers"]))


def _train(rank: int, world: int, rpn: int, name: str) -> dict:
    kind, ep = TRAIN[name]
    cfg = _cfg()
    mesh = init_distributed(cfg, ep=ep, ranks_per_node=rpn, timeout_s=60)
    # the trainer's recipe: same seed everywhere, single-process initialisation, broadcast
    torch.manual_seed(SEED)
    model = Transformer(cfg, dispatcher_factory(cfg, mesh, kind))
    init_like_single_process(model, mesh, SEED)
    broadcast_parameters(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    norms = []
    for step in range(STEPS):
        x, y = _batch(world, seed=100 + step)
        model.compute_loss(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]).loss.backward()
        sync_gradients(model, mesh)
        norms.append(float(clip_grad_norm_(model, CLIP, mesh)))
        update_router_bias(model, group=dist.group.WORLD)
        opt.step()
        opt.zero_grad()
    return dict(state=full_state_dict(model, mesh), norms=norms)


def _layout_worker(rank: int, rpn: int) -> dict:
    world = int(os.environ["WORLD_SIZE"])
    out = {name: _equivalence(rank, world, rpn, name) for name in _cases(world)}
    if (world, rpn) == (4, 2):
        out.update({name: _train(rank, world, rpn, name) for name in TRAIN})
    dist.destroy_process_group()
    return out


# ---- single-process oracles -----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _init_state() -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Transformer(_cfg()).state_dict()


@functools.lru_cache(maxsize=None)
def _oracle(world: int, fp8: bool, cdt) -> dict:
    cfg = _cfg()
    x, y = _batch(world)
    ref = Transformer(cfg, dispatcher_factory(cfg, None, "local", fp8, cdt))
    ref.load_state_dict(_init_state())
    logits = ref(x).detach()
    loss = ref.compute_loss(x, y).loss
    loss.backward()
    return dict(logits=logits, loss=loss.item(), grads={n: p.grad for n, p in ref.named_parameters()})


@functools.lru_cache(maxsize=None)
def _train_oracle(world: int) -> dict:
    cfg = _cfg()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        ref = Transformer(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    grad_max: dict[str, list[float]] = {n: [] for n, _ in ref.named_parameters()}
    norms = []
    for step in range(STEPS):
        x, y = _batch(world, seed=100 + step)
        ref.compute_loss(x, y).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        for n, p in ref.named_parameters():
            grad_max[n].append(float(p.grad.abs().max()))
        update_router_bias(ref)
        opt.step()
        opt.zero_grad()
    return dict(state=ref.state_dict(), norms=norms, grad_max=grad_max)


def adamw_bound(grad_max: list[float], w_max: float) -> float:
    """Largest difference of a parameter (largest magnitude w_max) after AdamW steps whose gradients
    (largest magnitude G per step) differ by at most d = FP32_TOL * G: each step moves it by
    lr * m / (sqrt(v) + eps), which changes by at most lr * (|dm| / eps + |m| |d sqrt(v)| / eps^2)
    <= lr * d * (1/eps + G/eps^2), plus the few FP32 roundings of each step's arithmetic."""
    steps = FP32_TOL * LR * sum(G / ADAM_EPS + G * G / ADAM_EPS**2 for G in grad_max)
    return steps + 8 * len(grad_max) * FP32_U * w_max


@functools.lru_cache(maxsize=None)
def _run_layout(name: str) -> tuple:
    world, rpn = LAYOUTS[name]
    return name, world, rpn, run_ranks(_layout_worker, world, rpn)


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_outputs_losses_and_gradients_match_single_process(layout):
    """Every case of the layout: logits of each rank's share, the mean loss, every gradient."""
    name_l, world, rpn, results = _run_layout(layout)
    failures = []
    for name in _cases(world):
        kind, _, fp8, cdt, metric, tol = CASES[name]
        ref = _oracle(world, fp8, cdt)
        plain = _oracle(world, False, None)
        for rank, res in enumerate(results):
            r = res[name]
            rows = slice(rank * B, (rank + 1) * B)
            pairs = {"logits": (r["logits"], ref["logits"][rows], plain["logits"][rows])}
            for pname, g in r["grads"].items():
                g_ref, g_plain = ref["grads"][pname], plain["grads"][pname]
                if pname in r["experts"]:
                    n = g.shape[0]
                    g_ref, g_plain = (t[r["ep_rank"] * n:(r["ep_rank"] + 1) * n] for t in (g_ref, g_plain))
                pairs[f"grad {pname}"] = (g, g_ref, g_plain)
            bound = tol if callable(tol) else (lambda effect: tol)
            errs = {k: (metric(got, want), bound(metric(want, base))) for k, (got, want, base) in pairs.items()}
            errs["loss"] = (abs(r["loss"] - ref["loss"]) / abs(ref["loss"]),
                            bound(abs(ref["loss"] - plain["loss"]) / abs(plain["loss"])))
            failures += [f"{name_l} rank {rank} {name}: {k} error {e:.2e} > {b:.2e}" for k, (e, b) in errs.items()
                         if not e <= b]
            assert len(r["grads"]) == len(ref["grads"])
            if kind != "local":
                # every MoE layer (2 blocks + the MTP block) counts its traffic
                assert r["n_layers_counted"] == 3
                crosses_nodes = world // rpn > 1 and not name.endswith("ep2")
                assert (r["inter_node_bytes"] > 0) == crosses_nodes, (name_l, name, r["inter_node_bytes"])
                assert r["job_bytes"] == sum(q[name]["rank_bytes"] for q in results)  # comm_stats(group=)
    assert not failures, "\n".join(failures)


def test_training_steps_match_single_process():
    """The trainer's loop on 4 ranks as 2 nodes x 2 (forward, backward, sync_gradients, clipping,
    router-bias update, AdamW): weights gathered to the full layout equal one process's."""
    _, world, _, results = _run_layout("4x2nodes")  # the same spawn as the 4x2nodes equivalence
    ref = _train_oracle(world)
    for name in TRAIN:
        for rank, res in enumerate(results):
            r = res[name]
            assert set(r["state"]) == set(ref["state"])
            assert any(k.endswith("gate.bias") for k in r["state"])  # router biases are trained state
            for n, n_ref in zip(r["norms"], ref["norms"]):
                assert abs(n - n_ref) <= 1e-4 * n_ref, (name, r["norms"], ref["norms"])
            assert min(ref["norms"]) > CLIP  # clipping was active
            # parameters: AdamW on gradients within FP32_TOL; buffers (router biases): exact steps of gamma
            errs = {k: (float((r["state"][k] - v).abs().max()),
                        adamw_bound(ref["grad_max"][k], float(v.abs().max())) if k in ref["grad_max"] else FP32_TOL)
                    for k, v in ref["state"].items()}
            worst = max(errs, key=lambda k: errs[k][0] / errs[k][1])
            assert errs[worst][0] <= errs[worst][1], (name, rank, worst, errs[worst])
