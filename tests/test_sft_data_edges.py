"""Edges of the fine-tuning data path (``flyer.data.chat_pack``, ``chat_sampler``, ``chat_encode``) a mutation sweep
found unpinned (each assertion fails on the mutant it names): a conversation longer than the row packed as its own
row holds it, packing replicas that share one stream, a conversation whose one target is a row's last, a resume
into a sampler that drew before, a changed pool refused on resume, and the fast encoder on tokenizers whose added
tokens nest or are normalized, and from a first trained turn past the first message."""

import string

import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers

from flyer.data.chat_data import ChatSplit, encode_conversation
from flyer.data.chat_encode import encode_conversation_fast, encode_conversations, token_splitter
from flyer.data.chat_pack import PackedChatSampler, packed_rows
from flyer.data.chat_sampler import ChatSampler, chat_rows, trainable
from flyer.data.errors import DataError

T = 16
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "sure"}]


def _split(lengths, mask=None) -> ChatSplit:
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.random.default_rng(0).integers(3, 100, off[-1]).astype(np.int64)
    if mask is None:
        mask = np.ones(off[-1], dtype=np.uint8)
        mask[off[:-1]] = 0
    return ChatSplit(ids, mask, off)


def test_a_packed_conversation_longer_than_the_row_is_its_unpacked_row():
    s = _split([T + 5, 4, 3])
    x, y, _ = packed_rows(s, [[0]], T)
    xa, ya = chat_rows(s, [0], T)
    assert np.array_equal(x, xa) and np.array_equal(y, ya) and int((y >= 0).sum()) == T


def test_packing_replicas_take_other_conversations():
    s = _split([5] * 40)
    replicas = [PackedChatSampler(s, 2, T, seed=3, replica=i, replicas=2) for i in range(2)]
    for step in range(3):
        seen = []
        for p in replicas:
            p.next_batch()
            seen.append(set(p.last_conversations))
        assert seen[0] and not seen[0] & seen[1], step


def test_a_conversation_whose_one_target_ends_its_row_is_trained():
    """Its only assistant token at position ``T`` is its row's last target: in the pool, once an epoch."""
    lengths = [T + 4, 6, 6]
    off = np.cumsum([0, *lengths])
    mask = np.zeros(off[-1], dtype=np.uint8)
    mask[T] = 1
    mask[off[1] + 3:off[2]] = 1
    mask[off[2] + 3:] = 1
    s = _split(lengths, mask)
    assert int((chat_rows(s, [0], T)[1] >= 0).sum()) == 1
    assert trainable(s, T)[0].tolist() == [0, 1, 2]
    assert sorted(ChatSampler(s, 3, T, seed=0).conversations(0).tolist()) == [0, 1, 2]


def test_a_sampler_that_drew_resumes_the_saved_stream():
    """A batch drawn before the state is loaded (its epoch's order cached) does not leak into the resumed stream."""
    s = _split([5] * 20)
    run = ChatSampler(s, 4, T, seed=7)
    for _ in range(2):
        run.next_batch()
    resumed = ChatSampler(s, 4, T, seed=0)
    resumed.next_batch()
    resumed.load_state_dict(run.state_dict())
    assert [resumed.conversations(k).tolist() for k in range(2, 6)] == [run.conversations(k).tolist()
                                                                     for k in range(2, 6)]


def test_a_pool_changed_at_the_same_token_count_is_refused_on_resume():
    """One conversation no longer trained (a template's mask changed): the same tokens, another pool."""
    s = _split([6] * 10)
    changed = ChatSplit(s.ids, s.mask.copy(), s.offsets)
    changed.mask[s.offsets[3]:s.offsets[4]] = 0
    a = ChatSampler(s, 4, T, seed=1)
    a.next_batch()
    with pytest.raises(DataError, match="n_conversations"):
        ChatSampler(changed, 4, T, seed=1).load_state_dict(a.state_dict())


def _chars(special=(), normalizer=None, added=()) -> tokenizers.Tokenizer:
    """A tokenizer of one token per printable character (and "▁"), with ``special`` and ``added`` tokens."""
    chars = sorted(set(string.printable)) + ["\u2581"]
    tok = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(["[UNK]"] + chars)}, unk_token="[UNK]"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.add_special_tokens(list(special))
    tok.add_tokens(list(added))
    return tok


def _plain(tok):
    return lambda text: tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["nested", "normalized"])
def test_the_fast_encoder_takes_tokenizers_the_plain_path_agrees_with(kind):
    """Added tokens one of which begins another (``<turn>``, ``<turn>assistant``: the longest is matched first), and
    a normalized added token under a normalizer that prepends "▁": the fast encoder encodes them (no silent fall
    back to the plain path, quadratic in the turns), as the plain path does."""
    if kind == "nested":
        tok = _chars(["<turn>", "<end>", "<turn>assistant"])

        def render(msgs, tools, add_generation_prompt=False, extra=None):
            return "".join(f"<turn>{m['role']}\n{m['content']}<end>" for m in msgs) + \
                ("<turn>assistant\n" if add_generation_prompt else "")
    else:
        tok = _chars(["<turn>"], normalizers.Prepend("\u2581"), [AddedToken("<sep>", normalized=True)])

        def render(msgs, tools, add_generation_prompt=False, extra=None):
            return "".join(f"<turn>{m['role']}<sep>{m['content']}" for m in msgs) + \
                ("<turn>assistant<sep>" if add_generation_prompt else "")
    split = token_splitter(tok)
    assert split is not None and encode_conversations([(MESSAGES, None)], render, split, tok)[0] is not None
    fast = encode_conversation_fast(MESSAGES, None, render, split, tok)
    assert fast == encode_conversation(MESSAGES, None, render, _plain(tok)) and sum(fast[1]) > 0


def test_the_fast_encoder_trains_from_an_assistant_turn_named_first():
    tok = _chars(["<turn>", "<end>"])

    def render(msgs, tools, add_generation_prompt=False, extra=None):
        return "".join(f"<turn>{m['role']}\n{m['content']}<end>" for m in msgs) + \
            ("<turn>assistant\n" if add_generation_prompt else "")
    fast = encode_conversation_fast(MESSAGES, None, render, token_splitter(tok), tok, 1)
    assert fast == encode_conversation(MESSAGES, None, render, _plain(tok), 1)
    assert sum(fast[1]) == sum(encode_conversation(MESSAGES, None, render, _plain(tok))[1])
