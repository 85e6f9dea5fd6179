"""Muon (``flyer.optim.muon``) under expert and pipeline parallelism: the optimizer's layout, not
the trajectory.

A trained EP or PP run differs from one process in the gradients' last FP32 bits, and Newton-Schulz
amplifies those in a gradient's near-zero singular directions (a tiny model's gradients are low-rank),
so a bound carried from the gradients' tolerance would be as large as the update itself. What a layout
must get right is the update *given* the gradients: on gloo ranks, after backward and the gradient sums
(replicas, the pipeline's embedding mirror, clipping: the trainer's order), each step's weights and
gradients are gathered to the one-process layout (``full_state_dict``; ``full_grads`` the same for
``.grad``); the test process steps one-process Muon (``build_optimizer`` on a ``LocalMesh`` model, kept
across steps, so its momentum is the carried one) at those weights and gradients and compares with the
ranks' own weights gathered after their step.

Every Muon parameter is orthogonalised on its own, an expert stack (E, out, in) as E matrices batched,
so an EP rank's stack of E / ep experts gets, per expert, the same batched GEMMs on the same operands;
AdamW's part is elementwise; ZeRO-1 steps whole parameters on their owner. So the weights must be
*equal* (measured: bit-identical on every layout here; a batched GEMM whose blocking depended on the
batch count could break that, and would show up here). Mutants run on the same ranks land far from
the oracle (by more than a tenth of the update): Newton-Schulz over the local expert stack as one
(E / ep x out, in) matrix; per expert but scaled by that matrix's shape, sqrt(max(E / ep x out, in));
momentum not carried from one step to the next (state lost, as a wrong reshard would).

Layouts: EP 2 (dp 2), EP 2 with ZeRO-1 (dense state sharded 2 ways, experts whole), PP 2 (1F1B; the
last stage's embedding mirror must stay equal to the first stage's embedding), on 2 ranks; on 4:
EP 2 x DP 4 with ZeRO-1 (dense 4 ways, experts 2 ways, two ZeroRedundancyOptimizer instances) and
PP 2 x EP 2 (1F1B) with ZeRO-1. End to end: ``flyer train --optimizer muon`` with EP 2 (ZeRO-1) and
PP 2 for two steps: finite losses, ``memory.json`` equal to ``flyer plan --optimizer muon``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random

import pytest
import torch
import torch.distributed as dist

from flyer.cli import main
from flyer.config import preset
from flyer.optim import muon
from flyer.parallel.grads import MIRROR, expert_param_names, full_state_dict
from flyer.parallel.launch import job_store
from flyer.parallel.memory import KEYS
from flyer.parallel.mesh import LocalMesh, init_distributed
from flyer.parallel.pipeline import PipelineModel
from flyer.train.checkpoint import resolve_checkpoint_path
from flyer.train.metrics import read_metrics
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from flyer.train.build import build_model, build_optimizer
from ranks import run_ranks

B, T, M = 2, 12, 2  # sequences per micro-batch, tokens, micro-batches per pipeline step
SEED, STEPS, LR, CLIP = 3, 2, 1e-2, 1.0
# name: (world, pp, ep, zero, mutant); dp = world / pp
CASES = {"ep2": (2, 1, 2, 0, None), "ep2-zero1": (2, 1, 2, 1, None), "pp2-1f1b": (2, 2, 1, 0, None),
         "ep2-flat-ns": (2, 1, 2, 0, "flat-ns"), "ep2-stack-scale": (2, 1, 2, 0, "stack-scale"),
         "ep2-no-momentum": (2, 1, 2, 0, "no-momentum"),
         "ep2-dp4-zero1": (4, 1, 2, 1, None), "pp2-ep2-1f1b-zero1": (4, 2, 2, 1, None)}
TRAIN_SEQ, TRAIN_VOCAB = 32, 320
# flyer train on 2 ranks: EP 2 x DP 2 with ZeRO-1, PP 2 (1F1B); (train flags, flyer plan's flags)
RUNS = {"train-ep2": (dict(ep=2, zero=1), ["--ep", "2", "--zero", "1"]),
        "train-pp2": (dict(pp=2), ["--pp", "2", "--pp-schedule", "1f1b"])}


def _cfg():
    return preset("tiny", vocab_size=256, n_layers=4, max_seq_len=64, original_seq_len=64)


def _tc(zero: int) -> TrainConfig:
    return TrainConfig(optimizer="muon", lr=LR, weight_decay=0.1, zero=zero)


def _batch(rows: int, step: int):
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, 256, (rows, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ---- ranks --------------------------------------------------------------------------------------
@torch.no_grad()
def full_grads(model: torch.nn.Module, mesh) -> dict[str, torch.Tensor]:
    """``full_state_dict`` for the parameters' gradients: expert stacks' gathered over the EP group
    to (E, ...), under pipelining every stage's on global rank 0 (the pipeline's mirrors left out, as
    there; other ranks get their own). Collective: all ranks call."""
    experts = expert_param_names(model) if mesh.ep > 1 else set()
    out = {}
    for name, p in model.named_parameters():
        if getattr(p, MIRROR, False):
            continue
        g = p.grad
        if name in experts:
            parts = [torch.empty_like(g) for _ in range(mesh.ep)]
            dist.all_gather(parts, g.contiguous(), group=mesh.ep_group)
            g = torch.cat(parts, 0)
        out[name] = g.clone()
    if mesh.pp > 1 and mesh.dp_rank == 0:
        parts = [None] * mesh.pp if mesh.rank == 0 else None
        dist.gather_object(out, parts, dst=0, group=mesh.pp_group)
        if mesh.rank == 0:
            out = {n: t for part in parts for n, t in part.items()}
    return out


@contextlib.contextmanager
def _mutant(kind: str | None):
    """Patch Muon's Newton-Schulz: a stack (E, out, in) orthogonalised as one (E out, in) matrix
    ('flat-ns'), or per expert but scaled as that one matrix ('stack-scale': sqrt(max(E out, in))
    instead of sqrt(max(out, in))); anything else: unchanged."""
    ns = muon.newton_schulz

    def flat(m, *a):
        return ns(m.reshape(-1, m.shape[-1]), *a).view_as(m) if m.ndim == 3 else ns(m, *a)

    def stack_scale(m, *a):
        e, n, k = m.shape if m.ndim == 3 else (1, *m.shape)
        return ns(m, *a) * math.sqrt(max(e * n, k) / max(n, k))

    muon.newton_schulz = {"flat-ns": flat, "stack-scale": stack_scale}.get(kind, ns)
    try:
        yield
    finally:
        muon.newton_schulz = ns


def _case(rank: int, name: str) -> dict:
    """STEPS Muon steps of ``CASES[name]``'s layout, the trainer's order (backward, replica and mirror
    sums, clipping, step); per step the one-process weights and gradients before the step and the
    weights after it (every parameter this rank sees: rank 0 all of them)."""
    _, pp, ep, zero, mutant = CASES[name]
    cfg = _cfg()
    mesh = init_distributed(cfg, ep=ep, pp=pp, timeout_s=120)
    model = build_model(cfg, mesh, "fp32", seed=SEED, stages=("1f1b", T) if pp > 1 else None)
    if pp > 1:
        model = PipelineModel(model, mesh, "1f1b", M, B, T)
    opt = build_optimizer(model, _tc(zero), mesh)
    names = {n for n, _ in model.named_parameters()}
    rows = M * B if pp > 1 else B  # per replica
    mine = slice(mesh.dp_rank * rows, (mesh.dp_rank + 1) * rows)
    steps = []
    with _mutant(mutant):
        for step in range(STEPS):
            x, y = _batch(mesh.dp * rows, step)
            if pp > 1:
                model.train_step(x[mine], y[mine])
                mesh.sync_gradients(model)
                model.sync_mirrors()
            else:
                model.compute_loss(x[mine], y[mine]).loss.backward()
                mesh.sync_gradients(model)
            mesh.clip_grad_norm_(model, CLIP)
            grads = full_grads(model, mesh)
            before = {n: t.clone() for n, t in full_state_dict(model, mesh).items() if n in grads}
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mutant == "no-momentum":  # as a reshard that loses the optimizer state would
                for o in getattr(opt, "local_optimizers", lambda: [opt])():
                    o.state.clear()
            after = full_state_dict(model, mesh)
            steps.append(dict(before=before, grads=grads,
                              after={n: t.clone() for n, t in after.items() if n in names or n in grads}))
    return dict(steps=steps, mirror=any(getattr(p, MIRROR, False) for p in model.parameters()),
                parts=[type(p).__name__ for p in getattr(opt, "parts", [opt])])


def _train(rank: int, out: str, data: str, ep: int = 1, pp: int = 1, zero: int = 0) -> dict:
    """``flyer train --preset tiny --optimizer muon`` for 2 steps on this layout."""
    tc = TrainConfig(preset="tiny", optimizer="muon", steps=2, batch_size=2, seq_len=TRAIN_SEQ, warmup=1,
                     eval_every=1000, eval_batches=1, ckpt_every=1000, threads=1, progress=False, plots=False,
                     data=data, data_cache=out + "-cache", vocab_size=TRAIN_VOCAB, out=out, device="cpu", ep=ep,
                     pp=pp, zero=zero, collective_timeout_s=120)
    return Trainer(tc, log=lambda m: None).run()


def _worker(rank: int, world: int, root: str, data: str, ports: list[int]) -> dict:
    out = {name: _case(rank, name) for name, c in CASES.items() if c[0] == world}
    if world == 2:
        for (run, (layout, _)), port in zip(RUNS.items(), ports):
            if not dist.is_initialized():  # the run before ended the job (destroyed its groups): a new one, whose
                os.environ["MASTER_PORT"] = str(port)  # store is fresh (a group's keys restart from 0)
            _train(rank, f"{root}/{run}", data, **layout)
    return out


def _corpus(path) -> str:
    """A small text file: flyer train's tokenizer trains on it in milliseconds (the built-in corpus: seconds)."""
    r = random.Random(0)
    words = "the king queen lord sword night love death crown speak thou art hath whence".split()
    path.write_text("\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(600)))
    return str(path)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon-parallel")
    stores = [job_store() for _ in RUNS]  # each later job's, held here as run_ranks holds the first one's
    res = run_ranks(_worker, 2, 2, str(root), _corpus(root / "corpus.txt"), [s.port for s in stores])
    return res, root


# ---- the one-process oracle ---------------------------------------------------------------------
def _oracle(steps: list[dict]) -> list[dict[str, torch.Tensor]]:
    """One-process Muon (kept across steps: its momentum is carried) stepped at each step's gathered
    weights and gradients; the weights after each step."""
    model = build_model(_cfg(), LocalMesh(torch.device("cpu")), "fp32", seed=SEED)
    opt = build_optimizer(model, _tc(0))
    params = dict(model.named_parameters())
    out = []
    for s in steps:
        assert set(s["grads"]) == set(params), set(params) ^ set(s["grads"])
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(s["before"][n])
                p.grad = s["grads"][n].clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({n: p.detach().clone() for n, p in params.items()})
    return out


def _compare(res: list[dict], name: str) -> list[dict[str, float]]:
    """Per step, per parameter: ||ranks - oracle|| / ||oracle's update|| (0 where equal); also checks
    that every rank's weights (replicas, the pipeline's mirror) equal rank 0's gathered ones."""
    steps = res[0][name]["steps"]
    for r in res[1:]:
        for a, b in zip(r[name]["steps"], steps):
            assert all(torch.equal(t, b["after"][n]) for n, t in a["after"].items()), (name, "replicas differ")
    out = []
    for s, want in zip(steps, _oracle(steps)):
        out.append({n: 0.0 if torch.equal(s["after"][n], w) else
                    float((s["after"][n] - w).norm() / (w - s["before"][n]).norm()) for n, w in want.items()})
    return out


def _assert_equal(res: list[dict], name: str) -> None:
    for t, rel in enumerate(_compare(res, name)):
        off = {n: v for n, v in rel.items() if v}
        assert not off, (name, t, sorted(off.items(), key=lambda kv: -kv[1])[:3])


# ---- tests --------------------------------------------------------------------------------------
def test_ep2_and_pp2_steps_are_one_process_muons(two_ranks):
    """EP 2 (8 of the 16 experts per rank), EP 2 with ZeRO-1 and PP 2 (1F1B): given the same weights
    and gradients, every parameter after each of 2 steps equals one-process Muon's (momentum carried),
    replicas equal, and the last stage's embedding mirror equal to the first stage's embedding."""
    res, _ = two_ranks
    for name in ("ep2", "ep2-zero1", "pp2-1f1b"):
        _assert_equal(res, name)
    assert [r["pp2-1f1b"]["mirror"] for r in res] == [False, True]  # the mirror check above was not vacuous
    assert [r["ep2-zero1"]["parts"] for r in res] == [["ZeroRedundancyOptimizer", "Muon"]] * 2  # dense sharded


def test_mutants_land_far_from_one_process(two_ranks):
    """On the same ranks: Newton-Schulz over the local stack as one matrix, or scaled as one, moves
    every expert stack by more than a tenth of its update (and nothing else); momentum not carried
    leaves step 1 alone and moves the Muon matrices at step 2."""
    res, _ = two_ranks
    experts = {n for n in res[0]["ep2"]["steps"][0]["grads"] if ".ffn.experts.w" in n}
    for name in ("ep2-flat-ns", "ep2-stack-scale"):
        for t, rel in enumerate(_compare(res, name)):
            assert min(rel[n] for n in experts) > 0.1, (name, t)
            assert not any(v for n, v in rel.items() if n not in experts), (name, t)
    first, second = _compare(res, "ep2-no-momentum")
    assert not any(first.values()) and min(second.values()) > 0.1


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_worker, 4, 4, "", "", 0)


