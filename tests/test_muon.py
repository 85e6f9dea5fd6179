"""Muon (``flyer.optim.muon``), DeepSeek-V4's optimizer, against independent oracles:

- ``torch.optim.Muon`` (2D only, BF16 Newton-Schulz, Jordan's five-step quintic, 0.2 sqrt(max(A, B))
  scaling): flyer's optimizer configured alike (``ns_dtype='bfloat16'``, a one-stage schedule, update
  RMS 0.2) runs the same operations in the same order, so the parameters must be *equal* after steps;
- Algorithm 1 of the paper spelled out in FP64 (momentum M = mu M + G, Nesterov, hybrid 8 + 2
  Newton-Schulz, 0.18 sqrt(max(n, m)), decoupled decay) against flyer's defaults in FP32, within
  ``ns_bound``: each iteration's FP32 rounding (measured: a running-error bound; the worst-case
  n u sum|terms| bound of a product of dense all-positive |X| |X|^T is 10^4 times looser here) carried
  to the output by the divided differences of the rest of the iteration (the exact first-order
  sensitivity of an odd matrix polynomial); a Muon step
  without Nesterov, with one stage, or with the 0.2 scale misses it by orders of magnitude;
- the hybrid schedule's singular values: within the scalar map's exact distance from 1 plus ``ns_bound``;
  ten first-stage iterations land far outside it;
- the routing (tiny, tiny-v4), AdamW's part equal to ``torch.optim.AdamW``, an expert stack as E
  matrices; the trainer (loss falls, exact resume, a resume with another optimizer refused, memory.json
  equal to the plan); ZeRO-1 on 2 ranks equal to the unsharded optimizer bit for bit.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bounds import FP32_U
from flyer.cli import main
from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.parallel.memory import measure_state_bytes, plan_state_bytes
from flyer.parallel.mesh import LocalMesh, init_distributed
from flyer.train.metrics import read_metrics
from flyer.optim.muon import NS_FAST, V4_SCHEDULE, Muon, muon_param_ids, newton_schulz, optimizer_groups
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from flyer.train.build import build_model, build_optimizer
from interrupted import stop_after
from ranks import run_ranks

FAST_10 = ((NS_FAST, 10),)
MU, GAMMA = 0.95, 0.18


# ---- the error bound of an FP32 Newton-Schulz --------------------------------------------------
def _poly(c, s):
    a, b, cc = c
    return a * s + b * s**3 + cc * s**5


def _dpoly(c, s):
    a, b, cc = c
    return a + 3 * b * s**2 + 5 * cc * s**4


def _divided_max(s: torch.Tensor, g: torch.Tensor, dg: torch.Tensor, rect: bool) -> float:
    """The largest first-order gain of X -> U g(S) V^T at singular values ``s`` (g(s), g'(s) given):
    its Frechet derivative multiplies, in the SVD basis, the symmetric part by g[s_i, s_j], the skew
    part by (g(s_i) + g(s_j)) / (s_i + s_j) and a rectangular matrix's extra block by g(s_i) / s_i."""
    si, sj, gi, gj = s[:, None], s[None, :], g[:, None], g[None, :]
    close = (si - sj).abs() <= 1e-6 * si
    sym = torch.where(close, torch.maximum(dg[:, None].abs(), dg[None, :].abs()),
                      ((gi - gj) / torch.where(close, torch.ones_like(si), si - sj)).abs())
    gains = [sym.max(), ((gi + gj) / (si + sj)).abs().max()]
    if rect:
        gains.append((g / s).abs().max())
    return float(max(gains))


def _step(c, X: torch.Tensor) -> torch.Tensor:
    """One iteration X <- a X + (b A + c A^2) X, A = X X^T, by flyer's operations (in X's dtype)."""
    a, b, cc = c
    gram = X @ X.T
    return torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=cc), X, beta=a)


