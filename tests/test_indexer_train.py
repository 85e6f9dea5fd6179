"""Training DSA's lightning indexer by its KL loss (``flyer.model.indexer_loss``, ``flyer train --indexer-train``):
L_I equals a plain FP64 reference (explicit per-head softmax attention, summed over heads, L1-normalised, KL against
the softmax of the index scores over the causal keys or the selection) within a derived bound, dense and sparse,
masked and gathered, one chunk and several; in sparse training the main model's gradients are those of a run
without the loss and the indexers' those of L_I alone (V3.2 and GLM-5 layouts), and a Trainer step moves every
other weight as a step without it does; the warm-up changes nothing but the indexers and lowers L_I while raising
the attention mass the indexer's top-k holds; "off" is the model as before; a Trainer run logs indexer_loss and
resumes exactly; two expert-parallel ranks give one process's step (sparse and warm-up); padding queries do not
count (layer and Trainer); FP8 sparse training runs; bad combinations exit 2 naming --indexer-train. Tiny MLA
(4 heads, nope 32, rope 16, v 32, latent 32), index_topk 8, FP32 (one test FP8), CPU."""

import contextlib
import math

import pytest
import torch

from flyer.cli import main
from flyer.errors import FieldError
from flyer.fp8.linear import FP8Linear
from flyer.model.attention import MLA
from flyer.model.indexer_loss import clip_gradients, indexer_attentions, real_queries, set_indexer_training
from flyer.model.transformer import Transformer
from flyer.train.config import TrainConfig
from flyer.train.metrics import model_flops_per_token, read_metrics
from flyer.train.trainer import Trainer
from flyer.train.build import build_optimizer
from tests.bounds import FP32_U
from tests.host_reads import host_reads
from tests.test_dsa_gather_train import CFG, TOPK, _input, _layer, _tables

T = 100  # past dsa_gathers' 80 under autograd: gather=True gathers, gather=False masks


