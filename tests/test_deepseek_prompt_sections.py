"""The parts of DeepSeek-V3.2's and V4's encodings beyond turns and tools (``flyer.data.deepseek_encoding``): the
system prompt's response format section and V4's ``latest_reminder`` role, in the encoder, in ``flyer serve`` and in
``flyer train``'s chat data.

Expected prompts are written out by hand from the releases' encoders (``encoding_dsv32.py`` / ``encoding_dsv4.py``:
``response_format_template`` after the tools section on a system message, in a developer turn before V3.2's
"# The user's message is:" and after V4's content; ``<｜latest_reminder｜>CONTENT`` with V4's transition rule; the
reminder placed as in V4's test conversation: system, reminder, user). Serve, through the openai client on a random
tiny V3.2 checkpoint: a request's response_format is in the prompt the engine gets (prompt tokens), the grammar still
holds the output to the schema; "text" writes nothing; latest_reminder answers 400 naming messages[i].role where the
format has no such role, and reaches V4's prompt (an engine stand-in records it). Chat data under V4's encoding: a
line's response_format and a reminder render as serve renders them, and the mask is the assistant's text only;
bad lines are refused naming file:line and the field."""

import functools
import json

import httpx
import openai
import pytest
from test_serve_dsml import ASK, v32_checkpoint, v32_server
from test_serve_structured import _valid
from test_serve_tools_v3 import _Scripted, _serving
from transformers import AddedToken, PreTrainedTokenizerFast

from flyer.data.chat_data import encode_conversation, prepare_chat
from flyer.data.deepseek_encoding import ENCODINGS, REASONING_EFFORT, encode_v4, encode_v32, tools_section
from flyer.errors import DataError, FieldError
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.serve.request import Limits
from flyer.serve.schema import ChatBody

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
LR = "<｜latest_reminder｜>"
RF = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
FMT = {"type": "json_schema", "json_schema": {"name": "weather", "description": "météo", "schema": SCHEMA}}
# FMT as the releases' to_json writes it: json.dumps' default separators, non-ASCII kept
FMT_TEXT = ('{"type": "json_schema", "json_schema": {"name": "weather", "description": "météo", "schema": {"type": '
            '"object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": '
            '9}}, "required": ["ok", "n"], "additionalProperties": false}}}')
OBJ, OBJ_TEXT = {"type": "json_object"}, '{"type": "json_object"}'
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
# V4's test conversation's shape: a reminder (date, place, client, language) between the system prompt and the user
REMINDED = [{"role": "system", "content": "You are flyer."}, {"role": "latest_reminder", "content": "2024-11-15,Oslo"},
            {"role": "user", "content": "Is it hot?"}, {"role": "assistant", "content": "No."},
            {"role": "user", "content": "Where else?"}]


def test_v32_response_format_section():
    assert encode_v32(ASK, response_format=FMT) == f"{B}{RF}{FMT_TEXT}{U}hello world{A}</think>"
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    assert encode_v32(system, response_format=OBJ, thinking=True) == \
        f"{B}Be brief.{RF}{OBJ_TEXT}{U}hello world{A}<think>"
    # after the tools section (which ends in a newline), on the same system message
    both = encode_v32(system, TOOLS, response_format=OBJ)
    assert both.endswith(f"</functions>\n{RF}{OBJ_TEXT}{U}hello world{A}</think>")
    ask = f"{U}hello world{A}</think>"
    assert both == encode_v32(system, TOOLS)[:-len(ask)] + f"{RF}{OBJ_TEXT}{ask}"
    # a developer turn's own (the releases' message field): before "# The user's message is:"
    dev = [{"role": "developer", "content": "rules", "response_format": OBJ}, *ASK]
    assert encode_v32(dev) == f"{B}{U}{RF}{OBJ_TEXT}\n\n# The user's message is: rules{A}</think>{ask}"
    # a system message's own, and the request's in its place
    own = [{"role": "system", "content": "S", "response_format": OBJ}, *ASK]
    assert encode_v32(own) == f"{B}S{RF}{OBJ_TEXT}{U}hello world{A}</think>"
    assert encode_v32(own, response_format=FMT) == f"{B}S{RF}{FMT_TEXT}{U}hello world{A}</think>"
    with pytest.raises(FieldError) as e:
        encode_v32([{"role": "system", "content": "S", "response_format": "json"}, *ASK])
    assert e.value.field == "messages[0].response_format"


