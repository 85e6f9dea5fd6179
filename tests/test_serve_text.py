"""``flyer serve``'s text layer: chat content parts validated (400 naming the field), chat prompts tokenized
and rendered as transformers' ``apply_chat_template`` does (one BOS, its ``tojson``), stop strings cut at
the earliest match, and the logprobs of stopped and echoed completions equal between streaming and not."""

import codecs
import json
import random
from types import SimpleNamespace

import httpx
import jinja2
import openai
import pytest
from tokenizers import Tokenizer, decoders, models
from hf_models import build, make_tokenizer
from test_serve_api import _Running, _error
from trained import counting_model
from transformers import AutoTokenizer

from flyer.cli import main
from flyer.interop.hf import load_tokenizer
from flyer.data.chat_template import chat_renderer
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.api import Api, ChatBody
from flyer.serve.choice import Choice
from flyer.serve.engine import TokenEvent

V = 64


@pytest.fixture(scope="module")
def served():
    s = _Running(counting_model(V))
    # chat messages rendered as their bare content: the counting model's 64 byte tokens hold no template's headers
    s.api.render_chat = chat_renderer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    yield s
    s.close()


# ---- chat content parts --------------------------------------------------------------------------

@pytest.mark.parametrize("text", [None, 5, ["a"]])
def test_a_text_part_without_string_text_answers_400_naming_it(served, text):
    body = {"model": "tiny-test", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": text}]}]}
    err = _error(httpx.post(served.url + "/v1/chat/completions", json=body), 400, "messages[1].content[0].text")
    assert err["message"].startswith("messages[1].content[0].text: ")
    _error(httpx.post(served.url + "/v1/chat/completions", json={
        "model": "tiny-test", "messages": [{"role": "user", "content": [{"type": "text"}]}]}), 400,
        "messages[0].content[0].text")
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(model="tiny-test", messages=body["messages"], max_tokens=1)


def test_content_parts_render_as_their_text_joined(served):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    as_parts = ChatBody(model="tiny-test", messages=[{"role": "user", "content": parts}])
    # a template that reads strings: "\n" between parts, as vLLM joins them (tests/test_chat_content_parts.py)
    as_text = ChatBody(model="tiny-test", messages=[{"role": "user", "content": "a\nb"}])
    assert served.api._chat_prompt(as_parts) == served.api._chat_prompt(as_text)


def test_an_image_part_answers_400_instead_of_being_dropped(served):
    """A text model answered as if the image were not there (its part was dropped)."""
    parts = [{"type": "text", "text": "1 + 2 = ?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    body = {"model": "tiny-test", "messages": [{"role": "user", "content": parts}]}
    err = _error(httpx.post(served.url + "/v1/chat/completions", json=body), 400, "messages[0].content[1].type")
    assert "'image_url' parts are not supported" in err["message"]
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(model="tiny-test", messages=body["messages"], max_tokens=1)


# ---- chat templates as transformers renders and tokenizes them -------------------------------------

MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "again"}]


def _hf_dir(tmp_path, template=None):
    make_tokenizer(tmp_path)
    if template is not None:
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    (tmp_path / "config.json").write_text("{}")
    return load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)


def test_a_bos_template_gives_one_bos_as_transformers(tmp_path):
    """transformers encodes the rendered text without special tokens: the template's own BOS is the one."""
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    tok, hf = _hf_dir(tmp_path, template)
    api = Api(None, tok, "m", chat_template=template)
    ids = api._chat_prompt(ChatBody(model="m", messages=MSGS))
    expect = hf.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == list(expect) and ids.count(hf.bos_token_id) == 1


def test_the_default_template_keeps_the_tokenizers_bos(tmp_path):
    """Without a checkpoint template the prompt starts with the BOS a completion prompt gets, once."""
    tok, hf = _hf_dir(tmp_path)
    ids = Api(None, tok, "m")._chat_prompt(ChatBody(model="m", messages=MSGS))
    text = chat_renderer(None, {"eos_token": hf.eos_token})(MSGS)  # the BOS left to the tokenizer, as a completion's
    assert ids == tok.encode_ids(text) and ids.count(hf.bos_token_id) == 1
    assert chat_renderer(None, {"bos_token": "<s>"})(MSGS).startswith("<s><|system|>\nsys\n")


