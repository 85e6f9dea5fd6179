"""flyer's DPO against TRL's (``trl.DPOTrainer``, an implementation nobody here wrote): the same preference file, policy
and reference give the same loss, rewards, accuracy and margin, conversational pairs (the chat template) and
plain-text ones (no template: the tokenizer's BOS, the completion's eos_token) alike. Tiny random Llama, FP32, CPU."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from flyer.data.chat_data import IGNORE_INDEX, chat_tokenizer
from flyer.data.chat_sampler import chat_rows
from flyer.data.pref_data import pair_samples, prepare_prefs
from flyer.interop.hf import load_hf
from flyer.train.dpo import completion_logprobs, dpo_terms
from tests.bounds import FP32_U
from tests.test_dpo import BETA, PAIRS
from tests.test_rope_scaling import logit_tolerance

trl = pytest.importorskip("trl")  # a test dependency (pyproject's test extra); skipped only outside it
datasets = pytest.importorskip("datasets")

SEQ = 128
# TRL 1.16 reads transformers 5's deprecated gradient-checkpointing names (its FutureWarnings, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy, reference) directories: the reference a tiny Llama with test_dpo's chat template, the policy the same
    with every weight moved (by transformers, seeded), so that rewards and margins are not zero."""
    from tests.hf_models import build
    from tests.test_sft import TEMPLATE

    root = tmp_path_factory.mktemp("trl")
    ref = build("llama", root / "ref")
    tok = json.loads((root / "ref" / "tokenizer_config.json").read_text())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(root / "policy")
    for d in ("ref", "policy"):
        for f in (root / "ref").iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) and d == "policy":
                (root / d / f.name).write_bytes(f.read_bytes())
        (root / d / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": TEMPLATE}))
    return root / "policy", root / "ref"


def _flyer(policy, ref, prefs):
    """flyer's per-pair loss, chosen and rejected rewards over the file's training pairs, their lines, a bound on how
    far each summed log-probability may sit from transformers' (FP32 sums in other orders), and their samples."""
    data = prepare_prefs(prefs, *chat_tokenizer(str(policy), None))
    x, y = chat_rows(data.train.samples, pair_samples(range(data.train.n_pairs)), SEQ, trim=True)
    models = [load_hf(str(d), dtype=torch.float32)[0].eval() for d in (policy, ref)]
    with torch.no_grad():
        pc, rc = (completion_logprobs(m, x, y) for m in models)
        logit_max = max(float(m(x.clamp(min=0)).abs().max()) for m in models)  # (padding fed as token 0)
    loss, chosen, rejected = dpo_terms(pc, rc, BETA)
    cfg, T = models[0].cfg, x.shape[1] + 1
    n_tok = (y != IGNORE_INDEX).sum(1).double()
    # a log-softmax entry moves by at most twice the largest logit error, plus the V-term sum's rounding
    lp_tol = n_tok * (2 * logit_tolerance(cfg, T) * logit_max + (cfg.vocab_size + 8) * FP32_U * logit_max)
    return loss, chosen, rejected, data.train.lines.tolist(), float(lp_tol.max()), data.train.samples


def _trl(policy, ref, rows: list[dict], tmp_path) -> tuple[dict, list[dict]]:
    """TRL's evaluation metrics of ``rows`` (one batch: TRL averages per batch, then over batches), and each row as
    TRL tokenized it (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the completions' are the trained tokens)."""
    from transformers import AutoTokenizer

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid"], label_smoothing=0.0,
                         max_length=None, per_device_eval_batch_size=len(rows), report_to=[], use_cpu=True,
                         dataloader_num_workers=0, bf16=False, fp16=False)
    ds = datasets.Dataset.from_list(rows)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                             ref_model=AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32), args=args,
                             train_dataset=ds, eval_dataset=ds, processing_class=AutoTokenizer.from_pretrained(policy))
    return trainer.evaluate(), list(trainer.eval_dataset)


@pytest.mark.parametrize("form", ["conversational", "plain text"])
def test_loss_rewards_accuracy_and_margin_equal_trl(models, tmp_path, form):
    """TRL's tokens of each side are flyer's, trained at the same positions (its completion ids: flyer's mask); each
    metric TRL reports is flyer's mean over the same pairs, within beta times the summed log-probabilities' FP32
    bound (four a pair); each pair's margin is far past that bound, so the accuracies are equal exactly."""
    policy, ref = models
    plain = form == "plain text"
    pairs = [p for p in PAIRS if isinstance(p["prompt"], str) == plain] * (2 if plain else 1)  # >= 2 training pairs
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    loss, chosen, rejected, lines, lp_tol, samples = _flyer(policy, ref, prefs)
    got, tokenized = _trl(policy, ref, [pairs[n - 1] for n in lines], tmp_path)
    for p, row in enumerate(tokenized):  # the same tokens, trained at the same places
        for side, key in enumerate(("chosen_ids", "rejected_ids")):
            ids, mask = samples.conversation(2 * p + side)
            assert ids.tolist() == row["prompt_ids"] + row[key], (p, key)
            assert mask.tolist() == [0] * len(row["prompt_ids"]) + [1] * len(row[key]), (p, key)
    tol = 4 * BETA * lp_tol
    margin = chosen - rejected
    assert float(margin.abs().min()) > 2 * tol and 0 < float((margin > 0).double().mean()) < 1
    assert got["eval_loss"] == pytest.approx(float(loss.mean()), abs=tol) and abs(got["eval_loss"] - math.log(2)) > tol
    assert got["eval_rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=tol)
    assert got["eval_rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=tol)
    assert got["eval_rewards/margins"] == pytest.approx(float(margin.mean()), abs=2 * tol)
    assert got["eval_rewards/accuracies"] == pytest.approx(float((margin > 0).double().mean()), abs=1e-6)