def test_zero1_ep2_dp4_and_pp2_ep2_steps_are_one_process_muons(four_ranks):
    """4 ranks. EP 2 x DP 4 with ZeRO-1: the dense state sharded 4 ways and the experts' 2 ways (over
    the ranks holding the same experts), two ZeroRedundancyOptimizers; PP 2 x EP 2 (1F1B) with ZeRO-1
    (dense sharded over each stage's 2 replicas, experts whole). Every parameter after each of 2
    steps equals one-process Muon's, replicas and the embedding mirror equal."""
    for name in ("ep2-dp4-zero1", "pp2-ep2-1f1b-zero1"):
        _assert_equal(four_ranks, name)
    assert all(r["ep2-dp4-zero1"]["parts"] == ["ZeroRedundancyOptimizer"] * 2 for r in four_ranks)
    assert [r["pp2-ep2-1f1b-zero1"]["mirror"] for r in four_ranks] == [False, False, True, True]


def _plan(capsys, run, flags: list[str], optimizer: str) -> dict:
    vocab = json.loads((resolve_checkpoint_path(run) / "config.json").read_text())["vocab_size"]
    capsys.readouterr()
    rc = main(["plan", "--preset", "tiny", "--gpus", "2", *flags, "--seq-len", str(TRAIN_SEQ), "--vocab-size",
               str(vocab), "--precision", "fp32", "--optimizer", optimizer, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_flyer_train_muon_ep2_and_pp2_run_and_memory_is_the_plan(two_ranks, capsys):
    """``flyer train --preset tiny --optimizer muon`` for 2 steps with ``--ep 2 --zero 1`` and with
    ``--pp 2``: finite losses, and memory.json's per-rank bytes equal ``flyer plan --optimizer muon``'s
    for that layout (and not AdamW's: the optimizer bytes differ)."""
    _, root = two_ranks
    for run, (_, flags) in RUNS.items():
        losses = [r["loss"] for r in read_metrics(root / run / "metrics.jsonl") if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (run, losses)
        measured = json.loads((root / run / "memory.json").read_text())
        planned = _plan(capsys, root / run, flags, "muon")
        for k in KEYS:
            assert measured[f"{k}_per_rank"] == planned[f"{k}_per_rank"], (run, k)
        adamw = _plan(capsys, root / run, flags, "adamw")
        assert measured["optimizer_bytes_per_rank"] != adamw["optimizer_bytes_per_rank"], run
