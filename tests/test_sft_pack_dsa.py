"""Packed rows for DSA models and DeepSeek-V4 (``flyer train --pack`` on V3.2 / GLM-5 / V4: ``Documents.each``):
each document in a packed row selects among its own causal keys only, at RoPE positions from 0 (V4: its sliding
windows and compression blocks start at its first token), so its logits and its MTP module's hidden states equal
the document run alone (V3.2's layout, GLM-5's shared selections, V4's hybrid attention), and equal transformers'
DeepseekV32ForCausalLM on the document alone; the indexer's L_I averages over the real queries only (a group's
padding slots count in nothing; an MTP block's queries stop at the document's end, in the trainer's shares too); a
packed training step (--indexer-train sparse / warmup; V4) gives the unpacked step's loss terms and gradients, the
indexers' included; PP2 1F1B on packed GLM-5 rows gives one process's step; ``flyer train --pack`` on a DSA model
runs and resumes exactly. Tiny random models (index_topk 8; V4's 16 CSA entries), FP32, CPU."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flyer.config import resolve_config
from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import chat_rows
from flyer.data.chat_pack import first_fit, packed_rows
from flyer.model import documents
from flyer.model.attention import Selection
from flyer.model.indexer_loss import real_queries, set_indexer_training
from flyer.model.rope import rope_cos_sin
from flyer.model.transformer import Transformer
from flyer.parallel import pipeline
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from tests import test_sft, test_sft_pack, test_sft_pack_pp
from tests.bounds import FP32_U
from tests.ranks import run_ranks
from tests.test_sft import reorder_bound
from tests.test_sft_pp import _state, _worst
from tests.test_sft_pack import _logit_bound, _step, _whole_rows, packed_errors

hf = test_sft.hf  # a tiny DeepSeek-V3 directory (its tokenizer and chat template) and chats.jsonl
chats = test_sft_pack_pp.chats  # test_sft_pp's CHATS and tokenizer, for the pipeline
DSA = dict(index_topk=8, index_n_heads=4, index_head_dim=32)
LAYOUTS = {"v32": DSA, "glm5": dict(DSA, indexer_types=("full", "shared", "full", "shared"))}
LENGTHS = [13, 40, 25, 15, 7]  # groups (4, 8], (8, 16] (13 and 15: two padding slots), (16, 32], (32, 64]
W = 112


def _row(cfg, seed: int = 0, lengths: list[int] = LENGTHS, width: int = W):
    """One packed row of ``width`` positions holding random documents of ``lengths`` (then padding): x, d, starts,
    docs."""
    g = torch.Generator().manual_seed(seed)
    convs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
    x, d = torch.zeros(1, width, dtype=torch.long), torch.full((1, width), -1)
    starts = np.cumsum([0, *lengths[:-1]])
    for i, (o, c) in enumerate(zip(starts, convs)):
        x[0, o:o + len(c)], d[0, o:o + len(c)] = c, i
    return x, d, starts, convs


def _model(layout: str) -> Transformer:
    cfg = resolve_config("tiny", None, LAYOUTS[layout])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked logits, as test_sft_pack's
        model.head.weight.mul_(30)
    return model


@pytest.mark.parametrize("layout", ["v32", "glm5"])
def test_packed_logits_equal_each_document_alone(layout, monkeypatch):
    """Each document's logits and MTP hidden states in a packed row equal the document run alone within
    ``test_sft_pack._logit_bound`` (the selection is the same discrete choice on both sides, the rest is dense MLA's
    rounding), with selection mattering (the same model attending densely is far off). Mutants far off: the indexer
    and attention run on the whole packed row (selection across documents; the first document sees nothing before
    it and stays); GLM-5's shared layers taking one selection for every group (a group's shared layer then reads
    another group's picks)."""
    model = _model(layout)
    cfg = model.cfg
    x, d, starts, convs = _row(cfg)
    tol = _logit_bound(cfg, W)
    errs, mtp_errs = packed_errors(model, x, d, starts, convs)
    assert max(errs) <= tol and max(mtp_errs) <= tol, (errs, mtp_errs, tol)
    with monkeypatch.context() as m:  # selection matters: every layer keeping all its keys
        for layer in [*model.layers, *(mod.block for mod in model.mtp)]:
            m.setattr(layer.attn, "index_topk", 10 ** 6)
        with torch.no_grad():
            dense = model(convs[1][None])
    with torch.no_grad():
        alone = model(convs[1][None])
    assert float((dense - alone).abs().max() / alone.abs().max()) > 100 * tol
    with monkeypatch.context() as m:
        m.setattr(documents, "document_segments", _whole_rows)
        errs, _ = packed_errors(model, x, d, starts, convs)
    assert errs[0] <= tol and min(errs[1:]) > 100 * tol, errs
    if layout == "glm5":
        with monkeypatch.context() as m:
            m.setattr(Selection, "group", lambda self, i: self)
            try:  # the groups' selections differ in shape: indexing one with another's fails, or reads garbage
                errs, _ = packed_errors(model, x, d, starts, convs)
            except (RuntimeError, IndexError):
                errs = [float("inf")]
        assert max(errs) > 100 * tol, errs


