"""Training DeepSeek-V4's CSA lightning indexer by its KL loss (``flyer.model.hybrid_indexer_loss``, ``flyer train
--indexer-train warmup|sparse`` on a hybrid-attention model): L_I and the indexer's gradients in the attention's
query chunks (masked, gathered; checkpointed) equal a plain whole-sequence computation (every head's softmax over
[window | entries | sink], the entries' columns summed over heads and L1-normalised, KL against the softmax of the
index scores over the entries each query attends to) within a derived rounding bound, in FP64 and FP32; a target
without the window and sink in its softmax lands far outside it. Sparse training leaves the main model's loss and
gradients as without it (the indexer's input detached), the indexers' those of L_I alone, HCA and window layers
without an indexer; the warm-up attends to every complete entry and trains nothing but the indexers; packed rows'
L_I is the mean over their documents' queries; warm-up steps on a batch halve its L_I; ``flyer train --preset
tiny-v4 --indexer-train warmup`` runs and logs indexer_loss; a V4 model without CSA layers is refused naming
--indexer-train. Tiny layers of tests/test_hybrid_attention.py (4 heads of 32, window 8, CSA 4 keeping 4 entries, 8
index heads of 16), CPU."""

import math

import pytest
import torch

import flyer.model.hybrid_indexer_loss as hil
from flyer.cli import main
from flyer.config import check_indexer_train, preset
from flyer.errors import FieldError
from flyer.model.documents import Documents
from flyer.model.hybrid import HybridAttention, rope_tail
from flyer.model.indexer_loss import indexer_attentions, set_indexer_training
from flyer.model.transformer import Transformer
from flyer.train.trainer import Trainer
from flyer.train.metrics import read_metrics
from tests.bounds import FP32_U
from tests.test_hybrid_attention import CFG, LAYER, WINDOW, _input, _tables
from tests.test_indexer_train import _grads, _model as v32_model

T = 100  # 25 entries: past 4 x index_topk, so chunks seeing over 16 gather (gather=True)
FP64_U = 2.0**-53
U = {torch.float64: FP64_U, torch.float32: FP32_U}


