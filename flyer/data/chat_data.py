"""Chat data for supervised fine-tuning: a ``.jsonl`` file of conversations -> token ids with an
assistant mask -> one conversation (or piece of one: below) per training row, the loss on the assistant's tokens
only (the rows and their sampler: ``flyer.data.chat_sampler``).

Each line is ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}`` (OpenAI / Hugging Face
chat format; ``tools`` optional, passed to the template as transformers' ``apply_chat_template(tools=...)``
does; an assistant's ``reasoning_content`` (or ``reasoning``, ``thinking``) a string or null; keys set to null
are left out, as transformers 5 leaves them out; ``"chat_template_kwargs"`` optional, an object whose
keys override the build's, ``prepare_chat``'s ``kwargs``, for that line: the renderer's ``extra``, e.g.
``{"thinking": true}``; ``"response_format"`` optional, a request's as OpenAI's API takes it: json_object or
json_schema, written into the system prompt by the DeepSeek-V3.2 / V4 encodings as ``flyer serve`` writes a
request's, nothing for a template, as serve). A conversation is rendered whole with the tokenizer's chat template
(``flyer.data.chat_template``; the checkpoint's, else flyer's default) and encoded as transformers encodes it:
the template's text carries its own BOS, no special tokens are added.

The assistant mask: message i (an assistant's) owns the tokens between the conversation up to i rendered
with the generation prompt and up to and including i rendered without it, i.e. its content and whatever
the template closes it with (DeepSeek's ``<｜end▁of▁sentence｜>``), not its header. Both prefixes must
encode to a prefix of the whole conversation's ids, else the line is refused; so must its non-empty
reasoning_content appear in its rendered turn (``chat_encode.reasoning_unshown``: a reasoning the template does not
show, e.g. in chat mode, is refused, never dropped). A template's
``{% generation %}`` markers (transformers' ``return_assistant_tokens_mask``) render their body as it is.
``encode_conversation`` is the plain path; the build takes ``flyer.data.chat_encode``'s fast twin (each token
encoded once, a run of lines in one ``encode_batch``: the same ids, mask and errors) wherever its tokenizer
model holds, the plain path for a conversation it cannot check.

Pieces: each assistant turn is trained once, in the context inference shows it. Templates that drop earlier
turns' reasoning once a later user turn exists (DeepSeek-V3.2 / V4 thinking mode, Qwen3's), or render the last turn
otherwise than the same turn with more after it (Qwen3's empty think block), render a turn's prefix one way and the
whole another; so a conversation is cut (``flyer.data.chat_pieces.pieces``) where a later turn's render no longer
extends an earlier turn's. Piece j is the conversation from its start through its cut (earlier messages as context,
as the template then renders them), trained on its own assistant turns only (earlier ones: mask 0, unchecked). Each
piece is a sample (a row; a document when packed); a conversation whose turns all extend each other is one piece.

Validation: conversation i (0-based, in file order, counting conversations not lines) is held out when
``i % VAL_EVERY == VAL_EVERY - 1``; a file of fewer than ``VAL_EVERY`` holds out its last one. All of a
conversation's pieces go where it goes.

The tokenized conversations are cached in ``{cache_dir}/chat-{key}/`` (``ids.npy``, ``mask.npy``,
``offsets.npy`` per sample; ``conversation.npy`` each sample's conversation, where some are cut in pieces;
``meta.json`` written last), ``key`` hashing the file's bytes, the tokenizer, the template, the build's
chat_template_kwargs and this format's version. The build reads the file in runs of about ``BATCH_BYTES`` of lines
and writes each run's ids and mask before reading on (memory: one run and the offsets); a bad line's error is the
first in file order, as if each line were encoded alone.
"""

from __future__ import annotations

import array
import functools
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tokenizers

from flyer.data.chat_encode import (Conversation, encode_conversations, prefix_problem, reasoning_unshown,
                                    token_splitter)