def test_v4_response_format_section():
    assert encode_v4(ASK, response_format=FMT) == f"{B}{RF}{FMT_TEXT}{U}hello world{A}</think>"
    system = [{"role": "system", "content": "Be brief."}, *ASK]
    high = REASONING_EFFORT["high"]
    assert encode_v4(system, thinking=True, reasoning_effort="high", response_format=OBJ) == \
        f"{B}{high}Be brief.{RF}{OBJ_TEXT}{U}hello world{A}<think>"
    both = encode_v4(system, TOOLS, response_format=FMT)
    assert both == f"{B}Be brief.\n\n{tools_section(TOOLS, v4=True)}{RF}{FMT_TEXT}{U}hello world{A}</think>"
    assert both.endswith(f"to invoke tool calls.\n{RF}{FMT_TEXT}{U}hello world{A}</think>")
    # a developer turn's own: after its content
    dev = [{"role": "developer", "content": "rules", "response_format": OBJ}, {"role": "assistant", "content": "ok"}]
    assert encode_v4(dev) == f"{B}{U}rules{RF}{OBJ_TEXT}{A}</think>ok{E}"
    with pytest.raises(FieldError) as e:
        encode_v4([{"role": "developer", "content": "d", "response_format": ["json"]}])
    assert e.value.field == "messages[0].response_format"


def test_v4_latest_reminder():
    assert encode_v4(REMINDED) == (f"{B}You are flyer.{LR}2024-11-15,Oslo{U}Is it hot?{A}</think>No.{E}"
                                   f"{U}Where else?{A}</think>")
    # thinking mode: the reminder is context (kept, no header of its own), the last user turn opens the reasoning
    assert encode_v4(REMINDED, thinking=True) == (f"{B}You are flyer.{LR}2024-11-15,Oslo{U}Is it hot?{A}</think>No.{E}"
                                                  f"{U}Where else?{A}<think>")
    # after a user turn: the user turn ends with the header, as before an answer; it splits two user turns
    after = [{"role": "user", "content": "hi"}, {"role": "latest_reminder", "content": "r"}]
    assert encode_v4(after) == f"{B}{U}hi{A}</think>{LR}r"
    assert encode_v4([*after, {"role": "assistant", "content": "ok"}]) == f"{B}{U}hi{A}</think>{LR}rok{E}"
    assert encode_v4([*after, {"role": "user", "content": "b"}]) == f"{B}{U}hi{A}</think>{LR}r{U}b{A}</think>"
    # V3.2's encoder has no such role
    with pytest.raises(FieldError) as e:
        encode_v32(REMINDED)
    assert e.value.field == "messages[1].role"
    assert ENCODINGS["deepseek_v4"].roles[-1] == "latest_reminder" not in ENCODINGS["deepseek_v32"].roles


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny V3.2 directory, its tokenizer also holding <｜latest_reminder｜> (a special token in V4's)."""
    path = v32_checkpoint(tmp_path_factory.mktemp("v32") / "v32")
    hf = PreTrainedTokenizerFast.from_pretrained(path)
    hf.add_tokens([AddedToken(LR, special=True, normalized=False)], special_tokens=True)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(ckpt):
    s = v32_server(ckpt)
    yield s
    s.close()


def test_serve_writes_the_response_format_and_the_grammar_holds(served):
    c, api = served.client(), served.api
    for fmt, text in ((FMT, FMT_TEXT), (OBJ, OBJ_TEXT)):
        want = f"{B}{RF}{text}{U}hello world{A}</think>"
        assert api._chat_text(ChatBody(model="tiny-test", messages=ASK, response_format=fmt)) == want
        r = c.chat.completions.create(model="tiny-test", messages=ASK, response_format=fmt, max_tokens=60,
                                      temperature=1.0, seed=3, n=2)
        assert r.usage.prompt_tokens == len(served.tok.encode_ids(want, add_special_tokens=False))
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            out = json.loads(ch.message.content)
            assert _valid(out, SCHEMA) if fmt is FMT else isinstance(out, dict)
    # "text" (OpenAI's default: any output) writes nothing
    assert api._chat_text(ChatBody(model="tiny-test", messages=ASK, response_format={"type": "text"})) == \
        encode_v32(ASK)
    # V3.2's format has no latest_reminder: 400 naming the message's role
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-test", messages=[ASK[0], {"role": "latest_reminder", "content": "r"}],
                                  max_tokens=1)
    assert e.value.param == "messages[1].role" and "latest_reminder" in e.value.message


class _Recording(_Scripted):
    """The scripted engine stand-in, keeping each request's prompt ids."""

    def __init__(self, limits, script):
        super().__init__(limits, script)
        self.prompts = []

    def submit(self, prompt, opts, emit):
        self.prompts.append(list(prompt))
        return super().submit(prompt, opts, emit)


def test_serve_v4_renders_the_reminder_and_the_section_and_templates_refuse_it(ckpt):
    tok = load_tokenizer(ckpt)
    engine = _Recording(Limits(vocab_size=1 << 20, max_seq_len=8192, block_size=16, capacity=512, max_queue=8),
                        tok.encode_ids("{}", add_special_tokens=False) + [tok.eos_id()])
    with _serving(engine, tok, ENCODINGS["deepseek_v4"]) as (api, url):
        r = openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
            model="tiny-test", messages=REMINDED, response_format=OBJ, tools=TOOLS, max_tokens=4)
        want = (f"{B}You are flyer.\n\n{tools_section(TOOLS, v4=True)}{RF}{OBJ_TEXT}{LR}2024-11-15,Oslo{U}Is it hot?"
                f"{A}</think>No.{E}{U}Where else?{A}</think>")
        assert engine.prompts == [tok.encode_ids(want, add_special_tokens=False)]
        assert tok.tok.token_to_id(LR) in engine.prompts[0]  # one token, as V4's tokenizer has it
        assert r.choices[0].message.content == "{}"
    # a chat template's roles do not include it
    with _serving(engine, tok, None) as (api, url):
        got = httpx.post(url + "/v1/chat/completions", timeout=60, json=dict(model="tiny-test", messages=REMINDED))
        assert got.status_code == 400 and got.json()["error"]["param"] == "messages[1].role"


