"""OpenAI's top-level ``reasoning_effort`` (``flyer.data.chat_template.effort_kwargs``) through the official openai
client, a server on loopback over an engine stand-in that records each prompt it is given:

- a Jinja template sees it as the variable ``reasoning_effort`` and ``enable_thinking`` true unless "none", as vLLM's
  server passes them: the prompt is transformers' ``apply_chat_template(..., reasoning_effort=E,
  enable_thinking=E != "none")``, for a gpt-oss-like template that writes the effort and for Qwen3's real one
  ("none" closes its think block); a template reading neither renders as without it;
- DeepSeek-V4's encoder: "none" chat mode, "low" / "high" / "max" thinking mode at the release's level (its effort
  prompt first), the reasoning parser then reading the answer's reasoning; V3.2's encoder (no effort control)
  renders as without it;
- a value outside OpenAI's, a V4 value naming no level of the release (minimal, medium, xhigh), and one that
  contradicts ``chat_template_kwargs`` answer 400 in OpenAI's error shape, naming ``reasoning_effort``."""

import contextlib
from pathlib import Path

import openai
import pytest
from served import client, serving
from test_serve_tools_v3 import _Scripted
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from flyer.data.chat_template import DEFAULT_CHAT_TEMPLATE
from flyer.data.deepseek_encoding import ENCODINGS, REASONING_EFFORT, encode_v32, encode_v4
from flyer.infer.cli import ByteTokenizer
from flyer.serve.api import Api
from flyer.serve.request import Limits