from flyer.data.chat_pieces import cut_conversation
from flyer.data.chat_template import (DEFAULT_CHAT_TEMPLATE, REASONING_FIELDS, chat_renderer, read_chat_template,
                                      sorts_tools_of)
from flyer.data.deepseek_encoding import ChatEncoding, ChatTemplate
from flyer.data.presplit import tokenizer_key
from flyer.data.prepare import _build_lock, cache_writes, unigram_from_counts
from flyer.data.shards import atomic_write
from flyer.data.tokenizer import ensure_eos, load_tokenizer as load_tokenizer_file
from flyer.errors import DataError, FieldError
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer as load_hf_tokenizer
from flyer.interop.load import init_source, run_tokenizer
from flyer.interop.hf import is_hf_model_dir
from flyer.parse import check_unicode, json_loads

CHAT_VERSION = 4  # 2: conversations cut into pieces (module doc); 3: where the render says (chat_pieces);
# 4: messages as transformers 5 passes them (chat_template.template_message)
# (a message's content is a string here, never OpenAI's list of parts, so how renderers join parts is no part of the
# key: taking parts in chat data must bump CHAT_VERSION; tests/test_chat_content_parts.py holds both)
MAX_LINE_BYTES = 1 << 22  # 4 MiB: a longer line is refused, not read whole
VAL_EVERY = 20
BATCH_BYTES = 1 << 18  # lines encoded together (one encode_batch, parallel in Rust): the build's memory
IGNORE_INDEX = -100  # flyer.model.loss's (and torch's) ignore_index
PAD_ID = -1  # x's padding: no token; the trainer feeds token 0 there and counts it in no routing statistic


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of one half of a UTF-16 pair


def is_chat_data(data: str | Path | None) -> bool:
    """A ``--data`` path naming a ``.jsonl`` file (in any case: ``.JSONL`` too): chat data."""
    return data is not None and str(data).lower().endswith(".jsonl")


def chat_tokenizer(init: str | None, tokenizer: str | None) -> tuple[TextTokenizer, ChatTemplate]:
    """(tokenizer, chat template or None) for chat data: ``init``'s (an HF directory, or a flyer run,
    which carries its HF settings when fine-tuned from one), else the ``tokenizer.json`` file ``tokenizer``
    with flyer's default template. Neither: ``FieldError`` on ``data`` (a BPE trained here has no chat
    template and no idea of the conversation's special tokens)."""
    if init:
        if is_hf_model_dir(init):
            return load_hf_tokenizer(Path(init)), read_chat_template(init)
        _, tok_path = init_source(init)
        return run_tokenizer(tok_path.parent, load_tokenizer_file(tok_path)), read_chat_template(init)
    if tokenizer:
        return TextTokenizer(load_tokenizer_file(tokenizer)), None
    raise FieldError("data", "a .jsonl chat file needs a tokenizer and its chat template: give init (a Hugging Face "
                             "directory or flyer run) or tokenizer (a tokenizer.json, with flyer's default template)")


def _problem(path: Path, line: int, what: str) -> DataError:
    return DataError(f"{path}:{line}: {what}")


def json_object(raw: bytes, path: Path, line: int, keys: str) -> dict:
    """Line ``line`` of ``path`` as a JSON object, or a one-line ``DataError`` naming ``path:line`` (``keys``: what
    the object should hold, for the message)."""
    try:  # json.loads reads bytes with a UTF-16/32 BOM or NULs as that encoding: a chat line is UTF-8
        text = raw.decode("utf-8-sig").rstrip("\r\n")  # (an error's "line 2" would name the line's end)
    except UnicodeDecodeError as e:
        raise _problem(path, line, f"not UTF-8 text (byte {e.start})") from None
    try:
        d = json_loads(text)
    except ValueError as e:
        raise _problem(path, line, f"not valid JSON ({str(e).splitlines()[0]:.80})") from None
    if not isinstance(d, dict):
        raise _problem(path, line, f"expected a JSON object with {keys}, got {type(d).__name__}")
    try:  # "\ud800": valid JSON, no text a tokenizer encodes (walked only where the line escapes a surrogate)
        if _ESCAPED_SURROGATE.search(text):
            check_unicode(d)
    except FieldError as e:
        raise _problem(path, line, str(e)) from None
    return d