def test_each_runs_every_group_from_position_0():
    """``Documents.each`` hands each group its documents' inputs from their first token, the RoPE tables of
    positions 0..L-1, and real (N, L) True on a document's own positions only (not past its end, not where the
    outer mask says padding); its outputs scatter back, padding positions 0. Mutants: positions running on across
    the row (RoPE scores depend on relative positions only, so only this check sees them), and the slots past a
    document's end counted real."""
    cfg = resolve_config("tiny", None, DSA)
    x, d, starts, convs = _row(cfg)
    e = torch.randn(1, W, 5)
    cos, sin = rope_cos_sin(cfg.rope_dim, W, cfg)
    outer = torch.ones(1, W, dtype=torch.bool)
    outer[0, starts[1] + 3] = False

    def check(docs):
        seen = []

        def fn(i, x_NLD, cos_L, sin_L, real_NL):
            L = x_NLD.shape[1]
            assert torch.equal(cos_L, cos[:L]) and torch.equal(sin_L, sin[:L])
            seen.append(real_NL)
            return x_NLD * 2

        out = docs.each(fn, e, *docs.rope(cos, sin, W), docs.real & outer)
        assert torch.equal(out, 2 * e * (d >= 0)[..., None])
        return seen

    seen = check(documents.Documents(d))
    n_real = [int(r.sum()) for r in seen]
    assert n_real == [7, 13 + 15, 25, 40 - 1]  # by length; 13 and 15 in one group; one slot masked outside
    with pytest.MonkeyPatch.context() as m:
        m.setattr(documents, "document_positions", lambda ids: torch.arange(ids.shape[1]).expand_as(ids))
        with pytest.raises(AssertionError):
            check(documents.Documents(d))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(documents, "document_slots", lambda g: torch.ones_like(g, dtype=torch.bool))
        assert sum(int(r.sum()) for r in check(documents.Documents(d))) > sum(n_real)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_indexer_loss_averages_the_real_queries(mode, monkeypatch):
    """--indexer-train on a packed row: each indexer's L_I (the main layers' and the MTP block's) is the mean over
    the documents' real queries of the documents' own, within ``reorder_bound``; counting a group's padding slots
    (past a document's end: 31 of them, after the 33-token document grouped with the 64-token one) moves it far
    outside. Larger indexer weights than init's make L_I vary from query to query (a mean of equal terms would not
    see extra ones)."""
    model = _model("glm5")
    cfg = model.cfg
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "indexer"):
                m.indexer.weights_proj.weight.mul_(30)
    set_indexer_training(model, mode)
    model.train()
    x, d, starts, convs = _row(cfg, 1, [33, 64, 9, 3])
    y = torch.full_like(x, IGNORE_INDEX)

    def packed():
        with real_queries(model, d >= 0):
            return [float(v.detach()) for v in model.compute_loss(x, y, d).indexer_losses]

    sums = None
    for c in convs:
        out = model.compute_loss(c[None], torch.full((1, len(c)), IGNORE_INDEX)).indexer_losses
        k = [0] * (len(out) - cfg.mtp_depth) + [1] * cfg.mtp_depth  # an MTP block's queries: len - 1
        terms = [float(v.detach()) * (len(c) - kk) for v, kk in zip(out, k)]
        sums = terms if sums is None else [a + b for a, b in zip(sums, terms)]
    want = [s / sum(len(c) - kk for c in convs) for s, kk in zip(sums, k)]
    got = packed()
    tol = reorder_bound(cfg, len(convs), W)
    assert len(got) == len(want) == 3 and all(abs(g - w) <= tol * w for g, w in zip(got, want)), (got, want)
    monkeypatch.setattr(documents, "document_slots", lambda g: torch.ones_like(g, dtype=torch.bool))
    mutant = packed()
    assert max(abs(g - w) / w for g, w in zip(mutant, want)) > 100 * tol, (mutant, want)


