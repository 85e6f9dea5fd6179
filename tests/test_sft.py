"""Supervised fine-tuning on chat data (``flyer train --data chats.jsonl``, ``flyer.data.chat_data``): ids and
assistant mask as transformers' ``apply_chat_template`` gives them, the loss as transformers' DeepseekV3 computes
it with labels -100 outside the assistant's tokens, token-weighted gradient accumulation, rows trimmed to their
batch's longest (not under --pp) with the padded rows' loss and gradients, an exactly resumed CLI
run whose output ``flyer generate`` loads, and one-line refusals of bad input. Tiny random models, FP32, CPU."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flyer.cli import main
from flyer.data import chat_data
from flyer.data.chat_data import IGNORE_INDEX, MAX_LINE_BYTES, PAD_ID, chat_tokenizer, encode_conversation, prepare_chat
from flyer.data.chat_sampler import chat_eval_batches, chat_rows, row_width
from flyer.config import resolve_config
from flyer.data.chat_template import chat_renderer
from flyer.errors import DataError
from flyer.interop.hf import load_hf
from flyer.interop.load import init_source
from flyer.model.moe import moe_layers
from flyer.train.config import TrainConfig
from flyer.train.metrics import model_flops_per_token
from flyer.train.trainer import Trainer
from tests.bounds import FP32_U
from tests.ranks import run_ranks

# transformers' assistant mask comes from the {% generation %} markers; flyer's from rendering prefixes.
TEMPLATE = ("{{ bos_token }}{% if tools %}<|tools|>{{ tools | tojson }}{% endif %}{% for m in messages %}"
            "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] or '' }}"
            "{% for c in m['tool_calls'] or [] %}<|call|>{{ c['function']['name'] }} {{ c['function']['arguments'] }}"
            "{% endfor %}{{ eos_token }}{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "the weather", "parameters": CITY}}]
WORDS = "the quick brown fox jumps over the lazy dog hello world flyer reads checkpoints".split()


def conversation(i: int) -> dict:
    """Conversation i: with a system turn, several turns, or a tool call and its answer, of varying lengths."""
    w = lambda k: " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k))  # noqa: E731
    kind = i % 3
    if kind == 0:
        return {"messages": [{"role": "system", "content": w(3)}, {"role": "user", "content": w(4)},
                             {"role": "assistant", "content": w(2 + i % 7)}]}
    if kind == 1:
        return {"messages": [{"role": "user", "content": w(2)}, {"role": "assistant", "content": w(3 + i % 5)},
                             {"role": "user", "content": w(5)}, {"role": "assistant", "content": w(1 + i % 4)}]}
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": w(3)},  # an assistant's turn that only calls a tool: content null
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": w(1)})}}]},
        {"role": "tool", "content": w(2)}, {"role": "assistant", "content": w(2 + i % 6)}]}


CHATS = [conversation(i) for i in range(40)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny DeepSeek-V3 directory whose tokenizer has TEMPLATE, and a chats.jsonl of CHATS."""
    from tests.hf_models import build  # transformers: imported where used, not by the ranks that import this module

    path = tmp_path_factory.mktemp("v3")
    ref = build("v3", path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    chats = path.parent / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return path, ref, chats


def test_ids_and_assistant_mask_equal_transformers(hf, tmp_path, monkeypatch):
    """Every conversation (system turn, several turns, tools and a tool turn) gives transformers' ids and
    assistant mask; the cached build returns them in file order, the 20th and 40th held out for validation.
    A mask with the header, or shifted by one, or over everything differs from transformers'."""
    from transformers import AutoTokenizer

    path, _, chats = hf
    ref = AutoTokenizer.from_pretrained(path)
    tok, template = chat_tokenizer(str(path), None)
    assert template == TEMPLATE
    data = prepare_chat(chats, tmp_path, tok, template)
    assert (data.train.n_conversations, data.val.n_conversations) == (38, 2)
    order = [c for c in range(40) if c % 20 != 19] + [19, 39]
    got = [data.train.conversation(j) for j in range(38)] + [data.val.conversation(j) for j in range(2)]
    for c, (ids, mask) in zip(order, got):
        want = ref.apply_chat_template(CHATS[c]["messages"], tools=CHATS[c].get("tools"), tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True)
        assert ids.tolist() == list(want["input_ids"]) and mask.tolist() == list(want["assistant_masks"]), c
        assert ids.tolist().count(ref.bos_token_id) == 1 and sum(mask) > 0
    ids, mask = got[1]  # conversation 1: two assistant turns
    want = mask.tolist()
    shifted = [0] + want[:-1]
    header = [max(a, b) for a, b in zip(want, want[3:] + [0] * 3)]  # a few tokens before each span ("<|assistant|>")
    for mutant in (shifted, header, [1] * len(want)):
        assert mutant != want
    monkeypatch.setattr(chat_data, "_build", None)  # a second run reads the cache: nothing rendered again
    again = prepare_chat(chats, tmp_path, tok, template)
    assert again.cache_dir == data.cache_dir and (again.train.ids == data.train.ids).all()


def test_flyer_loss_equals_transformers_with_masked_labels(hf):
    """flyer's next-token loss on a chat batch (padded rows, the assistant's targets only) equals transformers'
    DeepseekV3ForCausalLM loss with labels -100 off the assistant's tokens, within a tolerance derived from the
    logits' (a cross-entropy moves by at most twice the largest logit error, and sums V + N terms); the same
    batch unmasked, or with the mask one token late, is far outside it."""
    from transformers import AutoModelForCausalLM

    from tests.test_rope_scaling import logit_tolerance as attention_tolerance

    path, _, chats = hf
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    model, cfg, _ = load_hf(path)
    model.eval()
    tok, template = chat_tokenizer(str(path), None)
    data = prepare_chat(chats, path.parent / "cache", tok, template)
    T = 64
    convs = [0, 1, 2, 3]  # padded, cut, cut before its assistant's turn (no target), padded
    x, y = chat_rows(data.train, convs, T)
    labels = torch.full((len(convs), T + 1), IGNORE_INDEX)
    ids_full = torch.zeros((len(convs), T + 1), dtype=torch.long)
    for b, c in enumerate(convs):
        ids, mask = data.train.conversation(c)
        n = min(len(ids), T + 1)
        ids_full[b, :n] = torch.from_numpy(ids[:n])
        labels[b, :n] = torch.where(torch.from_numpy(mask[:n]) == 1, torch.from_numpy(ids[:n]), IGNORE_INDEX)
    assert (x < 0).any() and (y != IGNORE_INDEX).sum() < (x >= 0).sum()  # padding (PAD_ID) and prompts
    x = x.clamp(min=0)  # the padding, as the trainer feeds it
    assert (ids_full[:, :T] == x).all()
    with torch.no_grad():
        out = ref(ids_full, labels=labels)
        got = model.compute_loss(x, y).main_loss
        unmasked = model.compute_loss(x, ids_full[:, 1:]).main_loss
        late = model.compute_loss(x, torch.cat([y[:, :1] * 0 + IGNORE_INDEX, y[:, :-1]], 1)).main_loss
    n = int((y != IGNORE_INDEX).sum())
    logit_err = (attention_tolerance(cfg, T + 1) + cfg.n_layers * (cfg.n_routed_experts + cfg.n_activated_experts)
                 * FP32_U) * float(out.logits.abs().max())
    tol = 2 * logit_err + (cfg.vocab_size + n + 4) * FP32_U * float(out.loss)
    assert abs(float(got) - float(out.loss)) <= tol
    for mutant in (unmasked, late):
        assert abs(float(mutant) - float(out.loss)) > 10 * tol


def row_grads(model, x, y, *extra) -> list[dict]:
    """Each row's own gradients (its loss alone, ``extra`` sliced alike: packed rows' documents): the scale of the
    terms a batch's gradient entry sums, which the tolerances multiply."""
    rows = []
    for b in range(x.shape[0]):
        model.zero_grad()
        model.compute_loss(x[b:b + 1].clamp(min=0), y[b:b + 1], *(e[b:b + 1] for e in extra)).loss.backward()
        rows.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return rows


def _trainer(hf, tmp_path, model="init", **kw) -> Trainer:
    """A Trainer on CHATS: fine-tuning the V3 directory (``model`` "init"), or the ``tiny`` preset (MTP depth 1)
    with the directory's tokenizer.json and flyer's default template ("tiny")."""
    path, _, chats = hf
    src = dict(init=str(path)) if model == "init" else dict(preset="tiny", tokenizer=str(path / "tokenizer.json"))
    tc = TrainConfig(**src, data=str(chats), data_cache=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                     **{"seq_len": 64, **kw}, precision="fp32", device="cpu", threads=1, plots=False, progress=False)
    return Trainer(tc, log=lambda m: None)


@pytest.mark.parametrize("model", ["init", "tiny"])
def test_grad_accum_is_token_weighted(hf, tmp_path, model):
    """Two micro-batches of unequal assistant-token counts give the loss and gradients of one micro-batch
    holding both (within the reordering bound below; "tiny": with its MTP loss); averaging the
    per-micro-batch means does not."""
    one = _trainer(hf, tmp_path / "one", model, batch_size=4, grad_accum=1)
    two = _trainer(hf, tmp_path / "two", model, batch_size=2, grad_accum=2)
    assert one.cfg.mtp_depth == (model == "tiny")
    x, y = chat_rows(one.data.train, [0, 3, 1, 6], 64)
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]
    counts = [int((h[1] != IGNORE_INDEX).sum()) for h in halves]
    assert counts[0] != counts[1]
    one.sampler.next_batch = iter([(x, y)]).__next__
    two.sampler.next_batch = iter(halves).__next__
    la, lb = one._local_step()["loss"], two._local_step()["loss"]
    ga = {n: p.grad.clone() for n, p in one.model.named_parameters() if p.grad is not None}
    gb = {n: p.grad.clone() for n, p in two.model.named_parameters() if p.grad is not None}
    # per-row gradients: the scale of the terms each entry sums (rows and their T positions, reordered)
    rows = row_grads(one.model, x, y)
    cfg = one.cfg
    c = (cfg.n_layers * (cfg.dim + cfg.inter_dim + 64) + 4 * 64 + 8) * FP32_U
    assert abs(la - lb) <= c * la
    # the mutant: the mean of the two micro-batches' means
    two.model.zero_grad()
    for h in halves:
        (two.model.compute_loss(h[0].clamp(min=0), h[1]).loss / 2).backward()
    gm = {n: p.grad.clone() for n, p in two.model.named_parameters() if p.grad is not None}
    worst, mutant = 0.0, 0.0
    for n in ga:
        scale = sum(float(r[n].norm()) for r in rows if n in r) + 1e-30
        worst = max(worst, float((ga[n] - gb[n]).norm()) / scale)
        mutant = max(mutant, float((ga[n] - gm[n]).norm()) / scale)
    assert worst <= c and mutant > 100 * c


