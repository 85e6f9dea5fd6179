"""Dispatchers in isolation on 4 gloo ranks as 2 nodes x 2 (EP 4): routing, gradients of tokens
and gate weights, skewed and empty batches, and the exact traffic counters.

The experts are a stand-in ``y = x * (expert id + 1)`` so a copy that reaches the wrong expert
shows; the oracle is ``LocalDispatcher`` on the concatenation of all ranks' tokens.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from flyer.config import preset
from flyer.model.dispatch import LocalDispatcher
from flyer.model.wire import fp8_row_bytes
from flyer.parallel.dispatch import make_dispatcher
from flyer.parallel.mesh import init_distributed
from ranks import run_ranks

WORLD, RPN, E, K, D = 4, 2, 16, 4, 160  # D not a multiple of 128: a partial FP8 scale block
N_LOCAL = E // WORLD


def _routing(scenario: str, rank: int):
    """(x_TD, topk_ids_TK, weights_TK) of a rank; every rank can rebuild every rank's."""
    g = torch.Generator().manual_seed(10 + rank)
    T = {"random": 24, "skewed": 16, "empty": 0 if rank == 1 else 8}[scenario]
    x = torch.randn(T, D, generator=g)
    if scenario == "skewed":  # every token of every rank wants experts 0..K-1 (all on node 0)
        ids = torch.arange(K).repeat(T, 1)
    else:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    w = torch.rand(T, K, generator=g)
    return x, ids, w


def _experts(x_ND: torch.Tensor, counts: torch.Tensor, first: int) -> torch.Tensor:
    scale = torch.arange(first + 1, first + 1 + counts.numel(), dtype=x_ND.dtype).repeat_interleave(counts)
    return x_ND * scale.unsqueeze(1)


def _run(disp, x, ids, w):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    first, _ = disp.local_experts()
    xs, counts, ctx = disp.dispatch(x, ids)
    y = disp.combine(_experts(xs, counts, first), w, ctx)
    # upstream gradient x**2: position-independent, the same in every run (a function of y would inherit its
    # summation order's last bits and flip FP8 roundings), and not y's rows, the stand-in experts' x scaled per token,
    # which an FP8 wire carries exactly (hiding the gradient's rounding)
    (y * x.detach().square()).sum().backward()
    return y.detach(), x.grad, w.grad


def _worker(rank: int) -> dict:
    cfg = preset("tiny", n_routed_experts=E, n_activated_experts=K, dim=D)
    mesh = init_distributed(cfg, ep=WORLD, ranks_per_node=RPN, timeout_s=60)
    out = {}
    for scenario in ("random", "skewed", "empty"):
        for kind in ("flat", "hierarchical"):
            for fp8 in (False, True):
                disp = make_dispatcher(kind, E, mesh, fp8=fp8, combine_dtype=torch.float32)
                y, gx, gw = _run(disp, *_routing(scenario, rank))
                totals = {}
                for phase, c in disp.counter.phases.items():
                    t = torch.tensor([c[k] for k in sorted(c)], dtype=torch.float64)
                    dist.all_reduce(t)
                    totals[phase] = dict(zip(sorted(c), t.tolist()))
                out[scenario, kind, fp8] = dict(y=y, gx=gx, gw=gw, totals=totals)
    for kind in ("flat", "hierarchical"):  # power-of-two FP8 scales (match_wire_scales under FP4 QAT)
        disp = make_dispatcher(kind, E, mesh, fp8=True, combine_dtype=torch.float32)
        disp.fp8_pow2 = True
        y, gx, gw = _run(disp, *_routing("random", rank))
        out["pow2", kind] = dict(y=y, gx=gx, gw=gw)
    for kind in ("flat", "hierarchical"):  # BF16 expert outputs, the default wire dtypes (as a BF16 run's)
        disp = make_dispatcher(kind, E, mesh)
        x, ids, w = _routing("random", rank)
        y, gx, gw = _run(disp, x.bfloat16(), ids, w)
        out["bf16", kind] = dict(y=y, gx=gx, gw=gw, totals={p: dict(c) for p, c in disp.counter.phases.items()})
    dist.destroy_process_group()
    return out


@functools.lru_cache(maxsize=None)
def _results():
    return run_ranks(_worker, WORLD)


def _oracle(scenario: str, fp8: bool):
    parts = [_routing(scenario, r) for r in range(WORLD)]
    x, ids, w = (torch.cat(p) for p in zip(*parts))
    y, gx, gw = _run(LocalDispatcher(E, fp8=fp8, combine_dtype=torch.float32), x, ids, w)
    sizes = [p[0].shape[0] for p in parts]
    return [t.split(sizes) for t in (y, gx, gw)], [p[1] for p in parts]