def _chat_trainer(hf, root: Path, preset: str, **kw) -> Trainer:
    """A Trainer on ``hf``'s chats with its tokenizer and flyer's default template: ``preset``, FP32, CPU."""
    path, _, chat_file = hf
    tc = TrainConfig(preset=preset, tokenizer=str(path / "tokenizer.json"), data=str(chat_file),
                     data_cache=str(root / "cache"), out=str(root / "run"), seq_len=test_sft_pack.T, precision="fp32",
                     device="cpu", threads=1, plots=False, progress=False, **kw)
    return Trainer(tc, log=lambda m: None)


@pytest.mark.parametrize("layout, mode", [("v32", "sparse"), ("glm5", "warmup"), ("v4", "off"), ("v4", "sparse")])
def test_packed_step_equals_the_unpacked_step(hf, tmp_path, layout, mode):
    """A training step (--indexer-train ``mode``; "v4": DeepSeek-V4's ``tiny-v4``, its CSA layers' L_I) on 7
    conversations packed into 2 rows gives the loss terms (the indexers' L_I included) and every gradient (the
    indexers' too) of the step on the same 7 in trimmed rows of their own, within ``_step_bound`` (a gradient's
    relative to the sum of the rows' own gradient norms)."""
    if layout == "v4":
        kw = dict(indexer_train=mode)
    else:
        over = "\n".join(f"{k} = {v!r}".replace("(", "[").replace(")", "]").replace("'", '"')
                         for k, v in LAYOUTS[layout].items())
        (tmp_path / "dsa.toml").write_text(f"[model]\n{over}\n")
        kw = dict(config=str(tmp_path / "dsa.toml"), indexer_train=mode)
    preset = "tiny-v4" if layout == "v4" else "tiny"
    convs = [0, 3, 1, 6, 2, 4, 9]
    T = test_sft_pack.T
    packed_t = _chat_trainer(hf, tmp_path / "p", preset, batch_size=2, pack=True, **kw)
    plain_t = _chat_trainer(hf, tmp_path / "u", preset, batch_size=len(convs), **kw)
    split, cfg = packed_t.data.train, packed_t.cfg
    assert cfg.index_topk > 0
    lengths = np.diff(split.offsets)[convs]
    rows, taken = first_fit(lengths, 2, T + 1)
    assert taken == len(convs) and len(rows) == 2
    batch = packed_rows(split, [[convs[i] for i in r] for r in rows], T)
    xt, yt = chat_rows(split, convs, T, trim=True)
    packed, plain = _step(packed_t, batch), _step(plain_t, (xt, yt))
    c = _step_bound(cfg, len(convs), T)
    terms = ("loss", "main_loss", "mtp_loss", "aux_loss") + (("indexer_loss",) if mode != "off" else ())
    for k in terms:
        assert abs(packed[0][k] - plain[0][k]) <= c * abs(plain[0][k]), (k, packed[0][k], plain[0][k])
    row_grads = []
    for b in range(len(convs)):
        plain_t.model.zero_grad()
        n = int((xt[b] >= 0).sum())
        plain_t.model.compute_loss(xt[b:b + 1, :n], yt[b:b + 1, :n]).loss.backward()
        row_grads.append({n: p.grad.clone() for n, p in plain_t.model.named_parameters() if p.grad is not None})
    assert set(packed[1]) == set(plain[1])
    assert mode == "off" or (plain[0]["indexer_loss"] > 0 and any(".indexer." in n for n in plain[1]))
    worst = max(float((packed[1][n] - g).norm()) / (sum(float(r[n].norm()) for r in row_grads if n in r) + 1e-30)
                for n, g in plain[1].items())
    assert worst <= c, (worst, c)
    assert all(torch.equal(a, b) for a, b in zip(packed[2], plain[2]))  # routing loads
    packed_t.close()
    plain_t.close()


