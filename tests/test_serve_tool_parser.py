"""``flyer serve --tool-call-parser {auto,deepseek_v3,deepseek_v31}`` (vLLM's names for the two DeepSeek formats of
``flyer.serve.tools``): "auto" reads the format off the chat template; a name forces it whatever the template.

Through the openai client, over a scripted engine (``test_serve_tools_v3._Scripted``: each request writes a fixed
output, here a calls block in one format, byte tokens: markers as text): forcing each format on a template of the
other parses the calls written in the forced format (and serves the template's own format as content), streamed or
not; "required" and a named function send the engine the forced format's grammar (``tool_grammar``'s text), which
with a random model writes calls the forced parser reads. A bad name: exit 2, one line naming the flag."""

import contextlib

import pytest
import torch
from served import EngineServer, client, handed_to_http, serving
from test_serve_tools import ASK, TEMPLATE as TEMPLATE_V31, TOOLS
from test_serve_tools_v3 import CALLS, TEMPLATE_V3, _Scripted

from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.request import Limits
from flyer.serve.dsml import DSML_V32
from flyer.serve.tools import DEEPSEEK_V3 as F3, DEEPSEEK_V31 as F31, TOOL_PARSERS, tool_grammar

LIMITS = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
NAMED = {"type": "function", "function": {"name": "set_light"}}


class _Recording(_Scripted):
    """``_Scripted``, keeping each request's ``SamplingOptions``."""

    def __init__(self, limits, script):
        super().__init__(limits, script)
        self.opts = []

    def submit(self, prompt, opts, emit):
        self.opts.append(opts)
        return super().submit(prompt, opts, emit)


@contextlib.contextmanager
def _Serving(engine, template: str, parser: str):
    """``Api(engine, byte tokens, template, tool_call_parser=parser)`` on a free loopback port while in the block;
    yields (the api, an openai client)."""
    api = Api(engine, ByteTokenizer(), "tiny-test", chat_template=template, tool_call_parser=parser)
    with serving(api) as url:
        yield api, client(url)


def _answer(c, stream: bool, **kw) -> tuple[str | None, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) of one chat answer, whole or put together from its stream."""
    kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=1000, **kw)
    if not stream:
        ch = c.chat.completions.create(**kw).choices[0]
        calls = [(t.function.name, t.function.arguments) for t in ch.message.tool_calls or []]
        return ch.message.content, calls, ch.finish_reason
    content, calls, finish = "", [], None
    for chunk in c.chat.completions.create(stream=True, **kw):
        d = chunk.choices[0].delta
        content += d.content or ""
        calls += [(t.function.name, t.function.arguments) for t in d.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return content or None, calls, finish


# (template, parser, the format calls are read in): auto is the template's; a name forces its format on either
CASES = [(TEMPLATE_V3, "auto", F3), (TEMPLATE_V31, "auto", F31), (TEMPLATE_V3, "deepseek_v31", F31),
         (TEMPLATE_V31, "deepseek_v3", F3), (TEMPLATE_V3, "deepseek_v3", F3), (TEMPLATE_V31, "deepseek_v31", F31)]


@pytest.mark.parametrize("template,parser,fmt", CASES)
def test_the_parser_forces_the_format_calls_are_read_and_constrained_in(template, parser, fmt):
    other = F31 if fmt is F3 else F3
    tok = ByteTokenizer()
    for written in (fmt, other):
        script = tok.encode_ids("Sure." + written.render(CALLS))
        engine = _Recording(LIMITS, script)
        with _Serving(engine, template, parser) as (api, c):
            assert api.tool_format is fmt
            for stream in (False, True):
                got = _answer(c, stream)
                if written is fmt:  # the forced (or template's) format: parsed
                    assert got == ("Sure.", CALLS, "tool_calls"), (stream, got)
                else:  # the other one: content
                    assert got == ("Sure." + written.render(CALLS), [], "stop"), (stream, got)
            # constrained: the grammar sent to the engine is the chosen format's
            functions = [t["function"] for t in TOOLS]
            engine.opts.clear()
            _answer(c, False, tool_choice="required")
            _answer(c, False, tool_choice=NAMED, parallel_tool_calls=False)
            assert [o.grammar for o in engine.opts] == [tool_grammar(functions, tok, None, True, fmt),
                                                        tool_grammar(functions, tok, "set_light", False, fmt)]
            assert tool_grammar(functions, tok, fmt=fmt) != tool_grammar(functions, tok, fmt=other)


def test_a_forced_format_is_written_by_a_random_model_and_read_back():
    """A real engine (tiny random model, byte tokens): the V3.1 template forced to deepseek_v3 under a named
    tool_choice writes a V3-0324 block (the fence, the type) that comes back as the call."""
    torch.manual_seed(0)
    engine = Engine(Transformer(preset("tiny")).eval(), EngineConfig(kv_cache_bytes=64 * 4 * 384 * 8, block_size=4,
                                                                     cache_dtype=torch.float32, prefill_chunk=8),
                    tokenizer=ByteTokenizer())
    written, submit = [], engine.submit

    def tap(prompt, opts, emit, bounded=True):  # the tokens the engine writes (byte tokens: the text's bytes)
        def heard(e):
            written.extend([e.token] if e.token is not None else [])
            emit(e)
        return submit(prompt, opts, heard, bounded)
    engine.submit = tap
    with EngineServer(engine, lambda link: Api(link, ByteTokenizer(), "tiny-test", chat_template=TEMPLATE_V31,
                                               tool_call_parser="deepseek_v3")) as s:
        r = s.client().chat.completions.create(model="tiny-test", messages=ASK, tools=TOOLS[1:], max_tokens=300,
                                               temperature=1.0, seed=1, tool_choice=NAMED)
        ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and [t.function.name for t in ch.message.tool_calls] == ["set_light"]
    head = F3.calls_begin + F3.call_begin + F3.call_type + F3.sep + "set_light" + F3.args_open
    assert bytes(written).decode().startswith(head)


def test_the_flag_reaches_the_api(monkeypatch):
    """``flyer serve --tool-call-parser deepseek_v3`` (the preset has no template: auto would be V3.1's): the HTTP
    process's ``Api``, built from what the command hands it, reads and constrains calls in V3-0324's format."""
    for parser, fmt in (("deepseek_v3", F3), ("auto", F31), ("deepseek_v32", DSML_V32)):
        limits, *args = handed_to_http(monkeypatch, "--tool-call-parser", parser)
        assert Api(_Scripted(limits, []), *args).tool_format is fmt


def test_api_and_cli_refuse_another_name(capsys):
    assert set(TOOL_PARSERS) == {"deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4", "kimi_k2"}
    with pytest.raises(FieldError, match="tool_call_parser"):
        Api(_Scripted(LIMITS, []), ByteTokenizer(), "tiny-test", tool_call_parser="hermes")
    assert main(["serve", "--preset", "tiny", "--tool-call-parser", "hermes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flyer: error: --tool-call-parser: invalid choice: 'hermes'") and err.count("\n") == 1
