"""MTP speculative decoding for DeepSeek-V4 in ``flyer generate`` (``flyer.infer.speculative``: the hybrid cache
rolled back by snapshot and re-feed, the MTP module drafting from the residual streams): greedy speculation gives
plain greedy's tokens, token for token, with 1..3 drafts, a batch of prompts of different lengths decoding
across window (8), CSA (r 4, past index_topk 4 entries) and HCA (r 16) boundaries; with rollback skipped
(the mutation: ``HybridCache.restore_slots`` a no-op) they differ; seeded sampling repeats; an MTP module trained a
few AdamW steps on a repeating sequence gets drafts accepted (and the output is still plain greedy's); the
CLI takes ``--speculative mtp`` for V4. Tiny random model, FP32, CPU.

Tolerance: exact token equality, as V3's speculation tests ask. The verify pass computes the target logits over
1 + K tokens where plain decoding computes them one at a time, the same sums in other orders (``v4_tolerance``
bounds such differences); a greedy token differs only if two logits lie within that bound of each other, which
random FP32 weights make improbable, and the mutation's outputs differ from the first steps on."""

import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.infer.generate import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.model.transformer import Transformer

NEW = 24  # prompts of 13, 29, 3 tokens + 24: positions up to 52 (HCA entries complete at 16, 32, 48 while decoding)
PATTERN = [5, 17, 42, 99, 7, 64, 130, 21, 88, 3, 250]


def _config():
    return preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4)


def _prompts(seq: list[int]) -> list[list[int]]:
    return [seq[:13], seq[3:3 + 29], seq[:3]]


def _gen(model, prompts, **kw) -> object:
    return generate(model, prompts, GenerationConfig(max_new_tokens=NEW, cache_dtype=torch.float32, **kw))


@pytest.fixture(scope="module")
def random_v4():
    """(model, prompts, plain greedy tokens) of a random tiny-v4 with its MTP module."""
    torch.manual_seed(0)
    model = Transformer(_config()).eval()
    assert len(model.mtp) == 1 and model.mtp[0].block.attn.compressor is None
    prompts = _prompts(torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist())
    return model, prompts, _gen(model, prompts).tokens


def pattern_trained() -> Transformer:
    """``_config``'s model (seed 0) trained 4 AdamW steps on ``PATTERN`` repeated (main and MTP losses), in eval."""
    torch.manual_seed(0)
    model = Transformer(_config()).train()
    seq = torch.tensor(PATTERN).repeat(5)[:49]
    x = torch.stack([seq, torch.roll(seq, -3)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(4):
        opt.zero_grad()
        model.compute_loss(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_v4():
    """(model, prompts, plain greedy tokens) of a tiny-v4 trained 4 AdamW steps on a repeating sequence (main
    and MTP losses), so its module drafts the sequence's next tokens some of the time (measured: 30 of 37 drafts
    kept with K = 1, 45 of 64 with K = 3; by 12 steps every draft is)."""
    model = pattern_trained()
    prompts = _prompts((PATTERN * 4)[:40])
    return model, prompts, _gen(model, prompts).tokens


@pytest.mark.parametrize("K", [1, 2, 3])
def test_greedy_speculation_is_plain_greedy(random_v4, K):
    """A random module's drafts are almost all rejected: with K > 1 most steps roll rows back and re-feed them."""
    model, prompts, want = random_v4
    r = _gen(model, prompts, speculative="mtp", draft_tokens=K)
    assert r.tokens == want
    assert r.drafted > 0 and all(len(t) == NEW for t in r.tokens)


def test_skipping_the_rollback_changes_the_tokens(random_v4, monkeypatch):
    """The mutation: rejected drafts' writes left in the windows and rings (and the MTP window). With K = 1 no
    rejection is rolled back (the last draft's writes are never read), so K = 2 and 3."""
    model, prompts, want = random_v4
    monkeypatch.setattr(HybridCache, "restore_slots", lambda self, saved, slots, rows=None: None)
    for K in (2, 3):
        got = _gen(model, prompts, speculative="mtp", draft_tokens=K).tokens
        assert got != want
        assert sum(a != b for t, w in zip(got, want) for a, b in zip(t, w)) > NEW  # far off, not one near-tie


def test_seeded_sampling_repeats(random_v4):
    model, prompts, _ = random_v4
    runs = [_gen(model, prompts, speculative="mtp", draft_tokens=2, temperature=1.0, seed=s).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("K", [1, 3])
def test_a_trained_module_gets_drafts_accepted(trained_v4, K):
    """Acceptance > 0 (partial: the rows roll back on some steps and keep every draft on others), the output
    still plain greedy's."""
    model, prompts, want = trained_v4
    r = _gen(model, prompts, speculative="mtp", draft_tokens=K)
    print(f"K={K}: accepted {r.accepted} of {r.drafted} drafts ({r.acceptance_rate:.2f})")
    assert r.tokens == want
    assert r.accepted > 0


def test_cli_generates_with_mtp_speculation_for_v4(capsys):
    assert main(["generate", "--preset", "tiny-v4", "--device", "cpu", "--prompt", "hi", "--prompt", "abcdef",
                 "--max-new-tokens", "4", "--speculative", "mtp", "--draft-tokens", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "acceptance_rate" in out or "token_ids" in out
