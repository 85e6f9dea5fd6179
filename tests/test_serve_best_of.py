"""``best_of`` on POST /v1/completions through the official ``openai`` client against a server on loopback: the n
returned per prompt are the best_of candidates with the highest mean token logprob (ranked here from the same seeded
candidates asked for as n = best_of with logprobs), best first; usage counts every candidate; best_of = n is n alone;
seeded requests repeat; the 400s; a client gone cancels every candidate."""

import math
import time

import httpx
import openai
import pytest
import torch
from served import gone_mid_request
from test_serve_api import _Running
from trained import counting_model

from flyer.infer.cli import ByteTokenizer
from flyer.serve.generation import best_candidates
from flyer.serve.schema import MAX_CHOICES

V = 64
EOS = 10  # a token the counting model samples now and then at temperature 1.5: candidates of different lengths
# the engine's logprobs agree with the model's to 1e-4 under any batch mix (tests/test_serve_api.py), so a mean of
# them moves by 1e-4 at most and two scores by 2e-4: rankings are compared only where adjacent scores are further apart
MARGIN = 1e-3


class _EosBytes(ByteTokenizer):
    def eos_ids(self) -> tuple[int, ...]:
        return (EOS,)


@pytest.fixture(scope="module")
def model():
    return counting_model(V)


@pytest.fixture(scope="module")
def served(model):
    s = _Running(model, api_tokenizer=_EosBytes())
    yield s
    s.close()


def _prog(start, step, n):
    return [(start + step * i) % V for i in range(n)]


PROMPTS = [_prog(1, 1, 5), _prog(3, 2, 5)]
SAMPLED = dict(model="tiny-test", prompt=PROMPTS, max_tokens=8, temperature=1.5, seed=5)


def _ranked(scores: list[float], n: int) -> list[int]:
    """The test's own ranking of 4 candidates per prompt: best first, the lower index first on a tie."""
    return [k for i in range(0, len(scores), 4) for k in sorted(range(i, i + 4), key=lambda k: (-scores[k], k))[:n]]


def _candidates(client) -> tuple[list, list[float], list[float]]:
    """The 4 seeded candidates per prompt as n = 4 returns them (candidate j sampled with seed + j, as best_of
    samples them), with their mean and summed token logprobs."""
    r = client.completions.create(**SAMPLED, n=4, logprobs=0)
    lps = [c.logprobs.token_logprobs for c in r.choices]
    return r, [math.fsum(x) / len(x) for x in lps], [math.fsum(x) for x in lps]