def reference(layer: MLA, x: torch.Tensor, sparse: bool, valid: torch.Tensor | None = None) -> tuple[float, float]:
    """(L_I in FP64 from explicit attention, a bound on |flyer's FP32 L_I - it|). The queries, latents and index
    scores are the layer's own FP32 tensors; keys are up-projected (k_nope = W_UK c), scores, softmax, head sum,
    L1 normalisation, log-softmax and KL are FP64. Bound, per query: flyer scores absorbed ((q_nope W_UK) . c) in
    FP32, each score within n u A of exact (n = nope + C + R + 4, A: its absolute terms), as the reference's FP32 W_UK
    c is; that moves each head's probabilities by 2 d of themselves (d: the largest score error), so the target's
    p_s by 2 d p_s and KL by sum_s 2 d p_s (|log p_s / q_s| + 1); an index logit (K_I + H_I + q_lora_rank + 8) u A_I
    (A_I = scale sum_h |w_h| |q_h| . |k|; the chunk's projections may round otherwise), moving log q by twice the
    largest; the KL's own FP32 sums over t keys (t + 8) u sum_s p_s (|log p_s| + |log q_s|); the mean over B T
    queries (``valid`` (B, T) bool: over its N real ones) B T (N) u of the mean's magnitude."""
    u = FP32_U
    B, T_, _ = x.shape
    H, nope, R, C = layer.n_heads, layer.qk_nope_head_dim, layer.qk_rope_head_dim, layer.kv_lora_rank
    ind = layer.indexer
    cos, sin = _tables(T_)
    with torch.no_grad():
        q_latent = layer.query_latent(x)
        q_nope, q_rope = layer.queries(x, cos, sin, q_latent)
        c_kv, k_rope = layer.latents(x, cos, sin)
        w_uk = layer.wkv_b.weight.view(H, -1, C)[:, :nope]
        k_nope = layer.wkv_b(c_kv).view(B, T_, H, -1)[..., :nope]
        qn, qr, kn, kr = (t.double() for t in (q_nope, q_rope, k_nope, k_rope))
        scale = layer.softmax_scale
        scores = (torch.einsum("bthd,bshd->bhts", qn, kn) + torch.einsum("bthr,bsr->bhts", qr, kr)) * scale
        A = scale * (torch.einsum("bthd,hdc,bsc->bhts", qn.abs(), w_uk.double().abs(), c_kv.double().abs())
                     + torch.einsum("bthr,bsr->bhts", qr.abs(), kr.abs()))
        visible = torch.ones(T_, T_, dtype=torch.bool).tril().expand(B, T_, T_)
        if sparse:
            visible = visible & layer.sparse_mask(x, q_latent, cos, sin).squeeze(1)
        vis4 = visible.unsqueeze(1)
        p = scores.masked_fill(~vis4, -math.inf).softmax(-1).sum(1)
        p = p / p.sum(-1, keepdim=True)
        keys = ind.keys(x, cos, sin)
        logits = ind.scores(x, q_latent, keys, cos, sin).double()
        log_q = logits.masked_fill(~visible, -math.inf).log_softmax(-1).masked_fill(~visible, 0.0)
        log_p = p.clamp(min=1e-300).log()
        kl_t = torch.where(visible, p * (log_p - log_q), 0.0).sum(-1)  # (B, T)
        real = torch.ones(B, T_, dtype=torch.bool) if valid is None else valid
        loss = float(kl_t[real].mean())
        n = nope + C + R + 4
        d = (n * u * A).masked_fill(~vis4, 0).amax(dim=(1, 3))  # (B, T): the largest score error per query
        iq, iw = ind.queries(x, q_latent, cos, sin)
        A_I = ind.head_dim ** -0.5 * torch.einsum("bth,bthk,bsk->bts", iw.double().abs(), iq.double().abs(),
                                                  keys.double().abs())
        dI = ((ind.head_dim + ind.n_heads + layer.q_lora_rank + 8) * u * A_I).masked_fill(~visible, 0).amax(-1)
        t = visible.sum(-1)
        per_query = (torch.where(visible, 2 * d.unsqueeze(-1) * p * ((log_p - log_q).abs() + 1), 0.0).sum(-1)
                     + 2 * dI
                     + (t + 8) * u * torch.where(visible, p * (log_p.abs() + log_q.abs()), 0.0).sum(-1) + 8 * u)
        bound = float(per_query[real].mean()) + int(real.sum()) * u * float(kl_t[real].abs().mean())
    return loss, bound


def _trained_layer(mode: str) -> MLA:
    layer = _layer()
    set_indexer_training(layer, mode)
    return layer


@pytest.mark.parametrize("mode,gather", [("warmup", False), ("sparse", False), ("sparse", True)])
@pytest.mark.parametrize("chunk", [None, 37])
def test_loss_is_the_reference(mode, gather, chunk):
    """flyer's L_I (dense warm-up; sparse on the masked form and on the gathered one, whose picks are the mask's) is
    the FP64 reference's within its bound, in one chunk and in chunks of 37 rows (checkpointed)."""
    layer = _trained_layer(mode)
    x = _input(T)
    out = layer(x, *_tables(T), gather=gather, chunk=chunk)
    assert out.requires_grad == (mode == "sparse")  # the warm-up froze the rest of the layer
    want, bound = reference(layer, x, sparse=mode == "sparse")
    got = float(layer.index_loss.detach())
    assert want > 0.05  # a loss far from 0: the mutations below move it by much more than the bound
    assert abs(got - want) <= bound, (got, want, bound)
    layer.index_loss.backward()  # checkpointed chunks recompute in backward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.indexer.parameters())
    assert all(p.grad is None for n, p in layer.named_parameters() if not n.startswith("indexer."))


def _model(mode: str, seed: int = 0, cfg=CFG) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    set_indexer_training(model, mode)
    return model


