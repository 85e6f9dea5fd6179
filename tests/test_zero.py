"""ZeRO-1 (``flyer.parallel.zero``): the sharded AdamW updates every parameter exactly as the
unsharded one, holds only its shard of the state, and ``partition`` is PyTorch's rule."""

import torch

from flyer.config import preset
from flyer.model.indexer_loss import set_indexer_training
from flyer.parallel.memory import measure_state_bytes, plan_state_bytes
from flyer.parallel.mesh import init_distributed
from flyer.train.config import TrainConfig
from flyer.train.build import build_model, build_optimizer
from flyer.parallel.zero import partition, zero_redundancy_optimizer
from ranks import run_ranks

B, T, STEPS = 2, 16, 3


def _cfg():
    return preset("tiny", vocab_size=256, max_seq_len=64, original_seq_len=64)


def _zero_vs_adamw(rank: int, ep: int):
    cfg = _cfg()
    mesh = init_distributed(cfg, ep=ep, timeout_s=60)
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = [build_model(cfg, mesh, "fp32", seed=0) for _ in range(2)]
    opts = [build_optimizer(models[0], tc, mesh),
            build_optimizer(models[1], TrainConfig(lr=1e-2, weight_decay=0.1, zero=1), mesh)]
    g = torch.Generator().manual_seed(100 + rank)
    memory = []
    for step in range(STEPS):
        d = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
        for model, opt in zip(models, opts):
            model.compute_loss(d[:, :-1], d[:, 1:]).loss.backward()
            mesh.sync_gradients(model)
            mesh.clip_grad_norm_(model, 1.0)
            opt.step()
            if step == 0:
                memory.append(measure_state_bytes(model, opt))
            opt.zero_grad(set_to_none=True)
    same = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    moved = any(not torch.equal(a, b) for a, b in zip(models[1].parameters(), build_model(cfg, mesh).parameters()))
    return {"same": same, "moved": moved, "adamw": memory[0], "zero": memory[1]}


def test_zero1_equals_adamw_and_the_plan_on_dp4_ep2():
    """4 ranks, EP 2: dense parameters sharded 4 ways, experts 2 ways (two instances). AdamW is
    elementwise and the shards are broadcast bit for bit, so the parameters must be *equal*."""
    ep = 2
    res = run_ranks(_zero_vs_adamw, 4, ep)
    assert all(r["same"] and r["moved"] for r in res)
    plan = plan_state_bytes(_cfg(), pp=1, dp=4, ep=ep, zero=1, seq_len=T)
    plain = plan_state_bytes(_cfg(), pp=1, dp=4, ep=ep, zero=0, seq_len=T)
    for k in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert [r["zero"][k] for r in res] == plan[f"{k}_per_rank"], k
        assert [r["adamw"][k] for r in res] == plain[f"{k}_per_rank"], k
    # the shards cover the state once: summed over the 4 ranks, dense state once and expert state per EP rank
    assert sum(plan["optimizer_bytes_per_rank"]) < sum(plain["optimizer_bytes_per_rank"]) / 2


def _zero_warmup(rank: int):
    cfg = _cfg().replace(index_topk=4, index_n_heads=2, index_head_dim=32)
    mesh = init_distributed(cfg, timeout_s=60)
    tc = TrainConfig(lr=1e-2, zero=1, indexer_train="warmup")
    model = build_model(cfg, mesh, "fp32", seed=0)
    set_indexer_training(model, "warmup")
    opt = build_optimizer(model, tc, mesh)
    held = {id(p) for part in opt.parts for g in part.param_groups for p in g["params"]}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    d = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(100 + rank))
    model.compute_loss(d[:, :-1], d[:, 1:]).loss.backward()
    mesh.sync_gradients(model)
    opt.step()
    return {"held_only_trained": held == trained, "frozen": len(list(model.parameters())) - len(trained),
            "state": measure_state_bytes(model, opt)}


def test_zero1_shards_only_the_parameters_that_train():
    """The indexers' warm-up (every other parameter frozen) on DP 2 with ZeRO-1: the sharded optimizer holds the
    indexers only, as the plain one does (it held every parameter, and a ZeroRedundancyOptimizer broadcasts all it
    holds at every step: the whole frozen model each step), and the plan's per-rank state is what the ranks hold."""
    res = run_ranks(_zero_warmup, 2)
    assert all(r["held_only_trained"] and r["frozen"] > 0 for r in res)
    cfg = _cfg().replace(index_topk=4, index_n_heads=2, index_head_dim=32)
    plan = plan_state_bytes(cfg, pp=1, dp=2, ep=1, zero=1, seq_len=T, indexer_train="warmup")
    for k in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert [r["state"][k] for r in res] == plan[f"{k}_per_rank"], k


def test_partition_is_zero_redundancy_optimizers():
    """``partition`` against ``ZeroRedundancyOptimizer._partition_parameters`` itself (called
    unbound on a stand-in: it reads only ``param_groups`` and ``world_size``)."""
    Z = zero_redundancy_optimizer()
    g = torch.Generator().manual_seed(0)
    sizes = [[int(n) for n in torch.randint(1, 50, (k,), generator=g)] for k in (9, 4, 0, 7)]
    sizes[1] += [sizes[1][0]] * 3  # ties
    groups = [{"params": [torch.empty(n) for n in s]} for s in sizes]

    class Stand:
        param_groups, world_size, _partition_parameters_cache = groups, 3, []
        _get_min_index = Z._get_min_index
        _partition_param_group = Z._partition_param_group

    stand = Stand()
    want = Z._partition_parameters(stand)
    got = partition(sizes, 3)
    for r in range(3):
        for gi, group in enumerate(groups):
            ids = [id(p) for p in want[r][gi]["params"]]
            assert [id(group["params"][i]) for i in got[r][gi]] == ids