def _step_bound(cfg, B: int, T: int) -> float:
    """``reorder_bound`` of a (B, T) step; DeepSeek-V4 has no dense FFN (whose inter_dim that counts): per layer its
    sums over dim, the hyper-connections' hc_mult dim, moe_inter_dim, o_lora_rank and at most T keys, then the
    loss's means over B T targets, n u each."""
    if cfg.attn != "hybrid":
        return reorder_bound(cfg, B, T)
    per_layer = cfg.dim * (1 + cfg.hc_mult) + cfg.moe_inter_dim + cfg.o_lora_rank + T
    return (cfg.n_layers * per_layer + B * T + 8) * FP32_U


def _v4_bound(cfg, T: int) -> float:
    """``_logit_bound`` for a DeepSeek-V4 layer: per layer the sums over dim, the experts' moe_inter_dim, the grouped
    output's o_lora_rank, the hyper-connections' hc_mult dim, at most T keys and entries, and the router's E + K."""
    return cfg.n_layers * (cfg.dim * (1 + cfg.hc_mult) + cfg.moe_inter_dim + cfg.o_lora_rank + T
                           + cfg.n_routed_experts + cfg.n_activated_experts) * FP32_U


def test_packed_v4_logits_equal_each_document_alone(monkeypatch):
    """DeepSeek-V4 (``tiny-v4``: window-only, CSA (ratio 4, 16 entries kept: selecting past 64 tokens) and HCA
    (ratio 16) layers, hyper-connections, a hash-routed layer, an MTP module): each document's logits and MTP hidden
    states in a packed row equal the document alone within ``_v4_bound`` (sliding windows, compression blocks and
    selection start at its first token); on the whole row (compression and the window across documents) the later
    documents are far off."""
    cfg = resolve_config("tiny-v4", None, {})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    lengths = [100, 37, 70, 9]  # 100 and 70 in one group: 30 padding slots, 6 HCA and 24 CSA entries
    x, d, starts, convs = _row(cfg, 2, lengths, 224)
    tol = _v4_bound(cfg, 224)
    errs, mtp_errs = packed_errors(model, x, d, starts, convs)
    assert max(errs) <= tol and max(mtp_errs) <= tol, (errs, mtp_errs, tol)
    with monkeypatch.context() as m:
        m.setattr(documents, "document_segments", _whole_rows)
        errs, _ = packed_errors(model, x, d, starts, convs)
    assert min(errs[1:]) > 100 * tol, errs


