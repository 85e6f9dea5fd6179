"""A message's content as OpenAI's list of text parts, rendered as the outside renderers render it:

- a Jinja template that loops over a message's content (vLLM's "openai" content format): it sees the list, and the
  server's prompt is transformers' ``apply_chat_template`` of the same messages;
- another template (vLLM's "string" format: DeepSeek V3.1's shape, Qwen3's real one): it sees the parts' text
  joined with "\\n", as vLLM's server joins them, so the prompt is transformers' for that string;
- DeepSeek-V3.2's / V4's encoders (``ChatEncoding``, the releases' Python code): "\\n" (vLLM's join before their
  encoders; the releases take strings), but V4's tool results "\\n\\n" (its release's ``merge_tool_messages``
  joins a tool result's text blocks so);
- ``content_format`` reads templates as vLLM's detection reads them (a loop over ``message['content']`` or
  ``message.content`` of a loop's item over ``messages``, an alias or slice of them, through filters);
- chat data caches (``flyer.data.chat_data``) are not stale under the rule: chat data takes string content only, and a
  build with the rule undone writes the same bytes under the same key.

The server's prompt is ``Api._chat_text`` over a request body as the openai client sends it."""

import json
from pathlib import Path

import pytest
from hf_models import make_tokenizer
from test_chat_build import FILES
from test_serve_reasoning import TEMPLATE as V31
from test_serve_tools_v3 import _Scripted
from test_sft import CHATS, TEMPLATE as SFT_TEMPLATE
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from flyer.data import chat_template, deepseek_encoding
from flyer.data.chat_data import prepare_chat
from flyer.data.chat_template import content_format
from flyer.data.deepseek_encoding import ENCODINGS
from flyer.errors import DataError
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer
from flyer.serve.api import Api
from flyer.serve.request import Limits
from flyer.serve.schema import ChatBody

QWEN3 = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
# a template of this test's own that reads parts (as multimodal ones do), and strings as they are
PARTS = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
         "{% if message['content'] is string %}{{ message['content'] }}"
         "{% else %}{% for part in message['content'] %}[{{ part['text'] }}]{% endfor %}{% endif %}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["first line", "second", ""]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def _parts(texts=TEXTS) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


MESSAGES = [{"role": "system", "content": _parts(["be brief", "and kind"])}, {"role": "user", "content": _parts()},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": _parts(["again"])}]


def _prompt(template, messages=MESSAGES, **body) -> str:
    """The server's prompt text for ``messages`` (``Api._chat_text``)."""
    t = Tokenizer(models.BPE())
    t.add_special_tokens(list(SPECIAL.values()))
    tok = TextTokenizer(t, eos=t.token_to_id("</s>"), bos=t.token_to_id("<s>"))
    api = Api(_Scripted(Limits(1 << 16, 4096, 16, 64, 8), []), tok, "tiny-test", chat_template=template)
    return api._chat_text(ChatBody.model_validate({"model": "tiny-test", "messages": messages, **body}))


def _transformers(template: str, messages, **kw) -> str:
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **SPECIAL)
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True, **kw)


def _joined(messages, sep="\n") -> list[dict]:
    return [{**m, "content": sep.join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]


def test_a_template_that_reads_parts_sees_them():
    want = _transformers(PARTS, MESSAGES)
    assert "[first line][second][]" in want
    assert _prompt(PARTS) == want


@pytest.mark.parametrize("template, kw", [(V31, {"thinking": True}), (QWEN3, {"enable_thinking": False})],
                         ids=["v3.1-shape", "qwen3"])
def test_a_template_that_reads_strings_sees_the_parts_joined(template, kw):
    want = _transformers(template, _joined(MESSAGES), **kw)
    assert "first line\nsecond\n" in want
    assert _prompt(template, chat_template_kwargs=kw) == want


def test_deepseek_encoders_join_as_their_releases_and_vllm():
    tool_turns = [{"role": "user", "content": _parts(["weather?", "in oslo"])},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": _parts(["sunny", "12C"])}]
    for name in ("deepseek_v32", "deepseek_v4"):
        enc = ENCODINGS[name]
        got = _prompt(enc, MESSAGES)
        assert got == enc.render(_joined(MESSAGES)) and "first line\nsecond\n" in got, name
        tool_sep = "\n\n" if name == "deepseek_v4" else "\n"
        got = _prompt(enc, tool_turns)
        want = enc.render(_joined(tool_turns[:2]) + _joined(tool_turns[2:], tool_sep))
        assert got == want and f"sunny{tool_sep}12C" in got, (name, got)


@pytest.mark.parametrize("template, fmt", [
    (None, "string"), (V31, "string"), (QWEN3, "string"), (PARTS, "openai"),
    ("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% set ms = messages[1:] %}{% for m in ms %}{% for p in m['content'] | list %}{{ p }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% set a = messages %}{% set b = a[1:] %}{% for m in b %}{% for p in m.content %}{% endfor %}{% endfor %}",
     "openai"),
    ("{% set first = messages[0] %}{% for p in first['content'] %}{{ p }}{% endfor %}", "string"),  # as vLLM
    ("{% for m in messages %}{% for t in m['tool_calls'] %}{{ t }}{% endfor %}{{ m['content'] }}{% endfor %}",
     "string"),
])
def test_content_format_reads_templates_as_vllm(template, fmt):
    assert content_format(template) == fmt


@pytest.mark.parametrize("template", ["jinja", "deepseek_v4", "deepseek_v32"])
def test_chat_data_caches_are_not_stale_under_the_parts_rule(tmp_path, monkeypatch, template):
    """The joined-parts rule (above) reaches no chat data cache, so its key needs no change: chat data refuses a
    message whose content is a list of parts (one line naming file, line and field; a cache holds strings only),
    and a build with the rule undone (``joined_parts`` passing every message as it is: the renderers before it) writes
    the same bytes under the same key. A change that lets chat data take parts must put that rule in the key
    (``flyer.data.chat_data.CHAT_VERSION``)."""
    make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok", config={})
    fmt = SFT_TEMPLATE if template == "jinja" else ENCODINGS[template]
    chats = [{"messages": c["messages"]} for c in CHATS[:6]]  # (the encoders' tools sections are not this test's)
    good = tmp_path / "chats.jsonl"
    good.write_text("".join(json.dumps(c) + "\n" for c in chats))
    now = prepare_chat(good, tmp_path / "now", tok, fmt)
    with monkeypatch.context() as m:  # the rule undone
        for module in (chat_template, deepseek_encoding):
            m.setattr(module, "joined_parts", lambda message, sep: message)
        before = prepare_chat(good, tmp_path / "before", tok, fmt)
    assert before.cache_dir.name == now.cache_dir.name and now.train.ids.size > 0
    assert all((before.cache_dir / f).read_bytes() == (now.cache_dir / f).read_bytes() for f in FILES)
    parts = [{**c, "messages": [{**c["messages"][0], "content": _parts(["a", "b"])}, *c["messages"][1:]]}
             for c in chats[:1]]
    bad = tmp_path / "parts.jsonl"
    bad.write_text(json.dumps(chats[1]) + "\n" + json.dumps(parts[0]) + "\n")
    with pytest.raises(DataError) as e:
        prepare_chat(bad, tmp_path / "parts", tok, fmt)
    assert str(e.value).startswith(f"{bad}:2: messages[0].content: expected a string") and "\n" not in str(e.value)
