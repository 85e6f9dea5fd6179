"""Packed chat rows (``flyer train --data chats.jsonl --pack``, ``flyer.data.chat_pack``, ``flyer.model.documents``):
each conversation in a packed row computes what it computes alone (block-diagonal causal mask, RoPE positions from
0), so a packed step's loss (next-token and MTP), gradients and routing statistics equal the unpacked step's on the
same conversations, and the loss equals transformers' DeepseekV3 on the conversations one per row; the sampler
packs the unpacked sampler's stream and resumes exactly; the trainer's MTP target counts stop at the boundaries
and two expert-parallel ranks give one process's step; bad combinations are one-line CLI errors. Tiny random
models, FP32, CPU."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flyer.cli import main
from flyer.config import resolve_config
from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import ChatSampler, chat_rows
from flyer.data.chat_pack import PackedChatSampler, first_fit, packed_eval_batches, packed_rows
from flyer.errors import DataError
from flyer.interop.hf import load_hf
from flyer.model import documents
from flyer.model.moe import moe_layers
from flyer.model.transformer import Transformer
from flyer.train.metrics import model_flops_per_token
from tests import test_sft
from tests.bounds import FP32_U
from tests.test_sft import reorder_bound

hf = test_sft.hf  # the same fixture: a tiny DeepSeek-V3 directory with a chat template, and chats.jsonl
T = 512  # rows of 3-4 of the chats (53 to 91 tokens; 247 to 265 with the default template's tools)


def _trainer(hf, tmp_path, model="tiny", **kw):
    return test_sft._trainer(hf, tmp_path, model, **{"seq_len": T, **kw})


_segments = documents.document_segments


def _whole_rows(documents_BT):  # mutant: attention over the whole row (no document boundary)
    return _segments(torch.zeros_like(documents_BT))


def _keep_all(targets_BT, documents_BT, k):  # mutant: MTP targets across a boundary kept
    return targets_BT[:, k:]


def test_packed_rows_hold_each_conversations_row(hf, tmp_path):
    """Row b of ``packed_rows`` holds its conversations back to back, each's x and y those of its own (unpacked)
    row, its last token's target ignored, document ids 0, 1, ... and -1 on the padding; first-fit fills the first
    row with room and stops at the first conversation that fits in none."""
    t = _trainer(hf, tmp_path, batch_size=2)
    split = t.data.train
    rows = [[0, 3, 1], [6, 2]]
    x, y, d = packed_rows(split, rows, T)
    assert x.shape == y.shape == d.shape == (2, T)
    for b, convs in enumerate(rows):
        o = 0
        for i, c in enumerate(convs):
            xa, ya = chat_rows(split, [c], T)
            n = len(split.conversation(c)[0])
            assert torch.equal(x[b, o:o + n], xa[0, :n]) and torch.equal(y[b, o:o + n - 1], ya[0, :n - 1])
            assert int(y[b, o + n - 1]) == IGNORE_INDEX and (d[b, o:o + n] == i).all()
            o += n
        assert (d[b, o:] == -1).all() and (x[b, o:] < 0).all() and (y[b, o:] == IGNORE_INDEX).all()
    assert first_fit([5, 4, 3, 2], 2, 7) == ([[0, 3], [1, 2]], 4)
    assert first_fit([5, 5, 5, 1], 2, 7) == ([[0], [1]], 2)
    with pytest.raises(ValueError):
        packed_rows(split, [[0, 1, 2, 3, 4]], T)  # more than seq_len+1 tokens


def test_the_chat_sampler_trains_each_conversation_once_an_epoch(hf, tmp_path):
    """The stream of conversations (batches of 3, running across epochs) holds each trainable conversation once in
    each epoch, in an order of its own per epoch and per seed; a sampler state saved before epochs (no ``order``)
    resumes its uniform draws with replacement (PCG64 seeded with (seed, n)), as the run began them."""
    split = _trainer(hf, tmp_path, batch_size=2).data.train
    s = ChatSampler(split, 3, T, seed=7)
    n = len(s.pool)
    stream = np.concatenate([s.conversations(b) for b in range(-(-3 * n // 3))])[:3 * n]
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(e.tolist()) == sorted(s.pool.tolist()) for e in epochs)
    assert epochs[0].tolist() != epochs[1].tolist()
    assert ChatSampler(split, 3, T, seed=8).conversations(0).tolist() != s.conversations(0).tolist()
    old = {k: v for k, v in s.state_dict().items() if k != "order"}
    resumed = ChatSampler(split, 3, T, seed=0)
    resumed.load_state_dict({**old, "position": 5})
    draws = np.random.Generator(np.random.PCG64([7, 5])).integers(0, n, size=3)
    assert resumed.conversations(5).tolist() == s.pool[draws].tolist() and resumed.state_dict()["order"] == "draws"


def test_data_parallel_replicas_share_one_epoch(hf, tmp_path):
    """Two replicas (same seed) take alternate blocks of the one-replica stream, so their steps together train each
    conversation once an epoch; the trainer builds them so (``samplers``). A replica's state resumes only that
    replica; a state saved before replicas shared the stream (no ``replicas``) resumes its own stream."""
    from flyer.train.batches import samplers

    t = _trainer(hf, tmp_path, batch_size=2)
    split = t.data.train
    one = ChatSampler(split, 3, T, seed=7)
    two = [ChatSampler(split, 3, T, seed=7, replica=r, replicas=2) for r in range(2)]
    n = len(one.pool)
    steps = -(-n // 6)
    both = np.concatenate([two[r].conversations(b) for b in range(steps) for r in range(2)])
    assert both.tolist() == np.concatenate([one.conversations(b) for b in range(2 * steps)]).tolist()
    assert sorted(both[:n].tolist()) == sorted(one.pool.tolist())
    built = [samplers(t.tc, t.data, r, 2)[0] for r in range(2)]
    assert [(s.seed, s.replica, s.replicas) for s in built] == [(built[0].seed, 0, 2), (built[0].seed, 1, 2)]
    state = {**two[1].state_dict(), "position": 4}
    with pytest.raises(DataError, match="replica 1 of 2"):
        two[0].load_state_dict(state)
    two[1].load_state_dict(state)
    assert two[1].conversations(4).tolist() == one.conversations(9).tolist()
    alone = ChatSampler(split, 3, T, seed=0, replica=1, replicas=2)
    alone.load_state_dict({k: v for k, v in one.state_dict().items() if k not in ("replica", "replicas")})
    assert alone.conversations(3).tolist() == one.conversations(3).tolist() and alone.state_dict()["replicas"] == 1


def test_another_number_of_replicas_picks_up_the_shared_stream(hf, tmp_path):
    """Resumed with another number of replicas (``load_resized``), the replicas go on from the blocks the run's
    replicas had drawn together: two replicas at position 3 (6 blocks) resume as three at 2 and one at 6, each
    drawing what the one-replica stream has next; a count they cannot share out, a state of replicas that did not
    share the stream, and packed rows (whose replicas stand at different places) are refused in one line."""
    split = _trainer(hf, tmp_path, batch_size=2).data.train
    one = ChatSampler(split, 3, T, seed=7)
    saved = [{**ChatSampler(split, 3, T, seed=7, replica=r, replicas=2).state_dict(), "position": 3}
             for r in range(2)]
    three = [ChatSampler(split, 3, T, seed=7, replica=r, replicas=3) for r in range(3)]
    for r, s in enumerate(three):
        s.load_resized(saved, r)
        assert s.position == 2 and s.conversations(2).tolist() == one.conversations(6 + r).tolist()
    alone = ChatSampler(split, 3, T, seed=7)
    alone.load_resized(saved, 0)
    assert alone.position == 6 and alone.conversations(6).tolist() == one.conversations(6).tolist()
    four = ChatSampler(split, 3, T, seed=7, replica=1, replicas=4)
    with pytest.raises(DataError, match="drew 6 blocks, which 4 replicas cannot share out"):
        four.load_resized(saved, 1)
    with pytest.raises(DataError, match="resume with as many data-parallel replicas"):
        four.load_resized([{k: v for k, v in d.items() if k not in ("replica", "replicas")} for d in saved], 1)
    packed = PackedChatSampler(split, 3, T, seed=7, replica=0, replicas=1)
    with pytest.raises(DataError, match="packed rows: the place in the stream of 2 data-parallel replicas does not "
                                        "carry over to 1; resume with 2 replicas$"):
        packed.load_resized([{**d, "pack": True, "offset": 0} for d in saved], 0)
    with pytest.raises(DataError, match="of 1 data-parallel replica does not carry over to 4; resume with 1 replica$"):
        PackedChatSampler(split, 3, T, seed=7, replica=0, replicas=4).load_resized([{**saved[0], "pack": True}], 0)


def test_sampler_packs_the_unpacked_stream_and_resumes_exactly(hf, tmp_path):
    """The packed sampler trains on the unpacked sampler's conversations in its order, each once; a sampler
    resumed from its state after two batches draws the next two bit for bit; an unpacked sampler's state is
    refused. Validation: the held-out conversations packed in file order, the same on every call."""
    t = _trainer(hf, tmp_path, batch_size=2, pack=True)
    split = t.data.train
    assert isinstance(t.sampler, PackedChatSampler)
    s = PackedChatSampler(split, 2, T, seed=7)
    batches, convs = [], []
    for _ in range(6):
        batches.append(s.next_batch())
        convs += s.last_conversations
    ref = ChatSampler(split, 2, T, seed=7)
    stream = np.concatenate([ref.conversations(n) for n in range(len(convs))])
    assert convs == stream[:len(convs)].tolist() and len(convs) > 6 * 2  # several per row
    offsets = []
    for cut in range(1, 6):  # resumed after each batch (a cursor inside a block among them)
        s2 = PackedChatSampler(split, 2, T, seed=7)
        for _ in range(cut):
            s2.next_batch()
        offsets.append(s2.offset)
        again = PackedChatSampler(split, 2, T, seed=0)
        again.load_state_dict(json.loads(json.dumps(s2.state_dict())))
        for want in batches[cut:]:
            assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), want))
    assert any(offsets)
    with pytest.raises(DataError, match="without pack"):
        again.load_state_dict(ref.state_dict())
    val = packed_eval_batches(t.data.val, 2, T, 4)
    assert len(val) == 1 and int(val[0][2].max()) == 1  # the two held-out conversations, one row
    assert all(torch.equal(a, b) for a, b in zip(val[0], t.eval_data[0]))


def _logit_bound(cfg, T: int) -> float:
    """max|packed - alone| / max|logit|: per layer the sums over dim, inter_dim and at most T keys (and the router's
    E + K) in two orders, n u each (``tests.test_rope_scaling.logit_tolerance`` without its RoPE frequency term:
    both sides rotate by flyer's tables)."""
    return cfg.n_layers * (cfg.dim + cfg.inter_dim + T + cfg.n_routed_experts + cfg.n_activated_experts) * FP32_U


def packed_errors(model, x, d, starts, convs) -> tuple[list[float], list[float]]:
    """Per conversation ``convs[i]`` packed at ``starts[i]`` of row 0 of ``x`` (documents ``d``): max|packed - alone|
    / max|alone| of the logits and of the MTP module's hidden states (its first len - 1 positions)."""
    with torch.no_grad():
        docs = documents.Documents(d)
        packed = model(x, d)
        h_mtp = model.mtp_hidden(model.last_residual(x, docs), x, docs)[0]
        errs, mtp_errs = [], []
        for o, c in zip(starts, convs):
            alone = model(c[None])
            errs.append(float((packed[0, o:o + len(c)] - alone[0]).abs().max() / alone.abs().max()))
            h = model.mtp_hidden(model.last_residual(c[None]), c[None])[0]
            mtp_errs.append(float((h_mtp[0, o:o + len(c) - 1] - h[0]).abs().max() / h.abs().max()))
    return errs, mtp_errs


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_packed_logits_equal_each_conversation_alone(attn, monkeypatch):
    """Each conversation's logits in a packed row (and its MTP module's hidden states) equal the conversation's
    run alone within ``_logit_bound``, its RoPE positions 0, 1, ... as alone; without the document mask a later
    conversation's are far off (the first's stay: it sees nothing before it). RoPE scores depend on relative
    positions only, so positions running on across the row change the logits by rounding alone (a shift within
    the mask); the positions are checked as they are."""
    over = {} if attn == "mla" else dict(attn="gqa", n_kv_heads=2, head_dim=32, qk_norm=True, rotary_dim=16)
    cfg = resolve_config("tiny", None, over)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked logits: a cross-entropy depends on its target (a near-uniform model's barely)
        model.head.weight.mul_(30)
    lengths = [13, 40, 25, 7]
    convs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    W = 96
    x = torch.zeros(1, W, dtype=torch.long)
    d = torch.full((1, W), -1)
    starts = np.cumsum([0, *lengths[:-1]])
    for i, (o, c) in enumerate(zip(starts, convs)):
        x[0, o:o + len(c)], d[0, o:o + len(c)] = c, i
    tol = _logit_bound(cfg, W)

    def worst() -> tuple[list[float], list[float]]:
        return packed_errors(model, x, d, starts, convs)

    errs, mtp_errs = worst()
    assert max(errs) <= tol and max(mtp_errs) <= tol, (errs, mtp_errs, tol)
    # the losses with every target of each conversation, and with its first two only (position 0's MTP target the
    # one left, so the 3 targets a boundary-crossing MTP position would add weigh much): the packed losses are the
    # target-weighted means of the alone ones
    with torch.no_grad():
        heads = [F.linear(model.mtp[0].head_input(model.mtp_hidden(model.last_residual(c[None]), c[None])[0]),
                          model.head.weight) for c in convs]
        logit_max = max(max(float(model(c[None]).abs().max()) for c in convs), max(float(h.abs().max()) for h in heads))
        for first in (None, 2):
            y = torch.full((1, W), IGNORE_INDEX)
            want_n, want_s = [0, 0], [0.0, 0.0]
            for o, c in zip(starts, convs):
                ya = c[None, 1:].clone()
                if first:
                    ya[:, first:] = IGNORE_INDEX
                y[0, o:o + len(c) - 1] = ya[0]
                out = model.compute_loss(c[None, :-1], ya)
                for k, loss in enumerate([out.main_loss, out.mtp_losses[0]]):
                    n = int((ya[:, k:] != IGNORE_INDEX).sum())
                    want_n[k], want_s[k] = want_n[k] + n, want_s[k] + float(loss) * n
            want = [s / n for s, n in zip(want_s, want_n)]
            out = model.compute_loss(x, y, d)
            got = [float(out.main_loss), float(out.mtp_losses[0])]
            with monkeypatch.context() as m:
                m.setattr("flyer.model.transformer.depth_targets", _keep_all)
                mutant = float(model.compute_loss(x, y, d).mtp_losses[0])
            # a cross-entropy moves by at most twice its logits' error, the mean adds V + N roundings
            loss_tol = [2 * tol * logit_max + (cfg.vocab_size + W + 4) * FP32_U * w for w in want]
            assert all(abs(g - w) <= t for g, w, t in zip(got, want, loss_tol)), (got, want, loss_tol)
            if first:
                assert abs(mutant - want[1]) > 10 * loss_tol[1]
    want = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(W - sum(lengths))])
    docs = documents.Documents(d)
    assert torch.equal(docs.positions[0], want)
    assert [tuple(g.shape) for g in docs.gathers] == [(1, 7), (1, 13), (1, 25), (1, 40)]  # by length: 2^j buckets
    v = torch.randn(1, W, 1, 3)
    assert torch.equal(docs.attend(lambda q, k, v: v, v, v, v), v * (d >= 0)[..., None, None])  # padding: zeros
    with monkeypatch.context() as m:
        m.setattr(documents, "document_segments", _whole_rows)
        errs, mtp_errs = worst()
    assert errs[0] <= tol and min(errs[1:]) > 100 * tol and min(mtp_errs[1:]) > 100 * tol, errs