def _prepare(tmp_path, name: str, chats: list[dict], template=ENCODINGS["deepseek_v4"]):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return prepare_chat(path, tmp_path / "cache", load_tokenizer(tmp_path / "v32"), template)


CHATS = [{"response_format": FMT, "messages": [*REMINDED[:3], {"role": "assistant", "content": "Not at all."}]},
         {"response_format": OBJ, "messages": [{"role": "user", "content": "hello"},
                                               {"role": "latest_reminder", "content": "today"},
                                               {"role": "assistant", "content": "{}"}]}]
WHOLE = [f"{B}You are flyer.{RF}{FMT_TEXT}{LR}2024-11-15,Oslo{U}Is it hot?{A}</think>Not at all.{E}",
         f"{B}{RF}{OBJ_TEXT}{U}hello{A}</think>{LR}today{{}}{E}"]


def test_chat_data_renders_them_as_serve_and_trains_on_the_answer_only(tmp_path, ckpt):
    (tmp_path / "v32").symlink_to(ckpt)
    data = _prepare(tmp_path, "chats", CHATS)
    got = [data.train.conversation(0), data.val.conversation(0)]  # the last (of two) is held out
    raw = load_tokenizer(ckpt).tok
    for chat, whole, (ids, mask) in zip(CHATS, WHOLE, got):
        assert whole == ENCODINGS["deepseek_v4"].render(chat["messages"], response_format=chat["response_format"])
        enc = raw.encode(whole, add_special_tokens=False)
        answer = chat["messages"][-1]["content"] + E
        start = len(whole) - len(answer)  # the assistant's turn ends the conversation
        assert ids.tolist() == enc.ids
        assert mask.tolist() == [int(s >= start) for s, _ in enc.offsets] and sum(mask) > 0
        # the plain path (the build's fallback) masks the same
        render = functools.partial(ENCODINGS["deepseek_v4"].render, response_format=chat["response_format"])
        def encode(text: str) -> list[int]:
            return raw.encode(text, add_special_tokens=False).ids
        assert encode_conversation(chat["messages"], None, render, encode) == (ids.tolist(), mask.tolist())
        # neither the section nor the reminder is trained on
        for part in (RF + FMT_TEXT, RF + OBJ_TEXT, LR + "today", LR + "2024-11-15,Oslo"):
            if part in whole:
                a = whole.index(part)
                assert not any(m for m, (s, e) in zip(mask.tolist(), enc.offsets) if s < a + len(part) and e > a)
    # a template writes no response format, as serve writes none for it
    bare = [{"messages": c["messages"]} for c in CHATS]
    plain, fmt = _prepare(tmp_path, "plain", bare, None), _prepare(tmp_path, "fmt", CHATS, None)
    assert [fmt.train.conversation(0)[0].tolist(), fmt.val.conversation(0)[0].tolist()] == \
        [plain.train.conversation(0)[0].tolist(), plain.val.conversation(0)[0].tolist()]


@pytest.mark.parametrize("line, template, why", [
    ({"response_format": "json"}, "deepseek_v4",
     "response_format: expected an object whose type is text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema"}}, "deepseek_v4",
     r"response_format.json_schema: given with type json_schema and only then"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "s"}}}, "deepseek_v4",
     "response_format.json_schema: expected an object with a name string and a schema object"),
    ({"response_format": None,  # the line's would replace the system message's own
      "messages": [{"role": "system", "content": "s", "response_format": 3}, *CHATS[0]["messages"][1:]]},
     "deepseek_v4", r"messages\[0\].response_format: must be a JSON object"),
    ({}, "deepseek_v32", r"messages\[1\].role: DeepSeek-V3.2's encoding renders"),
])
def test_chat_data_refuses_bad_lines_naming_file_line_and_field(tmp_path, ckpt, line, template, why):
    (tmp_path / "v32").symlink_to(ckpt)
    with pytest.raises(DataError, match=r"bad.jsonl:1: " + why) as e:
        _prepare(tmp_path, "bad", [{**CHATS[0], **line}], ENCODINGS[template])
    assert "\n" not in str(e.value)


def test_a_reminder_prefix_renders_as_the_prompt():
    """The chat data mask and serve rely on it: a conversation's prefix up to an answer is its prompt."""
    render = ENCODINGS["deepseek_v4"].render
    for extra in (None, {"thinking": True}):
        whole = render(REMINDED + [{"role": "assistant", "content": "x"}], None, False, extra, OBJ)
        assert whole.startswith(render(REMINDED, None, True, extra, OBJ))