def _grads(model: Transformer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


GLM5 = CFG.replace(indexer_types=("full", "shared", "full", "shared"), mtp_depth=0)  # shared layers: no indexer


@pytest.mark.parametrize("seq", [40, T])  # masked; gathered (past 80 under autograd)
@pytest.mark.parametrize("cfg", [CFG, GLM5], ids=["v32", "glm5"])
def test_sparse_gradients_are_routed(seq, cfg):
    """Sparse training: every non-indexer gradient equals, bit for bit, that of the same step without the loss
    (the indexer's input detached, the target without gradient), the LM and MTP losses are unchanged, and the
    indexers' gradients are those of their L_I alone; every indexer (the MTP block's too; GLM-5's full layers) has
    one."""
    tokens = torch.randint(0, cfg.vocab_size, (2, seq + 1), generator=torch.Generator().manual_seed(5))
    off, sparse = _model("off", cfg=cfg), _model("sparse", cfg=cfg)
    out_off = off.compute_loss(tokens[:, :-1], tokens[:, 1:])
    out = sparse.compute_loss(tokens[:, :-1], tokens[:, 1:])
    assert torch.equal(out.main_loss, out_off.main_loss) and out.indexer_losses and not out_off.indexer_losses
    full = sum(map(cfg.has_indexer, range(cfg.n_layers)))
    assert len(out.indexer_losses) == len(indexer_attentions(sparse)) == full + cfg.mtp_depth
    g_off, g = _grads(off, out_off.loss), _grads(sparse, out.loss)
    main = {n for n in g if ".indexer." not in n}
    assert main == set(g_off) and all(torch.equal(g[n], g_off[n]) for n in main)
    out_again = sparse.compute_loss(tokens[:, :-1], tokens[:, 1:])
    g_kl = _grads(sparse, torch.stack(out_again.indexer_losses).sum())
    assert set(g_kl) == set(g) - main and all(torch.equal(g[n], g_kl[n]) for n in g_kl)


def test_warmup_changes_only_the_indexers():
    """Warm-up: the optimizer holds the indexers' parameters only, nothing else gets a gradient, and after a step
    only they have changed; attention is dense (the logits are a model's without selection)."""
    model = _model("warmup")
    tc = TrainConfig(indexer_train="warmup", lr=1e-2)
    opt = build_optimizer(model, tc)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    indexer = {n for n, p in model.named_parameters() if ".indexer." in n}
    assert held == {id(p) for n, p in model.named_parameters() if n in indexer}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, CFG.vocab_size, (2, 41), generator=torch.Generator().manual_seed(6))
    model.compute_loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == indexer
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == indexer
    dense = Transformer(CFG.replace(index_topk=0))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    with torch.no_grad():
        assert torch.equal(model(tokens), dense(tokens))


def _captured(model: Transformer, tokens: torch.Tensor) -> tuple[float, float]:
    """(mean L_I over the indexer layers, mean share of each query's dense attention mass (p, as L_I's target)
    held by the indexer's top-k keys), over the main model's layers."""
    layers = [m for m in indexer_attentions(model) if isinstance(m, MLA)][:model.cfg.n_layers]
    shares = []
    hooks = [m.register_forward_hook(lambda m, args, out: shares.append(_share(m, *args))) for m in layers]
    out = model.compute_loss(tokens[:, :-1], tokens[:, 1:])
    for h in hooks:
        h.remove()
    return float(torch.stack(out.indexer_losses).mean().detach()), sum(shares) / len(shares)


def _share(layer: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *_) -> float:
    with torch.no_grad():
        B, T_, _ = x.shape
        q_latent = layer.query_latent(x)
        q_nope, q_rope = layer.queries(x, cos, sin, q_latent)
        c_kv, k_rope = layer.latents(x, cos, sin)
        k_nope = layer.wkv_b(c_kv).view(B, T_, layer.n_heads, -1)[..., :layer.qk_nope_head_dim]
        s = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope))
        causal = torch.ones(T_, T_, dtype=torch.bool).tril()
        p = (s * layer.softmax_scale).masked_fill(~causal, -math.inf).softmax(-1).mean(1)
        picked = layer.sparse_mask(x, q_latent, cos, sin).squeeze(1)
        return float((p * picked).sum(-1).mean())