def _step(t, batch):
    """``_local_step`` of ``t`` on ``batch``: its sums, gradients, MoE loads and balance losses (state cleared)."""
    t.sampler.next_batch = iter([batch]).__next__
    sums = t._local_step()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    layers = moe_layers(t.model)
    loads = [m.tokens_per_expert.clone() for m in layers]
    aux = [float(m.aux_loss.detach()) for m in layers if m.aux_loss is not None]
    t.model.zero_grad(set_to_none=True)
    for m in layers:
        m.tokens_per_expert.zero_()
    return sums, grads, loads, aux


def test_packed_step_equals_the_unpacked_step(hf, tmp_path):
    """A training step on 7 conversations packed into 2 rows (``tiny``: MLA, MoE, MTP) gives the loss, next-token
    and MTP losses, gradients, routing loads and per-conversation balance losses of the step on the same 7 in
    trimmed rows of their own (within ``reorder_bound``; the loads exactly), tokens/s and MFU counting real
    positions and each conversation's own attention. Keeping the targets across the boundaries moves the gradients
    far outside the bound. (An MTP target across a boundary is a conversation's second token, never the
    assistant's here: ``test_packed_logits_equal_each_conversation_alone`` checks those.)"""
    convs = [0, 3, 1, 6, 2, 4, 9]  # 53 to 81 tokens: rows of 255 and 224
    packed_t = _trainer(hf, tmp_path / "p", batch_size=2, pack=True)
    plain_t = _trainer(hf, tmp_path / "u", batch_size=len(convs))
    split, cfg = packed_t.data.train, packed_t.cfg
    lengths = np.diff(split.offsets)[convs]
    rows, taken = first_fit(lengths, 2, T + 1)
    assert taken == len(convs) and len(rows) == 2
    batch = packed_rows(split, [[convs[i] for i in r] for r in rows], T)
    assert all(sum(lengths[i] for i in r) <= T for r in rows)  # every last token in x: routed as in its own row
    xt, yt = chat_rows(split, convs, T, trim=True)
    packed, plain = _step(packed_t, batch), _step(plain_t, (xt, yt))
    c = reorder_bound(cfg, len(convs), T)
    for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):
        assert abs(packed[0][k] - plain[0][k]) <= c * plain[0][k], k
    row_grads = []
    for b in range(len(convs)):  # the scale of the terms each gradient entry sums
        plain_t.model.zero_grad()
        n = int((xt[b] >= 0).sum())
        plain_t.model.compute_loss(xt[b:b + 1, :n], yt[b:b + 1, :n]).loss.backward()
        row_grads.append({n: p.grad.clone() for n, p in plain_t.model.named_parameters() if p.grad is not None})

    def worst(grads: dict) -> float:  # the largest gradient difference from the unpacked step's, over its scale
        return max(float((grads[n] - g).norm()) / (sum(float(r[n].norm()) for r in row_grads if n in r) + 1e-30)
                   for n, g in plain[1].items())

    assert worst(packed[1]) <= c
    assert all(torch.equal(a, b) for a, b in zip(packed[2], plain[2]))
    assert packed[3] and all(abs(a - b) <= (T * cfg.n_activated_experts + cfg.n_routed_experts + 8) * FP32_U * b
                             for a, b in zip(packed[3], plain[3]))
    assert packed[0]["tokens"] == lengths.sum()
    assert packed[0]["flops"] == pytest.approx(sum(n * model_flops_per_token(cfg, n) for n in lengths), rel=1e-12)

    x, y, d = batch
    kept = y.clone()
    ends = (d[:, :-1] != d[:, 1:]) & (d[:, 1:] >= 0)  # a conversation's last position before the next's first
    kept[:, :-1][ends] = x[:, 1:][ends]
    boundary = _step(packed_t, (x, kept, d))
    assert worst(boundary[1]) > 10 * c  # about 80 c: 5 targets of some 240