def test_tojson_renders_as_transformers(tmp_path):
    """transformers' ``tojson``: no HTML escaping, non-ASCII kept, keys in their order, indent/separators honoured."""
    template = ("{% for m in messages %}{{ m['content']|tojson }}{% endfor %}{{ {'b': 1, 'a': [1, 'é']}|tojson }}"
                "{{ {'z': {'y': 2}, 'x': 1}|tojson(indent=2) }}{{ [1, 2]|tojson(separators=(',', ':')) }}")
    _, hf = _hf_dir(tmp_path)
    msgs = [{"role": "user", "content": "<a & 'é'>"}]
    expect = hf.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert chat_renderer(template)(msgs) == expect
    assert "<a & 'é'>" in expect and '{"b": 1, "a"' in expect


CALLS = [{"role": "user", "content": "weather?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny", "name": None}]
# ChatML reading a message's content as a string or a list of parts (Qwen2.5-like; vLLM's "openai" content format)
PARTS = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}"
         "{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
         "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PLAIN = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% if m.name is defined %} ({{ m.name }}){% endif %}\n"
         "{% endfor %}")
# DeepSeek-V3 / R1's shape: an assistant's content added to text beside its calls unless it is none
DEEPSEEK = ("{% for m in messages %}{% if m['role'] == 'assistant' and 'tool_calls' in m %}"
            "{% if m['content'] is none %}<A><calls>{% else %}{{ '<A>' + m['content'] + '<calls>' }}{% endif %}"
            "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}")


def _flyer_text(tok, template, messages):
    return Api(None, tok, "m", chat_template=template)._chat_text(ChatBody(model="m", messages=messages))


@pytest.mark.parametrize("template", [PARTS, PLAIN])
def test_null_content_and_keys_render_as_transformers(tmp_path, template):
    """A null content beside tool calls (what the openai client sends back after a call), and any key set to null,
    reach the template as transformers 5's ``apply_chat_template`` passes them: left out. It failed a template that
    loops over parts (500) and rendered "None" in one that prints it."""
    tok, hf = _hf_dir(tmp_path)
    expect = hf.apply_chat_template(CALLS, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert _flyer_text(tok, template, CALLS) == expect and "None" not in expect


def test_null_content_a_template_adds_to_text_renders_as_no_text(tmp_path):
    """DeepSeek-V3 / R1's templates add an assistant's content to text beside its calls (unless it is none), which
    transformers 5 fails on once it leaves the null out: the message is rendered with no text, as vLLM passes it
    (the template's text for a null content)."""
    tok, hf = _hf_dir(tmp_path)
    with pytest.raises(jinja2.UndefinedError):
        hf.apply_chat_template(CALLS, chat_template=DEEPSEEK, tokenize=False)
    assert _flyer_text(tok, DEEPSEEK, CALLS) == "<user>weather?<A><calls><tool>sunny"


def test_a_template_failing_on_the_messages_answers_400_not_500(served):
    """Whatever a template raises while it renders a request's messages (a TypeError of its own arithmetic, not only
    Jinja's errors) is the request's fault: 400 naming messages (it was a 500); flyer's own code failing still answers
    500. A null content beside calls under a template that loops over a message's parts is served."""
    old, url = served.api.render_chat, served.url + "/v1/chat/completions"
    try:
        served.api.render_chat = chat_renderer("{{ messages[0]['content'] + 1 }}")
        err = _error(httpx.post(url, json={"model": "tiny-test", "messages": [{"role": "user", "content": "1"}]}), 400,
                     "messages")
        assert "TypeError" in err["message"]
        served.api.render_chat = lambda *a, **kw: 1 / 0  # flyer's own code failing, outside the template: a bug
        assert _error(httpx.post(url, json={"model": "tiny-test", "messages": [{"role": "user", "content": "1"}]}),
                      500)["type"] == "server_error"
        # the parts' text only: the counting model's 64 byte tokens hold no ChatML header
        served.api.render_chat = chat_renderer("{% for m in messages %}{% if m['content'] is string %}"
                                               "{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}"
                                               "{% endfor %}{% endif %}{% endfor %}")
        calls = [{**m, "content": "1" if m["content"] else None} for m in CALLS]
        r = served.client().chat.completions.create(model="tiny-test", messages=calls, max_tokens=1)
        assert r.usage.prompt_tokens == 2
    finally:
        served.api.render_chat = old


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.role }}:{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}",
    "{% for m in messages %}{{ m.role }}:\n{%- if m.role == 'assistant' -%}\n{% generation -%}\n{{ m.content }}|\n"
    "{%- endgeneration %}\n{% else %}{{ m.content }}{% endif %}{% endfor %}"])
