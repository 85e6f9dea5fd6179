"""Direct Preference Optimization (``flyer train --init DIR --data prefs.jsonl --dpo``, ``flyer.train.dpo``,
``flyer.data.pref_data``): the completions' ids and mask as transformers' chat template gives them, the step-1
log-probabilities and gradient and the step-2 loss as a plain torch DPO on transformers' own model computes them,
the reference fixed, data-parallel ranks equal to one process, an exact resume, and one-line refusals. Tiny random
Llama (dense: no balance loss in the oracle), FP32, CPU."""

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from flyer.cli import main
from flyer.config import preset
from flyer.data.chat_data import IGNORE_INDEX, chat_tokenizer
from flyer.data.chat_sampler import chat_rows
from flyer.data.pref_data import pair_samples
from flyer.interop.export import export_model
from flyer.interop.hf import load_hf
from flyer.train import checkpoint as ckpt
from flyer.train.config import TrainConfig
from flyer.model.counts import param_counts, training_flops_per_token
from flyer.model.transformer import Transformer
from flyer.train.dpo import completion_logprobs, dpo_flops_per_token
from flyer.train.metrics import model_flops_per_token
from flyer.train.trainer import Trainer
from flyer.train.build import training_memory_bytes
from tests.bounds import FP32_U
from tests.hf_models import add_mtp_layer, build
from tests.host_reads import host_reads
from tests.ranks import run_ranks
from tests.test_rope_scaling import logit_tolerance
from tests.test_sft import TEMPLATE

WORDS = "the quick brown fox jumps over the lazy dog hello world flyer reads checkpoints".split()
BETA = 0.5


def pair(i: int) -> dict:
    """Pair i: conversational (a system turn, or an earlier assistant turn as context) or, every fourth, plain text."""
    w = lambda k, o=0: " ".join(WORDS[(i + o + j) % len(WORDS)] for j in range(k))  # noqa: E731
    if i % 4 == 3:
        return {"prompt": w(3), "chosen": w(2 + i % 3, 1), "rejected": w(1 + i % 4, 5)}
    prompt = [{"role": "user", "content": w(4)}]
    if i % 4 == 1:
        prompt = [{"role": "system", "content": w(2, 3)}, *prompt]
    if i % 4 == 2:
        prompt = [*prompt, {"role": "assistant", "content": w(2, 4)}, {"role": "user", "content": w(3, 6)}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": w(3, 2)}],
            "rejected": [{"role": "assistant", "content": w(2 + i % 5, 7)}]}