def test_mtp_indexer_counts_stop_at_document_boundaries(hf, tmp_path, monkeypatch):
    """The trainer weights each micro-batch's L_I by its share of the step's real queries, an MTP block's counted
    within each document (``depth_queries``: a document alone has len - 1): two packed micro-batches (ten 3-token
    documents; one 32-token document) give the gradients of one micro-batch holding both rows, within
    ``reorder_bound``; counting the positions that read a later document's first token (``x[:, k:] >= 0``) weights
    the first micro-batch's MTP L_I by 29/60 instead of 20/51, far outside it."""
    (tmp_path / "dsa.toml").write_text("[model]\nindex_topk = 8\nindex_n_heads = 4\nindex_head_dim = 32\n")
    kw = dict(config=str(tmp_path / "dsa.toml"), indexer_train="sparse", seq_len=32)
    two = test_sft._trainer(hf, tmp_path / "two", "tiny", batch_size=1, grad_accum=2, pack=True, **kw)
    one = test_sft._trainer(hf, tmp_path / "one", "tiny", batch_size=2, pack=True, **kw)
    V = two.cfg.vocab_size
    x = torch.randint(1, V, (2, 32), generator=torch.Generator().manual_seed(3))
    d = torch.full((2, 32), -1)
    d[0, :30], d[1] = torch.arange(10).repeat_interleave(3), 0
    x[0, 30:] = -1  # PAD_ID
    y = torch.full((2, 32), IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    y[:, :-1][d[:, :-1] != d[:, 1:]] = IGNORE_INDEX
    y[d < 0] = IGNORE_INDEX

    def grads(t, batches):
        t.sampler.next_batch = iter(batches).__next__
        t._local_step()
        out = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        t.model.zero_grad(set_to_none=True)
        return out

    whole = grads(one, [(x, y, d)])
    halves = [(x[:1], y[:1], d[:1]), (x[1:], y[1:], d[1:])]
    split = grads(two, halves)
    monkeypatch.setattr("flyer.train.batches.query_count", lambda valid, d, k: int(valid[:, k:].sum()))
    mutant = grads(two, halves)
    rows = []
    for b in range(2):
        with real_queries(one.model, x[b:b + 1] >= 0):
            one.model.compute_loss(x[b:b + 1].clamp(min=0), y[b:b + 1], d[b:b + 1]).loss.backward()
        rows.append({n: p.grad.clone() for n, p in one.model.named_parameters() if p.grad is not None})
        one.model.zero_grad(set_to_none=True)

    def worst(g: dict) -> float:
        return max(float((g[n] - w).norm()) / (sum(float(r[n].norm()) for r in rows if n in r) + 1e-30)
                   for n, w in whole.items())

    c = reorder_bound(two.cfg, 2, 32)
    assert any(n.startswith("mtp.") and ".indexer." in n for n in whole)
    assert worst(split) <= c and worst(mutant) > 100 * c, (worst(split), worst(mutant), c)
    one.close()
    two.close()


def test_transformers_per_document_equals_flyer_packed(tmp_path):
    """transformers' DeepseekV32ForCausalLM run on each document alone gives the logits flyer computes for it in one
    packed row, within ``test_rope_scaling.logit_tolerance`` (as ``test_deepseek_v32``); without the document
    groups (the whole row attended and selected) the later documents are far off."""
    from transformers import AutoModelForCausalLM

    from flyer.interop.hf import load_hf
    from tests.hf_models import VOCAB, build
    from tests.test_rope_scaling import logit_tolerance

    build("v32", tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model, cfg, _ = load_hf(tmp_path)
    model.eval()
    lengths = [40, 24, 30]
    g = torch.Generator().manual_seed(0)
    convs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    x, d = torch.cat(convs)[None], torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    tol = logit_tolerance(cfg, max(lengths))

    def errors():
        with torch.no_grad():
            got = model(x, d)
            out, o = [], 0
            for c in convs:
                want = ref(c[None]).logits
                out.append(float((got[0, o:o + len(c)] - want[0]).abs().max() / want.abs().max()))
                o += len(c)
        return out

    errs = errors()
    assert max(errs) <= tol, (errs, tol)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(documents, "document_segments", _whole_rows)
        errs = errors()
    assert min(errs[1:]) > 100 * tol, errs


def test_cli_packed_dsa_run_resumes_exactly(hf, tmp_path):
    """``flyer train --pack --indexer-train sparse`` on a tiny DSA model: 2 steps straight equal 1 step then a
    resumed second (loss and validation loss). (DeepSeek-V4 through the Trainer: ``test_packed_step_equals_the_unpacked
    _step``.)"""
    (tmp_path / "dsa.toml").write_text("[model]\nindex_topk = 8\nindex_n_heads = 4\nindex_head_dim = 32\n")
    test_sft_pack.resumes_exactly(hf, tmp_path, "--config", str(tmp_path / "dsa.toml"), "--indexer-train", "sparse")


def _glm5_toml(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "glm5.toml").write_text("[model]\nindex_topk = 8\nindex_n_heads = 4\nindex_head_dim = 32\n"
                                    'indexer_types = ["full", "shared", "full", "shared"]\n')
    return str(root / "glm5.toml")


def _pp_kw(model: str, root: Path) -> dict:
    """TrainConfig fields of ``model``: "glm5" (``tiny`` with GLM-5's shared selections) or "v4" (``tiny-v4``)."""
    return dict(config=_glm5_toml(root)) if model == "glm5" else dict(preset="tiny-v4")


# two of ``test_sft_pack_pp``'s packed micro-batches (6 and 4 conversations): 1F1B's fewest on PP2 (a warm-up
# forward, a forward-backward pair, a cool-down backward); the share weighting over M = 4 is test_sft_pack_pp's
PP_ROWS = [test_sft_pack_pp.ROWS[0], test_sft_pack_pp.ROWS[2]]


def _pp_rank(rank: int, chats: str, model: str) -> dict:
    """Rank ``rank`` of PP2 1F1B on ``model`` (``_pp_kw``; GLM-5: a stage starts at a full layer): one
    ``_pipeline_step`` on the packed micro-batches ``PP_ROWS``, then one with the document ids dropped after the
    first stage."""
    root = Path(chats).parent / f"pp-{model}"
    t = test_sft_pack_pp._trainer(chats, root, rank, pp=2, pp_schedule="1f1b", micro_batches=len(PP_ROWS),
                                  **_pp_kw(model, root))
    t.sampler.next_batch = iter(test_sft_pack_pp._batches(t, PP_ROWS) * 2).__next__
    out = {"step": _state(t, t._pipeline_step())}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.Stage, "forward", test_sft_pack_pp._later_stages_without_documents)
        out["mutant"] = _state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


def _one_process(chats: Path, model: str) -> tuple[dict, list[dict], float]:
    """One process with --pack and grad_accum M on ``_pp_kw(model)`` (``PP_ROWS``): the step's state, each packed
    row's own gradients (the scale of the terms an entry sums) and the tolerance factor c."""
    M, B, T = len(PP_ROWS), test_sft_pack_pp.B, test_sft_pack_pp.T
    root = chats.parent / f"one-{model}"
    t = test_sft_pack_pp._trainer(str(chats), root, 0, grad_accum=M, **_pp_kw(model, root))
    assert t.cfg.index_topk > 0 and (t.cfg.attn == "hybrid") == (model == "v4")
    batches = test_sft_pack_pp._batches(t, PP_ROWS)
    assert all(bool((d[:, 1:] > d[:, :-1]).any()) for _, _, d in batches)  # packed: rows of several documents
    t.sampler.next_batch = iter(batches).__next__
    ref = _state(t, t._local_step())
    rows = []
    for x, y, d in batches:
        for b in range(B):
            t.model.zero_grad()
            t.model.compute_loss(x[b:b + 1].clamp(min=0), y[b:b + 1], d[b:b + 1]).loss.backward()
            rows.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
    c = _step_bound(t.cfg, M * B, T)
    t.close()
    return ref, rows, c


@pytest.mark.parametrize("model", ["glm5", pytest.param("v4", marks=pytest.mark.slow)])
def test_pp_packed_step_equals_grad_accum(chats, model):
    """PP2 (1F1B) with --pack on a DSA model (GLM-5's shared selections, each stage's own per group of documents)
    and on DeepSeek-V4 (each layer kind's RoPE table at the documents' positions) gives the loss terms, gradients and
    routing loads of one process with --pack and grad_accum = micro-batches on the same packed rows, within
    ``_step_bound`` (``test_sft_pack_pp``'s tolerance); dropping the document ids after the first stage (selection,
    compression and attention across conversations) moves the gradients far outside it."""
    ref, rows, c = _one_process(chats, model)
    ranks = run_ranks(_pp_rank, 2, str(chats), model)
    assert set(ranks[0]["step"]["grads"]) | set(ranks[1]["step"]["grads"]) == set(ref["grads"])
    for r in ranks:
        for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):
            assert abs(r["step"]["terms"][k] - ref["terms"][k]) <= c * ref["terms"][k], k
        assert _worst(r["step"]["grads"], ref["grads"], rows) <= c
        assert all(torch.equal(v, ref["counts"][n]) for n, v in r["step"]["counts"].items())
    later = {n: g for r in ranks for n, g in r["mutant"]["grads"].items()}
    assert _worst(later, ref["grads"], rows) > 30 * c