def ns_bound(x: torch.Tensor, schedule, in_err: float = 0.0) -> tuple[torch.Tensor, float]:
    """(exact Newton-Schulz of ``x`` in FP64, a first-order running-error bound on the Frobenius
    error of flyer's FP32 evaluation, its input off by at most ``in_err`` in Frobenius norm).

    Each iteration's own FP32 rounding is measured (the iteration once in FP32 and once in FP64 from
    the same FP32 iterate; the normalisation likewise, plus 2 in_err / ||x|| for the input's error)
    and carried to the output by the largest divided difference of the remaining iterations' scalar
    map at the singular values it meets (``_divided_max``): an iteration maps U S V^T to U f(S) V^T,
    so the rest of the iteration's Frechet derivative is exactly that of the composed odd polynomial."""
    X = x.double()
    tall = X.shape[0] > X.shape[1]
    X, x32 = (X.T, x.float().T) if tall else (X, x.float())
    rect = X.shape[0] != X.shape[1]
    X = X / X.norm()
    steps = [c for c, k in schedule for _ in range(k)]
    traj, iters = [torch.linalg.svdvals(X)], [X]
    for c in steps:
        traj.append(_poly(c, traj[-1]))
        iters.append(_step(c, iters[-1]))

    def gain(j: int) -> float:  # the iterations after iterate j, at its singular values
        if j == len(steps):
            return 1.0
        dg = torch.ones_like(traj[j])
        for i in range(j, len(steps)):
            dg = dg * _dpoly(steps[i], traj[i])
        return _divided_max(traj[j], traj[-1], dg, rect)

    norm_err = float(((x32 / x32.norm()).double() - X).norm()) + 2 * in_err / float(x.double().norm())
    local = [float((_step(c, Xj.float()).double() - _step(c, Xj.float().double())).norm())
             for c, Xj in zip(steps, iters)]
    bound = gain(0) * norm_err + sum(gain(j + 1) * e for j, e in enumerate(local))
    out = iters[-1]
    return (out.T if tall else out), bound


