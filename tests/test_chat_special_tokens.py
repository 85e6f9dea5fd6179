"""A chat template sees the special tokens transformers' tokenizer names (its ``special_tokens_map``:
tokenizer_config.json's bos/eos/unk/pad/... tokens, or special_tokens_map.json's for a directory
saved by older transformers), not the texts of the first BOS and EOS ids: Llama 3.1's eos_token is
<|eot_id|> while its generation_config lists <|end_of_text|> first. flyer serve's rendering of an HF
directory equals transformers' ``apply_chat_template``, text and ids; every template sees ``documents``; the
config's flags of an added token win over tokenizer.json's, and its ``split_special_tokens`` holds, as transformers
reads them."""

import json
import shutil

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from flyer.interop.hf import load_tokenizer
from flyer.serve.api import Api, ChatBody
from flyer.data.chat_template import chat_renderer, read_chat_template
from tests.hf_models import build

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
            "{% if pad_token is defined %}(pad {{ pad_token }}){% endif %}"
            "{% if unk_token is defined %}(unk {{ unk_token }}){% endif %}[assistant]")
MSGS = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the fox"},
        {"role": "user", "content": "again"}]


def _edit(path, name, **fields):
    d = json.loads((path / name).read_text()) if (path / name).is_file() else {}
    d.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del d[k]
    (path / name).write_text(json.dumps(d))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A DeepseekV3 directory whose generation_config lists another id before the tokenizer's
    eos_token (</s>, id 2), as Llama 3.1's does, and whose template uses the named tokens."""
    path = tmp_path_factory.mktemp("special") / "src"
    build("v3", path)
    _edit(path, "generation_config.json", eos_token_id=[100, 2])
    _edit(path, "tokenizer_config.json", chat_template=TEMPLATE, unk_token="<pad>")
    return path


def _same_as_transformers(path) -> str:
    hf = AutoTokenizer.from_pretrained(path)
    api = Api(None, load_tokenizer(path), "m", chat_template=read_chat_template(str(path)))
    want = hf.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert api.render_chat(MSGS) == want
    ids = hf.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert api._chat_prompt(ChatBody(model="m", messages=MSGS)) == list(ids)
    return want


def test_the_template_sees_the_tokenizers_named_tokens(src):
    text = _same_as_transformers(src)
    assert "the fox</s>" in text and "(pad <pad>)" in text and "(unk <pad>)" in text
    assert load_tokenizer(src).eos_ids() == (100, 2)  # both still end generation, the first listed first


def test_special_tokens_map_of_an_older_save(src, tmp_path):
    """Saved without added_tokens_decoder (transformers 4's older files), special_tokens_map.json's
    tokens win over tokenizer_config.json's, as transformers 5 loads them."""
    old = shutil.copytree(src, tmp_path / "old")
    _edit(old, "tokenizer_config.json", added_tokens_decoder=None, eos_token="<s>")
    (old / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<s>"}))
    text = _same_as_transformers(old)
    assert "the fox</s>" in text and "(pad <s>)" in text


def test_documents_are_none_unless_given(src, tmp_path):
    """transformers passes ``documents`` to every template, None unless given: a retrieval template's ``documents is
    none`` holds, and documents given as chat_template_kwargs render as its ``documents=`` renders them."""
    path = shutil.copytree(src, tmp_path / "documents")
    _edit(path, "tokenizer_config.json", chat_template="{% if documents is none %}[no documents]{% else %}"
          "{% for d in documents %}[{{ d['title'] }}]{% endfor %}{% endif %}" + TEMPLATE)
    assert "[no documents]" in _same_as_transformers(path)
    docs = [{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]
    want = AutoTokenizer.from_pretrained(path).apply_chat_template(MSGS, documents=docs, tokenize=False,
                                                                   add_generation_prompt=True)
    render = chat_renderer(read_chat_template(str(path)), load_tokenizer(path).special_tokens())
    assert render(MSGS, extra={"documents": docs}) == want and "[a][b]" in want


def test_the_configs_token_flags_win_over_tokenizer_json(src, tmp_path):
    """Where tokenizer_config.json's ``added_tokens_decoder`` flags an added token otherwise than tokenizer.json (a
    config edited by hand), transformers 5 re-adds the config's over it: a token special there alone is dropped when
    decoding, an ``rstrip`` there alone takes the spaces after the token; flyer reads the directory the same."""
    path = shutil.copytree(src, tmp_path / "flags")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens(["<tool>"])  # a plain added token in tokenizer.json
    tok.save(str(path / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    _edit(path, "tokenizer_config.json", added_tokens_decoder={
        str(tok.token_to_id("<tool>")): {**flags, "content": "<tool>"},
        "2": {**flags, "content": "</s>", "rstrip": True}})
    hf, ours = AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    for text in ("a <tool> b", "the fox</s>  \n again <tool>"):
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode_ids(text, add_special_tokens=False) == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert "<tool>" not in ours.decode(hf.encode("a <tool> b", add_special_tokens=False))


def test_split_special_tokens_encodes_their_text_as_text(src, tmp_path):
    """``split_special_tokens: true`` in tokenizer_config.json: special-token text in a text is encoded as plain
    text, as transformers encodes it; without it, as the special token."""
    path = shutil.copytree(src, tmp_path / "split")
    text = "hello </s> world"
    assert load_tokenizer(path).encode_ids(text, add_special_tokens=False).count(2) == 1
    _edit(path, "tokenizer_config.json", split_special_tokens=True)
    ids = AutoTokenizer.from_pretrained(path).encode(text, add_special_tokens=False)
    assert load_tokenizer(path).encode_ids(text, add_special_tokens=False) == ids and 2 not in ids