@pytest.mark.parametrize("scenario", ["random", "skewed", "empty"])
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_dispatch_combine_and_gradients_match_local(scenario, kind, fp8):
    (ys, gxs, gws), _ = _oracle(scenario, fp8)
    for rank, res in enumerate(_results()):
        r = res[scenario, kind, fp8]
        torch.testing.assert_close(r["y"], ys[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["gx"], gxs[rank], rtol=1e-5, atol=1e-5)  # backward of dispatch
        torch.testing.assert_close(r["gw"], gws[rank], rtol=1e-5, atol=1e-5)  # gate weights' gradient


def _expected_rows(ids_per_rank: list[torch.Tensor]) -> dict[str, dict[str, int]]:
    """Rows crossing nodes / staying inside a node for flat and hierarchical dispatch, counted
    from the routing alone (ranks node-major, 2 per node, 4 experts per rank)."""
    def node(r):
        return r // RPN

    exp = {"flat": {"intra": 0, "inter": 0}, "hierarchical": {"intra": 0, "inter": 0}}
    for src, ids in enumerate(ids_per_rank):
        for row in ids.tolist():
            dests = [e // N_LOCAL for e in row]
            for d in dests:
                if d != src:
                    exp["flat"]["inter" if node(d) != node(src) else "intra"] += 1
            for q in sorted({node(d) for d in dests}):
                fwd = q * RPN + src % RPN  # same local index on node q
                exp["hierarchical"]["inter"] += q != node(src)
                # once per rank of node q holding any of the token's experts, however many
                exp["hierarchical"]["intra"] += len({d for d in dests if node(d) == q and d != fwd})
    return exp


@pytest.mark.parametrize("scenario", ["random", "skewed"])
def test_traffic_counters_are_exact(scenario):
    _, ids_per_rank = _oracle(scenario, False)
    exp = _expected_rows(ids_per_rank)
    pairs_remote = exp["hierarchical"]["inter"]
    pairs_all = sum(len({e // (N_LOCAL * RPN) for e in row}) for ids in ids_per_rank for row in ids.tolist())
    res = _results()[0]
    for kind in ("flat", "hierarchical"):
        for fp8 in (False, True):
            tot = res[scenario, kind, fp8]["totals"]
            d_row = fp8_row_bytes(D) if fp8 else 4 * D
            for where in ("intra", "inter"):
                rows = exp[kind][where]
                assert tot["dispatch"][f"{where}_node_tokens"] == rows, (kind, fp8, where)
                assert tot["dispatch"][f"{where}_node_bytes"] == rows * d_row
                assert tot["combine"][f"{where}_node_bytes"] == rows * 4 * D  # FP32 combine here
                assert tot["dispatch_grad"][f"{where}_node_bytes"] == rows * 4 * D
                # combine's gradient retraces dispatch's route in dispatch's format: FP8 rows under FP8 dispatch
                assert tot["combine_grad"][f"{where}_node_tokens"] == rows
                assert tot["combine_grad"][f"{where}_node_bytes"] == rows * d_row
                # flat weighs the copies on the token's rank: under FP8 their weights go along (4 bytes a copy)
                meta = tot.get("combine_grad_meta", {}).get(f"{where}_node_bytes", 0)
                assert meta == (rows * 4 if kind == "flat" and fp8 else 0), (kind, fp8, where)
            if kind == "hierarchical":  # K local ids (int32) and K gate weights (fp32) per row moved
                for where, rows in (("inter", pairs_remote), ("intra", exp[kind]["intra"])):
                    assert tot["dispatch_meta"][f"{where}_node_bytes"] == rows * K * 4, where
                    assert tot["combine_meta"][f"{where}_node_bytes"] == rows * K * 4, where
    if scenario == "skewed":  # all experts on node 0: one crossing per token from node 1
        assert exp["hierarchical"]["inter"] == 2 * 16 and exp["flat"]["inter"] == 2 * 16 * K
    # the bound: hierarchical inter-node rows = flat / (remote experts / remote nodes per token)
    assert exp["hierarchical"]["inter"] <= exp["flat"]["inter"]
    if scenario == "random":  # K = 4 of 16 experts, 4 per rank: tokens share ranks, copies do not cross twice
        assert exp["hierarchical"]["intra"] + exp["hierarchical"]["inter"] < exp["flat"]["intra"] + exp["flat"]["inter"]
    assert pairs_all >= pairs_remote


def test_bf16_expert_outputs_cross_in_bf16_until_summed():
    """Under BF16 autocast the experts' outputs are BF16, but flat's combine sent them as FP32 (its local sort
    stage widened them first: twice DeepEP's combine bytes, each way). Copies now travel in their own dtype, as
    DeepEP's BF16 combine, which is exact; hierarchical's sums (its weighted partial sums per rank and node) stay
    FP32, keeping one process the oracle (DeepEP rounds them to BF16). The values are the local dispatcher's."""
    parts = [_routing("random", r) for r in range(WORLD)]
    x, ids, w = (torch.cat(p) for p in zip(*parts))
    want = _run(LocalDispatcher(E), x.bfloat16(), ids, w)
    sizes = [p[0].shape[0] for p in parts]
    for kind in ("flat", "hierarchical"):
        for rank, res in enumerate(_results()):
            r = res["bf16", kind]
            y, gx, gw = (t.split(sizes)[rank] for t in want)
            torch.testing.assert_close(r["y"], y, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["gw"], gw, rtol=1e-5, atol=1e-5)
            # x's gradient sums its K copies': in BF16 here (index_select's backward), in FP32 then rounded once
            # there; K roundings of at most half a BF16 step (2**-9 relative) of partial sums about the gradient's size
            assert r["gx"].dtype == torch.bfloat16 and r["y"].dtype == torch.float32
            torch.testing.assert_close(r["gx"].float(), gx.float(), rtol=0, atol=K * 2**-9 * gx.float().abs().max())
            # combine retraces dispatch's route, as the dispatch gradients do: BF16 rows (the inputs' and their
            # gradients') there, so the bytes a rank sends compare row for row
            sent = {p: c["intra_node_bytes"] + c["inter_node_bytes"] for p, c in r["totals"].items()}
            wide = 1 if kind == "flat" else 2  # hierarchical's partial sums: FP32 both ways
            assert sent["combine"] == wide * sent["dispatch_grad"] > 0, (kind, rank, sent)
            assert sent["combine_grad"] == wide * sent["dispatch"] > 0, (kind, rank, sent)


def test_fp8_wire_scales_follow_the_experts_recipe():
    """FP8 experts quantize the rows they receive again, in the same 1x128 tiles: under the wire's own scale rule
    that gives back the wire's values exactly, under another it rounds each value a second time. With FP4 QAT the
    experts take power-of-two scales (``fp4_experts``) while the wire kept amax / 448: 26% of the values moved
    (BF16 inputs). ``match_wire_scales`` gives each layer's dispatch its experts' rule."""
    from flyer.fp8 import convert_to_fp8
    from flyer.fp8.fp4 import fp4_experts
    from flyer.fp8.quant import quantize_tiles
    from flyer.model.dispatch import match_wire_scales
    from flyer.model.transformer import Transformer
    from flyer.model.wire import fp8_round_trip

    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, D)
    for pow2 in (False, True):
        wire = fp8_round_trip(x, pow2)
        assert torch.equal(quantize_tiles(wire, torch.float8_e4m3fn, pow2).dequantize()[:, :D], wire)
        twice = quantize_tiles(wire, torch.float8_e4m3fn, not pow2).dequantize()[:, :D]
        assert (twice != wire).float().mean() > 0.1  # the other rule rounds again
    cfg = preset("tiny", n_routed_experts=E, n_activated_experts=K)
    for fp8, fp4, want in ((False, False, False), (True, False, False), (True, True, True)):
        model = Transformer(cfg, make_dispatcher=lambda _: LocalDispatcher(E, fp8=True))
        if fp8:
            convert_to_fp8(model)
        if fp4:
            fp4_experts(model)
        match_wire_scales(model)
        flags = [m.dispatcher.fp8_pow2 for m in model.modules() if hasattr(m, "dispatcher")]
        assert flags and all(f is want for f in flags), (fp8, fp4, flags)


def test_power_of_two_fp8_dispatch_matches_local():
    local = LocalDispatcher(E, fp8=True, combine_dtype=torch.float32)
    local.fp8_pow2 = True
    parts = [_routing("random", r) for r in range(WORLD)]
    x, ids, w = (torch.cat(p) for p in zip(*parts))
    want = [t.split([p[0].shape[0] for p in parts]) for t in _run(local, x, ids, w)]
    plain = _oracle("random", True)[0]
    assert not torch.equal(want[0][0], plain[0][0])  # the scales' rule shows in the values
    for kind in ("flat", "hierarchical"):
        for rank, res in enumerate(_results()):
            r = res["pow2", kind]
            for got, ref in zip((r["y"], r["gx"], r["gw"]), (t[rank] for t in want)):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