def test_packed_loss_equals_transformers_one_conversation_per_row(hf):
    """flyer's packed next-token loss on 6 conversations in 2 rows equals transformers' DeepseekV3ForCausalLM loss
    on the same conversations one per row (right-padded, labels -100 off the assistant's tokens), within
    ``test_sft``'s tolerance (twice the logits' error bound, plus the mean's V + N roundings); the packed rows
    without the document mask are far outside it."""
    from transformers import AutoModelForCausalLM

    from flyer.data.chat_data import chat_tokenizer, prepare_chat
    from tests.test_rope_scaling import logit_tolerance

    path, _, chats = hf
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    model, cfg, _ = load_hf(path)
    model.eval()
    data = prepare_chat(chats, path.parent / "cache", *chat_tokenizer(str(path), None))
    convs = [0, 3, 1, 6, 4, 7]  # 49 to 80 tokens (this template's), none cut
    lengths = np.diff(data.train.offsets)[convs]
    rows, taken = first_fit(lengths, 2, T + 1)
    assert taken == len(convs)
    x, y, d = packed_rows(data.train, [[convs[i] for i in r] for r in rows], T)
    W = int(lengths.max())
    ids = torch.zeros(len(convs), W, dtype=torch.long)
    labels = torch.full((len(convs), W), IGNORE_INDEX)
    for b, c in enumerate(convs):
        i, m = (torch.from_numpy(a) for a in data.train.conversation(c))
        ids[b, :len(i)], labels[b, :len(i)] = i, torch.where(m == 1, i, IGNORE_INDEX)
    with torch.no_grad():
        out = ref(ids, labels=labels)
        got = float(model.compute_loss(x.clamp(min=0), y, d).main_loss)
        unmasked = float(model.compute_loss(x.clamp(min=0), y).main_loss)
    n = int((y != IGNORE_INDEX).sum())
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    logit_err = (logit_tolerance(cfg, W) + cfg.n_layers * (cfg.n_routed_experts + cfg.n_activated_experts)
                 * FP32_U) * float(out.logits.abs().max())
    tol = 2 * logit_err + (cfg.vocab_size + n + 4) * FP32_U * float(out.loss)
    assert abs(got - float(out.loss)) <= tol
    assert abs(unmasked - float(out.loss)) > 10 * tol


