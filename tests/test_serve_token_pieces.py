"""Logprobs' tokens as OpenAI's API shows them, on a byte-level BPE: each token's ``bytes`` are its own (a token
holding part of a UTF-8 character included), so they put the text back together; such a token's text is
``bytes:\\xNN`` (two of them kept apart in ``top_logprobs``, where each decoded alone as U+FFFD was one key); and the
completions route's ``top_logprobs`` always hold the chosen token's, as OpenAI's do (up to logprobs + 1)."""

import math

import httpx
import pytest
import torch
from hf_models import make_tokenizer
from served import EngineServer

from flyer.config import preset
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf import load_tokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.tokenize import TokenPieces

V = 300  # the tests' BPE has fewer ids


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    make_tokenizer(path)
    (path / "config.json").write_text("{}")
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=V)).eval()
    cfg = EngineConfig(kv_cache_bytes=64 * 4 * 384 * 2 * 8, block_size=4, cache_dtype=torch.float32, prefill_chunk=8)
    s = EngineServer(Engine(model, cfg, tokenizer=tok), lambda link: Api(link, tok, "tiny-test"))
    s.tok = tok
    yield s
    s.close()


def _partial_ids(tok) -> list[int]:
    """The ids of single bytes that are no character alone (UTF-8 lead and continuation bytes)."""
    return sorted(i for t, i in tok.tok.get_vocab().items() if len(t) == 1 and tok.decode([i]) == "\ufffd")


def test_logprob_bytes_put_a_text_of_split_characters_back_together(served):
    lead, cont = served.tok.encode_ids("é", add_special_tokens=False)  # 0xC3 0xA9: the BPE never merged them
    # the lead byte first, then (its frequency penalty) the continuation, and so on: "ééé"
    bias = {"logit_bias": {str(lead): 100, str(cont): 99.5}, "frequency_penalty": 2, "max_tokens": 6,
            "temperature": 0}
    chat = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny-test", "messages": [{"role": "user", "content": "hello"}], "logprobs": True, "top_logprobs": 2,
        **bias}).json()["choices"][0]
    assert chat["message"]["content"] == "ééé"
    entries = chat["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries) == "ééé".encode()
    assert [e["token"] for e in entries] == ["bytes:\\xc3", "bytes:\\xa9"] * 3
    assert all({t["token"] for t in e["top_logprobs"]} == {"bytes:\\xc3", "bytes:\\xa9"} for e in entries)
    assert all(bytes(t["bytes"]) in (b"\xc3", b"\xa9") for e in entries for t in e["top_logprobs"])

    done = httpx.post(served.url + "/v1/completions", timeout=60, json={
        "model": "tiny-test", "prompt": "hello", "logprobs": 1, **bias}).json()["choices"][0]
    assert done["text"] == "ééé" and done["logprobs"]["tokens"] == ["bytes:\\xc3", "bytes:\\xa9"] * 3
    assert done["logprobs"]["text_offset"] == [0, 0, 1, 1, 2, 2]  # where each token's text starts in the text


def test_top_logprobs_keep_split_characters_apart(served):
    ids = _partial_ids(served.tok)[:5]
    assert len(ids) == 5
    lp = httpx.post(served.url + "/v1/completions", timeout=60, json={
        "model": "tiny-test", "prompt": "the", "max_tokens": 1, "temperature": 0, "logprobs": 5,
        "logit_bias": {str(i): 50 for i in ids}}).json()["choices"][0]["logprobs"]
    top = lp["top_logprobs"][0]
    assert set(top) == {served.api.pieces.text(i) for i in ids} and all(k.startswith("bytes:\\x") for k in top), top


@pytest.mark.parametrize("k", [0, 2])
def test_completion_top_logprobs_hold_the_chosen_token(served, k):
    """At temperature 2 the chosen token is often outside the top k: its logprob is there still (and with
    logprobs 0, it alone, where the entries were null)."""
    lp = httpx.post(served.url + "/v1/completions", timeout=60, json={
        "model": "tiny-test", "prompt": "the quick", "max_tokens": 24, "temperature": 2, "seed": 5, "logprobs": k,
        "echo": True}).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None  # the prompt's first token has none
    outside = 0
    for token, chosen, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == chosen and len(top) in (k, k + 1)
        outside += len(top) == k + 1
        assert all(v <= max(top.values()) for v in top.values()) and all(math.isfinite(v) for v in top.values())
    assert outside > 0  # the case this pins: the chosen token past the top k


def test_token_pieces_of_byte_tokens():
    pieces = TokenPieces(ByteTokenizer(), lambda: 257)
    assert pieces.text(ord("A")) == "A" and pieces.of(0xC3)[1] == b"\xc3" and pieces.text(0xC3) == "bytes:\\xc3"
    assert pieces.of(256)[1] == b""  # a preset's end word: no text