def _well_conditioned(n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    U = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    s = 1 + torch.rand(k, generator=g, dtype=torch.float64)  # condition number <= 2
    return (U * s) @ V.T


# ---- Newton-Schulz ------------------------------------------------------------------------------
def test_hybrid_newton_schulz_singular_values_settle_at_one():
    """Well-conditioned input: the 8 + 2 schedule's output singular values lie within the exact
    scalar map's distance from 1 plus ``ns_bound``; ten first-stage iterations (Jordan's quintic
    oscillates in about [0.7, 1.2]) land far outside, and differ from the hybrid measurably."""
    for shape in ((96, 48), (40, 72)):
        x = _well_conditioned(*shape, seed=sum(shape)).float()
        exact, bound = ns_bound(x, V4_SCHEDULE)
        got = newton_schulz(x, V4_SCHEDULE)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert float((got.double() - exact).norm()) <= bound, shape
        sv = torch.linalg.svdvals(got.double())
        dist = float((torch.linalg.svdvals(exact) - 1).abs().max()) + bound
        assert float((sv - 1).abs().max()) <= dist < 0.01, (shape, dist)
        fast = newton_schulz(x, FAST_10)
        assert float((torch.linalg.svdvals(fast.double()) - 1).abs().max()) > 10 * dist  # mutation: one stage
        _, fast_bound = ns_bound(x, FAST_10)
        assert float((fast - got).norm()) > 10 * (bound + fast_bound)


def _paper_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's hybrid Newton-Schulz written out in FP64 from the paper: Frobenius-normalised, on the short side,
    8 iterations of (3.4445, -4.7750, 2.0315), then 2 of (2, -1.5, 0.5)."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = (x.T if tall else x) / x.norm()
    for (a, b, c), k in (((3.4445, -4.7750, 2.0315), 8), ((2.0, -1.5, 0.5), 2)):
        for _ in range(k):
            A = x @ x.T
            x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if tall else x


def test_the_default_schedule_is_the_papers():
    """``newton_schulz``'s default is the paper's 8 + 2 iterations with its coefficients (the tests above take the
    schedule from the module): FP64 on both sides, equal within 1e-10 (a fast iteration more or fewer moves it by
    about 2e-4)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((24, 16), (16, 24)):
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert torch.allclose(newton_schulz(m, dtype=torch.float64), _paper_newton_schulz(m), rtol=0, atol=1e-10)


def test_a_group_must_say_whether_muon_updates_it():
    """A parameter group without a bool ``muon`` flag is refused (ValueError), not routed by a guess."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    for group in ({"params": [p]}, {"params": [p], "muon": 1}):
        with pytest.raises(ValueError, match="muon: True or False"):
            Muon([group])


def test_expert_stack_is_orthogonalised_per_expert():
    """An (E, out, in) stack: batched Newton-Schulz equals each expert's own (FP64, within its
    ``ns_bound``; and the FP32 loop within twice it); the stack as one (E out, in) matrix misses."""
    g = torch.Generator().manual_seed(5)
    stack = torch.randn(6, 24, 40, generator=g) * torch.linspace(0.5, 3, 6).view(6, 1, 1)
    got = newton_schulz(stack, V4_SCHEDULE)
    flat = newton_schulz(stack.reshape(-1, 40), V4_SCHEDULE).view_as(stack)
    for e in range(stack.shape[0]):
        exact, bound = ns_bound(stack[e], V4_SCHEDULE)
        assert float((got[e].double() - exact).norm()) <= bound, e
        assert float((got[e] - newton_schulz(stack[e], V4_SCHEDULE)).norm()) <= 2 * bound, e
        assert float((flat[e].double() - exact).norm()) > 100 * bound, e  # mutation: the stack as one matrix


def test_grouped_wo_a_is_orthogonalised_per_head_group():
    """DeepSeek-V4's ``wo_a`` (G L, K) is block-diagonal (head group g through its rows g L .. (g + 1) L - 1): Muon
    steps it as a (G, L, K) stack of G matrices, bit for bit, scaled by sqrt(max(L, K)); orthogonalised as one
    (G L, K) matrix, the groups would share one basis and their updates' RMS would stray from 0.18."""
    cfg = preset("tiny-v4", vocab_size=256, n_layers=2, compress_ratios=(0, 4), max_seq_len=64, original_seq_len=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    ids = muon_param_ids(model)
    grouped = {n for n, p in model.named_parameters() if ids.get(id(p), 1) > 1}
    assert grouped == {*(f"layers.{i}.attn.wo_a.weight" for i in range(2)), "mtp.0.block.attn.wo_a.weight"}
    assert cfg.o_groups > 1
    G, (N, K) = cfg.o_groups, model.layers[0].attn.wo_a.weight.shape
    g = torch.Generator().manual_seed(3)
    w, grad = torch.randn(N, K, generator=g) * 0.02, torch.randn(N, K, generator=g)
    flat, stack = w.clone().requires_grad_(), w.view(G, N // G, K).clone().requires_grad_()
    flat.grad, stack.grad = grad.clone(), grad.view(G, N // G, K).clone()
    Muon(optimizer_groups("muon", [flat], {id(flat): G}, 0.1), lr=1e-2).step()
    Muon(optimizer_groups("muon", [stack], {id(stack): 1}, 0.1), lr=1e-2).step()
    assert torch.equal(flat.detach().view(G, N // G, K), stack.detach())
    rms = [float(((w.view(G, -1, K)[i] * (1 - 1e-3) - stack[i].detach()) / 1e-2).pow(2).mean().sqrt())
           for i in range(G)]
    assert all(abs(r - 0.18) < 0.01 for r in rms), rms


# ---- the optimizer ------------------------------------------------------------------------------
def _matrices(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 0.02 for s in ((64, 32), (32, 96), (48, 48))]


def _grads(shapes, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def test_matches_torch_muon_bit_for_bit():
    """Configured as ``torch.optim.Muon(adjust_lr_fn='match_rms_adamw')`` (one stage of five
    Jordan iterations, BF16 Newton-Schulz, RMS 0.2): the same operations in the same order, so the
    parameters are equal after 5 steps of random gradients; without Nesterov they are not."""
    ws = _matrices(0)
    grads = _grads([w.shape for w in ws], 5, seed=1)
    runs = {}
    for name in ("flyer", "torch", "no-nesterov"):
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        if name == "torch":
            opt = torch.optim.Muon(ps, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        else:
            opt = Muon([{"params": ps, "muon": True}], lr=1e-2, weight_decay=0.1, ns_schedule=((NS_FAST, 5),),
                       update_rms=0.2, ns_dtype="bfloat16", nesterov=name == "flyer")
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        runs[name] = [p.detach() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(runs["flyer"], runs["torch"]))
    assert all(not torch.equal(a, b) for a, b in zip(runs["no-nesterov"], runs["torch"]))


def _algorithm1(ws, grads, lr, wd, schedule=V4_SCHEDULE, gamma=GAMMA, nesterov=True):
    """The paper's Algorithm 1 in FP64, literally; also the bound on flyer's FP32 distance from it."""
    W = [w.double() for w in ws]
    M = [torch.zeros_like(w) for w in W]
    bounds = [0.0] * len(W)
    for t, gs in enumerate(grads, 1):
        for i, g in enumerate(gs):
            g = g.double()
            M[i] = MU * M[i] + g
            u = MU * M[i] + g if nesterov else M[i]
            # flyer's FP32 input (1 - mu)(G + mu M): its exponential averages, 2 roundings a step, off by at most
            # (2t + 2) u of the absolute terms; Newton-Schulz ignores the (1 - mu) factor
            terms = (1 - MU) * (g.abs() + MU * sum(MU ** (t - k) * gk[i].double().abs()
                                                  for k, gk in enumerate(grads[:t], 1)))
            o, nsb = ns_bound((1 - MU) * u, schedule, in_err=float((2 * t + 2) * FP32_U * terms.norm()))
            scale = lr * gamma * math.sqrt(max(W[i].shape))
            W[i] = W[i] * (1 - lr * wd) - scale * o
            bounds[i] += scale * nsb + 4 * FP32_U * float(W[i].norm() + scale * o.norm())
    return W, bounds


def test_equals_algorithm_1_within_the_fp32_bound():
    """flyer's defaults (8 + 2 schedule in FP32, 0.18, Nesterov, decoupled decay) against the paper's
    Algorithm 1 in FP64 over 3 steps of fixed gradients: within the carried ``ns_bound``; Algorithm 1
    without Nesterov, with one stage or with RMS 0.2 (torch's) is far outside it."""
    ws, lr, wd = _matrices(2), 2e-2, 0.1
    grads = _grads([w.shape for w in ws], 3, seed=3)
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = Muon([{"params": ps, "muon": True}], lr=lr, weight_decay=wd)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    ref, bounds = _algorithm1(ws, grads, lr, wd)
    errs = [float((p.detach().double() - r).norm()) for p, r in zip(ps, ref)]
    assert all(e <= b for e, b in zip(errs, bounds)), (errs, bounds)
    for mutant in (dict(nesterov=False), dict(schedule=FAST_10), dict(gamma=0.2)):
        other, _ = _algorithm1(ws, grads, lr, wd, **mutant)
        assert all(float((p.detach().double() - r).norm()) > 100 * b for p, r, b in zip(ps, other, bounds)), mutant


# ---- routing ------------------------------------------------------------------------------------
ADAMW_NAMES = re.compile(r"(^|\.)(embed|head)\.weight$|norm\.weight$|\.(base|scale)$|attn_sink$|compressor\.ape$")


def test_routing_tiny_and_tiny_v4():
    """Embedding, head, every RMSNorm, mHC's base and scale, attention sinks and the compressor's
    gate bias go to AdamW; every other matrix (attention, router, shared and routed experts, MTP
    projections, mHC's fn) to Muon."""
    for name in ("tiny", "tiny-v4"):
        with torch.device("meta"):
            model = Transformer(preset(name))
        muon = muon_param_ids(model)
        routed = {n: id(p) in muon for n, p in model.named_parameters()}
        want = {n: not ADAMW_NAMES.search(n) for n in routed}
        assert routed == want, {n: v for n, v in routed.items() if v != want[n]}
        assert all(p.ndim >= 2 for p in model.parameters() if id(p) in muon)
        assert any(n.endswith("experts.w1") for n, v in routed.items() if v)
        assert any(n.startswith("mtp.") and "proj" in n for n, v in routed.items() if v)
        assert any(n.endswith("hc_attn.fn") for n, v in routed.items() if v) == (name == "tiny-v4")


def test_adamw_part_is_torch_adamw_and_the_embedding_is_not_muon():
    """One step of tiny-v4: the AdamW-routed parameters equal ``torch.optim.AdamW``'s update bit for
    bit (the trainer's betas, eps, fused kernel); the Muon ones do not; routing the embedding to
    Muon (a mutant) moves it elsewhere."""
    cfg = preset("tiny-v4", vocab_size=256, n_layers=2, compress_ratios=(0, 4), max_seq_len=64, original_seq_len=64)
    tc = TrainConfig(optimizer="muon", lr=1e-2)
    models = [build_model(cfg, LocalMesh(torch.device("cpu")), "fp32", seed=0) for _ in range(3)]
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    opts = [build_optimizer(models[0], tc), build_optimizer(models[1], TrainConfig(lr=1e-2))]
    mutant_ids = {**muon_param_ids(models[2]), id(models[2].embed.weight): 1}
    params = [p for _, p in models[2].named_parameters()]
    opts.append(Muon(optimizer_groups("muon", params, mutant_ids, 0.1), lr=1e-2, fused=True))
    for model, opt in zip(models, opts):
        model.compute_loss(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
    muon = muon_param_ids(models[0])
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if a.grad is not None:  # the indexer's query projection learns from its own loss, absent here
            assert torch.equal(a, b) != (id(a) in muon), n
    assert not torch.equal(models[2].embed.weight, models[1].embed.weight)


# ---- the trainer ----------------------------------------------------------------------------------
def _tc(out, data_cache, **kw):
    base = dict(preset="tiny", steps=4, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=2,
                out=str(out), data_cache=data_cache, seed=3, progress=False, plots=False, warmup=1, lr=3e-3,
                device="cpu", optimizer="muon")
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}


def test_trainer_muon_trains_resumes_exactly_and_refuses_another_optimizer(tmp_path, data_cache, capsys):
    """``--optimizer muon``: the loss is finite and falls; a run checkpointed at step 2 and resumed
    equals the uninterrupted one bit for bit (the momentum buffers are saved); memory.json's optimizer
    bytes are the plan's (one buffer per Muon matrix); resuming with ``--optimizer adamw`` is refused
    in one line (exit 2)."""
    quiet = lambda _m: None  # noqa: E731
    full = Trainer(_tc(tmp_path / "full", data_cache), log=quiet)
    full.run()
    stop_after(_tc(tmp_path / "cut", data_cache), 2)  # 2 of the 4 steps (the same schedule), a checkpoint
    Trainer(_tc(tmp_path / "cut", data_cache, resume=True), log=quiet).run()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in a), (a, b)
    assert all(math.isfinite(v) for v in a.values()) and a[4] < a[1]
    mem = json.loads((tmp_path / "full" / "memory.json").read_text())
    plan = plan_state_bytes(full.cfg, 1, 1, 1, 0, seq_len=32, optimizer="muon")
    assert mem["optimizer_bytes_per_rank"] == plan["optimizer_bytes_per_rank"]
    adamw = plan_state_bytes(full.cfg, 1, 1, 1, 0, seq_len=32)["optimizer_bytes_per_rank"][0]
    assert plan["optimizer_bytes_per_rank"][0] < 0.7 * adamw
    capsys.readouterr()
    args = ["train", "--preset", "tiny", "--steps", "5", "--batch-size", "2", "--seq-len", "32", "--data-cache",
            data_cache, "--out", str(tmp_path / "full"), "--no-progress", "--no-plots", "--resume", "--seed", "3",
            "--lr", "3e-3", "--warmup", "1", "--eval-batches", "1", "--eval-every", "2", "--device", "cpu"]
    assert main(args + ["--optimizer", "adamw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--optimizer" in err[0] and "muon" in err[0], err
    assert main(["train", "--optimizer", "lion", "--out", str(tmp_path / "x")]) == 2
    assert "--optimizer: must be one of adamw, muon" in capsys.readouterr().err


# ---- ZeRO-1 -------------------------------------------------------------------------------------------
def _zero_vs_muon(rank: int):
    cfg = preset("tiny", vocab_size=256, max_seq_len=64, original_seq_len=64)
    mesh = init_distributed(cfg, ep=1, timeout_s=60)
    models = [build_model(cfg, mesh, "fp32", seed=0) for _ in range(2)]
    opts = [build_optimizer(models[0], TrainConfig(lr=1e-2, optimizer="muon"), mesh),
            build_optimizer(models[1], TrainConfig(lr=1e-2, optimizer="muon", zero=1), mesh)]
    g = torch.Generator().manual_seed(100 + rank)
    memory = []
    for step in range(2):
        d = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
        for model, opt in zip(models, opts):
            model.compute_loss(d[:, :-1], d[:, 1:]).loss.backward()
            mesh.sync_gradients(model)
            opt.step()
            if step == 0:
                memory.append(measure_state_bytes(model, opt)["optimizer_bytes"])
            opt.zero_grad(set_to_none=True)
    same = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    return {"same": same, "memory": memory}


def test_zero1_muon_equals_unsharded_bit_for_bit_dp2():
    """2 ranks: ZeRO-1 assigns whole parameters, whose owner orthogonalises each on its own (as the
    unsharded optimizer does), then broadcasts it: the parameters must be *equal*; each rank holds
    the shard the plan counts."""
    res = run_ranks(_zero_vs_muon, 2)
    assert all(r["same"] for r in res)
    cfg = preset("tiny", vocab_size=256, max_seq_len=64, original_seq_len=64)
    plan = plan_state_bytes(cfg, pp=1, dp=2, ep=1, zero=1, seq_len=16, optimizer="muon")
    plain = plan_state_bytes(cfg, pp=1, dp=2, ep=1, zero=0, seq_len=16, optimizer="muon")
    assert [r["memory"][1] for r in res] == plan["optimizer_bytes_per_rank"]
    assert [r["memory"][0] for r in res] == plain["optimizer_bytes_per_rank"]
