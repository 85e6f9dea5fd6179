"""LongCat-Flash (shortcut MoE, zero-computation experts) under expert parallelism on 2 gloo ranks, flat and
hierarchical (as one node and as two), against the same model in one process on both ranks' batches: the
identity picks stay on their token's rank (never dispatched), the others travel as for any MoE. Logits, loss and
every gradient within 1e-4 of the oracle's largest magnitude (tests/test_ep_model.py: only the FP32 summation
order differs). One MoE layer's zero-expert bias is raised so that most of its tokens pick identities only
(a few rows to send, or none)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from flyer.config import preset
from flyer.model.moe import moe_layers
from flyer.model.transformer import Transformer
from flyer.parallel.dispatch import comm_stats, dispatcher_factory
from flyer.parallel.grads import expert_param_names, load_full_state_dict, sync_gradients
from flyer.parallel.mesh import init_distributed, validate_layout
from ranks import run_ranks

B, T, WORLD = 2, 12, 2
TOL = 1e-4
CASES = {"flat-1node": ("flat", 2), "hierarchical-2nodes": ("hierarchical", 1)}  # (kind, ranks per node)


def _cfg():
    return preset("tiny", vocab_size=256, n_dense_layers=0, shortcut_moe=True, n_zero_experts=4,
                  score_func="softmax", router_bias=True, norm_topk_prob=False, n_expert_groups=1,
                  n_limited_groups=1, n_shared_experts=0, mtp_depth=0, route_scale=2.0, max_seq_len=64,
                  original_seq_len=64)


@functools.lru_cache(maxsize=None)
def _init_state() -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Transformer(_cfg())
    bias = model.layers[2].shortcut.gate.bias
    bias[_cfg().n_routed_experts:] = 0.05  # the second MoE: 43 of the 48 tokens pick identities only, 5 not
    return model.state_dict()


def _batch():
    data = torch.randint(0, 256, (WORLD * B, T + 1), generator=torch.Generator().manual_seed(1))
    return data[:, :-1], data[:, 1:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-8))


def _worker(rank: int) -> dict:
    out = {}
    cfg = _cfg()
    for name, (kind, rpn) in CASES.items():
        mesh = init_distributed(cfg, ep=WORLD, ranks_per_node=rpn, timeout_s=60)
        x, y = _batch()
        xr, yr = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        model = Transformer(cfg, dispatcher_factory(cfg, mesh, kind))
        load_full_state_dict(model, _init_state(), mesh)
        rows = []  # rows each MoE layer's experts run on this rank
        hooks = [m.experts.register_forward_hook(lambda mod, args, y: rows.append(args[0].shape[0]))
                 for m in moe_layers(model)]
        logits = model(xr).detach()
        for h in hooks:
            h.remove()
        loss = model.compute_loss(xr, yr).loss
        loss.backward()
        sync_gradients(model, mesh)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        stats = comm_stats(model)
        out[name] = dict(logits=logits, loss=float(mean) / WORLD, ep_rank=mesh.ep_rank,
                         grads={n: p.grad for n, p in model.named_parameters()}, experts=expert_param_names(model),
                         identity=[int(m.last_counts[cfg.n_routed_experts:].sum()) for m in moe_layers(model)],
                         rows=rows, sent=stats["intra_node_tokens"] + stats["inter_node_tokens"])
    dist.destroy_process_group()  # once: init_distributed joins the group the first case made
    return out


@functools.lru_cache(maxsize=None)
def _oracle() -> dict:
    cfg = _cfg()
    x, y = _batch()
    ref = Transformer(cfg)
    ref.load_state_dict(_init_state())
    logits = ref(x).detach()
    loss = ref.compute_loss(x, y).loss
    loss.backward()
    return dict(logits=logits, loss=loss.item(), grads={n: p.grad for n, p in ref.named_parameters()})


def test_longcat_under_ep_matches_single_process():
    validate_layout(_cfg(), WORLD, WORLD, WORLD)  # no longer refused
    results = run_ranks(_worker, WORLD)
    ref = _oracle()
    K = _cfg().n_activated_experts
    failures = []
    for name in CASES:
        # identity picks on both MoE layers, most of the second's; the experts of both ranks run the others only
        identity = [sum(res[name]["identity"][i] for res in results) for i in range(2)]
        assert identity[0] > 0 and WORLD * B * T * K // 2 < identity[1] < WORLD * B * T * K, identity
        for rank, res in enumerate(results):
            r = res[name]
            pairs = {"logits": (r["logits"], ref["logits"][rank * B:(rank + 1) * B])}
            for pname, g in r["grads"].items():
                g_ref = ref["grads"][pname]
                if pname in r["experts"]:
                    n = g.shape[0]
                    g_ref = g_ref[r["ep_rank"] * n:(r["ep_rank"] + 1) * n]
                pairs[f"grad {pname}"] = (g, g_ref)
            errs = {k: _rel(a, b) for k, (a, b) in pairs.items()}
            errs["loss"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
            failures += [f"{name} rank {rank}: {k} error {e:.2e}" for k, e in errs.items() if not e <= TOL]
            assert set(r["grads"]) == set(ref["grads"])
        assert not failures, "\n".join(failures)
        assert [sum(res[name]["rows"][i] for res in results) for i in range(2)] == [
            WORLD * B * T * K - n for n in identity]
        assert all(res[name]["sent"] > 0 for res in results)