def test_generation_markers_render_as_transformers(tmp_path, template):
    """transformers' ``{% generation %}`` assistant-mask markers (SmolLM3 / OLMo / TRL templates) render their body, as
    ``apply_chat_template`` renders them: the server's HTTP side failed to start on such a template."""
    tok, hf = _hf_dir(tmp_path)
    for msgs in (MSGS, MSGS[:3]):
        expect = hf.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert _flyer_text(tok, template, msgs) == expect


# a template reading a message's reasoning under transformers' name and under gpt-oss's
REASONING = ("{% for m in messages %}{{ m.role }}:{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
             "{% endif %}{% if m.thinking %}[{{ m.thinking }}]{% endif %}{{ m.content }}\n{% endfor %}")


@pytest.mark.parametrize("fields", [{"reasoning": "because"}, {"thinking": "because"},
                                    {"reasoning_content": "because"}, {"reasoning": "b", "thinking": "because"},
                                    {"reasoning": "because", "reasoning_content": None}])
def test_reasoning_fields_reach_the_template_as_transformers_aliases_them(tmp_path, fields):
    """An assistant's reasoning sent as ``reasoning`` (vLLM's name) or ``thinking`` reaches the template as
    ``reasoning_content`` and ``thinking`` too, the first of reasoning_content, thinking, reasoning given winning, as
    transformers 5's ``apply_chat_template`` passes it (it was dropped)."""
    tok, hf = _hf_dir(tmp_path)
    msgs = [MSGS[1], {"role": "assistant", "content": "yes", **fields}, MSGS[3]]
    expect = hf.apply_chat_template(msgs, chat_template=REASONING, tokenize=False, add_generation_prompt=True)
    assert "assistant:<think>because</think>[because]yes\n" in expect
    assert _flyer_text(tok, REASONING, msgs) == expect


# ---- stop strings and the tokens a cut text keeps ---------------------------------------------------

def _pieces(*texts):
    """A tokenizer whose token i decodes to texts[i] (several characters a token)."""
    return SimpleNamespace(decode=lambda ids: "".join(texts[i] for i in ids))


def _run(choice, ids):
    streamed, tokens = "", []
    for k, t in enumerate(ids):
        choice.add(TokenEvent(t, finish_reason="length" if k == len(ids) - 1 else None))
        streamed += choice.delta()
        tokens += choice.delta_tokens()
        if choice.finish_reason:
            break
    return streamed, tokens


@pytest.mark.parametrize("pieces,stops,text", [
    (("hell", "o"), ["ll", "he"], ""),  # list order would cut at "ll"
    (("he", "llo"), ["lo", "el"], "h"),
    (("ab", "cd", "ef"), ["de", "bcd", "cde"], "a"),
])
def test_the_earliest_stop_string_in_the_text_cuts_it(pieces, stops, text):
    c = Choice(_pieces(*pieces), stops)
    streamed, _ = _run(c, range(len(pieces)))
    assert (c.text, streamed, c.finish_reason) == (text, text, "stop")


