"""Expert parallelism with GQA attention and Qwen3-MoE's router (per-head q/k norms, softmax over
every expert, renormalised top-k, no shared expert, no dense layer): on 2 ranks of gloo, each rank's
logits, the mean loss and every gradient equal one process on the concatenation of both ranks'
batches. ``tests/test_ep_model.py`` covers the dispatchers on the DeepSeek model; this covers the
architecture Qwen3-MoE checkpoints import into. FP32: only the summation order differs (1e-4)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.parallel.dispatch import dispatcher_factory
from flyer.parallel.grads import expert_param_names, load_full_state_dict, sync_gradients
from flyer.parallel.mesh import init_distributed
from ranks import run_ranks

B, T, WORLD, TOL = 2, 12, 2, 1e-4


def _cfg():
    return preset("tiny", vocab_size=256, n_layers=2, n_dense_layers=0, max_seq_len=64, original_seq_len=64,
                  attn="gqa", n_kv_heads=2, head_dim=32, qk_norm=True, n_shared_experts=0, n_routed_experts=8,
                  n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
                  router_bias=False, norm_topk_prob=True, route_scale=1.0, mtp_depth=0, rope_factor=1.0,
                  rope_type="default")


def _batch():
    data = torch.randint(0, 256, (WORLD * B, T + 1), generator=torch.Generator().manual_seed(1))
    return data[:, :-1], data[:, 1:]


@functools.lru_cache(maxsize=None)
def _init_state() -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Transformer(_cfg())
        with torch.no_grad():  # head norms away from ones, so that a path skipping them shows
            for name, p in model.named_parameters():
                if "head_norm" in name:
                    p.uniform_(0.5, 1.5)
        return model.state_dict()


def _rank(rank: int) -> dict:
    world = WORLD
    cfg = _cfg()
    mesh = init_distributed(cfg, ep=world, ranks_per_node=world, timeout_s=60)
    x, y = _batch()
    rows = slice(rank * B, (rank + 1) * B)
    model = Transformer(cfg, dispatcher_factory(cfg, mesh, "flat", False, None))
    load_full_state_dict(model, _init_state(), mesh)
    logits = model(x[rows]).detach()
    loss = model.compute_loss(x[rows], y[rows]).loss
    loss.backward()
    sync_gradients(model, mesh)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    out = dict(logits=logits, loss=float(mean) / world, ep_rank=mesh.ep_rank, experts=expert_param_names(model),
               grads={n: p.grad for n, p in model.named_parameters()})
    dist.destroy_process_group()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-8))


def test_gqa_moe_on_two_ranks_matches_one_process():
    x, y = _batch()
    ref = Transformer(_cfg())
    ref.load_state_dict(_init_state())
    want = ref(x).detach()
    loss = ref.compute_loss(x, y).loss
    loss.backward()
    results = run_ranks(_rank, WORLD)
    for rank, r in enumerate(results):
        assert _rel(r["logits"], want[rank * B:(rank + 1) * B]) <= TOL
        assert abs(r["loss"] - loss.item()) <= TOL * abs(loss.item())
        assert set(r["grads"]) == {n for n, _ in ref.named_parameters()}
        for name, g in r["grads"].items():
            g_ref = dict(ref.named_parameters())[name].grad
            if name in r["experts"]:  # this rank's slice of the expert stack
                n = g.shape[0]
                g_ref = g_ref[r["ep_rank"] * n:(r["ep_rank"] + 1) * n]
            assert _rel(g, g_ref) <= TOL, (rank, name)