def test_mtp_targets_carry_the_mask(hf, tmp_path):
    """The MTP module's loss (it predicts token t+2 at position t: targets y[:, 1:]) is the mean over the
    assistant's targets only, as an unfused FP32 cross-entropy with ignore_index computes it (within the
    head's D-term dot products, V-term log-sum-exp and N-term mean, n u each); unmasked it is far off."""
    t = _trainer(hf, tmp_path, "tiny", batch_size=3)
    x, y = chat_rows(t.data.train, [0, 1, 3], 64)
    x = x.clamp(min=0)
    m = t.model.eval()
    with torch.no_grad():
        h = m.last_residual(x)
        _, (mtp,) = m.output_losses(h, x, y)
        logits = F.linear(m.mtp[0].head_input(m.mtp_hidden(h, x)[0]), m.head.weight).flatten(0, 1)
        want = F.cross_entropy(logits, y[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        every = F.cross_entropy(logits, y[:, 1:].clamp(min=0).flatten())  # no mask: token 0 off the assistant's
    n = int((y[:, 1:] != IGNORE_INDEX).sum())
    tol = (t.cfg.dim + t.cfg.vocab_size + n + 8) * FP32_U * (float(want) + float(logits.abs().max()))
    assert abs(float(mtp) - float(want)) <= tol and abs(float(every) - float(want)) > 10 * tol


def test_padding_moves_no_routing_statistic(hf, tmp_path):
    """After a training step on padded chat rows, every MoE layer's token counts (the bias update's loads) are
    those of the rows' real tokens routed alone, and its sequence balance loss is the mean of theirs alone;
    counting the padding (no ``counting_only``) gives other counts."""
    t = _trainer(hf, tmp_path, batch_size=3)
    x, y = chat_rows(t.data.train, [0, 3, 6], 64)
    assert (x < 0).any(dim=1).all()  # every row padded
    t.sampler.next_batch = iter([(x, y)]).__next__
    layers = moe_layers(t.model)
    t._local_step()
    counts = [m.tokens_per_expert.clone() for m in layers]
    aux = [float(m.aux_loss.detach()) for m in layers if m.aux_loss is not None]
    assert aux  # seq_aux_alpha > 0: the balance loss is computed
    want = [torch.zeros_like(c) for c in counts]
    want_aux = [0.0] * len(aux)
    with torch.no_grad():
        for b in range(3):
            for m in layers:
                m.tokens_per_expert.zero_()
            t.model.compute_loss(x[b:b + 1, :int((x[b] >= 0).sum())], y[b:b + 1, :int((x[b] >= 0).sum())])
            want = [w + m.tokens_per_expert for w, m in zip(want, layers)]
            balanced = [m for m in layers if m.aux_loss is not None]
            want_aux = [a + float(m.aux_loss) / 3 for a, m in zip(want_aux, balanced)]
        for m in layers:
            m.tokens_per_expert.zero_()
        t.model.compute_loss(x.clamp(min=0), y)  # padding counted
        padded = [m.tokens_per_expert.clone() for m in layers]
    assert all(torch.equal(c, w) for c, w in zip(counts, want))
    assert not any(torch.equal(p, w) for p, w in zip(padded, want))
    K, E = t.cfg.n_activated_experts, t.cfg.n_routed_experts
    for a, w in zip(aux, want_aux):  # sums of 64 K hits and 64 probabilities per expert, then E products
        assert abs(a - w) <= (64 * K + E + 8) * FP32_U * abs(w)


def reorder_bound(cfg, B: int, T: int) -> float:
    """c of ``test_grad_accum_is_token_weighted`` for a (B, T) batch: per layer the dot products over dim and
    inter_dim and attention's sums over at most T keys, then the loss's means over at most B T targets, n u each
    (relative to the loss; a gradient's, to the sum of the rows' own gradient norms)."""
    return (cfg.n_layers * (cfg.dim + cfg.inter_dim + T) + B * T + 8) * FP32_U


def _step(t: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict, list]:
    """One ``_local_step`` of ``t`` on (x, y): its sums, the gradients and every MoE layer's loads (cleared)."""
    t.sampler.next_batch = iter([(x, y)]).__next__
    sums = t._local_step()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    loads = [m.tokens_per_expert.clone() for m in moe_layers(t.model)]
    t.model.zero_grad(set_to_none=True)
    for m in moe_layers(t.model):
        m.tokens_per_expert.zero_()
    return sums, grads, loads


def test_rows_are_trimmed_to_the_batchs_longest(hf, tmp_path):
    """Without a pipeline the trainer's sampler and validation batches are as wide as each batch's longest row
    (min(length, seq_len) tokens: its last real token is routed as in a padded row), rounded up to 16, at most
    seq_len, and hold the padded rows' first columns (the rest was padding: nothing is lost); a step on them
    gives the loss, gradients and routing loads of the same batch padded to seq_len, validation its loss
    (causal attention: padding after a position does not change it, only summation shapes differ:
    ``reorder_bound``), and tokens/s and MFU count the trimmed positions. Trimmed one token too short (the
    longest row's last target dropped) is outside the bound: the loss by about 10x, the gradients by over 100x."""
    T = 128
    t = _trainer(hf, tmp_path, "tiny", batch_size=3, seq_len=T)
    split, cfg = t.data.train, t.cfg
    lengths = np.diff(split.offsets)
    assert lengths[[0, 3, 1, 4]].tolist() == [54, 62, 82, 83]
    for convs, seq_len, want in (([0, 3], T, 64), ([0, 3, 1], T, 96), ([4, 0], T, 96), ([1], 64, 64), ([1], 70, 70)):
        assert row_width(split, convs, seq_len) == want
    assert t.sampler.trim
    for n in range(3):  # the sampler's batches: trimmed padded rows
        x, y = t.sampler.next_batch()
        xp, yp = chat_rows(split, t.sampler.conversations(n), T)
        W = row_width(split, t.sampler.conversations(n), T)
        assert x.shape[1] == W < T and torch.equal(x, xp[:, :W]) and torch.equal(y, yp[:, :W])
        assert (xp[:, W:] == PAD_ID).all() and (yp[:, W:] == IGNORE_INDEX).all()
    padded_eval = chat_eval_batches(t.data.val, 3, T, t.tc.eval_batches)
    assert [x.shape[1] for x, _ in t.eval_data] == [96]  # validation: 83 and 67 tokens
    assert all(torch.equal(x, xp[:, :x.shape[1]]) for (x, _), (xp, _) in zip(t.eval_data, padded_eval))

    convs = [0, 3, 1]  # 54, 62 and 82 tokens: width 96, the longest row's last target (its line end) in column 80
    xt, yt = chat_rows(split, convs, T, trim=True)
    xp, yp = chat_rows(split, convs, T)
    assert xt.shape == (3, 96) and int(yt[2, 80]) != IGNORE_INDEX and (yt[:, 81:] == IGNORE_INDEX).all()
    trimmed, short, padded = _step(t, xt, yt), _step(t, xt[:, :80], yt[:, :80]), _step(t, xp, yp)
    assert trimmed[0]["tokens"] == 3 * 96 and trimmed[0]["flops"] == 3 * 96 * model_flops_per_token(cfg, 96)
    rows = []
    for b in range(3):
        t.model.zero_grad()
        t.model.compute_loss(xp[b:b + 1].clamp(min=0), yp[b:b + 1]).loss.backward()
        rows.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
    t.model.zero_grad(set_to_none=True)
    c = reorder_bound(cfg, 3, T)
    loss = padded[0]["loss"]

    def worst(got: dict) -> float:
        return max(float((got[n] - g).norm()) / (sum(float(r[n].norm()) for r in rows if n in r) + 1e-30)
                   for n, g in padded[1].items())

    assert abs(trimmed[0]["loss"] - loss) <= c * loss and worst(trimmed[1]) <= c
    assert all(torch.equal(a, b) for a, b in zip(trimmed[2], padded[2]))
    # one of 82 targets dropped moves a near-uniform random model's mean loss little (about 10 c), its gradients much
    assert abs(short[0]["loss"] - loss) > 5 * c * loss and worst(short[1]) > 100 * c
    val = t.evaluate()
    trimmed_eval, t.eval_data = t.eval_data, padded_eval
    assert abs(val - t.evaluate()) <= c * val
    t.eval_data = trimmed_eval
    t.sampler.next_batch = iter([(xt, yt)]).__next__
    rec = t.train_step()  # the metrics: the trimmed positions and their FLOPs
    assert rec["tokens_per_s"] * rec["step_time_s"] == pytest.approx(3 * 96, rel=1e-9)
    assert rec["mfu"] * t.peak_flops * rec["step_time_s"] == pytest.approx(trimmed[0]["flops"], rel=1e-9)


def _pp_rows(rank: int, hf_dir: str, chats: str) -> dict:
    """Rank ``rank`` of a PP2 ``tiny`` run (1F1B) on CHATS at seq_len 128: whether its first batch is the
    conversations' seq_len-wide rows bit for bit, its validation batches' widths, and its trimmed width."""
    root = Path(chats).parent / "pp-rows"
    tc = TrainConfig(preset="tiny", tokenizer=f"{hf_dir}/tokenizer.json", data=chats, data_cache=str(root / "cache"),
                     out=str(root / f"run{rank}"), seq_len=128, batch_size=2, pp=2, pp_schedule="1f1b",
                     precision="fp32", device="cpu", threads=1, plots=False, progress=False, collective_timeout_s=120)
    t = Trainer(tc, log=lambda m: None)
    convs = t.sampler.conversations(0)
    x, y = t.sampler.next_batch()
    want = chat_rows(t.data.train, convs, 128)
    out = {"same": torch.equal(x, want[0]) and torch.equal(y, want[1]), "widths": [x.shape[1] for x, _ in t.eval_data],
           "trimmed": row_width(t.data.train, convs, 128)}
    t.close()
    t.mesh.destroy()
    return out


def test_pipeline_rows_keep_seq_len(hf):
    """Under --pp 2 the rows stay seq_len wide (the stages are built for that shape), training's and
    validation's, though trimming would narrow them."""
    path, _, chats = hf
    for r in run_ranks(_pp_rows, 2, str(path), str(chats)):
        assert r["same"] and r["widths"] == [128] and r["trimmed"] < 128


def _rank_step(rank: int, hf_dir: str, chats: str, halves: list[list[int]]) -> dict:
    """One ``_local_step`` of the ``tiny`` preset (MTP, MoE) on CHATS at seq_len 128: rank ``rank`` of 2
    expert-parallel ranks (each a data-parallel replica) on conversations ``halves[rank]``, or one process (no
    torchrun) on both halves, which also gives each row's own gradients (the scale of the terms); rows trimmed as
    the trainer's sampler trims them (``width``). The loss and the replicated (non-expert) parameters' gradients."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = halves[rank] if world > 1 else halves[0] + halves[1]
    root = Path(chats).parent / f"ranks{world}"
    tc = TrainConfig(preset="tiny", tokenizer=f"{hf_dir}/tokenizer.json", data=chats, data_cache=str(root / "cache"),
                     out=str(root / f"run{rank}"), seq_len=128, batch_size=len(rows), precision="fp32", device="cpu",
                     threads=1, plots=False, progress=False, ep=world, collective_timeout_s=120)
    t = Trainer(tc, log=lambda m: None)
    x, y = chat_rows(t.data.train, rows, 128, trim=t.sampler.trim)
    t.sampler.next_batch = iter([(x, y)]).__next__
    out = {"loss": t._local_step()["loss"], "counts": int((y != IGNORE_INDEX).sum()), "width": x.shape[1],
           "grads": {n: p.grad.clone() for n, p in t.model.named_parameters()
                     if p.grad is not None and "experts.w" not in n}}
    if world == 1:
        out["rows"] = row_grads(t.model, x, y)
    t.close()
    t.mesh.destroy()
    return out


@pytest.mark.slow
def test_data_parallel_ranks_weight_by_the_jobs_tokens(hf, tmp_path):
    """Two expert-parallel ranks (each a data-parallel replica) with unequal assistant-token counts and rows trimmed
    to unequal widths (64 and 96: the dispatchers exchange token counts, so each rank's T is its own) give the loss
    and replicated gradients of one process holding both batches (the counts are all-reduced first), within the
    reordering bound of ``test_grad_accum_is_token_weighted`` (ranks weighting by their own counts, without the
    all-reduce, miss it: the embedding's gradient by about 190x the bound at seq_len 64)."""
    path, _, chats = hf
    halves = [[0, 3], [1, 6]]
    ranks = run_ranks(_rank_step, 2, str(path), str(chats), halves)
    whole = _rank_step(0, str(path), str(chats), halves)
    assert ranks[0]["counts"] != ranks[1]["counts"] and ranks[0]["loss"] == ranks[1]["loss"]
    assert (ranks[0]["width"], ranks[1]["width"], whole["width"]) == (64, 96, 96)
    c = reorder_bound(resolve_config("tiny", None, {}), 4, 128)
    assert abs(ranks[0]["loss"] - whole["loss"]) <= c * whole["loss"]
    for n, g in whole["grads"].items():
        scale = sum(float(r[n].norm()) for r in whole["rows"] if n in r) + 1e-30
        assert float((ranks[0]["grads"][n] - g).norm()) <= c * scale, n


def _train_args(hf, tmp_path, out, steps, *extra):
    path, _, chats = hf
    return ["train", "--init", str(path), "--data", str(chats), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "64", "--grad-accum", "2", "--eval-batches", "1", "--eval-every", "1", "--ckpt-every", "1",
            "--data-cache", str(tmp_path / "cache"), "--out", str(out), "--no-plots", "--no-progress", "--threads",
            "1", "--device", "cpu", "--precision", "fp32", *extra]


def _losses(run):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]


def test_cli_run_resumes_exactly_and_generate_loads_it(hf, tmp_path, capsys):
    """``flyer train --init DIR --data chats.jsonl``: 3 steps straight equal 2 steps then a resumed third (loss
    and validation loss), ``flyer generate`` loads the run, and the run fine-tunes again on its carried template."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_train_args(hf, tmp_path, whole, 3)) == 0
    assert capsys.readouterr().err.count("training conversations are longer than seq_len+1 = 65 tokens") == 1
    assert main(_train_args(hf, tmp_path, cut, 2)) == 0
    assert main(_train_args(hf, tmp_path, cut, 3, "--resume")) == 0
    assert _losses(whole) == _losses(cut) and len(_losses(whole)) == 3
    assert all(math.isfinite(loss) for _, loss, _ in _losses(whole))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(whole), "--prompt", "hello world", "--max-new-tokens", "3",
                 "--temperature", "0", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"][0]) <= 3
    tok, template = chat_tokenizer(str(whole), None)  # the run carries the directory's template and tokens
    assert template == TEMPLATE and tok.special_tokens() == chat_tokenizer(str(hf[0]), None)[0].special_tokens()
    argv = _train_args(hf, tmp_path, tmp_path / "again", 1)
    argv[argv.index("--init") + 1] = str(whole)
    assert main(argv) == 0  # fine-tuning the fine-tuned run


def _cli_rank(rank: int, argv: list[str]) -> int:
    return main(argv)


@pytest.mark.slow
def test_a_data_parallel_run_resumes_in_one_process(hf, tmp_path):
    """Two data-parallel replicas for two steps, then one process with grad_accum 4 (as many batches a step): the
    replicas shared one stream of conversations, so the resumed step trains on the conversations the uninterrupted
    run's third step did, and at the same weights (the checkpoint's) its loss is that run's within the reordering
    bound (another step's conversations give another loss: the steps' losses differ by far more)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_ranks(_cli_rank, 2, _train_args(hf, tmp_path, whole, 3)) == [0, 0]
    assert run_ranks(_cli_rank, 2, _train_args(hf, tmp_path, cut, 2)) == [0, 0]
    one = _train_args(hf, tmp_path, cut, 3, "--resume")
    one[one.index("--grad-accum") + 1] = "4"
    assert main(one) == 0
    want, got = _losses(whole), _losses(cut)
    assert [s for s, _, _ in got] == [1, 2, 3] and got[:2] == want[:2]
    c = reorder_bound(init_source(str(hf[0]))[0], 8, 64)
    assert abs(got[2][1] - want[2][1]) <= c * want[2][1], (got, want, c)
    assert min(abs(want[2][1] - want[k][1]) for k in (0, 1)) > 10 * c * want[2][1]


@pytest.mark.parametrize("line, words", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"messages": []}', "messages: expected a non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content: expected a string"),
    ('{"messages": [{"role": "user"}]}', "messages[0].content: expected a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages: no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "x"}], "tools": 3}', "tools: expected a list"),
    ('{"messages": [{"role": "user", "content": null, "tool_calls": [{}]}]}', "messages[0].tool_calls: expected an"),
    ('{"messages": [{"role": "assistant", "content": null}]}', "messages[0].content: expected a string"),
    ("x" * (MAX_LINE_BYTES + 1), f"longer than {MAX_LINE_BYTES} bytes"),
])
def test_bad_lines_are_one_line_errors_naming_file_line_and_field(hf, tmp_path, capsys, line, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n\n" + line + "\n")
    argv = _train_args(hf, tmp_path, tmp_path / "run", 1)
    argv[argv.index("--data") + 1] = str(bad)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flyer: error: {bad}:3: ") and words in err[0], err


def test_chat_data_without_a_tokenizer_is_refused(hf, tmp_path, capsys):
    argv = _train_args(hf, tmp_path, tmp_path / "run", 1)
    i = argv.index("--init")
    del argv[i:i + 2]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --data: "), err


def test_a_prefix_that_is_not_a_prefix_of_the_conversation_is_refused(hf, tmp_path):
    """A template whose generation prompt is not how it renders an assistant's turn: the mask would be wrong,
    so the line is refused, naming file:line and the message."""
    path, _, _ = hf
    tok, _ = chat_tokenizer(str(path), None)
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps(CHATS[1]) + "\n")
    with pytest.raises(DataError) as e:
        prepare_chat(chats, tmp_path / "cache", tok, TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>",
                                                                      "{% if add_generation_prompt %}<|bot|>"))
    assert str(e.value).startswith(f"{chats}:1: messages[2]: the conversation rendered with the generation prompt")