def parse_conversation(raw: bytes, path: Path,
                       line: int) -> tuple[list[dict], list | None, dict | None, dict | None]:
    """(messages, tools, chat_template_kwargs, response_format: None for none or "text") of one line, or a one-line
    ``DataError`` naming ``path:line`` and the field."""
    d = json_object(raw, path, line, "'messages'")
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        pair = " (this line is a preference pair: DPO trains on those)" if "chosen" in d else ""
        raise _problem(path, line, f"messages: expected a non-empty list of {{role, content}} objects{pair}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _problem(path, line, f"messages[{i}]: expected an object with role and content")
        calls = m.get("tool_calls")
        if calls is not None and not (m.get("role") == "assistant" and isinstance(calls, list) and calls
                                      and all(isinstance(c, dict) for c in calls)):
            raise _problem(path, line, f"messages[{i}].tool_calls: expected an assistant's non-empty list of objects")
        # an assistant's message that only calls tools has no content (OpenAI's null)
        for k in ("role", "content") if calls is None or m.get("content") is not None else ("role",):
            if not isinstance(m.get(k), str):
                raise _problem(path, line, f"messages[{i}].{k}: expected a string, got {type(m.get(k)).__name__}")
        # a reasoning under any of its names is reasoning_content, as a template would see it (template_message)
        key = next((k for k in REASONING_FIELDS if m.get(k) is not None), None)
        if key is not None and not (m.get("role") == "assistant" and isinstance(m[key], str)):
            raise _problem(path, line, f"messages[{i}].{key}: expected an assistant's string or null, "
                                       f"got {type(m[key]).__name__}")
        msgs[i] = {k: v for k, v in m.items() if k not in REASONING_FIELDS} | ({} if key is None else
                                                                             {"reasoning_content": m[key]})
    if not any(m["role"] == "assistant" for m in msgs):
        raise _problem(path, line, "messages: no assistant turn (nothing to train on)")
    tools = d.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _problem(path, line, "tools: expected a list of objects")
    kwargs = d.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _problem(path, line, f"chat_template_kwargs: expected an object, got {type(kwargs).__name__}")
    return msgs, tools or None, kwargs, _response_format(d.get("response_format"), path, line)


def _response_format(fmt, path: Path, line: int) -> dict | None:
    """A line's ``response_format`` checked as serve's request body checks it (``flyer.serve.schema``); None for
    none or "text" (nothing to write)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _problem(path, line, "response_format: expected an object whose type is text, json_object or json_schema")
    spec = fmt.get("json_schema")
    if (spec is not None) != (kind == "json_schema"):
        raise _problem(path, line, "response_format.json_schema: given with type json_schema and only then")
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                                 and isinstance(spec.get("schema"), dict)):
        raise _problem(path, line, "response_format.json_schema: expected an object with a name string and a "
                                   "schema object")
    return None if kind == "text" else fmt


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[:len(a)] == a


def encode_conversation(messages: list[dict], tools: list | None, render, encode, first: int = 0,
                        extra: dict | None = None) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a whole conversation (or a piece), both (n,): ``mask[j]`` 1 where token j belongs
    to an assistant message from message ``first`` on (module doc). ``render(messages, tools,
    add_generation_prompt, extra)`` -> text; ``encode(text)`` -> ids. ``ValueError`` when a trained turn's prefix
    does not encode to a prefix of the whole, or its reasoning is not rendered (``reasoning_unshown``)."""
    whole = render(messages, tools, add_generation_prompt=False, extra=extra)
    ids = encode(whole)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        head_text = render(messages[:i], tools, add_generation_prompt=True, extra=extra)
        upto_text = render(messages[:i + 1], tools, add_generation_prompt=False, extra=extra)
        head, upto = encode(head_text), encode(upto_text)
        for name, p, text in (("with the generation prompt", head, head_text), ("through it", upto, upto_text)):
            if not _is_prefix(p, ids):
                raise ValueError(prefix_problem(i, name, None if whole.startswith(text) else text, whole))
        unshown = reasoning_unshown(messages, i, tools, render, extra, head_text)
        if unshown is not None:
            raise ValueError(unshown)
        mask[len(head):len(upto)] = [1] * max(0, len(upto) - len(head))
    return ids, mask


def _read_lines(path: Path):
    """(line number, bytes) of every non-blank line, each at most ``MAX_LINE_BYTES``."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise _problem(path, n, f"line longer than {MAX_LINE_BYTES} bytes (the limit of a chat line)")
            if raw.strip():
                yield n, raw


@dataclass
class ChatSplit:
    """Tokenized conversations (samples: a conversation, or a piece of one; module doc): conversation c is
    ``ids[offsets[c]:offsets[c + 1]]`` with its assistant mask (uint8, same span). ``len()``: its tokens."""
    ids: np.ndarray  # (N,) int64
    mask: np.ndarray  # (N,) uint8
    offsets: np.ndarray  # (n + 1,) int64

    @property
    def n_conversations(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def conversation(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = int(self.offsets[c]), int(self.offsets[c + 1])
        return self.ids[s:e], self.mask[s:e]


@dataclass
class ChatData:
    """What ``prepare_chat`` gives the trainer, the fields of ``PreparedData`` it reads."""
    tokenizer: tokenizers.Tokenizer
    train: ChatSplit
    val: ChatSplit
    vocab_size: int
    eos_id: int
    unigram_val_loss: float  # nats per assistant token of validation, a unigram fitted on training's
    cache_dir: Path
    baseline: str = "unigram baseline (validation, nats/token):"  # how the log and plot name unigram_val_loss


def _select(ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> ChatSplit:
    """The conversations ``keep`` (a bool per conversation) of the cache's arrays, copied in runs of neighbours."""
    bounds = np.flatnonzero(np.diff(keep, prepend=~keep[0], append=~keep[-1]))  # where keep flips: runs' edges
    runs = [(offsets[a], offsets[b]) for a, b in zip(bounds[:-1], bounds[1:]) if keep[a]]
    lengths = np.diff(offsets)[keep]
    return ChatSplit(np.concatenate([ids[a:b] for a, b in runs]).astype(np.int64, copy=False),
                     np.concatenate([mask[a:b] for a, b in runs]).astype(np.uint8, copy=False),
                     np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def read_splits(out: Path) -> tuple[ChatSplit, ChatSplit]:
    """(training, validation) of the built cache ``out``; its files mapped, the splits copied out of them (the
    files are never held whole besides)."""
    ids, mask = (np.load(out / f"{n}.npy", mmap_mode="r") for n in ("ids", "mask"))
    offsets = np.load(out / "offsets.npy")
    cut = (out / "conversation.npy").is_file()  # written where a conversation was cut in pieces
    owner = np.load(out / "conversation.npy") if cut else np.arange(len(offsets) - 1)
    val = np.asarray(held_out(int(owner[-1]) + 1))[owner]  # a piece goes where its conversation goes
    return _select(ids, mask, offsets, ~val), _select(ids, mask, offsets, val)


def held_out(n: int) -> list[bool]:
    """Which of ``n`` conversations validation holds out (module doc)."""
    val = [i % VAL_EVERY == VAL_EVERY - 1 for i in range(n)]
    if not any(val):
        val[-1] = True
    return val


def prepare_chat(path: str | Path, cache_dir: str | Path, tok: TextTokenizer, template: ChatTemplate,
                 kwargs: dict | None = None) -> ChatData:
    """Read, render, mask and cache the chat file ``path`` (module doc); a cached build is reused. ``kwargs``: the
    chat_template_kwargs every line renders with (a line's own keys override them). ``FieldError`` on
    chat_template_kwargs for ``kwargs`` the renderer refuses."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: not a file" if path.exists() else f"{path}: does not exist")
    special = tok.special_tokens()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    key_src = {"version": CHAT_VERSION, "file": h.hexdigest(), "max_line": MAX_LINE_BYTES, "val_every": VAL_EVERY,
               "tokenizer": hashlib.blake2b(tokenizer_key(tok.tok), digest_size=16).hexdigest(),
               # None: the default, by its text (a build with an earlier default is not reused)
               "template": asdict(template) if isinstance(template, ChatEncoding)
               else template or DEFAULT_CHAT_TEMPLATE,
               "special": special, **({"chat_template_kwargs": kwargs} if kwargs else {}),  # none: the key as before
               **({"tools_sorted": True} if sorts_tools_of(template) else {})}
    key = hashlib.blake2b(json.dumps(key_src, sort_keys=True).encode(), digest_size=8).hexdigest()
    out = Path(cache_dir).expanduser() / f"chat-{key}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FieldError("data_cache", f"cannot create directory {out}: {e.strerror or e}") from None
    with _build_lock(out):
        if not (out / "meta.json").exists():
            with cache_writes(out):
                _build(out, path, tok, template, special, kwargs or {})
        meta = json.loads((out / "meta.json").read_text())
        train_split, val_split = read_splits(out)
    vocab = tok.tok.get_vocab_size()
    return ChatData(tok.tok, train_split, val_split, vocab, meta["eos_id"],
                    _unigram(train_split, val_split, vocab), out)


def _build(out: Path, path: Path, tok: TextTokenizer, template: ChatTemplate, special: dict,
           kwargs: dict | None = None) -> None:
    render = chat_renderer(template, special)
    split = token_splitter(tok.tok)

    def encode(text: str) -> list[int]:
        return tok.encode_ids(text, add_special_tokens=False)

    def batches():
        """The file's lines in runs of about ``BATCH_BYTES``; a bad line (too long) after those before it."""
        run, size = [], 0
        try:
            for line, raw in _read_lines(path):
                run.append((line, raw))
                size += len(raw)
                if size >= BATCH_BYTES:
                    yield run
                    run, size = [], 0
        except DataError:
            if run:
                yield run
            raise
        if run:
            yield run

    # ids and mask go to their .npy files a run of lines at a time: the build holds one run and the offsets
    columns = [_Column(out / "ids.npy", np.int64), _Column(out / "mask.npy", np.uint8)]
    offsets, owner, done = [0], array.array("q"), 0  # owner: each sample's conversation, 8 bytes each
    try:
        for run in batches():
            ids, mask, lengths, convs = _encode_run(run, path, render, split, tok.tok, encode, kwargs)
            columns[0].append(ids)
            columns[1].append(mask)
            for n, c in zip(lengths, convs):
                offsets.append(offsets[-1] + n)
                owner.append(done + c)
            done += len(run)
        if done < 2:
            raise DataError(f"{path}: {done} conversation(s); at least 2 are needed (one is held out for validation)")
        for c in columns:
            c.close()
    except BaseException:
        for c in columns:
            c.discard()
        raise
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    if len(owner) > done:  # else one sample per conversation: the files as before pieces
        np.save(out / "conversation.npy", np.asarray(owner, dtype=np.int64))
    eos = tok.eos_id()
    meta = {"source": str(path), "conversations": done, "tokens": offsets[-1],
            "eos_id": eos if eos is not None else ensure_eos(tok.tok)}
    atomic_write(out / "meta.json", [json.dumps(meta, indent=1).encode()])


def _encode_run(run: list[tuple[int, bytes]], path: Path, render, split, tok: tokenizers.Tokenizer, encode,
                kwargs: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """ids (N,) int64, mask (N,) uint8, each sample's length and its conversation's index in ``run`` of the lines
    ``run`` ((line number, bytes)), the samples (each conversation's ``pieces``) back to back: ``chat_encode``'s
    batch where ``split`` is not None, else (or where it gives None) ``encode_conversation``; each line rendered
    with ``kwargs`` and its own chat_template_kwargs over them. The first bad line's ``DataError``, in file order
    (``FieldError`` on chat_template_kwargs where the build's ``kwargs`` are refused)."""
    convs, bad = [], None
    for line, raw in run:
        try:
            convs.append(parse_conversation(raw, path, line))
        except DataError as e:  # raised once the lines before it are through
            bad = e
            break
    # a line's response_format goes to the renderer with its conversation (the encoder writes it; a template not)
    samples, cut = [], {}  # cut: a conversation whose pieces' renders fail, the error in place of its samples
    for c, ((line, _), (messages, tools, own, fmt)) in enumerate(zip(run, convs)):
        extra = {**(kwargs or {}), **(own or {})} or None
        render_c = render if fmt is None else functools.partial(render, response_format=fmt)
        try:
            cuts, lengths, wholes = cut_conversation(messages, tools, render_c, extra)
            samples += [(c, line, Conversation(messages[:end], tools, first, extra, render_c, lengths, whole))
                        for (end, first), whole in zip(cuts, wholes)]
        except Exception as e:
            cut[c] = e
            samples.append((c, line, None))
    fast = iter(encode_conversations([s for *_, s in samples if s], render, split, tok) if split else [])
    ids, spans, lengths, total = [], [], [], 0
    for c, line, sample in samples:
        got = cut[c] if sample is None else next(fast, None)
        if got is None:
            try:
                got = encode_conversation(sample.messages, sample.tools, sample.render, encode, sample.first,
                                          sample.extra)
            except Exception as e:
                got = e
            else:  # the plain path's mask as 1-runs: the same bytes below
                got = got[0], [(a, b) for a, b in _runs(got[1])]
        if isinstance(got, FieldError) and got.field == "chat_template_kwargs" and not convs[c][2]:
            raise FieldError("chat_template_kwargs", got.problem)  # the build's, not the line's: the flag's error
        if isinstance(got, ValueError):
            raise _problem(path, line, str(got))
        if isinstance(got, Exception):  # a template's raise_exception, or a render error: the user's line or template
            raise _problem(path, line, f"messages: the chat template cannot render them ({got})")
        spans += [(total + a, total + b) for a, b in got[1]]
        ids.append(got[0])
        lengths.append(len(got[0]))
        total += len(got[0])
    if bad is not None:
        raise bad
    mask = np.zeros(total, dtype=np.uint8)
    for a, b in spans:
        mask[a:b] = 1
    return (np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total), mask, lengths,
            [c for c, *_ in samples])


def _runs(mask: list[int]) -> np.ndarray:
    """[start, end) of each run of 1s in ``mask``: (runs, 2)."""
    edges = np.flatnonzero(np.diff(np.asarray(mask, dtype=np.int8), prepend=0, append=0))
    return edges.reshape(-1, 2)


class _Column:
    """A 1-D ``.npy`` file written as it grows, ``np.save``'s bytes once closed: its header is rewritten in place
    for the final length (numpy pads a header with room for any length: ``GROWTH_AXIS_MAX_DIGITS``)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.start = self._header()

    def _header(self) -> int:
        d = np.lib.format.header_data_from_array_1_0(np.empty(0, self.dtype))
        self.f.seek(0)
        np.lib.format.write_array_header_1_0(self.f, {**d, "shape": (self.n,)})
        return self.f.tell()

    def append(self, values) -> None:
        a = np.asarray(values, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.n += len(a)

    def close(self) -> None:
        if self._header() != self.start:
            raise RuntimeError(f"{self.path}: the .npy header of {self.n} elements changed length")
        self.f.close()

    def discard(self) -> None:
        try:
            self.f.close()  # flushes: fails again where the disk is full
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def _unigram(train: ChatSplit, val: ChatSplit, vocab: int) -> float:
    """Add-one unigram cross-entropy on validation's assistant tokens, fitted on training's."""
    def counts(split: ChatSplit) -> np.ndarray:
        return np.bincount(split.ids[split.mask == 1], minlength=vocab)[:vocab].astype(np.float64)
    return unigram_from_counts(counts(train), counts(val))
