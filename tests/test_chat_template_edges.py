"""Edges of chat rendering (``flyer.data.chat_template``), tools as TypeScript declarations
(``flyer.data.tools_typescript``) and Hugging Face tokenizer directories (``flyer.interop.hf_tokenizer``).
Oracles: transformers' ``apply_chat_template`` and ``PreTrainedTokenizerFast`` on locally built tokenizers, and
hand-written declarations."""

import json

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from flyer.data.chat_template import DEFAULT_CHAT_TEMPLATE, ToolsSorted, chat_renderer
from flyer.data.tools_typescript import typescript_tools
from flyer.errors import CheckpointError
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer
from tests.hf_models import make_tokenizer


def fn(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def declared(body: str, name: str = "f") -> str:
    return f"# Tools\n\n## functions\nnamespace functions {{\ntype {name} = (_: {{\n{body}\n}}) => any;\n}}\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(hf_dir)


def test_typescript_integer_in_type_list_is_number():
    """A list of types maps integer to TypeScript's number, as a single integer type does."""
    schema = {"type": "object", "properties": {"n": {"type": ["integer", "null"]}}, "required": ["n"]}
    assert typescript_tools([fn("f", schema)]) == declared("  n: number | null")


def test_typescript_string_pattern_is_a_constraint():
    """A string's pattern is written on the constraint comment line, sorted with its other constraints."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a+$", "maxLength": 3}},
              "required": ["s"]}
    assert typescript_tools([fn("f", schema)]) == declared("  // maxLength: 3, pattern: ^a+$\n  s: string")


def test_typescript_falsy_defaults_are_written():
    """Defaults of 0, False and "" are declared like any other default (only a missing/null default is left out)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "default": 0},
                                                "b": {"type": "boolean", "default": False},
                                                "c": {"type": "string", "default": ""}}}
    assert typescript_tools([fn("f", schema)]) == declared(
        "  // Default: 0\n  a?: number,\n  // Default: False\n  b?: boolean,\n  // Default: \"\"\n  c?: string")


def test_typescript_object_items_nest_at_the_field_indent():
    """An array of objects (items without comments) closes the object at the array field's own indentation."""
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}, "required": ["xs"]}
    assert typescript_tools([fn("f", schema)]) == declared("  xs: Array<{\n    a: string\n  }>")


PROBE = ("{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ m.thinking }}|{{ m.reasoning_content }}|"
         "{{ m.tool_calls is defined }}]"
         "{% endfor %}{{ tools | tojson }}{% if add_generation_prompt %}<gen>{% endif %}")


def test_probe_template_matches_transformers(hf_tok):
    """None keys, reasoning aliases, tojson (non-ASCII, key order) and the generation prompt render as transformers'."""
    messages = [{"role": "user", "content": "héllo"},
                {"role": "assistant", "content": "ok", "thinking": "own", "reasoning_content": "rc",
                 "tool_calls": None},
                {"role": "assistant", "content": "x", "reasoning": "only"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "café ☕", "parameters": {
        "type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}}}]
    for gen in (True, False):
        want = hf_tok.apply_chat_template(messages, tools=tools, chat_template=PROBE, tokenize=False,
                                          add_generation_prompt=gen)
        assert chat_renderer(PROBE)(messages, tools, add_generation_prompt=gen) == want


def test_default_template_without_tools_list():
    """The default template writes no tools section for an empty tools list, as for none."""
    messages = [{"role": "user", "content": "hi"}]
    render = chat_renderer(None, {"bos_token": "<s>", "eos_token": "</s>"})
    assert render(messages, []) == render(messages, None) == "<s><|user|>\nhi\n<|assistant|>\n"
    assert "<|tools|>" in DEFAULT_CHAT_TEMPLATE


def _edit_json(path, **changes):
    d = json.loads(path.read_text()) if path.is_file() else {}
    d.update(changes)
    path.write_text(json.dumps(d))


def test_eos_ids_keep_generation_config_order_without_repeats(tmp_path):
    """generation_config.json's eos list wins over config.json's, keeps its order and drops repeats."""
    make_tokenizer(tmp_path)
    _edit_json(tmp_path / "generation_config.json", eos_token_id=[2, 0, 2], bos_token_id=[1, 0])
    tok = load_tokenizer(tmp_path, {"eos_token_id": 0, "bos_token_id": 0})
    assert tok.eos_ids() == (2, 0) and tok.eos_id() == 2 and tok.bos_id() == 1


def test_bool_and_huge_special_ids(tmp_path):
    """A boolean eos_token_id is no id (falls through to the tokenizer's name); one past 32 bits is an error."""
    make_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, {"eos_token_id": True}).eos_ids() == (2,)
    with pytest.raises(CheckpointError, match="eos_token_id"):
        load_tokenizer(tmp_path, {"eos_token_id": 2**31})


def test_named_special_tokens_empty_when_config_names_none(tmp_path):
    """A directory whose tokenizer files name no special tokens gives a template no bos/eos names."""
    make_tokenizer(tmp_path)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for k in ("bos_token", "eos_token", "pad_token"):
        tc.pop(k, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = load_tokenizer(tmp_path, {"eos_token_id": 2, "bos_token_id": 1})
    assert tok.eos_id() == 2 and tok.special_tokens() == {}


def test_typescript_skips_non_function_tools_even_with_a_function_key():
    """Only tools of type "function" are declared, whatever other keys a tool of another type carries."""
    other = {"type": "custom", "function": {"name": "g", "parameters": {"type": "object"}}}
    assert typescript_tools([other]) == ""


def test_eos_without_ids_is_the_first_known_name_in_the_vocabulary():
    """With no eos id given, the end-of-sequence token is the first of the known EOS names the vocabulary holds."""
    tok = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<|endoftext|>": 2}, unk_token="a"))
    text = TextTokenizer(tok)
    assert text.eos_id() == 2 and text.eos_ids() == (2,)
    assert text.special_tokens() == {"eos_token": "<|endoftext|>"}


def test_special_tokens_map_ignored_beside_added_tokens_decoder(tmp_path):
    """special_tokens_map.json does not override tokenizer_config.json's names when it has added_tokens_decoder."""
    make_tokenizer(tmp_path)
    _edit_json(tmp_path / "tokenizer_config.json", added_tokens_decoder={})
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<pad>", "bos_token": "</s>"}))
    named = load_tokenizer(tmp_path, {}).special_tokens()
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (named["eos_token"], named["bos_token"]) == (hf.eos_token, hf.bos_token) == ("</s>", "<s>")


def test_named_templates_pick_tool_use_only_when_tools_given():
    """Named templates render "tool_use" when tools are given (even an empty list), else "default"."""
    render = chat_renderer({"default": "D", "tool_use": "T"})
    assert render([], None) == "D" and render([], []) == "T" and render([], [fn("f", {})]) == "T"


def test_tools_sorted_template_sees_sorted_keys():
    """A ToolsSorted template sees the tools with their keys sorted at every depth."""
    render = chat_renderer(ToolsSorted("{{ tools | tojson }}"))
    assert render([], [{"b": {"d": 1, "c": 2}, "a": 0}]) == '[{"a": 0, "b": {"c": 2, "d": 1}}]'


def test_message_without_content_retried_with_empty_content():
    """A template failing on a message with no content renders it with empty content instead of raising."""
    render = chat_renderer("{% for m in messages %}{{ m['content'] + '|' }}{% endfor %}")
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert render([{"role": "assistant", "tool_calls": [call]}], add_generation_prompt=False) == "|"