QWEN3 = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
# gpt-oss's shape (this test's own): the effort written into the system header, "medium" when unset
GPT_OSS = ("<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
           "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
           "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
ASK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
BYTES = ByteTokenizer()


class _Recording(_Scripted):
    """``_Scripted``, keeping each prompt it is given (as text: byte tokens)."""

    def __init__(self, limits: Limits, script: list[int]):
        super().__init__(limits, script)
        self.prompts: list[str] = []

    def submit(self, prompt, opts, emit):
        self.prompts.append(BYTES.decode(prompt))
        return super().submit(prompt, opts, emit)


@contextlib.contextmanager
def _serving(template, script: str = "ok", parser: str | None = None):
    """The API over ``_Recording`` (byte tokens, writing ``script``) with ``template``, on a free loopback port
    while in the block: (the engine stand-in, an openai client)."""
    engine = _Recording(Limits(vocab_size=256, max_seq_len=1 << 14, block_size=16, capacity=1 << 10, max_queue=8),
                        BYTES.encode_ids(script))
    with serving(Api(engine, BYTES, "tiny-test", chat_template=template, reasoning_parser=parser)) as url:
        yield engine, client(url)


def _prompt(engine, c, **kw) -> str:
    """The prompt the engine was given for ``ASK`` with the request's fields ``kw``, streamed and not (the same)."""
    c.chat.completions.create(model="tiny-test", messages=ASK, max_tokens=2, **kw)
    list(c.chat.completions.create(model="tiny-test", messages=ASK, max_tokens=2, stream=True, **kw))
    whole, streamed = engine.prompts[-2:]
    assert whole == streamed
    return whole


def _transformers(template: str, **kw) -> str:
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    return hf.apply_chat_template(ASK, chat_template=template, tokenize=False, add_generation_prompt=True, **kw)


@pytest.mark.parametrize("template", [GPT_OSS, QWEN3], ids=["gpt-oss-shape", "qwen3"])
def test_a_jinja_template_sees_the_effort_as_vllm_passes_it(template):
    with _serving(template) as (engine, c):
        plain = _prompt(engine, c)
        assert plain == _transformers(template)
        got = {e: _prompt(engine, c, reasoning_effort=e) for e in EFFORTS}
        for e, prompt in got.items():
            assert prompt == _transformers(template, reasoning_effort=e, enable_thinking=e != "none"), e
        if template is GPT_OSS:
            assert len(set(got.values())) == len(EFFORTS) and "Reasoning: xhigh<|end|>" in got["xhigh"]
        else:  # Qwen3 reads enable_thinking only: "none" closes the think block, the others think (its default)
            assert got["none"].endswith("<think>\n\n</think>\n\n") and got["high"] == plain
            assert set(got.values()) == {plain, got["none"]}
        # the request's own enable_thinking wins (as vLLM's), and the same effort in both places is one request
        both = dict(reasoning_effort="none", extra_body={"chat_template_kwargs": {"enable_thinking": True,
                                                                                 "reasoning_effort": "none"}})
        assert _prompt(engine, c, **both) == _transformers(template, reasoning_effort="none", enable_thinking=True)


def test_a_template_that_reads_no_effort_renders_as_without_it():
    with _serving(DEFAULT_CHAT_TEMPLATE) as (engine, c):
        plain = _prompt(engine, c)
        assert all(_prompt(engine, c, reasoning_effort=e) == plain for e in EFFORTS)


def test_deepseek_v4_maps_the_effort_onto_its_release_levels():
    v4, asked = ENCODINGS["deepseek_v4"], ASK + [{"role": "user", "content": "and 3+3?"}]
    with _serving(v4, "add</think>4", parser="deepseek") as (engine, c):
        want = {"none": encode_v4(ASK), "low": encode_v4(ASK, thinking=True),
                "high": encode_v4(ASK, thinking=True, reasoning_effort="high"),
                "max": encode_v4(ASK, thinking=True, reasoning_effort="max")}
        for e, text in want.items():
            assert _prompt(engine, c, reasoning_effort=e) == text, e
        assert want["max"].startswith("<｜begin▁of▁sentence｜>" + REASONING_EFFORT["max"])
        assert want["low"].endswith("<think>") and want["none"].endswith("</think>")
        # thinking mode's output is read by the parser: reasoning up to </think>, the answer after it
        m = c.chat.completions.create(model="tiny-test", messages=ASK, reasoning_effort="max").choices[0].message
        assert (m.reasoning_content, m.content) == ("add", "4")
        m = c.chat.completions.create(model="tiny-test", messages=ASK, reasoning_effort="none").choices[0].message
        assert (m.reasoning_content, m.content) == (None, "add</think>4")
        # the same level in chat_template_kwargs agrees; a conversation of several turns renders as the encoder's
        same = {"chat_template_kwargs": {"thinking": True, "reasoning_effort": "high"}}
        assert _prompt(engine, c, reasoning_effort="high", extra_body=same) == want["high"]
        c.chat.completions.create(model="tiny-test", messages=asked, max_tokens=1, reasoning_effort="max")
        assert engine.prompts[-1] == encode_v4(asked, thinking=True, reasoning_effort="max")


def test_deepseek_v32_has_no_effort_control_and_renders_as_without_it():
    with _serving(ENCODINGS["deepseek_v32"]) as (engine, c):
        assert all(_prompt(engine, c, reasoning_effort=e) == encode_v32(ASK) for e in EFFORTS)


@pytest.mark.parametrize("template, effort, kwargs", [
    (GPT_OSS, "extreme", None), (GPT_OSS, "", None), (GPT_OSS, 3, None),  # not OpenAI's
    (ENCODINGS["deepseek_v4"], "HIGH", None),
    (ENCODINGS["deepseek_v4"], "medium", None), (ENCODINGS["deepseek_v4"], "minimal", None),  # no V4 level
    (ENCODINGS["deepseek_v4"], "xhigh", None),
    (GPT_OSS, "high", {"reasoning_effort": "low"}),  # contradicting chat_template_kwargs
    (ENCODINGS["deepseek_v4"], "high", {"reasoning_effort": "max"}),
    (ENCODINGS["deepseek_v4"], "none", {"thinking": True}), (ENCODINGS["deepseek_v4"], "max", {"thinking": False}),
    (ENCODINGS["deepseek_v4"], "none", {"reasoning_effort": "max"}),
], ids=["unknown", "empty", "number", "uppercase", "v4-medium", "v4-minimal", "v4-xhigh", "jinja-differs",
        "v4-level-differs", "v4-none-thinking", "v4-max-chat", "v4-none-level"])
def test_bad_efforts_answer_400_naming_the_field(template, effort, kwargs):
    body = {"reasoning_effort": effort, **({"chat_template_kwargs": kwargs} if kwargs else {})}
    with _serving(template) as (engine, c):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-test", messages=ASK, max_tokens=2, extra_body=body)
        err = e.value.response.json()["error"]
        assert e.value.status_code == 400 and set(err) == {"message", "type", "param", "code"}
        assert err["param"] == "reasoning_effort" and err["type"] == "invalid_request_error", err
        assert "reasoning_effort" in err["message"] and "\n" not in err["message"], err
        assert engine.prompts == []  # refused before anything ran
