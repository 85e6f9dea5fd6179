"""Preference-data edges a mutation sweep of ``flyer.data.pref_data`` found unpinned: a plain pair tokenized as
TRL's DPOTrainer tokenizes it (``trl.data_utils.common_prefix_length``, and EOS added only where the completion
lacks it), an empty tools list, a line's own chat_template_kwargs over the run's, and the length bound at
seq_len + 1 exactly."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from trl.data_utils import common_prefix_length

from flyer.data import tiktoken_file as tf
from flyer.data.chat_data import ChatSplit
from flyer.data.pref_data import (PairSampler, PrefSplit, pair_eval_batches, parse_pair, plain_pair, prepare_prefs,
                                   refuse_long)
from flyer.errors import DataError, FieldError
from flyer.interop.hf_tokenizer import TextTokenizer


def _byte_tok() -> TextTokenizer:
    return TextTokenizer(tf.tiktoken_tokenizer([bytes([b]) for b in range(256)], tf.DEFAULT_PATTERN, ["<|eos|>"]),
                         eos=256, named={"eos_token": "<|eos|>"})


class _ToyTok:
    """A tokenizer whose "x" + "y" merge into one token across the prompt/completion boundary; characters else."""

    def special_tokens(self):
        return {"eos_token": "</s>"}

    def encode_ids(self, text, add_special_tokens=True):
        ids, i = [1] if add_special_tokens else [], 0  # BOS 1
        while i < len(text):
            if text.startswith("</s>", i):
                ids, i = ids + [2], i + 4
            elif text.startswith("xy", i):
                ids, i = ids + [3], i + 2
            else:
                ids, i = ids + [ord(text[i])], i + 1
        return ids


def _trl_plain(tok, prompt, chosen, rejected):
    """TRL's DPOTrainer on a plain-text pair: EOS added unless the completion ends with it, the prompt the shorter
    common prefix of the two sides."""
    eos = tok.special_tokens()["eos_token"]
    sides = [tok.encode_ids(prompt + (c if c.endswith(eos) else c + eos)) for c in (chosen, rejected)]
    p = tok.encode_ids(prompt)
    n = min(common_prefix_length(p, s) for s in sides)
    return [(s, [0] * n + [1] * (len(s) - n)) for s in sides]


@pytest.mark.parametrize("prompt, chosen, rejected", [
    ("ab x", "y z", "q"),  # "x" + "y" merge on the chosen side only: the prompt is the shorter prefix
    ("ab ", "c</s>", "d"),  # a completion that ends with eos_token gets none added
])
def test_a_plain_pair_tokenizes_as_trl_does(prompt, chosen, rejected):
    assert plain_pair(_ToyTok(), prompt, chosen, rejected) == _trl_plain(_ToyTok(), prompt, chosen, rejected)


def test_an_empty_tools_list_is_no_tools():
    line = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}], "tools": []}
    assert parse_pair(json.dumps(line).encode(), Path("x.jsonl"), 1)[3] is None


def test_a_lines_own_chat_template_kwargs_win_over_the_runs(tmp_path):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}[{{ flag }}]"
                "{% endif %}<|eos|>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in [{**pair, "chat_template_kwargs": {"flag": "line"}}, pair,
                                                        pair]))
    tok = _byte_tok()
    data = prepare_prefs(p, tok, template, {"flag": "run"})
    texts = {}
    for split in (data.train, data.val):
        for s in range(2 * split.n_pairs):
            ids, _ = split.samples.conversation(s)
            texts[(int(split.lines[s // 2]), s % 2)] = tok.tok.decode(ids.tolist(), skip_special_tokens=False)
    assert len(texts) == 6 and "[line]" in texts[(1, 0)] and "[line]" in texts[(1, 1)]
    assert all("[run]" in t for (line, _), t in texts.items() if line != 1)


def test_a_side_of_seq_len_plus_one_tokens_fits_and_one_more_is_refused():
    lengths = [5, 5, 5, 6]  # pair 0 (line 3): 5, 5; pair 1 (line 7): 5, 6
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = PrefSplit(ChatSplit(np.zeros(sum(lengths), np.int64), np.ones(sum(lengths), np.uint8), offsets),
                      np.asarray([3, 7], np.int64), Path("p.jsonl"))
    refuse_long(split, 5)
    with pytest.raises(DataError, match=r"p.jsonl:7: prompt\+rejected is 6 tokens, more than seq_len\+1 = 5"):
        refuse_long(split, 4)


_PAIR = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}
_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<|eos|>{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")




def _prefs(tmp_path, *lines) -> Path:
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def test_one_pair_is_refused_naming_the_file(tmp_path):
    p = _prefs(tmp_path, _PAIR)
    with pytest.raises(DataError, match=re.escape(f"{p}: 1 preference pair(s); at least 2 are needed")):
        prepare_prefs(p, _byte_tok(), _TEMPLATE)
    assert prepare_prefs(_prefs(tmp_path, _PAIR, _PAIR), _byte_tok(), _TEMPLATE).val.n_pairs == 1


def test_an_empty_rejected_plain_completion_is_refused():
    with pytest.raises(DataError, match=r"x.jsonl:4: rejected: empty completion"):
        parse_pair(b'{"prompt": "hi", "chosen": "a", "rejected": ""}', Path("x.jsonl"), 4)


def test_a_completion_the_template_does_not_render_is_refused(tmp_path):
    silent = ("{% for m in messages %}{% if m.role != 'assistant' %}<{{ m.role }}>{{ m.content }}<|eos|>{% endif %}"
              "{% endfor %}")
    p = _prefs(tmp_path, _PAIR, _PAIR, _PAIR)
    with pytest.raises(DataError, match=re.escape(f"{p}:1: chosen: the completion renders no trained token")):
        prepare_prefs(p, _byte_tok(), silent)


def test_validation_batches_stop_at_n_batches():
    lengths = [3] * 10  # 5 pairs
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = PrefSplit(ChatSplit(np.arange(30, dtype=np.int64), np.ones(30, np.uint8), offsets),
                      np.arange(1, 6, dtype=np.int64), Path("p.jsonl"))
    assert [x.shape[0] for x, _ in pair_eval_batches(split, 2, 8, 2)] == [4, 4]
    assert [x.shape[0] for x, _ in pair_eval_batches(split, 2, 8, 9)] == [4, 4, 2]


def test_a_dpo_sampler_state_is_not_a_chat_samplers(tmp_path):
    data = prepare_prefs(_prefs(tmp_path, *[_PAIR] * 12), _byte_tok(), _TEMPLATE)
    sampler = PairSampler(data.train, 2, 32, 0)
    state = sampler.state_dict()
    assert state["kind"] == "dpo"
    with pytest.raises(DataError, match="kind='chat'"):
        sampler.load_state_dict({**state, "kind": "chat"})


def test_run_chat_template_kwargs_the_template_refuses_are_the_flags_error(tmp_path):
    with pytest.raises(FieldError) as e:
        prepare_prefs(_prefs(tmp_path, _PAIR, _PAIR), _byte_tok(), _TEMPLATE, {"messages": 1})
    assert e.value.field == "chat_template_kwargs" and not isinstance(e.value, DataError)


def test_a_lines_own_bad_chat_template_kwargs_name_the_line(tmp_path):
    """A line's own kwargs the template refuses are a bad line, named path:line as chat data names it; they were
    the renderer's FieldError, which the CLI words as the run's --chat-template-kwargs flag."""
    p = _prefs(tmp_path, _PAIR, {**_PAIR, "chat_template_kwargs": {"messages": 1}}, _PAIR)
    with pytest.raises(DataError, match=re.escape(f"{p}:2: ")):
        prepare_prefs(p, _byte_tok(), _TEMPLATE)