@pytest.mark.parametrize("stops,text,kept", [
    (["bc"], "a", 1),  # "ab" partly kept: stays
    (["cd"], "ab", 1),  # "cd" starts at the cut: gone
    (["b", "f"], "a", 1),
    (["zz"], "abcdef", 3),
])
def test_a_cut_text_keeps_the_tokens_starting_before_the_cut(stops, text, kept):
    c = Choice(_pieces("ab", "cd", "ef"), stops)
    _, streamed = _run(c, range(3))
    assert c.text == text and c.kept() == kept and list(streamed) == list(range(kept))
    assert c.starts[:kept] == [0, 2, 4][:kept]


# ---- completions: streaming == non-streaming with stop, logprobs and echo ----------------------------

def _joined(chunks):
    """The one choice of streamed chunks, concatenated as a client would."""
    out = {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        for c in ch.choices:
            out["text"] += c.text
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                out[k] += getattr(c.logprobs, k) if c.logprobs is not None else []
    return out


def _whole(r):
    c = r.choices[0]
    return {"text": c.text, **{k: getattr(c.logprobs, k) for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                    "text_offset")}}


@pytest.mark.parametrize("echo", [False, True])
def test_stopped_logprobs_are_the_kept_tokens_streaming_or_not(served, echo):
    client = served.client()
    p = [(4 + 3 * i) % V for i in range(9)]
    kw = dict(model="tiny-test", prompt=p, max_tokens=12, temperature=0, logprobs=2, echo=echo)
    ref = client.completions.create(**kw).choices[0].text[len(bytes(p).decode()) if echo else 0:]
    stops = [ref[5:7], ref[3:5]]  # the second comes first in the text
    whole = _whole(client.completions.create(**kw, stop=stops))
    streamed = _joined(client.completions.create(**kw, stop=stops, stream=True))
    assert whole == streamed
    gen = whole["text"][len(bytes(p).decode()) if echo else 0:]
    assert gen == ref[:3] and len(whole["tokens"]) == (len(p) if echo else 0) + 3
    assert "".join(whole["tokens"]) == whole["text"]
    assert whole["text_offset"] == list(range(len(whole["text"])))  # one byte a token


def test_echo_streams_the_prompt_with_its_logprobs(served):
    client = served.client()
    p = [(7 + 2 * i) % V for i in range(11)]
    kw = dict(model="tiny-test", prompt=p, max_tokens=5, temperature=0, logprobs=3, echo=True)
    whole = _whole(client.completions.create(**kw))
    chunks = list(client.completions.create(**kw, stream=True))
    streamed = _joined(chunks)
    assert whole["token_logprobs"][0] is None and len(whole["tokens"]) == len(p) + 5
    assert whole == streamed
    first = chunks[0].choices[0]
    assert first.text == bytes(p).decode() and first.logprobs.tokens == whole["tokens"][:len(p)]