def test_warmup_learns(capsys):
    """40 warm-up steps (AdamW, lr 3e-2) on a one-layer DSA model whose attention is peaked (MLA weights of outputs
    twice unit scale), fresh random tokens each step: on a held-out batch L_I falls by over 10% and the share of the
    attention mass the indexer's top-k holds rises by over 0.1 (printed: the figures in the report)."""
    cfg = CFG.replace(n_layers=1, mtp_depth=0)
    torch.manual_seed(1)
    model = Transformer(cfg)
    set_indexer_training(model, "warmup")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".attn." in n and ".indexer." not in n and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
    opt = build_optimizer(model, TrainConfig(indexer_train="warmup", lr=3e-2, weight_decay=0.0))
    held_out = torch.randint(0, cfg.vocab_size, (4, 65), generator=g)
    before = _captured(model, held_out)
    for _ in range(40):
        tokens = torch.randint(0, cfg.vocab_size, (4, 65), generator=g)
        opt.zero_grad(set_to_none=True)
        model.compute_loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        opt.step()
    after = _captured(model, held_out)
    with capsys.disabled():
        print(f"\nwarm-up 40 steps: L_I {before[0]:.4f} -> {after[0]:.4f}, top-{TOPK} attention mass "
              f"{before[1]:.3f} -> {after[1]:.3f}")
    assert after[0] < 0.9 * before[0] and after[1] > before[1] + 0.1