PAIRS = [pair(i) for i in range(40)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny Llama directory whose tokenizer has TEMPLATE, and a prefs.jsonl of PAIRS."""
    path = tmp_path_factory.mktemp("llama")
    build("llama", path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    prefs = path.parent / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path, prefs


def _trainer(hf, out, **kw) -> Trainer:
    path, prefs = hf
    kw = {"seq_len": 96, "batch_size": 4, "precision": "fp32", **kw}
    tc = TrainConfig(init=str(path), data=str(prefs), dpo=True, out=str(out), **kw, dpo_beta=BETA, lr=3e-2, warmup=0,
                     schedule="constant", clip=1e9, device="cpu", threads=1, plots=False, progress=False)
    return Trainer(tc, log=lambda m: None)


def _messages(p: dict, key: str) -> list[dict]:
    as_list = lambda v, role: [{"role": role, "content": v}] if isinstance(v, str) else v  # noqa: E731
    return as_list(p["prompt"], "user") + as_list(p[key], "assistant")


def _plain_text(ref, p: dict, key: str) -> tuple[list[int], list[int]]:
    """A plain-text pair's side as TRL tokenizes it with transformers' tokenizer: prompt+completion+eos_token encoded
    whole (its BOS too), trained past the prefix the prompt's own encoding shares with both sides."""
    prompt = ref(p["prompt"])["input_ids"]
    sides = {k: ref(p["prompt"] + p[k] + ref.eos_token)["input_ids"] for k in ("chosen", "rejected")}
    n = min(next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
            for ids in sides.values())
    return sides[key], [0] * n + [1] * (len(sides[key]) - n)


def test_ids_and_completion_mask_equal_transformers(hf):
    """prompt+chosen and prompt+rejected: transformers' ids, and its assistant mask on the completion's turn (the
    prompt's assistant turn is context, unmasked); a plain-text pair as TRL reads it (no template: the tokenizer's
    BOS, the completion and its eos_token); training pairs in file order, the 20th and 40th held out."""
    path, _ = hf
    ref = AutoTokenizer.from_pretrained(path)
    t = _trainer(hf, path.parent / "ids")
    assert (t.data.train.n_pairs, t.data.val.n_pairs) == (38, 2) and t.data.val.lines.tolist() == [20, 40]
    order = [i for i in range(40) if i % 20 != 19]
    for s in range(2 * 38):
        p, key = PAIRS[order[s // 2]], ("chosen", "rejected")[s % 2]
        ids, mask = t.data.train.samples.conversation(s)
        if isinstance(p["prompt"], str):
            want_ids, want_mask = _plain_text(ref, p, key)
            assert (ids.tolist(), mask.tolist()) == (want_ids, want_mask) and want_ids[0] == ref.bos_token_id, s
            assert want_ids[-1] == ref.eos_token_id and 0 < sum(want_mask) < len(want_ids), s
            continue
        want = ref.apply_chat_template(_messages(p, key), tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        prompt_len = len(ref.apply_chat_template(_messages(p, key)[:-1], tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
        assert ids.tolist() == list(want["input_ids"]), s
        assert mask.tolist() == [m if j >= prompt_len else 0 for j, m in enumerate(want["assistant_masks"])], s
        assert sum(mask) > 0 and (order[s // 2] % 4 != 2 or sum(want["assistant_masks"]) > sum(mask))
    t.close()


def _hf_logprobs(model, samples, data) -> torch.Tensor:
    """Each sample's summed log-probability of its completion tokens, transformers' logits -> log-softmax -> gather
    at the mask (plain torch)."""
    out = []
    for s in samples:
        ids, mask = (torch.from_numpy(a.astype("int64")) for a in data.conversation(int(s)))
        logp = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1).gather(1, ids[1:, None])[:, 0]
        out.append((logp * mask[1:]).sum())
    return torch.stack(out)


def _dpo(pol: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(BETA * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))).mean()


def test_steps_equal_plain_dpo_on_transformers(hf, tmp_path):
    """Step 1: each row's completion log-probability (policy and reference) is transformers' within the bound of
    its logits; the loss is ln 2 (policy = reference) and the gradient (its norm, the embedding's and head's) that
    of a plain torch DPO on transformers' model with autograd. Step 2: the reference's log-probabilities are
    step 1's, bit for bit, and the loss is the plain DPO of transformers' model loaded from the step-1 weights
    (exported) against the original."""
    path, _ = hf
    t = _trainer(hf, tmp_path / "run")
    cfg, data = t.cfg, t.data.train.samples
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    grads = {}
    step = t.optimizer.step

    def capture(*a, **k):  # the step's gradients, as the optimizer gets them (clip 1e9: unclipped)
        grads.update({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    t.optimizer.step = capture
    samples = [t.sampler.conversations(n) for n in (0, 1)]
    x, y = t.sampler.next_batch()
    t.sampler.position = 0
    with torch.no_grad():
        ref1 = completion_logprobs(t.dpo.reference, x, y)
        want_ref = _hf_logprobs(hf_model, samples[0], data)
    rec1 = t.train_step()
    T, V = x.shape[1] + 1, cfg.vocab_size
    n_tok = (y != IGNORE_INDEX).sum(1).double()
    # a log-softmax entry moves by at most twice the largest logit error, plus the V-term sum's rounding
    with torch.no_grad():
        logit_max = float(hf_model(torch.from_numpy(data.ids[:T])[None]).logits.abs().max())
    logit_err = logit_tolerance(cfg, T) * logit_max
    lp_tol = n_tok * (2 * logit_err + (V + 8) * FP32_U * want_ref.abs().max() / n_tok.clamp(min=1))
    assert ((ref1.double() - want_ref.double()).abs() <= lp_tol).all()
    assert rec1["dpo_loss"] == pytest.approx(math.log(2), abs=4 * FP32_U) and rec1["reward_margin"] == 0.0

    hf_model.zero_grad()
    loss = _dpo(_hf_logprobs(hf_model, samples[0], data), want_ref)
    loss.backward()
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters() if p.grad is not None}
    hf_norm = float(torch.stack([g.norm() for g in hf_grads.values()]).norm())
    # first order: each gradient entry sums the rows' terms, each off by the logits' relative error (reordered sums:
    # c per layer and width, as tests/test_sft.py's reorder bound)
    c = logit_tolerance(cfg, T) + (cfg.n_layers * (cfg.dim + cfg.inter_dim + T) + 4 * T + 8) * FP32_U
    assert abs(rec1["grad_norm"] - hf_norm) <= 4 * c * hf_norm
    for mine, theirs in (("embed.weight", "model.embed_tokens.weight"), ("head.weight", "lm_head.weight")):
        g, h = grads[mine], hf_grads[theirs]
        assert float((g - h).norm()) <= 4 * c * float(h.norm()) and float(h.norm()) > 0, mine

    x2, y2 = t.sampler.next_batch()
    t.sampler.position = 1
    export_model(t.model, chat_tokenizer(str(path), None)[0], tmp_path / "step1", dtype="fp32", source=path)
    rec2 = t.train_step()
    with torch.no_grad():
        assert torch.equal(completion_logprobs(t.dpo.reference, x, y), ref1)  # the reference stays fixed
        policy = AutoModelForCausalLM.from_pretrained(tmp_path / "step1", dtype=torch.float32)
        pol2, ref2 = _hf_logprobs(policy, samples[1], data), _hf_logprobs(hf_model, samples[1], data)
        want2 = float(_dpo(pol2, ref2))
    n2 = float((y2 != IGNORE_INDEX).sum(1).max())
    # the loss moves by at most beta (its derivative in each log-probability difference) times the four rows' errors
    tol = BETA * 4 * n2 * (2 * logit_err + (V + 8) * FP32_U * float(ref2.abs().max()))
    assert abs(rec2["dpo_loss"] - want2) <= tol and abs(want2 - math.log(2)) > tol  # not step 1's ln 2
    assert rec2["rewards_chosen"] == pytest.approx(float(BETA * (pol2[0::2] - ref2[0::2]).mean()), abs=tol)
    t.close()


def _rank_step(rank: int, hf_dir: str, prefs: str, out: str, halves: list[list[int]]) -> dict:
    """One DPO step's loss, gradients and rewards: rank ``rank`` of 2 data-parallel ranks on pairs ``halves[rank]``,
    or one process (no torchrun) on both halves."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pairs = halves[rank] if world > 1 else halves[0] + halves[1]
    t = _trainer((Path(hf_dir), prefs), f"{out}/w{world}r{rank}", batch_size=len(pairs), collective_timeout_s=120)
    t.sampler.next_batch = iter([chat_rows(t.data.train.samples, pair_samples(pairs), 96, trim=True)]).__next__
    rec = t._local_step()
    result = {"loss": rec["dpo_loss"], "margin": rec["reward_margin"],
              "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}}
    t.close()
    t.mesh.destroy()
    return result


def _v3_with_mtp(path: Path) -> Path:
    """A tiny DeepSeek-V3 directory with one MTP layer and TEMPLATE."""
    ref = build("v3", path)
    add_mtp_layer(ref, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": TEMPLATE}))
    return path


def test_moe_step_updates_router_biases_and_leaves_mtp_alone(hf, tmp_path):
    """A DeepSeek-V3 policy with an MTP module: a DPO step adds the sequence balance loss and moves the routers'
    biases (the policy's, not the reference's); the MTP module's own weights get no gradient and stay as loaded."""
    _, prefs = hf
    path = _v3_with_mtp(tmp_path / "v3")
    t = _trainer((path, prefs), tmp_path / "run")
    assert t.cfg.mtp_depth == 1
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if n.startswith("mtp.")}
    main_before = t.model.embed.weight.detach().clone()
    # the main model's routers (the reference has no MTP module: DPO never runs it)
    bias = lambda m: torch.cat([b for n, b in m.named_buffers()  # noqa: E731
                                if n.endswith("gate.bias") and not n.startswith("mtp.")])
    b0 = bias(t.model)
    assert len(b0) and torch.equal(b0, bias(t.dpo.reference))
    rec = t.train_step()
    assert rec["aux_loss"] > 0 and rec["loss"] == pytest.approx(rec["dpo_loss"] + rec["aux_loss"], rel=1e-6)
    assert not torch.equal(bias(t.model), b0) and torch.equal(bias(t.dpo.reference), b0)
    assert not torch.equal(t.model.embed.weight, main_before)  # shared with the MTP module: trained
    for n, p in t.model.named_parameters():
        if n in before and p is not t.model.embed.weight and p is not t.model.head.weight:
            # frozen too: a data-parallel sync gives a parameter without a gradient zeros, which weight decay moves
            assert torch.equal(p, before[n]) and p.grad is None and not p.requires_grad, n
    t.close()


def test_a_step_reads_its_loss_terms_once(hf, tmp_path):
    """A DPO step keeps its loss terms on the device and reads them all at once at its end, however many
    micro-batches it accumulates (a read per term and micro-batch would stall the host on each)."""
    for grad_accum in (1, 3):
        t = _trainer(hf, tmp_path / str(grad_accum), grad_accum=grad_accum)
        with host_reads() as reads:
            t.train_step()
        t.close()
        assert reads == {"metrics.py:floats": 1}, grad_accum


@pytest.mark.slow
def test_data_parallel_ranks_equal_one_process(hf, dp_ranks, tmp_path):
    """Two data-parallel ranks (gloo), each on 2 pairs of unlike lengths, give the loss and gradients of one process
    on all 4 (the mean over the job's pairs), within the reordering bound of the step-1 gradient test."""
    path, prefs = hf
    halves = HALVES
    ranks = [r["step"] for r in dp_ranks["ranks"]]
    whole = _rank_step(0, str(path), str(prefs), str(tmp_path), halves)
    cfg = load_hf(path)[1]
    c = (cfg.n_layers * (cfg.dim + cfg.inter_dim + 97) + 4 * 97 + 8) * FP32_U
    assert ranks[0]["loss"] == ranks[1]["loss"] and abs(ranks[0]["loss"] - whole["loss"]) <= c
    for n, g in whole["grads"].items():
        assert float((ranks[0]["grads"][n] - g).norm()) <= 4 * c * float(g.norm()) + 1e-30, n
        assert torch.equal(ranks[0]["grads"][n], ranks[1]["grads"][n]), n
    half = _rank_step(1, str(path), str(prefs), str(tmp_path / "half"), [[0, 2], [0, 2]])  # one rank's pairs alone
    assert max(float((half["grads"][n] - g).norm() / g.norm()) for n, g in whole["grads"].items()) > 100 * c


def _zero_step(rank: int, hf_dir: str, prefs: str, out: str, halves: list[list[int]]) -> dict:
    """Rank ``rank`` of 2 data-parallel ranks, on pairs ``halves[rank]``: the weights after one DPO step (its loss,
    gradient norm) with the optimizer state unsharded and with ZeRO-1's shards."""
    result = {}
    for zero in (0, 1):
        t = _trainer((Path(hf_dir), prefs), f"{out}/zero{zero}r{rank}", batch_size=2, zero=zero,
                     collective_timeout_s=120)
        rows = chat_rows(t.data.train.samples, pair_samples(halves[rank]), 96, trim=True)
        t.sampler.next_batch = iter([rows]).__next__
        rec = t.train_step()
        moved = any(not torch.equal(p, r) for p, r in zip(t.model.parameters(), t.dpo.reference.parameters()))
        result[zero] = {"rec": (rec["dpo_loss"], rec["grad_norm"]), "layout": t.layout["zero"], "moved": moved,
                        "weights": {n: p.detach().clone() for n, p in t.model.named_parameters()}}
        t.close()
    return result


HALVES = [[0, 2], [5, 3]]  # each data-parallel rank's pairs: unlike lengths


def _dp_job(rank: int, hf_dir: str, prefs: str, out: str, v3_dir: str) -> dict:
    """Both data-parallel tests' ranks in one job (one set of forked ranks, one process group): the unsharded and
    ZeRO-1 steps (``_zero_step``), of the Llama and of a DeepSeek-V3 with a frozen MTP module, then
    ``_rank_step``'s loss and gradients, each from its own trainer."""
    return {"zero": _zero_step(rank, hf_dir, prefs, out, HALVES),
            "zero_v3": _zero_step(rank, v3_dir, prefs, f"{out}/v3", HALVES),
            "step": _rank_step(rank, hf_dir, prefs, out, HALVES)}


@pytest.fixture(scope="module")
def dp_ranks(hf, tmp_path_factory):
    path, prefs = hf
    v3 = _v3_with_mtp(tmp_path_factory.mktemp("v3"))
    return {"v3": v3, "ranks": run_ranks(_dp_job, 2, str(path), str(prefs), str(tmp_path_factory.mktemp("dp")),
                                         str(v3))}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "v3_mtp"])
def test_zero1_step_equals_unsharded_step(dp_ranks, model):
    """``zero=1`` on 2 data-parallel ranks (gloo): one DPO step leaves every weight equal, bit for bit, to the
    unsharded optimizer's on the same ranks (AdamW is elementwise and each shard is broadcast as its owner computed
    it: ``flyer.parallel.zero``), which tests/test_dpo.py's data-parallel test ties to one process. A DeepSeek-V3
    policy's frozen MTP module (no gradient, in no shard's update) stays as loaded in both."""
    ranks = [r["zero" if model == "llama" else "zero_v3"] for r in dp_ranks["ranks"]]
    for r in ranks:
        plain, sharded = r[0], r[1]
        assert (plain["layout"], sharded["layout"]) == (0, 1) and plain["rec"] == sharded["rec"] and sharded["moved"]
        for n, w in plain["weights"].items():
            assert torch.equal(sharded["weights"][n], w), n
    assert all(torch.equal(ranks[0][1]["weights"][n], w) for n, w in ranks[1][1]["weights"].items())
    if model == "v3_mtp":
        loaded = dict(load_hf(dp_ranks["v3"])[0].named_parameters())
        frozen = [n for n in loaded if n.startswith("mtp.")]  # its own (the shared embedding and head: the model's)
        assert frozen and all(torch.equal(ranks[0][1]["weights"][n], loaded[n]) for n in frozen)


def _train_args(hf, out, steps, *extra):
    path, prefs = hf
    return ["train", "--init", str(path), "--data", str(prefs), "--dpo", "--dpo-beta", str(BETA), "--steps",
            str(steps), "--batch-size", "2", "--seq-len", "96", "--grad-accum", "2", "--lr", "1e-2", "--eval-batches",
            "1", "--eval-every", "1", "--ckpt-every", "1", "--out", str(out), "--no-plots", "--no-progress",
            "--threads", "1", "--device", "cpu", "--precision", "fp32", *extra]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def test_cli_run_resumes_exactly_and_records_dpo(hf, tmp_path, capsys):
    """``flyer train --dpo``: 3 steps straight equal 2 steps then a resumed third (every DPO field and the validation
    loss; the cut run's init a copy of the whole one's); the checkpoint's config says dpo; resuming with another init
    (another reference), or with the same init whose weight file was rewritten (another model of the same shapes
    and size) since, is refused."""
    whole, cut, init = tmp_path / "whole", tmp_path / "cut", tmp_path / "init"
    shutil.copytree(hf[0], init)
    capsys.readouterr()
    assert main(_train_args(hf, whole, 3)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # its baseline named as what it is
    assert summary["reference_val_loss"] == pytest.approx(math.log(2)) and "unigram_val_loss" not in summary
    assert main(_train_args((init, hf[1]), cut, 2)) == 0
    assert main(_train_args((init, hf[1]), cut, 3, "--resume")) == 0
    keys = ("step", "loss", "dpo_loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
            "grad_norm", "val_loss")
    strip = lambda rs: [{k: r[k] for k in keys} for r in rs]  # noqa: E731
    assert strip(_records(whole)) == strip(_records(cut)) and len(_records(whole)) == 3
    assert _records(whole)[0]["dpo_loss"] == pytest.approx(math.log(2)) and _records(whole)[2]["reward_margin"] != 0
    state = ckpt.saved_state(ckpt.newest_valid_checkpoint(whole / "checkpoints")[0])
    assert state["train_config"]["dpo"] is True and state["train_config"]["dpo_beta"] == BETA
    other = tmp_path / "other"
    build("llama", other, seed=1)
    argv = _train_args(hf, cut, 4, "--resume")
    argv[argv.index("--init") + 1] = str(other)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --init: ") and "differs from the run's init" in err[0]
    assert main(_train_args((init, hf[1]), cut, 4, "--resume")) == 0  # unchanged: resumes
    size = (init / "model.safetensors").stat().st_size
    shutil.copyfile(other / "model.safetensors", init / "model.safetensors")
    assert (init / "model.safetensors").stat().st_size == size  # the same header: only the bytes differ
    capsys.readouterr()
    assert main(_train_args((init, hf[1]), cut, 5, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --init: ") and "weights changed" in err[0], err


def _assert_memory_counts(t, reference: int) -> None:
    """The pre-run memory check of ``t``'s DPO run exceeds the same run without DPO by ``reference`` bytes, whatever
    the batch (the reference's forward adds nothing to the peak)."""
    plain = dataclasses.replace(t.tc, dpo=False)
    for batch in (0, 4):
        tc = dataclasses.replace(t.tc, batch_size=batch)
        assert (training_memory_bytes(t.cfg, tc, t.precision)
                - training_memory_bytes(t.cfg, dataclasses.replace(plain, batch_size=batch), t.precision)) == reference


@pytest.mark.parametrize("name", ["tiny", "tiny-v4"])
def test_memory_bound_holds_the_frozen_mtp_modules_weights_only(name):
    """DPO freezes the policy's MTP modules and never runs them: the pre-run bound holds their FP32 weights (4 bytes
    each, counted on a meta-device model) and nothing else of them, whatever the batch; without DPO they train."""
    cfg = preset(name, mtp_depth=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    own = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    for batch in (0, 4):
        tc = TrainConfig(batch_size=batch, seq_len=32, dpo=True)
        without = training_memory_bytes(cfg.replace(mtp_depth=0), tc, "fp32")
        assert training_memory_bytes(cfg, tc, "fp32") - without == 4 * own
        plain = dataclasses.replace(tc, dpo=False)  # weights, gradients, AdamW's moments, and with a batch its saves
        trained = training_memory_bytes(cfg, plain, "fp32") - training_memory_bytes(cfg.replace(mtp_depth=0), plain,
                                                                                    "fp32")
        assert trained == 16 * own if batch == 0 else trained > 16 * own


def test_memory_estimate_and_flops_count_the_reference(hf, tmp_path):
    """The pre-run memory estimate of a DPO run exceeds the same run's without DPO by the reference's weights, as
    held; a step's FLOPs are the policy's training (3 forwards, ``training_flops_per_token``) plus the reference's
    forward, per position run, MTP modules (not run) not counted."""
    t = _trainer(hf, tmp_path / "run")
    ref = t.dpo.reference
    weights = sum(p.numel() for p in ref.parameters()) * ref.embed.weight.element_size()
    assert weights == param_counts(t.cfg).total * 4  # built FP32, no MTP module here
    _assert_memory_counts(t, weights)
    x, _ = t.sampler.next_batch()
    t.sampler.position = 0
    rec = t._local_step()
    train = training_flops_per_token(t.cfg, x.shape[1])
    forward = train / 3  # flyer counts a training step as 3 forwards (forward, backward: twice)
    assert rec["tokens"] == x.numel() and rec["flops"] == pytest.approx(x.numel() * (train + forward), rel=1e-12)
    mtp = t.cfg.replace(mtp_depth=1)
    assert dpo_flops_per_token(mtp, 96) == dpo_flops_per_token(t.cfg, 96) < model_flops_per_token(mtp, 96) * 4 / 3
    t.close()


@pytest.mark.parametrize("name, overrides, fp4", [("tiny", {}, False), ("tiny", {"tie_embeddings": True}, False),
                                                 ("tiny", {}, True), ("tiny-v4", {}, False)])
@pytest.mark.parametrize("emulate", [True, False])
def test_bf16_reference_holds_gemm_weights_with_the_same_bits(name, overrides, fp4, emulate):
    """Under bf16 the reference's GEMM weights (linears, routed experts) are held in BF16 and its per-token
    log-probabilities under autocast equal the FP32 copy's bit for bit (autocast rounds each GEMM weight to BF16
    first); the embedding (the head too, still tied, where tied), norms, routers, the FP32-computed indexer weights
    and FP4-QAT experts (quantized from FP32) stay FP32. At any precision the MTP modules (never run) are dropped.
    MLA + MoE + MTP (tiny), tied embeddings, FP4 experts,
    DeepSeek-V4's hybrid attention and hyper-connections (tiny-v4); BF16 GEMMs through the FP32 kernel and native."""
    from flyer.fp8.fp4 import fp4_experts
    from flyer.infer.weights import KEEP
    from flyer.model import lowp
    from flyer.model.transformer import Transformer
    from flyer.runtime import autocast
    from flyer.train.dpo import hold_reference

    cfg = preset(name, **overrides)
    torch.manual_seed(0)
    ref32 = Transformer(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # a checkpoint's norm weights, not the init's ones (BF16 would hold those exactly)
        for n, p in ref32.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    if fp4:
        fp4_experts(ref32)
    ref16, fp32 = copy.deepcopy(ref32), copy.deepcopy(ref32)
    hold_reference(ref16, "bf16")
    hold_reference(fp32, "fp32")
    assert len(ref32.mtp) and not len(ref16.mtp) and not len(fp32.mtp)  # never run by DPO: dropped
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    dtypes = {n: p.dtype for n, p in ref16.named_parameters()}
    experts, linear = dtypes["layers.1.ffn.experts.w1"], dtypes["layers.0.attn.wq_b.weight"]
    assert (experts, linear) == (torch.float32 if fp4 else torch.bfloat16, torch.bfloat16)
    assert ref16.head.weight.dtype == (torch.float32 if cfg.tie_embeddings else torch.bfloat16)
    assert (ref16.head.weight is ref16.embed.weight) == cfg.tie_embeddings  # one tensor: no held copy beside it
    assert all(dtypes[n] == torch.float32 for n in dtypes
               if "norm" in n or ".gate." in n or n == "embed.weight" or n.split(".")[-2] in KEEP)
    x = torch.randint(0, cfg.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, cfg.vocab_size, (4, 48), generator=torch.Generator().manual_seed(2))
    y[:, :12] = IGNORE_INDEX  # prompts
    x[3, 40:], y[3, 39:] = -1, IGNORE_INDEX  # a padded row
    with lowp.emulation(emulate), torch.no_grad(), autocast("bf16", "cpu"):
        lp32, lp16 = completion_logprobs(ref32, x, y), completion_logprobs(ref16, x, y)
    assert torch.equal(lp16, lp32)
    plain = dict(ref32.named_parameters())  # holding rounded weights: the two are not the same model computed twice
    assert any(not torch.equal(p.float(), plain[n]) for n, p in ref16.named_parameters())


def test_bf16_trainer_reference_is_held_and_counted(hf, tmp_path, monkeypatch):
    """A bf16 DPO run's reference holds its GEMM weights in BF16 (the FP32 rest: embedding, norms), its
    log-probabilities under the run's autocast are the policy's at step 0 (the same init weights in FP32) bit for bit,
    and the memory estimate of the run exceeds the one without DPO by the bytes of the reference's tensors as held."""
    from flyer.train import trainer

    monkeypatch.setattr(trainer, "fastest_gemm", lambda dtype, device: (1e12, f"{dtype} (stub)"))  # no GEMM timing
    t = _trainer(hf, tmp_path / "run", precision="bf16")
    ref = t.dpo.reference
    held = sum(p.numel() * p.element_size() for p in ref.parameters())
    n16 = sum(p.numel() for p in ref.parameters() if p.dtype == torch.bfloat16)
    assert n16 and held == param_counts(t.cfg).total * 4 - 2 * n16 and ref.embed.weight.dtype == torch.float32
    _assert_memory_counts(t, held)
    x, y = t.sampler.next_batch()
    t.sampler.position = 0
    with torch.no_grad(), t._autocast():
        assert torch.equal(completion_logprobs(ref, x, y), completion_logprobs(t.model, x, y))
    t.close()


def test_bf16_step_matches_fp32_within_its_logits_error(hf, tmp_path, monkeypatch):
    """--precision bf16 (its GEMMs emulated through FP32, as on a CPU without BF16 hardware: the same on any
    machine): step 1's loss is ln 2 (policy and reference computed alike), and the DPO loss of the step-1 weights on
    the next batch is the FP32 one within what the BF16 logits' error allows: beta (the loss's slope in each
    log-probability, logsigmoid being 1-Lipschitz) times the pair's four rows' errors (policy and reference, chosen
    and rejected), a row's at most twice its trained positions' largest logit error each (a log-softmax entry moves
    by at most twice its logits' largest change)."""
    from flyer.model import lowp
    from flyer.train import trainer

    monkeypatch.setattr(trainer, "fastest_gemm", lambda dtype, device: (1e12, f"{dtype} (stub)"))  # no GEMM timing
    with lowp.emulation(True):
        t = _trainer(hf, tmp_path / "bf16", precision="bf16")
        rec1 = t.train_step()
        assert t.precision == "bf16" and math.isfinite(rec1["grad_norm"]) and rec1["grad_norm"] > 0
        assert rec1["dpo_loss"] == pytest.approx(math.log(2), abs=4 * FP32_U) and rec1["reward_margin"] == 0.0
        x, y = t.sampler.next_batch()
        t.sampler.position = 1
        keep = y != IGNORE_INDEX
        losses, logits = {}, {}
        with torch.no_grad():
            for name, cast in (("bf16", t._autocast), ("fp32", contextlib.nullcontext)):
                with cast():
                    losses[name] = t.dpo._pairs(t.model, x, y, torch.device("cpu"))[0].double()
                    logits[name] = [m.head(m.norm(m.hidden(x.clamp(min=0))))[keep].float().double()
                                    for m in (t.model, t.dpo.reference)]  # (N, V) each
        rec2 = t.train_step()
        t.close()
    V, rows = t.cfg.vocab_size, keep.nonzero()[:, 0]
    scale = max(float(lg.abs().max()) for lg in logits["fp32"]) + math.log(V)
    bound = torch.zeros(len(losses["fp32"]), dtype=torch.float64)
    for b16, b32 in zip(logits["bf16"], logits["fp32"]):
        # per trained position: twice the largest logit error, plus FP32 rounding of the V-term log-sum-exp
        err = 2 * (b16 - b32).abs().amax(1) + (V + 8) * FP32_U * scale
        row = torch.zeros(x.shape[0], dtype=torch.float64).index_add(0, rows, err)  # a row's summed log-probability
        bound += row[0::2] + row[1::2]
    diff = (losses["bf16"] - losses["fp32"]).abs()
    assert (diff <= BETA * bound).all() and diff.max() > 0  # BF16 was in effect
    assert rec2["dpo_loss"] == pytest.approx(float(losses["bf16"].mean()), abs=4 * FP32_U)


@pytest.mark.parametrize("line, words", [
    ("not json", "not valid JSON"),
    ('{"prompt": "hi", "chosen": "a"', "not valid JSON (Expecting ',' delimiter: line 1 column 31"),  # not "line 2"
    ('{"prompt": "hi", "chosen": "a"}', "rejected: missing"),
    ('{"prompt": "hi", "chosen": "", "rejected": "b"}', "chosen: empty completion"),
    ('{"prompt": "hi", "chosen": "a", "rejected": []}', "rejected: expected a string, as prompt is"),
    ('{"prompt": [], "chosen": [], "rejected": []}', "prompt: expected a non-empty list of {role, content}"),
    ('{"prompt": [{"role": "user", "content": 3}], "chosen": [], "rejected": []}', "prompt[0]: expected an object"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": ""}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "chosen: empty completion"),
    # a completion is the assistant's: a user turn first would score chosen and rejected in different contexts
    ('{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "say a"}, '
     '{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
     "chosen: a completion starts with the assistant's turn (got 'user')"),
    ('{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}], "tools": 3}', "tools: expected a list"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b", "tools": []}', "tools: applies to conversational pairs"),
    ('{"prompt": "' + " ".join(WORDS * 8) + '", "chosen": "a", "rejected": "b"}', "more than seq_len+1 = 97"),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(hf, tmp_path, capsys, line, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:3]) + "\n" + line + "\n")
    argv = _train_args(hf, tmp_path / "run", 1)
    argv[argv.index("--data") + 1] = str(bad)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flyer: error: {bad}:5: ") and words in err[0], err


@pytest.mark.parametrize("drop, add, words", [
    ("--init", (), "--dpo: needs --init"),
    (None, ("--pack",), "--pack: is not supported with --dpo"),
    (None, ("--dpo-beta", "-1"), "--dpo-beta: must be"),
])
def test_unsupported_settings_are_refused(hf, tmp_path, capsys, drop, add, words):
    argv = _train_args(hf, tmp_path / "run", 1, *add)
    if drop:
        i = argv.index(drop)
        del argv[i:i + 2]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flyer: error: {words}"), err


def test_data_that_holds_no_pairs_is_named_as_data(hf, tmp_path, capsys):
    """``--data`` a folder (or a .txt file) with ``--dpo``: one line naming ``--data`` and its value (it named
    ``--dpo`` and printed ``(got True)``)."""
    argv = _train_args(hf, tmp_path / "run", 1)
    argv[argv.index("--data") + 1] = str(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flyer: error: --data: dpo trains on preference pairs: a .jsonl file of {{prompt, chosen, "
                   f"rejected}} lines (got {str(tmp_path)!r})"], err