def test_stopped_chat_logprobs_are_the_kept_tokens_streaming_or_not(served):
    client = served.client()
    msgs = [{"role": "user", "content": bytes((4 + 3 * i) % V for i in range(9)).decode()}]
    kw = dict(model="tiny-test", messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    ref = client.chat.completions.create(**kw).choices[0].message.content
    kw["stop"] = [ref[5:7], ref[3:5]]
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert whole.message.content == "".join(c.delta.content or "" for c in chunks) == ref[:3]
    streamed = [t.model_dump() for c in chunks if c.logprobs for t in c.logprobs.content]
    assert [t.model_dump() for t in whole.logprobs.content] == streamed and len(streamed) == 3


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_chat_template_that_does_not_compile_is_one_line_before_serving(tmp_path, capsys, where):
    """Not a traceback from the HTTP process once the model is loaded: one line naming the file and the line, exit 2."""
    build("llama", tmp_path)
    broken = "{% for m in messages %}\n{{ m.content }"
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(broken)
    else:
        d = json.loads((tmp_path / where).read_text())
        (tmp_path / where).write_text(json.dumps({**d, "chat_template": broken}))
    capsys.readouterr()
    assert main(["serve", "--ckpt", str(tmp_path), "--port", "0", "--kv-cache-memory", "16M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flyer: error: {tmp_path / where}: the chat template does not compile (line 2: unexpected '}}')"]


@pytest.mark.parametrize("text,cut", [("aé", 1), ("x😀", 1), ("x😀", 2), ("x😀", 3)])
def test_a_final_token_inside_a_utf8_sequence_keeps_its_text(text, cut):
    """A choice that ends (length) inside a UTF-8 sequence reports, streamed and whole, the decode of all its ids
    (the incomplete sequence as U+FFFD, as transformers and vLLM decode it): held back only while more tokens may
    complete it, then given."""
    tok = ByteTokenizer()
    ids = list(text.encode())[:-cut]
    c, streamed = Choice(tok, stops=[]), ""
    for i, t in enumerate(ids):
        c.add(TokenEvent(t, finish_reason="length" if i == len(ids) - 1 else None))
        streamed += c.delta()
    assert c.text == streamed == tok.decode(ids) and c.text.endswith("\ufffd")
    assert c.finish_reason == "length"


def _bytes_fed(data: bytes, stops: list[str]) -> tuple[Choice, list[int]]:
    """A choice fed ``data`` a byte token at a time (the last "length"), streamed as the API streams it: the
    indices of the tokens whose logprobs its chunks report."""
    c, streamed = Choice(ByteTokenizer(), stops), []
    for k, t in enumerate(data):
        c.add(TokenEvent(t, finish_reason="length" if k == len(data) - 1 else None))
        c.delta()
        streamed += c.delta_tokens()
        if c.finish_reason is not None:
            break
    return c, streamed


@pytest.mark.parametrize("text", ["a字b", "€\u200d字?f한", "x😀y", "é😀字z"])
def test_the_bytes_of_a_character_start_where_it_does(text):
    """A 3- or 4-byte character's middle bytes started past it (their first bytes' U+FFFD counted as a character
    of the text) and its last byte at it: starts went backwards, so a stream reported tokens' logprobs twice and a
    stop string dropped the character's last bytes' (``kept`` and ``delta_tokens`` bisect the starts)."""
    c, streamed = _bytes_fed(text.encode(), [])
    want = [i for i, ch in enumerate(text) for _ in ch.encode()]
    assert c.starts == want and streamed == list(range(len(c.ids)))
    c, _ = _bytes_fed(text.encode(), [text[-1]])
    assert c.text == text[:-1] and c.kept() == len(text[:-1].encode())


def _byte_owners(data: bytes) -> list[int]:
    """Where each byte's text starts in ``data``'s decode, by Python's incremental UTF-8 decoder (the oracle): a
    byte it holds pending starts the character to come; one it consumed is in the last character it gave."""
    dec, out, own = codecs.getincrementaldecoder("utf-8")("replace"), 0, []
    for b in data:
        n = len(dec.decode(bytes([b])))
        pending = dec.getstate()[0]
        own.append(out + n if pending and pending[-1] == b else out + n - 1)
        out += n
    return own


def test_token_starts_and_kept_tokens_follow_the_utf8_decoder():
    """Random byte strings of whole characters, a literal U+FFFD, bytes no character takes and unfinished
    sequences, cut or not by a stop string: every byte token starts where the decoder puts its text, the stream
    reports each kept token's logprobs once, and the kept tokens are those starting before the cut."""
    rng = random.Random(0)
    pool = [b"a", b" ", "é".encode(), "字".encode(), "😀".encode(), "\ufffd".encode(), b"\x80", b"\xe5", b"\xe5\xad",
            b"\xf0\x9f", b"\xff", b"\xc3"]
    for _ in range(300):
        data = b"".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
        full, own = data.decode("utf-8", "replace"), _byte_owners(data)
        at = rng.randrange(len(full))
        stops = [full[at:at + rng.randint(1, 2)]] if rng.random() < 0.6 else []
        c, streamed = _bytes_fed(data, stops)
        cut = full.find(stops[0]) if stops else len(full)
        assert c.text == full[:cut] and c.starts == own[:len(c.ids)], (data, stops)
        assert c.kept() == sum(o < cut for o in own[:len(c.ids)]) and streamed == list(range(c.kept())), (data, stops)


def test_a_token_of_no_text_after_a_literal_replacement_character_starts_after_it():
    """A U+FFFD decoded from its own three bytes is a character: a token of no text after it (an id past the bytes,
    a skipped special token) starts after it, as after any other, not inside it (a stop right after the U+FFFD kept
    that token, its text at the cut)."""
    c, _ = _bytes_fed(bytes([0xEF, 0xBF, 0xBD]), [])
    for t in (300, ord("a")):
        c.add(TokenEvent(t, finish_reason="length" if t == ord("a") else None))
    assert c.starts == [0, 0, 0, 1, 1] and c.text == "\ufffda"
    cut = Choice(ByteTokenizer(), ["a"])
    for t in (0xEF, 0xBF, 0xBD, 300, ord("a")):
        cut.add(TokenEvent(t))
    assert cut.text == "\ufffd" and cut.kept() == 3


def _byte_fallback() -> TextTokenizer:
    """A SentencePiece-style tokenizer (Llama 2's, Mistral's): byte tokens <0xNN> at ids 3 + byte, tokenizers'
    ByteFallback decoder (one U+FFFD a byte of an unfinished sequence, where Python's decoder writes one)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.ByteFallback()
    return TextTokenizer(tok, eos=2)


def test_byte_fallback_tokens_start_where_the_utf8_decoder_puts_them():
    """Valid text spelled in <0xNN> tokens: each starts where Python's decoder puts its byte (a character's later
    bytes started one U+FFFD a byte past it, out of order), and a stop keeps every byte of the text before it. (A
    literal U+FFFD so spelled is left out: its bytes' U+FFFDs are its own character's, which text cannot tell; its
    later bytes start after it, still in order.)"""
    rng, tok = random.Random(1), _byte_fallback()
    for _ in range(200):
        text = "".join(rng.choice(["a", " ", "é", "字", "😀"]) for _ in range(rng.randint(1, 8)))
        data, own = text.encode(), _byte_owners(text.encode())
        at = rng.randrange(len(text))
        stops = [text[at:at + rng.randint(1, 2)]] if rng.random() < 0.6 else []
        c, streamed = Choice(tok, stops), []
        for k, b in enumerate(data):
            c.add(TokenEvent(3 + b, finish_reason="length" if k == len(data) - 1 else None))
            c.delta()
            streamed += c.delta_tokens()
            if c.finish_reason is not None:
                break
        cut = text.find(stops[0]) if stops else len(text)
        assert c.text == text[:cut] and c.starts == own[:len(c.ids)], (text, stops)
        assert c.kept() == sum(o < cut for o in own[:len(c.ids)]) and streamed == list(range(c.kept())), (text, stops)


# R1 / Qwen's shape: a branch per role it knows, none for developer
NO_DEVELOPER = ("{% for m in messages %}{% if m['role'] == 'system' %}[S]{{ m['content'] }}"
                "{% elif m['role'] == 'user' %}[U]{{ m['content'] }}{% endif %}{% endfor %}[A]")
WITH_DEVELOPER = NO_DEVELOPER.replace("{% endif %}", "{% elif m['role'] == 'developer' %}[D]{{ m['content'] }}"
                                                     "{% endif %}")


def test_a_developer_message_reaches_a_template_without_its_branch_as_system(tmp_path):
    """OpenAI's developer role (Codex sends it) is instructions: a template with no branch for it dropped it
    silently (the prompt as without it); it renders as a system message there, as vLLM and llama.cpp map it, and
    as itself where the template names it or with flyer's default."""
    tok, _ = _hf_dir(tmp_path)
    dev = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    sys_ = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert _flyer_text(tok, NO_DEVELOPER, dev) == _flyer_text(tok, NO_DEVELOPER, sys_) == "[S]be brief[U]hi[A]"
    assert _flyer_text(tok, WITH_DEVELOPER, dev) == "[D]be brief[U]hi[A]"
    assert "developer" in _flyer_text(tok, None, dev)