def test_off_is_the_model_as_built():
    """off: indexers frozen, no loss computed, the same logits, loss and gradients as a model never switched."""
    a, b = _model("off"), Transformer(CFG)
    b.load_state_dict(a.state_dict())
    assert not any(p.requires_grad for m in indexer_attentions(a) for p in m.indexer.parameters())
    tokens = torch.randint(0, CFG.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(8))
    out_a, out_b = a.compute_loss(tokens[:, :-1], tokens[:, 1:]), b.compute_loss(tokens[:, :-1], tokens[:, 1:])
    assert out_a.indexer_losses == [] and torch.equal(out_a.loss, out_b.loss)
    g_a, g_b = _grads(a, out_a.loss), _grads(b, out_b.loss)
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[n], g_b[n]) for n in g_a)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small generated text (about 40 KB) and a cache for its tokenizer and shards."""
    root = tmp_path_factory.mktemp("indexer-train")
    words = "latent rope key indexer query selection head score layer token".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)) for i in range(600)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return root / "text.txt", root / "cache"


def _tc(out, corpus, **kw):
    # a constant schedule: the run cut at step 2 (steps=2) takes the same learning rates as the whole one
    base = dict(preset="tiny", steps=4, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=2,
                out=str(out), data=str(corpus[0]), data_cache=str(corpus[1]), vocab_size=300, seed=3, progress=False,
                plots=False, warmup=1, lr=3e-3, schedule="constant", device="cpu", indexer_train="sparse")
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_logs_and_resumes(tmp_path, corpus):
    """A sparse-training run trains the indexers and logs indexer_loss each step; cut after 2 steps and resumed, it
    gives the uninterrupted run's losses bit for bit (the indexers' weights and optimizer state checkpointed as any);
    a resume in another mode is refused naming the field."""
    (tmp_path / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    cfg = str(tmp_path / "dsa.toml")
    full_run = Trainer(_tc(tmp_path / "full", corpus, config=cfg), log=print)
    start = {n: p.detach().clone() for n, p in full_run.model.named_parameters() if ".indexer." in n}
    full_run.run()
    assert start and all(not torch.equal(p, start[n]) for n, p in full_run.model.named_parameters() if n in start)
    Trainer(_tc(tmp_path / "cut", corpus, config=cfg, steps=2), log=print).run()
    with pytest.raises(FieldError, match="indexer_train"):
        Trainer(_tc(tmp_path / "cut", corpus, config=cfg, resume=True, indexer_train="warmup"), log=print)
    Trainer(_tc(tmp_path / "cut", corpus, config=cfg, resume=True), log=print).run()
    full, cut = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "cut"))
    steps = [r for r in full if "loss" in r]
    assert len(steps) == 4 and all(r["indexer_loss"] > 0 for r in steps)
    assert [(r["loss"], r["indexer_loss"]) for r in steps] == [(r["loss"], r["indexer_loss"]) for r in cut
                                                                 if "loss" in r]


def test_sparse_trainer_step_moves_the_model_as_without(tmp_path, corpus):
    """One Trainer step of sparse training (clipping at 0.01: every step clips) leaves every non-indexer weight as
    the same step without indexer training does, bit for bit: the main model's gradients and their clipping
    (apart from the indexers', ``clip_gradients``) do not see L_I; the indexers move."""
    (tmp_path / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    runs, flops = {}, {}
    for mode in ("off", "sparse"):
        t = Trainer(_tc(tmp_path / mode, corpus, config=str(tmp_path / "dsa.toml"), clip=0.01, indexer_train=mode,
                        precision="fp32"), log=print)
        start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        rec = t.train_step()
        t.close()
        runs[mode] = start, dict(t.model.named_parameters()), rec
        flops[mode] = t.flops_per_token(T)  # the MFU numerator counts the indexers as the mode trains them
        assert flops[mode] == model_flops_per_token(t.cfg, T, indexer_train=mode)
    assert flops["sparse"] > flops["off"]
    (start, off, rec_off), (start_s, sparse, rec) = runs["off"], runs["sparse"]
    assert rec_off["grad_norm"] == rec["grad_norm"] > 0.01 and rec["indexer_grad_norm"] > 0
    assert all(torch.equal(start[n], start_s[n]) for n in start)
    for n in off:
        if ".indexer." in n:
            assert torch.equal(off[n], start[n]) and not torch.equal(sparse[n], start[n]), n
        else:
            assert torch.equal(off[n], sparse[n]), n


def test_a_step_reads_its_loss_terms_once(tmp_path, corpus):
    """A Trainer step with every loss term (main, MTP, the balance loss, L_I) keeps them on the device and reads
    them all at once at its end, however many micro-batches it accumulates; the routers' loads are read once too."""
    (tmp_path / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    for grad_accum in (1, 3):
        t = Trainer(_tc(tmp_path / str(grad_accum), corpus, config=str(tmp_path / "dsa.toml"), grad_accum=grad_accum),
                    log=print)
        assert t.cfg.mtp_depth and t.cfg.is_moe
        with host_reads() as reads:
            rec = t.train_step()
        t.close()
        assert rec["mtp_loss"] > 0 and rec["aux_loss"] > 0 and rec["indexer_loss"] > 0
        assert reads == {"metrics.py:floats": 1, "expert_stats.py:expert_loads": 1}, grad_accum


@pytest.mark.parametrize("extra,words", [
    ([], "has none (attn 'mla', index_topk 0"),  # the tiny preset: dense MLA
    (["--indexer-train", "later"], "must be one of off, warmup, sparse"),
])  # chat data under --pp trains too (tests/test_indexer_train_pack_pp.py)
def test_cli_refuses(tmp_path, capsys, extra, words):
    if "--indexer-train" not in extra:
        extra = ["--indexer-train", "warmup", *extra]
    argv = ["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress",
            "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flyer: error: --indexer-train") and words in err, err



def _rank_steps(rank: int, corpus: tuple, config: str, tokens: torch.Tensor) -> dict:
    """For each mode (sparse, warmup): one ``_local_step`` and ``clip_gradients`` of ``tiny`` with DSA indexers,
    rank ``rank`` of 2 expert-parallel ranks (each a data-parallel replica) on its half of the rows of ``tokens``
    (B, T+1), or one process on all of them, which also gives each row's own gradients (the scale of the terms).
    The sums, the norms, every gradient (an EP rank's expert stacks: its slice) and the rank's EP index."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = tokens.chunk(world)[rank]
    result = {}
    for mode in ("sparse", "warmup"):
        root = corpus[0].parent / f"{mode}-ranks{world}"
        t = Trainer(_tc(root / f"run{rank}", (corpus[0], root / "cache"), config=config, indexer_train=mode,
                        ep=world, batch_size=rows.shape[0], seq_len=tokens.shape[1] - 1, precision="fp32", threads=1,
                        collective_timeout_s=120), log=lambda m: None)
        t.sampler.next_batch = iter([(rows[:, :-1], rows[:, 1:])]).__next__
        sums = t._local_step()
        norms = clip_gradients(t.model, t.mesh.clip_grad_norm_, t.tc.clip, mode)
        out = result[mode] = {"sums": sums, "norms": norms, "experts": t.mesh.ep_rank,
                              "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}}
        if world == 1:
            out["rows"] = []
            for b in range(rows.shape[0]):
                t.model.zero_grad()
                t.model.compute_loss(rows[b:b + 1, :-1], rows[b:b + 1, 1:]).loss.backward()
                out["rows"].append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        t.close()
        if mode == "warmup":
            t.mesh.destroy()
    return result


@pytest.mark.slow
def test_two_expert_parallel_ranks_equal_one_process(tmp_path, corpus):
    """--indexer-train sparse and warmup with --ep 2: two ranks (gloo, each a data-parallel replica, on 2 rows each)
    give the loss, L_I, the indexers' and (sparse) the main model's gradients (replicated parameters' and each rank's
    expert slice) and the clipping norms (sparse: the main model's and the indexers' apart) of one process on all 4
    rows, within ``tests.test_sft.reorder_bound`` (relative to the loss; a gradient's, to the sum of the rows' own
    gradient norms; a norm's, to itself), at T 48 (sparse: past index_topk)."""
    from tests.ranks import run_ranks
    from tests.test_sft import reorder_bound

    (tmp_path / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    cfg = str(tmp_path / "dsa.toml")
    tokens = torch.randint(0, 300, (4, 49), generator=torch.Generator().manual_seed(11))
    ranks = run_ranks(_rank_steps, 2, corpus, cfg, tokens)
    whole = _rank_steps(0, corpus, cfg, tokens)
    c = reorder_bound(CFG, 4, 48)
    for mode, want in whole.items():
        got = [r[mode] for r in ranks]
        for k in ("loss", "main_loss", "aux_loss", "indexer_loss"):
            assert got[0]["sums"][k] == got[1]["sums"][k]
            assert abs(got[0]["sums"][k] - want["sums"][k]) <= c * abs(want["sums"][k]), (mode, k)
        assert want["sums"]["indexer_loss"] > 0 and (want["norms"][1] is not None) == (mode == "sparse")
        assert any(".indexer." in n for n in want["grads"])
        for r in got:
            assert r["norms"] == got[0]["norms"]
            assert all(abs(a - b) <= c * b for a, b in zip(r["norms"], want["norms"]) if b is not None)
            assert r["grads"].keys() == want["grads"].keys()
            for n, g in want["grads"].items():
                if ".experts.w" in n:  # this rank's experts: a contiguous slice of the stack
                    E = r["grads"][n].shape[0]
                    g = g[r["experts"] * E:(r["experts"] + 1) * E]
                scale = sum(float(row[n].norm()) for row in want["rows"] if n in row) + 1e-30
                assert float((r["grads"][n] - g).norm()) <= c * scale, (mode, n)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_padding_queries_do_not_count(mode):
    """Chat rows' padding is no data: with the real positions known (``real_queries``), L_I is the mean over the
    real queries only. Two right-padded rows of 70 and 33 real tokens: at width 100 (gathered, past 80) and trimmed
    to the longest, 70 (masked), each L_I is the FP64 reference's over the real queries within its bound, so the two
    agree within the sum of the bounds (a real query sees no padding key: causal); the mean over all B T queries
    (padding's included) is far from both."""
    layer = _trained_layer(mode)
    valid = torch.arange(T) < torch.tensor([[70], [33]])
    x = torch.where(valid.unsqueeze(-1), _input(T), 4 * _input(T, seed=2))  # padding unlike data: peaked attention
    losses, bounds = [], []
    for width in (T, 70):
        xw, vw = x[:, :width].contiguous(), valid[:, :width]
        with real_queries(layer, vw):
            layer(xw, *_tables(width))
        want, bound = reference(layer, xw, sparse=mode == "sparse", valid=vw)
        got = float(layer.index_loss.detach())
        assert abs(got - want) <= bound, (width, got, want, bound)
        losses.append(got)
        bounds.append(bound)
    assert abs(losses[0] - losses[1]) <= sum(bounds)
    layer(x, *_tables(T))  # outside: every query counts
    assert layer.index_valid_BT is None and abs(float(layer.index_loss.detach()) - losses[0]) > 10 * sum(bounds)


def test_trainer_averages_over_real_queries(tmp_path, corpus, monkeypatch):
    """A Trainer step (sparse) on two right-padded rows (40 and 20 real tokens; padding PAD_ID, no target) at width
    48 logs the indexer_loss of the same rows trimmed to 40, and of two micro-batches (--grad-accum 2) of a row each
    trimmed to its own length, within ``tests.test_sft.reorder_bound`` relative to it (each micro-batch weighted by
    its share of the real queries, the MTP module's its own); without ``real_queries`` (every position a query) it is
    far off."""
    from tests.test_sft import reorder_bound

    (tmp_path / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    t = Trainer(_tc(tmp_path / "run", corpus, config=str(tmp_path / "dsa.toml"), precision="fp32", threads=1),
                log=print)
    tokens = torch.randint(0, 300, (2, 49), generator=torch.Generator().manual_seed(4))
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    for b, n in enumerate((40, 20)):
        x[b, n:], y[b, n:] = -1, -100  # PAD_ID, IGNORE_INDEX

    def indexer_loss(batch):
        t.sampler.next_batch = iter([batch]).__next__
        out = t._local_step()["indexer_loss"]
        t.model.zero_grad(set_to_none=True)
        return out

    padded, trimmed = indexer_loss((x, y)), indexer_loss((x[:, :40], y[:, :40]))
    with monkeypatch.context() as m:
        m.setattr("flyer.train.trainer.real_queries", lambda model, valid: contextlib.nullcontext())
        every = indexer_loss((x, y))
    t.close()
    t = Trainer(_tc(tmp_path / "two", corpus, config=str(tmp_path / "dsa.toml"), precision="fp32", threads=1,
                    batch_size=1, grad_accum=2), log=print)
    t.sampler.next_batch = iter([(x[:1, :40], y[:1, :40]), (x[1:, :20], y[1:, :20])]).__next__
    accumulated = t._local_step()["indexer_loss"]
    t.close()
    c = reorder_bound(CFG, 2, 48)
    assert abs(padded - trimmed) <= c * trimmed and abs(every - trimmed) > 100 * c * trimmed, (padded, trimmed, every)
    assert abs(accumulated - trimmed) <= c * trimmed, (accumulated, trimmed)


def test_fp8_sparse_training_runs(tmp_path, corpus):
    """--precision fp8 --indexer-train sparse (the indexers' projections FP8 as the rest, L_I in FP32): a step leaves
    every non-indexer weight as the same FP8 step without indexer training does, bit for bit, and moves the
    indexers; three steps train with finite losses, a positive L_I and both clipping norms. (Past the first step
    the runs part: the trained indexers select other keys.)"""
    (tmp_path / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    trainers = {mode: Trainer(_tc(tmp_path / mode, corpus, config=str(tmp_path / "dsa.toml"), indexer_train=mode,
                                  precision="fp8", threads=1, seq_len=48), log=print) for mode in ("off", "sparse")}
    indexers = indexer_attentions(trainers["sparse"].model)
    assert indexers and all(isinstance(m.indexer.wk, FP8Linear) for m in indexers)
    start = {n: p.detach().clone() for n, p in trainers["off"].model.named_parameters()}
    recs = [t.train_step() for t in trainers.values()][1:]
    off, sparse = (dict(t.model.named_parameters()) for t in trainers.values())
    for n in off:
        if ".indexer." in n:
            assert not torch.equal(sparse[n], start[n]), n
        else:
            assert torch.equal(off[n], sparse[n]), n
    recs += [trainers["sparse"].train_step() for _ in range(2)]
    for t in trainers.values():
        t.close()
    assert all(not r.get("skipped") and math.isfinite(r["loss"]) and r["indexer_loss"] > 0 and r["grad_norm"] > 0
               and r["indexer_grad_norm"] > 0 for r in recs)