def _layer(mode: str, dtype: torch.dtype, seed: int = 0) -> HybridAttention:
    """The CSA layer with random weights (matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.2^2), gate biases
    N(0, 1), sinks 2 + N(0, 1), as tests/test_hybrid_attention.py's), in ``dtype``, its indexer in ``mode``."""
    layer = HybridAttention(CFG, LAYER["csa"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            z = torch.randn(p.shape, generator=g)
            p.copy_(z if name.endswith("ape") else 2 + z if name == "attn_sink" else
                    1 + 0.2 * z if name.endswith("norm.weight") else z / math.sqrt(p.shape[1]))
    layer.to(dtype)
    set_indexer_training(layer, mode)
    return layer


def _inputs(dtype: torch.dtype, T_: int = T):
    cos, sin = _tables(LAYER["csa"], T_)
    return _input(T_).to(dtype), cos.to(dtype), sin.to(dtype)


def reference(layer: HybridAttention, x: torch.Tensor, mode: str, valid: torch.Tensor | None = None):
    """(L_I, {indexer parameter: gradient}, bound on |L_I - flyer's|, bound on max|gradient - flyer's| / max|it|):
    the whole sequence at once, in the layer's dtype, written out plainly. The layer's queries, tokens' keys,
    entries and index keys are its own (the same ops on the same tensors as flyer's path).

    Bound (first order, per evaluation, u the dtype's unit roundoff): a score is a d-term dot product, scaled:
    within (d + 1) u A of exact (A: its absolute terms, the largest here), moving each probability by 2 d of itself
    and the softmax's normaliser over its S <= T + N + 1 terms, the head sum and the L1 normalisation (S + H + N +
    16) u more: eps_p relative on p. An index logit is sum_h w_h relu(q_h . K) / sqrt(di) with q a R-term and w a
    D-term projection: within (di + hi + R + D + 8) u A_I (A_I = scale sum_h |w_h| |q_h| . |K|), moving log q by
    twice the largest. KL_t then moves by sum_i eps_p p_i (|log p_i / q_i| + 1) + 2 dI, its own sum (N + 8) u
    sum_i p_i (|log p_i| + |log q_i|), the mean B T u |L_I|. Two evaluations: twice that. The gradients consume
    (softmax(I) - p) per query, so (first order, as tests/test_hybrid_attention_chunked.py bounds gradients) they move
    by 2 (eps_p + 2 dI) of their largest, plus their sums over the B T queries and N entries and the backward
    through the projections (D, R, di terms)."""
    u = U[x.dtype]
    B, T_, _ = x.shape
    cos, sin = _tables(LAYER["csa"], T_)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    ind, H, r = layer.indexer, layer.n_heads, layer.ratio
    with torch.no_grad():
        q_latent, q = layer.queries(x, cos, sin)
        kv = layer.shared_kv(x, cos, sin)[:, :, 0]
        entries = layer.compressor(x, cos, sin)
    N = entries.shape[1]
    t = torch.arange(T_).view(-1, 1)
    j = torch.arange(T_).view(1, -1)
    window = ((j <= t) & (j > t - WINDOW)).expand(B, T_, T_)
    chosen = (torch.arange(N).view(1, -1) < (t + 1) // r).expand(B, T_, N)  # complete entries
    if mode == "sparse":
        chosen = ind.select(x, q_latent, cos, sin, chosen)
    keys = torch.cat([kv, entries], dim=1)  # (B, T + N, d)
    with torch.no_grad():
        scores = torch.einsum("bthd,bsd->bhts", q, keys) * layer.softmax_scale
        mask = torch.cat([window, chosen], dim=-1).unsqueeze(1)
        sink = layer.attn_sink.view(1, H, 1, 1).expand(B, H, T_, 1)
        p = torch.cat([scores.masked_fill(~mask, -math.inf), sink], dim=-1).softmax(-1)[..., T_:T_ + N].sum(1)
        seen = chosen.any(-1)  # queries that see an entry: the others add 0
        p = torch.where(seen.unsqueeze(-1), p / p.sum(-1, keepdim=True), 0.0)
    index_keys = ind.keys(x, cos, sin)  # (B, N, di), with the indexer's gradient
    iq = rope_tail(ind.wq_b(q_latent).view(B, T_, ind.n_heads, ind.head_dim), cos, sin)
    w = ind.weights_proj(x) * ind.n_heads ** -0.5
    relu = torch.relu(torch.einsum("bthk,bnk->bthn", iq, index_keys)) * ind.head_dim ** -0.5
    logits = (w.unsqueeze(-1) * relu).sum(2)  # (B, T, N)
    real = torch.ones(B, T_, dtype=torch.bool) if valid is None else valid
    rows = seen & real
    log_q = logits[rows].masked_fill(~chosen[rows], -math.inf).log_softmax(-1).masked_fill(~chosen[rows], 0.0)
    p_r = p[rows]
    kl = (torch.xlogy(p_r, p_r) - p_r * log_q).sum(-1)
    loss = kl.sum() / real.sum()
    grads = dict(zip([n for n, _ in ind.named_parameters()],
                     torch.autograd.grad(loss, list(ind.parameters()))))
    with torch.no_grad():
        # per query: the largest absolute terms of its scores (over heads and visible keys) and of its index logits
        A = layer.softmax_scale * torch.einsum("bthd,bsd->bhts", q.abs(), keys.abs()).masked_fill(~mask, 0).amax((1, 3))
        eps_p = (2 * (layer.head_dim + 1) * u * A + (T_ + N + 1 + H + N + 16) * u)[rows].unsqueeze(-1)
        A_I = ind.head_dim ** -0.5 * torch.einsum("bth,bthk,bnk->btn", w.abs(), iq.abs(), index_keys.abs())
        dI = (ind.head_dim + ind.n_heads + CFG.q_lora_rank + CFG.dim + 8) * u * A_I.masked_fill(~chosen, 0).amax(-1)
        dI = dI[rows]
        log_p = p_r.clamp(min=1e-300).log()
        on = chosen[rows]
        per_query = (torch.where(on, eps_p * p_r * ((log_p - log_q).abs() + 1), 0.0).sum(-1) + 2 * dI
                     + (N + 8) * u * torch.where(on, p_r * (log_p.abs() + log_q.abs()), 0.0).sum(-1))
        bound = 2 * float(per_query.sum() / real.sum()) + B * T_ * u * abs(float(loss))
        grad_bound = 2 * float(eps_p.max() + 2 * dI.max()) + (B * T_ + N + CFG.dim + CFG.q_lora_rank
                                                               + 2 * ind.head_dim + 16) * u
    return float(loss.detach()), grads, bound, grad_bound


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _flyer(layer: HybridAttention, x, cos, sin, chunk, gather):
    """(flyer's L_I, {indexer parameter: gradient}) of one forward (the layer's output unused)."""
    layer(x, cos, sin, chunk=chunk, gather=gather)
    loss = layer.index_loss
    names = [n for n, _ in layer.indexer.named_parameters()]
    return float(loss.detach()), dict(zip(names, torch.autograd.grad(loss, list(layer.indexer.parameters()))))


CASES = [("warmup", True, None), ("warmup", True, 7), ("sparse", False, 7), ("sparse", True, 37),
         ("sparse", True, None)]  # one chunk (query_chunk's 128 rows >= T); 7 rows masked; 37 rows: the last two gather


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode,gather,chunk", CASES)
def test_loss_and_gradients_are_the_reference(dtype, mode, gather, chunk):
    """flyer's L_I and the gradient of every indexer parameter (its compressor's included) are the plain
    whole-sequence computation's within ``reference``'s bound, in one chunk and in chunks (masked, gathered)."""
    layer = _layer(mode, dtype)
    x, cos, sin = _inputs(dtype)
    want, g_want, bound, g_bound = reference(layer, x, mode)
    got, g = _flyer(layer, x, cos, sin, chunk, gather)
    assert want > 0.05  # far from 0: the mutations below move it by much more than the bound
    assert abs(got - want) <= bound, (got, want, bound)
    assert g.keys() == g_want.keys() and any("compressor" in n for n in g)
    for n in g:
        assert g_want[n].abs().max() > 0 and _rel(g[n], g_want[n]) <= g_bound, (n, _rel(g[n], g_want[n]), g_bound)


def _entries_only(attn, q_BCHd, band_BS1d, band_BCS, own, own_BCn, equation):
    """A plausible mistake: the target's softmax over the entries alone (no window, no sink)."""
    entry = torch.einsum(equation, q_BCHd, own) * attn.softmax_scale
    p = entry.masked_fill(~own_BCn.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num(0.0).sum(2)
    return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


def _no_sink(attn, q_BCHd, band_BS1d, band_BCS, own, own_BCn, equation):
    """A plausible mistake: the sink left out of the target's softmax."""
    B, C, H, _ = q_BCHd.shape
    band = torch.einsum("bchd,bsd->bchs", q_BCHd, band_BS1d[:, :, 0]) * attn.softmax_scale
    entry = torch.einsum(equation, q_BCHd, own) * attn.softmax_scale
    p = torch.cat([band.masked_fill(~band_BCS.unsqueeze(2), float("-inf")),
                   entry.masked_fill(~own_BCn.unsqueeze(2), float("-inf"))], dim=-1).softmax(-1)
    p = p[..., band.shape[-1]:].sum(2)
    return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


@pytest.mark.parametrize("mistake", [_entries_only, _no_sink], ids=["entries-only", "no-sink"])
def test_wrong_targets_land_far_outside_the_bound(mistake, monkeypatch):
    """A target softmaxed over the entries alone, or without the sink, moves L_I by over 100 times the FP64 bound."""
    layer = _layer("sparse", torch.float64)
    x, cos, sin = _inputs(torch.float64)
    want, _, bound, _ = reference(layer, x, "sparse")
    monkeypatch.setattr(hil, "_target", mistake)
    got, _ = _flyer(layer, x, cos, sin, 37, True)
    assert abs(got - want) > 100 * bound, (got, want, bound)


V4 = preset("tiny-v4", vocab_size=256, mtp_depth=1)
CSA_LAYERS = [i for i in range(V4.n_layers) if V4.is_csa(i)]


def _model(mode: str) -> Transformer:
    return v32_model(mode, cfg=V4)


def _tokens(B: int, T_: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, V4.vocab_size, (B, T_ + 1), generator=torch.Generator().manual_seed(seed))


def test_sparse_training_leaves_the_model_as_without():
    """tiny-v4 at T 96 (24 entries: the CSA layers select 16): sparse training's LM loss and every non-indexer
    gradient equal, bit for bit, those of the same step without it (the indexer's input detached, the target without
    gradient); the indexers' gradients are those of their L_I alone; only the CSA layers (not HCA, window or the
    MTP block) have an indexer and an L_I."""
    tokens = _tokens(2, 96)
    off, sparse = _model("off"), _model("sparse")
    out_off = off.compute_loss(tokens[:, :-1], tokens[:, 1:])
    out = sparse.compute_loss(tokens[:, :-1], tokens[:, 1:])
    assert torch.equal(out.main_loss, out_off.main_loss) and not out_off.indexer_losses
    assert len(out.indexer_losses) == len(indexer_attentions(sparse)) == len(CSA_LAYERS) > 0
    assert all(float(k.detach()) > 0 for k in out.indexer_losses)
    g_off, g = _grads(off, out_off.loss), _grads(sparse, out.loss)
    main = {n for n in g if ".indexer." not in n}
    assert main == set(g_off) and all(torch.equal(g[n], g_off[n]) for n in main)
    assert {n.split(".attn.")[0] for n in set(g) - main} == {f"layers.{i}" for i in CSA_LAYERS}
    again = sparse.compute_loss(tokens[:, :-1], tokens[:, 1:])
    g_kl = _grads(sparse, torch.stack(again.indexer_losses).sum())
    assert set(g_kl) == set(g) - main and all(torch.equal(g[n], g_kl[n]) for n in g_kl)


def test_warmup_is_dense_and_trains_only_the_indexers():
    """Warm-up: only the indexers get gradients, and the logits are those of the model keeping every complete entry
    (index_topk past the entries: no selection), bit for bit; sparse mode at this length selects (other logits)."""
    tokens = _tokens(2, 96)
    model = _model("warmup")
    model.compute_loss(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, _ in model.named_parameters() if ".indexer." in n}
    dense = Transformer(V4.replace(index_topk=10_000))
    dense.load_state_dict(model.state_dict())
    sparse = _model("sparse")
    with torch.no_grad():
        assert torch.equal(model(tokens), dense(tokens)) and not torch.equal(sparse(tokens), dense(tokens))


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_packed_rows_average_over_their_documents(mode):
    """Packed rows (documents of 20 and 76 tokens in one row, 96 in the other: two groups of unequal size, 20 and
    76 + 96 queries): the CSA layer's L_I is the mean over the three documents' queries of each one's run alone,
    within the reference bound of each (summed)."""
    layer = _layer(mode, torch.float64)
    x, cos, sin = _inputs(torch.float64, 96)
    ids = torch.cat([torch.zeros(1, 20), torch.ones(1, 76)], dim=1).long()
    docs = Documents(torch.cat([ids, torch.full((1, 96), 2)]))
    cos_p, sin_p = docs.rope(cos, sin, 96)
    layer(x, cos_p, sin_p, docs=docs)
    got = float(layer.index_loss.detach())
    sums, bounds = 0.0, 0.0
    for b, s, e in [(0, 0, 20), (0, 20, 96), (1, 0, 96)]:
        want, _, bound, _ = reference(layer, x[b:b + 1, s:e].contiguous(), mode)
        sums += want * (e - s)
        bounds += bound * (e - s)
    assert abs(got - sums / 192) <= bounds / 192, (got, sums / 192)


def test_warmup_learns_a_batch(capsys):
    """20 warm-up steps (AdamW, lr 1e-2) of tiny-v4 on one batch of 2 x 96 tokens, its attention peaked (attention
    matrices at twice unit scale): each CSA layer's L_I falls below half its start (printed: the figures in the
    report); only the indexers have moved."""
    model = _model("warmup")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".attn." in n and ".indexer." not in n and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    tokens = _tokens(2, 96, seed=9)
    losses = []
    for _ in range(21):
        opt.zero_grad(set_to_none=True)
        out = model.compute_loss(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        losses.append([float(k.detach()) for k in out.indexer_losses])
        opt.step()
    with capsys.disabled():
        print("\nwarm-up on one batch, L_I per CSA layer:", losses[0], "->", losses[-1])
    assert all(b < 0.5 * a for a, b in zip(losses[0], losses[-1])), losses
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == {n for n in start if ".indexer." in n}


def test_cli_warmup_run_logs_indexer_loss(tmp_path):
    """``flyer train --preset tiny-v4 --indexer-train warmup`` runs (4 steps of 2 x 96 tokens) and logs a positive,
    finite indexer_loss every step."""
    words = "latent window entry indexer query selection head score layer token".split()
    text = "\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)) for i in range(600))
    (tmp_path / "text.txt").write_text(text + "\n")
    argv = ["train", "--preset", "tiny-v4", "--indexer-train", "warmup", "--steps", "4", "--batch-size", "2",
            "--seq-len", "96", "--lr", "1e-2", "--warmup", "1", "--schedule", "constant", "--eval-every", "100",
            "--ckpt-every", "100", "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"),
            "--vocab-size", "300", "--out", str(tmp_path / "run"), "--no-progress", "--no-plots", "--device", "cpu",
            "--threads", "1", "--precision", "fp32"]
    assert main(argv) == 0
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 4 and all(0 < r["indexer_loss"] < math.inf for r in steps), steps


def test_v4_without_csa_is_refused(tmp_path, capsys):
    """A hybrid model with no CSA layer (HCA and window only) has no indexer: refused naming indexer_train, and by
    the CLI with exit 2 naming --indexer-train; tiny-v4 (two CSA layers) is accepted."""
    check_indexer_train("warmup", V4)
    no_csa = V4.replace(compress_ratios=(0, 16, 16, 0))
    with pytest.raises(FieldError, match="indexer_train"):
        check_indexer_train("sparse", no_csa)
    (tmp_path / "hca.toml").write_text("[model]\ncompress_ratios = [0, 16, 16, 0]\n")
    argv = ["train", "--preset", "tiny-v4", "--config", str(tmp_path / "hca.toml"), "--indexer-train", "warmup",
            "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flyer: error: --indexer-train") and "has none" in err, err


PP_T, PP_M = 96, 4  # 24 entries: the CSA layers select 16 of them


def _pp_trainer(text, root, **kw):
    from tests.test_indexer_train import _tc

    return Trainer(_tc(root, (text, root.parent / "cache"), preset="tiny-v4", batch_size=1, seq_len=PP_T,
                       precision="fp32", threads=1, collective_timeout_s=120, **kw), log=lambda m: None)


def _pp_state(t, sums: dict) -> dict:
    return {"sums": sums, "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}}


def _pp_rank(rank: int, text, batches: list, mode: str) -> dict:
    """Rank ``rank`` of PP2 (1F1B, PP_M micro-batches of a row, ``--indexer-train mode``): one pipeline step."""
    t = _pp_trainer(text, text.parent / f"pp-{mode}" / f"run{rank}", pp=2, pp_schedule="1f1b", micro_batches=PP_M,
                    indexer_train=mode)
    t.sampler.next_batch = iter(batches).__next__
    out = _pp_state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_pipeline_collects_the_csa_losses(tmp_path, mode):
    """``--pp 2`` (1F1B, 4 micro-batches) with tiny-v4's CSA indexers trained: the logged indexer_loss (the mean over
    the CSA layers, one on each stage), the loss and every gradient (the indexers'; sparse: the main model's too)
    equal one process with grad_accum 4 on the same rows within ``tests.test_sft.reorder_bound`` (a gradient's
    relative to the rows' own gradient norms, as tests/test_indexer_train_pp.py)."""
    from tests.ranks import run_ranks
    from tests.test_indexer_train_pp import _worst
    from tests.test_sft import reorder_bound

    words = "latent window entry indexer query selection head score layer token".split()
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5))
                              for i in range(600)) + "\n")
    tokens = torch.randint(0, 300, (PP_M, PP_T + 1), generator=torch.Generator().manual_seed(5))
    batches = [(r[None, :-1], r[None, 1:]) for r in tokens]
    one = _pp_trainer(text, tmp_path / "one", grad_accum=PP_M, indexer_train=mode)
    one.sampler.next_batch = iter(batches).__next__
    want = _pp_state(one, one._local_step())
    rows = []
    for x, y in batches:
        one.model.zero_grad(set_to_none=True)
        one.model.compute_loss(x, y).loss.backward()
        rows.append({n: p.grad.clone() for n, p in one.model.named_parameters() if p.grad is not None})
    one.close()
    ranks = run_ranks(_pp_rank, 2, text, batches, mode)
    c = reorder_bound(V4, PP_M, PP_T)
    assert want["sums"]["indexer_loss"] > 0
    for r in ranks:
        for k in ("loss", "main_loss", "indexer_loss"):
            assert abs(r["sums"][k] - want["sums"][k]) <= c * abs(want["sums"][k]), (k, r["sums"][k], want["sums"][k])
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    indexers = [n for n in want["grads"] if ".indexer." in n]
    main_ = [n for n in want["grads"] if ".indexer." not in n]
    assert indexers and bool(main_) == (mode == "sparse")
    assert {n.split(".attn.")[0] for n in indexers} == {f"layers.{i}" for i in CSA_LAYERS}
    held = [{n.split(".attn.")[0] for n in r["grads"] if ".indexer." in n} for r in ranks]
    assert all(held) and not held[0] & held[1]  # a CSA layer on each stage
    for names in (indexers, main_):
        assert _worst(grads, {n: want["grads"][n] for n in names}, rows) <= c


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_loss_keeps_no_whole_sequence_scores(mode, monkeypatch):
    """Under autograd, in chunks of 16 (FP32), the state L_I adds to the layer's graph (its forward's saved bytes less
    those of the same forward with L_I stubbed out) at most doubles from T 512 to 1024, and at 1024 stays below an
    eighth of the whole sequence's index scores (4 B T hi N bytes): each chunk is recomputed in backward, only the
    indexer keys' compression over the sequence (linear in T) is kept."""
    import flyer.model.hybrid as hybrid
    from flyer.parallel.memory import saved_bytes

    def added(T_: int) -> int:
        layer = _layer(mode, torch.float32)
        x, cos, sin = _inputs(torch.float32, T_)
        x.requires_grad_(True)
        with_loss = saved_bytes(lambda: layer(x, cos, sin, chunk=16))
        with monkeypatch.context() as m:
            m.setattr(hybrid, "csa_indexer_kl", lambda *a: x.new_zeros(()))
            return with_loss - saved_bytes(lambda: layer(x, cos, sin, chunk=16))

    ind = CFG.index_n_heads
    small, large = added(512), added(1024)
    assert 0 < small and large <= 2 * small, (small, large)
    assert large < 4 * 2 * 1024 * ind * (1024 // CFG.csa_ratio) / 8, large
