"""``flyer train --data chats.jsonl`` on a DeepSeek-V3.2 checkpoint without a chat template: conversations are
rendered with DeepSeek-V3.2's encoding (chat mode; ``flyer.data.deepseek_encoding``), and the assistant mask
covers exactly each assistant turn's text (content, DSML calls, the closing EOS) as the encoder writes it, found
here by the tokens' character offsets in the encoder's text, not by the prefix renders the build uses. The
chat cache's key changes with the encoding; the CLI trains on it, and its run renders as the directory."""

import json

import pytest
from tests.test_serve_dsml import v32_checkpoint

from flyer.cli import main
from flyer.data.chat_data import chat_tokenizer, prepare_chat
from flyer.data.chat_template import read_chat_template
from flyer.data.deepseek_encoding import ENCODINGS, EOS, ChatEncoding, dsml_calls, encode_v32
from flyer.errors import DataError
from flyer.interop.hf_tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "oslo", "days": 2}'}}
CHATS = [
    {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "world", "reasoning_content": ""},  # non-empty: refused
                  {"role": "user", "content": "the lazy dog"}, {"role": "assistant", "content": "jumps over"}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather in oslo"},
        {"role": "assistant", "content": "let me look", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "sunny for two days"}]}]


def _assistant_spans(messages: list[dict], whole: str) -> list[tuple[int, int]]:
    """Each assistant turn's characters in ``whole``: its text as the format writes it (content, a blank line
    and the DSML block of its calls, EOS), found in order."""
    spans, at = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls", [])]
        text = m["content"] + ("\n\n" + dsml_calls(calls) if calls else "") + EOS
        start = whole.index("</think>" + text, at) + len("</think>")  # after the header chat mode closes
        spans.append((start, start + len(text)))
        at = start + len(text)
    return spans


def test_the_mask_is_the_assistant_turns_text(tmp_path):
    path = v32_checkpoint(tmp_path / "v32")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    tok, template = chat_tokenizer(str(path), None)
    assert template is ENCODINGS["deepseek_v32"]
    data = prepare_chat(chats, tmp_path / "cache", tok, template)
    got = [data.train.conversation(j) for j in range(data.train.n_conversations)] + \
        [data.val.conversation(j) for j in range(data.val.n_conversations)]  # the last is held out
    assert len(got) == len(CHATS)
    raw = load_tokenizer(path).tok
    for chat, (ids, mask) in zip(CHATS, got):
        whole = encode_v32(chat["messages"], chat.get("tools"))
        enc = raw.encode(whole, add_special_tokens=False)
        spans = _assistant_spans(chat["messages"], whole)
        want = [int(any(a <= s and e <= b for a, b in spans)) for s, e in enc.offsets]
        assert ids.tolist() == enc.ids and mask.tolist() == want
        assert sum(want) > 0
    # the cache is keyed by the encoding: the default template, or another version of it, builds elsewhere
    default = prepare_chat(chats, tmp_path / "cache", tok, None)
    other = prepare_chat(chats, tmp_path / "cache", tok, ChatEncoding("deepseek_v32", version=0))
    assert len({data.cache_dir, default.cache_dir, other.cache_dir}) == 3
    assert default.train.conversation(0)[0].tolist() != got[0][0].tolist()
    # a conversation the encoding refuses: one line naming the file's line and the message
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c",
                                                                              "content": "y"},
                                            {"role": "assistant", "content": "z"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*messages\[1\]: a tool answer follows no assistant call") as e:
        prepare_chat(bad, tmp_path / "cache", tok, template)
    assert "\n" not in str(e.value)


def test_flyer_train_runs_on_it(tmp_path):
    path = v32_checkpoint(tmp_path / "v32")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS[::-1] * 2))  # held out: a short one
    assert main(["train", "--init", str(path), "--data", str(chats), "--steps", "1", "--batch-size", "2",
                 "--seq-len", "64", "--eval-batches", "1", "--data-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "run"), "--no-plots", "--no-progress", "--threads", "1", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(losses) == 1 and losses[0] > 0
    # the run carries the directory's tokenizer settings, not its config.json: its model names the encoding, so
    # serving or fine-tuning the run renders as the directory does
    assert read_chat_template(tmp_path / "run") is ENCODINGS["deepseek_v32"]