def test_best_of_returns_the_top_n_candidates_by_mean_logprob(served):
    c = served.client()
    cands, mean, total = _candidates(c)
    want = _ranked(mean, 2)
    # the seed draws candidates that end at EOS at different lengths, so the mean's ranking is not the sum's
    # (vLLM's): the test tells them apart; and not the candidates' own order
    assert want != _ranked(total, 2) and want != [0, 1, 4, 5]
    for i in range(0, 8, 4):
        s = sorted(mean[i:i + 4], reverse=True)
        assert min(a - b for a, b in zip(s, s[1:3])) > MARGIN  # the top two and the cut are clear

    best = c.completions.create(**SAMPLED, best_of=4, n=2)
    assert [ch.index for ch in best.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in best.choices] == [cands.choices[k].text for k in want]
    assert [ch.finish_reason for ch in best.choices] == [cands.choices[k].finish_reason for k in want]
    assert {ch.finish_reason for ch in cands.choices} == {"stop", "length"}
    assert all(ch.logprobs is None for ch in best.choices)  # scored with logprobs, returned without: not asked
    # every candidate billed, each prompt counted once
    assert best.usage.completion_tokens == cands.usage.completion_tokens > sum(
        len(cands.choices[k].logprobs.token_logprobs) for k in want)
    assert best.usage.prompt_tokens == 10

    # with logprobs and echo: each choice's own candidate's, after its own prompt's text
    echoed = c.completions.create(**SAMPLED, best_of=4, n=2, logprobs=2, echo=True)
    tok = ByteTokenizer()
    for i, k in enumerate(want):
        ch = echoed.choices[i]
        assert ch.text == tok.decode(PROMPTS[k // 4]) + cands.choices[k].text
        got = ch.logprobs.token_logprobs[len(PROMPTS[k // 4]):]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(cands.choices[k].logprobs.token_logprobs),
                                   atol=1e-4, rtol=0)  # the engine's agreement under batch mixes (``MARGIN``)

    best1 = c.completions.create(**SAMPLED, best_of=4)  # n = 1: the best of each prompt's four
    assert [ch.text for ch in best1.choices] == [cands.choices[k].text for k in _ranked(mean, 1)]


def test_best_of_equal_to_n_is_n_alone(served):
    """best_of = 1 is today's single choice; best_of = n returns every candidate in its own order and streams."""
    c = served.client()
    kw = dict(SAMPLED, logprobs=1, echo=True)
    plain = c.completions.create(**kw)
    assert c.completions.create(**kw, best_of=1).model_dump()["choices"] == plain.model_dump()["choices"]

    cands, mean, _ = _candidates(c)
    assert _ranked(mean, 4) != list(range(8))  # score order differs from the candidates' own
    same = c.completions.create(**SAMPLED, n=4, best_of=4)
    assert [ch.text for ch in same.choices] == [ch.text for ch in cands.choices]
    streamed = [""] * 8
    for chunk in c.completions.create(**SAMPLED, n=4, best_of=4, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == [ch.text for ch in cands.choices]


def _split_logprobs(choices: list[dict]) -> tuple[list[dict], torch.Tensor]:
    """Completion choices (``model_dump``) as what must match exactly (texts, tokens, offsets, the top tokens) and
    their logprob values, the chosen tokens' then the top ones'."""
    exact, values = [], []
    for ch in choices:
        lp = dict(ch["logprobs"])
        values += lp.pop("token_logprobs") + [v for top in lp["top_logprobs"] for v in top.values()]
        lp["top_logprobs"] = [list(top) for top in lp["top_logprobs"]]
        exact.append({**ch, "logprobs": lp})
    return exact, torch.tensor(values)


def test_best_of_is_reproducible_with_a_seed_and_greedy_ties_do_not_matter(served):
    c = served.client()
    a, b = (c.completions.create(**SAMPLED, best_of=3, n=2, logprobs=1).model_dump()["choices"] for _ in range(2))
    # the same candidates and tokens; their logprobs each within 1e-4 of the model's under the batch mix its steps
    # ran in (``MARGIN``), which the HTTP side's timing may change between the two: 2e-4 apart at most
    (exact_a, lp_a), (exact_b, lp_b) = _split_logprobs(a), _split_logprobs(b)
    assert exact_a == exact_b
    torch.testing.assert_close(lp_a, lp_b, atol=2e-4, rtol=0)
    greedy = dict(model="tiny-test", prompt=PROMPTS, max_tokens=6, temperature=0)
    one = c.completions.create(**greedy)
    r = c.completions.create(**greedy, best_of=3, n=2)  # three equal candidates per prompt: tied scores
    assert [ch.text for ch in r.choices] == [one.choices[0].text] * 2 + [one.choices[1].text] * 2
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_ties_keep_the_lower_candidate_first():
    assert best_candidates([0.0, -1.0, 0.0, 0.0, -2.0, -0.5, -0.5, -3.0], 4, 2) == [0, 2, 5, 6]
    assert best_candidates([-1.0, -0.5, -2.0], 3, 3) == [1, 0, 2]


def _param(err: openai.BadRequestError) -> str | None:
    return err.body.get("param") if isinstance(err.body, dict) else None


@pytest.mark.parametrize("over", [dict(best_of=1, n=2), dict(best_of=3, n=2, stream=True), dict(best_of=0),
                                  dict(best_of=MAX_CHOICES + 1, prompt=PROMPTS[0]),
                                  dict(best_of=MAX_CHOICES, prompt=PROMPTS * 2)])
def test_best_of_refusals_name_it(served, over):
    """best_of < n; streamed above n (OpenAI refuses it: the best are known at the end); out of [1, 128], n's
    bound; more candidates than the queue (256) holds: 400 naming best_of, before anything runs."""
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(**{**SAMPLED, **over})
    assert _param(e.value) == "best_of", e.value.body
    assert not served.engine.busy


def test_chat_still_refuses_best_of(served):
    r = httpx.post(served.url + "/v1/chat/completions", json=dict(
        model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=2, best_of=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_a_client_gone_cancels_every_candidate(model, monkeypatch):
    monkeypatch.setattr("flyer.serve.generation.DISCONNECT_POLL_S", 0.1)
    s = _Running(model, api_tokenizer=_EosBytes())
    try:
        step = s.engine.step
        monkeypatch.setattr(s.engine, "step", lambda: (time.sleep(0.05), step()))  # >= 3 s for 60 steps
        # greedy from 11, 12 counts on, writing no EOS before its 60th token
        gone_mid_request(s, dict(model="tiny-test", prompt=[11, 12], max_tokens=60, temperature=0, best_of=3))
        for _ in range(100):  # bounded: the cancels land within the engine's next steps
            if not s.engine.busy:
                break
            time.sleep(0.05)
        assert not s.engine.busy and s.engine.alloc.used == 0
        m = s.engine.metrics
        assert m.requests.labels("cancelled")._value.get() == 3 and m.generation_tokens._value.get() < 3 * 60
    finally:
        s.close()
