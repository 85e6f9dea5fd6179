"""Per-request prefix-cache hits in ``usage`` (``prompt_tokens_details.cached_tokens``, the Responses API's
``input_tokens_details.cached_tokens``) and the Responses API's ``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items``, through the official openai client against a tiny engine on loopback.

A request whose prompt starts with another's reports the whole blocks of their common prefix (but for its own last
token, always computed) as cached, computed here from the block size and the prompts' tokens; the first reports 0,
and so does every request with prefix sharing off; a stream's usage equals the unstreamed one's on a prompt that
shares as much. Blocks loaded from the on-disk tier count as shared ones. A request preempted and recomputed reports
its first admission's count. ``input_items`` pages
through a stored response's input items in either order (``limit``, ``after``, ``has_more``); a deleted response is
gone (404 for GET, DELETE and input_items, 400 for previous_response_id)."""

import httpx
import openai
import pytest
import torch
from served import EngineServer
from test_serve_engine import _engine, _progression

from flyer.config import preset
from flyer.data.chat_template import chat_renderer
from flyer.infer.cli import ByteTokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.request import SamplingOptions

BS = 4  # tokens per cache block: several whole blocks in a short prompt


def _served(model, sharing: bool) -> EngineServer:
    cfg = EngineConfig(kv_cache_bytes=1 << 22, block_size=BS, cache_dtype=torch.float32, prefix_sharing=sharing)
    return EngineServer(Engine(model, cfg, tokenizer=ByteTokenizer()), lambda link: Api(link, ByteTokenizer(), "t"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()  # random weights, a vocabulary holding every byte (text prompts)


@pytest.fixture  # a server per test: its first request finds an empty cache
def on(model):
    s = _served(model, True)
    yield s
    s.close()


@pytest.fixture
def off(model):
    s = _served(model, False)
    yield s
    s.close()


def _expected(prompt: list[int], *computed: list[int]) -> int:
    """Tokens of ``prompt`` in the whole blocks it shares with the prompt of ``computed`` it shares most with (its
    last token never is)."""
    common = max(next((i for i, (a, b) in enumerate(zip(c, prompt)) if a != b), min(len(c), len(prompt)))
                 for c in computed)
    return min(common, len(prompt) - 1) // BS * BS


def _chat_ids(messages: list[dict]) -> list[int]:
    return ByteTokenizer().encode_ids(chat_renderer(None)(messages))  # as the API renders them (no template)


def _error(resp: httpx.Response, status: int, param: str | None = None) -> None:
    """An OpenAI-shaped error (``test_serve_api._error``'s check, without importing that module's transformers)."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def _cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def _written(usage) -> int:
    return usage.prompt_tokens_details.cache_write_tokens


def test_completions_report_the_prompt_tokens_taken_from_the_cache(on, off):
    head = _progression(3, 5, 22)  # 5 whole blocks and 2 tokens
    first, second, third = head + [1, 2, 3], head + [4, 5, 6, 7, 8], head + [9, 10, 11, 12, 13]
    for s in (on, off):
        c = s.client()
        kw = dict(model="t", max_tokens=3, temperature=0)
        r1, r2 = (c.completions.create(prompt=p, **kw) for p in (first, second))
        assert _cached(r1.usage) == 0
        want = _expected(second, first) if s is on else 0
        assert _cached(r2.usage) == want and (want == 20 or s is off)  # the case at hand: 5 blocks
        # written: the prompt's whole blocks not in the cache before (25 tokens: 6 blocks; then 1 of 27's 6 new)
        assert (_written(r1.usage), _written(r2.usage)) == ((24, 4) if s is on else (0, 0))
        # streamed: the same usage as the unstreamed request on a prompt that shares as much
        chunks = list(c.completions.create(prompt=third, stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage.model_dump() == r2.usage.model_dump()
    # prompts: each counted once; n choices of one prompt share it (the first computes it): its fewest
    c = on.client()
    fresh = _progression(7, 3, 13)
    r = c.completions.create(model="t", prompt=fresh, max_tokens=2, temperature=0, n=2)
    assert _cached(r.usage) == 0 and r.usage.prompt_tokens == len(fresh)
    assert _written(r.usage) == 12  # written once, by whichever choice filled a block first
    r = c.completions.create(model="t", prompt=[fresh, head + [40, 41]], max_tokens=2, temperature=0, n=2)
    assert _cached(r.usage) == _expected(fresh, fresh) + _expected(head + [40, 41], first)
    assert _written(r.usage) == 4  # fresh's blocks were there; head + [40, 41]'s sixth is new


def test_chat_and_responses_report_it(on, off):
    system = "You answer in one short line, and you never repeat yourself. "
    asks = ["count to four", "name a colour", "spell a verb!"]  # of one length, differing in their first character
    for s in (on, off):
        c = s.client()
        msgs = [[{"role": "system", "content": system + "chat"}, {"role": "user", "content": a}] for a in asks]
        kw = dict(model="t", max_tokens=3, temperature=0)
        r1, r2 = (c.chat.completions.create(messages=m, **kw) for m in msgs[:2])
        assert r2.usage.prompt_tokens == len(_chat_ids(msgs[1]))
        assert _cached(r1.usage) == 0
        want = _expected(_chat_ids(msgs[1]), _chat_ids(msgs[0])) if s is on else 0
        assert _cached(r2.usage) == want and (want > 0 or s is off)
        chunks = list(c.chat.completions.create(messages=msgs[2], stream=True, stream_options={"include_usage": True},
                                                **kw))
        assert chunks[-1].usage.model_dump() == r2.usage.model_dump()
        # the Responses API: instructions a system message first, as chat renders them
        kw = dict(model="t", instructions=system + "responses", max_output_tokens=3, temperature=0)
        ids = [_chat_ids([{"role": "system", "content": kw["instructions"]}, {"role": "user", "content": a}])
               for a in asks]
        r1, r2 = (c.responses.create(input=a, **kw) for a in asks[:2])
        assert r2.usage.input_tokens == len(ids[1])
        # the first shares the template's head and the system text's with chat's prompts; the second, its first's too
        chat = [_chat_ids(m) for m in msgs]
        assert r1.usage.input_tokens_details.cached_tokens == (_expected(ids[0], *chat) if s is on else 0)
        assert r2.usage.input_tokens_details.cached_tokens == (_expected(ids[1], ids[0], *chat) if s is on else 0)
        for r, p in ((r1, ids[0]), (r2, ids[1])):
            details = r.usage.input_tokens_details
            assert details.cache_write_tokens == (len(p) // BS * BS - details.cached_tokens if s is on else 0)
        done = [e for e in c.responses.create(input=asks[2], stream=True, **kw)
                if e.type in ("response.completed", "response.incomplete")]  # (no EOS: max_output_tokens ends it)
        assert done[0].response.usage == r2.usage


def test_a_preempted_request_reports_its_first_admission(model):
    """Preempted while it prefills, ``b`` is recomputed from what is left of the cache: it reports what its first
    admission took (the shared prefix's whole blocks), not what its recompute did."""
    eng = _engine(model, blocks=12, block_size=BS, prefill_chunk=4)  # 11 blocks besides the null block
    head = _progression(5, 7, 2 * BS)
    eng.submit(head + [1], SamplingOptions(max_tokens=1), lambda e: None)
    eng.run_until_idle()
    a = eng.submit(_progression(1, 1, 4), SamplingOptions(max_tokens=36), lambda e: None)
    while len(a.blocks) < 3:
        eng.step()
    told, preemptions = [], eng.metrics.preemptions._value
    b = eng.submit(head + _progression(2, 3, 24), SamplingOptions(max_tokens=2),
                   lambda e: told.append((e.cached_tokens, preemptions.get())))
    eng.run_until_idle()
    assert told[0][1] > 0 and b.n_shared != 2 * BS  # preempted before its first token; its recompute took another count
    assert [n for n, _ in told] == [_expected(b.prompt, head + [1]), None]  # with its first token only


def test_blocks_from_the_on_disk_tier_count(model, tmp_path):
    """A new engine over the same ``--prefix-cache`` directory: the prompt's whole blocks come from disk, then its
    fork's from memory (loaded by the first)."""
    p = _progression(2, 3, 30)
    told = []
    for run, prompts in enumerate(([p], [p, p[:13] + [1]])):
        eng = _engine(model, block_size=BS, prefix_cache=open_disk_prefix_cache(model, tmp_path, torch.float32, BS))
        for q in prompts:
            eng.submit(q, SamplingOptions(max_tokens=2), lambda e, run=run: told.append((run, e.cached_tokens)))
            eng.run_until_idle()
    assert eng.cfg.prefix_cache.stats.hits == (len(p) - 1) // BS  # (the tier's own count: the loads were from disk)
    assert told == [(0, 0), (0, None), (1, _expected(p, p)), (1, None), (1, _expected(p[:13] + [1], p)), (1, None)]


def test_input_items_pages_and_delete(on):
    c = on.client()
    items = [{"role": "developer", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello "},
                                                             {"type": "input_text", "text": "world"}]},
             {"role": "assistant", "content": "hi", "id": "msg_given"},
             {"role": "user", "content": "again"},
             {"role": "system", "content": "last"}]
    r = c.responses.create(model="t", input=items, max_output_tokens=2, temperature=0)
    listed = c.responses.input_items.list(r.id, order="asc")
    assert [(i.type, i.role) for i in listed.data] == [("message", m["role"]) for m in items]
    assert [[p.text for p in i.content] for i in listed.data] == [["be brief"], ["hello ", "world"], ["hi"],
                                                                  ["again"], ["last"]]
    assert listed.data[1].content[0].type == "input_text" and listed.data[2].content[0].type == "output_text"
    ids = [i.id for i in listed.data]
    assert ids[2] == "msg_given" and len(set(ids)) == len(ids) and not listed.has_more
    assert [i.id for i in c.responses.input_items.list(r.id).data] == ids[::-1]  # desc by default
    raw = httpx.get(f"{on.url}/v1/responses/{r.id}/input_items", params={"limit": 2, "order": "asc"}).json()
    assert raw["object"] == "list" and [i["id"] for i in raw["data"]] == ids[:2]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (ids[0], ids[1], True)
    for order, seq in (("asc", ids), ("desc", ids[::-1])):
        for k in range(len(ids)):  # after each item: the ones after it in that order
            page = c.responses.input_items.list(r.id, order=order, after=seq[k], limit=2)
            assert [i.id for i in page.data] == seq[k + 1:k + 3] and page.has_more == (k + 3 < len(ids))
        # the client's pages, each after the last one's last id: every item once
        assert [i.id for i in c.responses.input_items.list(r.id, order=order, limit=2)] == seq
    one = c.responses.create(model="t", input="just this", max_output_tokens=1)
    [item] = c.responses.input_items.list(one.id).data
    assert (item.role, item.content[0].type, item.content[0].text) == ("user", "input_text", "just this")
    # a chained response was generated from the conversation: the previous one's items and output, then its own
    chained = c.responses.create(model="t", input="and then", previous_response_id=one.id, max_output_tokens=1)
    listed = c.responses.input_items.list(chained.id, order="asc").data
    assert [i.id for i in listed] == [item.id, one.output[0].id, listed[2].id] and listed[2].content[0].text == \
        "and then" and (listed[1].type, listed[1].role) == ("message", "assistant")
    url = f"{on.url}/v1/responses/{r.id}/input_items"
    for q, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                     ({"order": "up"}, "order"), ({"after": "msg_unknown"}, "after")):
        _error(httpx.get(url, params=q), 400, param)
    # DELETE: OpenAI's shape; then the response is gone
    gone = httpx.delete(f"{on.url}/v1/responses/{one.id}")
    assert gone.status_code == 200 and gone.json() == {"id": one.id, "object": "response.deleted", "deleted": True}
    assert c.responses.delete(r.id) is None
    for rid in (r.id, one.id):
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(rid)
        with pytest.raises(openai.NotFoundError):
            c.responses.delete(rid)
        with pytest.raises(openai.NotFoundError):
            c.responses.input_items.list(rid)
        _error(httpx.delete(f"{on.url}/v1/responses/{rid}"), 404)
        _error(httpx.post(on.url + "/v1/responses", json=dict(model="t", input="x", previous_response_id=rid)), 400,
               "previous_response_id")