def _args(hf, tmp_path, *extra):
    path, _, chats = hf
    return ["train", "--tokenizer", str(path / "tokenizer.json"), "--data", str(chats), "--steps", "1",
            "--seq-len", "64", "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-plots",
            "--no-progress", "--threads", "1", "--device", "cpu", "--precision", "fp32", "--pack", *extra]


@pytest.mark.parametrize("preset, extra, words", [
    ("tiny", ("text",), "text data is already packed"),
])
def test_pack_refusals_are_one_line_errors(hf, tmp_path, capsys, preset, extra, words):
    """--pack on text data: exit 2, one line naming --pack (every attention packs: DSA and DeepSeek-V4's in
    ``tests/test_sft_pack_dsa.py``; under a pipeline it runs: ``tests/test_sft_pack_pp.py``)."""
    argv = _args(hf, tmp_path, "--preset", preset, *[e for e in extra if e != "text"])
    if "text" in extra:
        (tmp_path / "text.txt").write_text("some text\n" * 50)
        argv[argv.index("--data") + 1] = str(tmp_path / "text.txt")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --pack: ") and words in err[0], err


def resumes_exactly(hf, tmp_path, *flags: str) -> None:
    """``flyer train --pack`` with ``flags``: 2 steps straight equal 1 step then a resumed second (loss and
    validation loss: the second step reads the checkpoint's weights, optimizer moments, router biases and the
    packed sampler's place)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    base = ["--preset", "tiny", *flags, "--batch-size", "2", "--eval-batches", "1", "--eval-every", "1",
            "--ckpt-every", "1"]

    def run(out, steps, *extra):
        argv = _args(hf, tmp_path, *base, *extra)
        argv[argv.index("--out") + 1], argv[argv.index("--steps") + 1] = str(out), str(steps)
        assert main(argv) == 0

    run(whole, 2)
    run(cut, 1)
    run(cut, 2, "--resume")
    assert test_sft._losses(whole) == test_sft._losses(cut) and len(test_sft._losses(whole)) == 2


def test_cli_packed_run_resumes_exactly(hf, tmp_path):
    resumes_exactly(hf, tmp_path)


def _pack_rank_step(rank: int, hf_dir: str, chats: str, convs: list[list[int]]) -> dict:
    """One packed ``_local_step`` of ``tiny`` (MLA, MoE, MTP) at seq_len T: rank ``rank`` of 2 expert-parallel ranks
    (each a data-parallel replica) on conversations ``convs[rank]`` first-fit into up to 2 rows, or one process (no
    torchrun) on both ranks' rows, which also gives each row's own gradients (the scale of the terms). The sums,
    every gradient (an EP rank's expert stacks: its slice of the experts) and the experts each rank holds."""
    import os
    from pathlib import Path

    from flyer.train.config import TrainConfig
    from flyer.train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    root = Path(chats).parent / f"pack-ranks{world}"
    tc = TrainConfig(preset="tiny", tokenizer=f"{hf_dir}/tokenizer.json", data=chats, data_cache=str(root / "cache"),
                     out=str(root / f"run{rank}"), seq_len=T, batch_size=2 * (3 - world), pack=True,
                     precision="fp32", device="cpu", threads=1, plots=False, progress=False, ep=world,
                     collective_timeout_s=120)
    t = Trainer(tc, log=lambda m: None)
    split = t.data.train

    def rows(cs):
        picked, taken = first_fit(np.minimum(np.diff(split.offsets), T + 1)[cs], 2, T + 1)
        assert taken == len(cs)
        return [[cs[i] for i in r] for r in picked]

    batch = packed_rows(split, rows(convs[rank]) if world > 1 else rows(convs[0]) + rows(convs[1]), T)
    t.sampler.next_batch = iter([batch]).__next__
    sums = t._local_step()
    out = {"sums": sums, "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None},
           "experts": t.mesh.ep_rank, "counts": int((batch[1] != IGNORE_INDEX).sum())}
    if world == 1:
        out["rows"] = test_sft.row_grads(t.model, *batch)
    t.close()
    t.mesh.destroy()
    return out


@pytest.mark.slow
def test_two_expert_parallel_ranks_equal_one_process(hf):
    """--pack --ep 2: two ranks (gloo, each a data-parallel replica) on unequal numbers of trained tokens give the
    loss terms and gradients (replicated parameters', and each rank's slice of the expert stacks) of one process
    on both ranks' packed rows, within ``reorder_bound`` (relative to the loss; a gradient's, to the sum of the rows'
    own gradient norms); the routed-token totals too."""
    from tests.ranks import run_ranks

    path, _, chats = hf
    convs = [[0, 3, 9, 6, 1, 2], [4, 5]]  # 6 conversations in 2 rows and 2 in 1: the balance loss's documents
    ranks = run_ranks(_pack_rank_step, 2, str(path), str(chats), convs)
    whole = _pack_rank_step(0, str(path), str(chats), convs)
    assert ranks[0]["counts"] != ranks[1]["counts"]
    cfg = resolve_config("tiny", None, {})
    c = reorder_bound(cfg, sum(map(len, convs)), T)
    for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):
        assert ranks[0]["sums"][k] == ranks[1]["sums"][k]
        assert abs(ranks[0]["sums"][k] - whole["sums"][k]) <= c * abs(whole["sums"][k]), k
    assert ranks[0]["sums"]["tokens"] == whole["sums"]["tokens"]
    for r in ranks:
        for n, g in whole["grads"].items():
            if ".experts.w" in n:  # this rank's experts: a contiguous slice of the stack
                E = r["grads"][n].shape[0]
                g = g[r["experts"] * E:(r["experts"] + 1) * E]
            scale = sum(float(row[n].norm()) for row in whole["rows"] if n in row) + 1e-30
            assert float((r["grads"][n] - g).norm()) <= c * scale, n