def test_default_template_with_a_tokenizer_file(hf, tmp_path):
    """--tokenizer alone: flyer's default template (one header per message), the assistant's content, EOS and line
    end (the EOS trained: a fine-tuned model stops where its turn ends)."""
    path, _, _ = hf
    tok, template = chat_tokenizer(None, str(path / "tokenizer.json"))
    assert template is None
    render = chat_renderer(None, tok.special_tokens())
    msgs = CHATS[0]["messages"]
    ids, mask = encode_conversation(msgs, None, render, lambda t: tok.encode_ids(t, add_special_tokens=False))
    trained = tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == msgs[-1]["content"] + tok.token(tok.eos_id()) + "\n" and tok.eos_id() is not None


def test_a_tokenizer_file_run_exports_as_it_trained(hf, tmp_path, capsys):
    """A chat run on ``--tokenizer`` (flyer's default template) trains without special tokens: its export encodes so
    in transformers and in flyer (the tokenizer.json's BOS post-processor left out) and carries the default template
    (transformers' ``apply_chat_template`` renders as the run did), whose assistant turns end with the EOS."""
    from transformers import AutoTokenizer

    from flyer.data.chat_template import DEFAULT_CHAT_TEMPLATE
    from flyer.interop.hf_tokenizer import load_tokenizer
    from flyer.interop.load import load_pretrained

    path, _, chats = hf
    run, out = tmp_path / "run", tmp_path / "export"
    argv = _train_args(hf, tmp_path, run, 1)
    i = argv.index("--init")
    argv[i:i + 2] = ["--preset", "tiny", "--tokenizer", str(path / "tokenizer.json")]
    assert main(argv) == 0
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    ours = load_pretrained(run, device="cpu")[2]
    theirs, exported = AutoTokenizer.from_pretrained(out), load_tokenizer(out)
    source = AutoTokenizer.from_pretrained(path)
    text = "the quick brown fox"
    assert source(text)["input_ids"][0] == source.bos_token_id  # the file the run read adds a BOS; the run does not
    assert theirs(text)["input_ids"] == exported.encode_ids(text) == ours.encode_ids(text) == source(
        text, add_special_tokens=False)["input_ids"]
    msgs = CHATS[0]["messages"]
    render = chat_renderer(None, ours.special_tokens())
    assert theirs.chat_template == DEFAULT_CHAT_TEMPLATE
    for k in range(1, len(msgs) + 1):
        for g in (True, False):
            assert theirs.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=g) == render(
                msgs[:k], None, g)
    assert render(msgs, None, False).endswith(f"<|assistant|>\n{msgs[-1]['content']}{ours.token(ours.eos_id())}\n")


def test_init_owns_the_model_and_tokenizer(hf, tmp_path, capsys):
    """With --init the model is init's, whatever --preset says: a run started with one resumes without it (and the
    reverse); a --tokenizer beside --init, which it would ignore, is refused in one line."""
    for first, then in ((("--preset", "tiny"), ()), ((), ("--preset", "tiny"))):
        out = tmp_path / f"run{len(first)}"
        assert main(_train_args(hf, tmp_path, out, 1, *first)) == 0
        assert main(_train_args(hf, tmp_path, out, 2, "--resume", *then)) == 0
        assert [s for s, _, _ in _losses(out)] == [1, 2]
    capsys.readouterr()
    path = hf[0]
    assert main(_train_args(hf, tmp_path, tmp_path / "both", 1, "--tokenizer", str(path / "tokenizer.json"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --tokenizer: is --init's own with --init") and "\n" not in err
    assert not (tmp_path / "both").exists()