def test_mtp_counts_stop_at_document_boundaries(hf, tmp_path, monkeypatch):
    """The trainer weights each micro-batch's MTP loss by its share of the step's MTP targets, counted within each
    document (``depth_targets``): two hand-built packed micro-batches (ten 3-token documents, every target trained, so
    9 MTP targets cross a boundary; one 32-token document) give the gradients of one micro-batch holding both rows,
    within ``reorder_bound``; counting the boundary-crossing targets (``y[:, k:]``) weights the first by 19/49
    instead of 10/40, far outside it."""
    two = _trainer(hf, tmp_path / "two", batch_size=1, grad_accum=2, pack=True)
    one = _trainer(hf, tmp_path / "one", batch_size=2, pack=True)
    W, V = 32, two.cfg.vocab_size
    x = torch.randint(1, V, (2, W), generator=torch.Generator().manual_seed(3))
    d = torch.full((2, W), -1)
    d[0, :30], d[1] = torch.arange(10).repeat_interleave(3), 0
    x[0, 30:] = -1  # PAD_ID
    y = torch.full((2, W), IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    y[:, :-1][d[:, :-1] != d[:, 1:]] = IGNORE_INDEX  # a document's last token: no target (``packed_rows``)
    y[d < 0] = IGNORE_INDEX
    assert int((documents.depth_targets(y, d, 1) != IGNORE_INDEX).sum()) == 40
    assert int((y[:1, 1:] != IGNORE_INDEX).sum()) == 19 and int((y[1:, 1:] != IGNORE_INDEX).sum()) == 30

    def grads(t, batches):
        t.sampler.next_batch = iter(batches).__next__
        sums = t._local_step()
        out = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        t.model.zero_grad(set_to_none=True)
        return sums, out

    whole = grads(one, [(x, y, d)])
    halves = [(x[:1], y[:1], d[:1]), (x[1:], y[1:], d[1:])]
    split = grads(two, halves)
    with monkeypatch.context() as m:
        m.setattr("flyer.train.batches.depth_targets", _keep_all)
        mutant = grads(two, halves)
    rows = []
    for b in range(2):
        one.model.compute_loss(x[b:b + 1].clamp(min=0), y[b:b + 1], d[b:b + 1]).loss.backward()
        rows.append({n: p.grad.clone() for n, p in one.model.named_parameters() if p.grad is not None})
        one.model.zero_grad(set_to_none=True)

    def worst(g: dict) -> float:
        return max(float((g[n] - w).norm()) / (sum(float(r[n].norm()) for r in rows if n in r) + 1e-30)
                   for n, w in whole[1].items())

    c = reorder_bound(two.cfg, 2, W)
    assert abs(split[0]["mtp_loss"] - whole[0]["mtp_loss"]) <= c * whole[0]["mtp_loss"]
    assert worst(split[1]) <= c and worst(mutant[1]) > 100 * c, (worst(split[1]), worst(mutant[1]), c)
