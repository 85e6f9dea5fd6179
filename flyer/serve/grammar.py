"""Structured outputs (OpenAI's ``response_format``: ``json_object``, ``json_schema``) with llguidance.

A request's JSON schema becomes an llguidance grammar (JSON text) on the HTTP side, checked there so that one
llguidance cannot compile answers 400 naming ``response_format``; the grammar crosses the link in the request's
``SamplingOptions`` and the engine gives the request a matcher (``GrammarMasks.start``). Each step, before a
grammar row's token is chosen, the logits of the tokens its grammar forbids are set to -inf (one mask fill per
row into one bitmask, applied to the step's logits rows at once); the chosen token
is then consumed, and the request ends ("stop") when its grammar is complete. EOS is a token the grammar allows
only where the output is complete.

With MTP speculation (``flyer.serve.speculation``) a grammar row's drafts are chosen under its grammar: the MTP
logits of each draft position are masked with the matcher's state after the drafts before it, and the matcher
consumes each draft tentatively (``Matcher.held``). Masking rather than cutting the draft at the first token the
grammar forbids: a mask is needed at each position anyway (the verify pass's), so the drafts cost no extra fill
and follow the grammar, where unmasked ones from a model that does not know it would mostly be cut. The verify
pass's logits at each position are masked with those same bitmasks (plus one fill after the last draft), so a row
costs one fill per verified position; ``settle`` then rolls back the drafts it rejected, and emission takes the
kept ones without consuming them again. A draft that completes the grammar is the row's last.

Reasoning first (``flyer serve --reasoning-parser`` and a prompt that opens reasoning: ``SamplingOptions
.grammar_after`` holds the end marker's ids): the request's matcher waits (``Request.deferred``) until the output
ends with the marker (``marker_ends``; a marker of several ids, text tokens: until the output's text holds it as the
reasoning parser finds it, whichever tokens the model spells it in, ``flyer.serve.reasoning.EndWatch``, and text its
last token carries past it is the grammar's first, ``GrammarMasks.begun``), so the model reasons unmasked, writes
the marker when it chooses, and its grammar constrains the tokens after it, as vLLM and SGLang apply a grammar after
a reasoning parser's end. A calls marker that ends the reasoning too (``grammar_at``: Kimi's section marker, which
its models may write inside the reasoning, ``flyer.serve.reasoning.KIMI_K2``) starts the grammar at it, its first
token(s): a calls grammar's block begins with that marker. A waiting row drafts without a grammar too, a draft
that would write either marker its last (``ends_reasoning``), verified as any draft: the marker is then the last
token a verify pass keeps, and every token after it is chosen under the grammar.

Reasoning the output opens itself (a parser, a prompt that neither opens nor closes reasoning, e.g. R1's original
template; ``SamplingOptions.grammar_open`` holds the begin marker's ids): the grammar holds from the first token,
but the output's first tokens may also be the begin marker (``Matcher.opening``: its next id added to the mask);
an output that writes the whole marker reasons free until the end marker, as one the prompt opened (``follow``).
vLLM (``StructuredOutputManager.should_fill_bitmask``) instead leaves every output unmasked until the parser's
``is_reasoning_end`` sees ``</think>`` in the prompt or the output, so a model that never reasons is never
constrained; flyer constrains it from its first token and lets only an output that opens reasoning run free.

    json_grammar(schema)            schema (None: any JSON object) -> grammar; ``FieldError`` naming response_format
    llg_tokenizer(tok, vocab_size)  llguidance's view of flyer's tokenizer (``TextTokenizer`` or ``ByteTokenizer``)
    GrammarMasks                    the engine's side: matchers, the step's masks, tokens consumed (and drafts)
    Matcher                         a request's llguidance matcher and the drafts it holds tentatively
    marker_ends(out, n, marker)     whether an output ends with the reasoning end marker (its grammar starts after)
    GrammarMasks.start / follow     a request's matchers at its start; after each token (the reasoning markers)
    GrammarMasks.ends_reasoning     whether drafts would complete the end (or calls) marker (the last draft then)

The work a request can cause is bounded: its schema's JSON text (``MAX_SCHEMA_CHARS``), compiling it and each
step's mask (``LIMITS``: llguidance's fuel and size limits; a grammar over them is refused or ends in error).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Sequence

import llguidance
import llguidance.numpy as llg_np
import torch
from tokenizers import Tokenizer

from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.reasoning import EndWatch

MAX_SCHEMA_CHARS = 32_768  # a schema's JSON text; a larger one is refused before llguidance sees it
# llguidance's resource limits (its defaults, stated here so they are one decision): compiling a grammar
# (lexer fuel ~50k/ms, grammar symbols) and each step's mask (lexer fuel ~14k/ms, Earley items ~20k/ms)
LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=250_000, max_grammar_size=500_000, max_items_in_row=2000)
# compact JSON (no whitespace between tokens) unless the schema's "x-guidance" says otherwise: a model that
# wanders in whitespace cannot spend its tokens there
JSON_DEFAULTS = {"whitespace_flexible": False}


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS, verbose_errors=False)


def schema_json(schema: dict[str, Any]) -> str:
    """A schema's JSON text as measured against ``MAX_SCHEMA_CHARS`` and given to llguidance: compact, its
    characters as they are (not ``\\u`` escapes, six characters each), so that no client is told it sent more than
    it did."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar (JSON text) of output matching the JSON ``schema`` (None: any JSON object, as
    OpenAI's ``json_object``); ``FieldError`` naming ``response_format`` for a schema too large
    (``MAX_SCHEMA_CHARS``) or one llguidance cannot compile within ``LIMITS``."""
    schema = {"type": "object"} if schema is None else schema
    text = schema_json(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise FieldError("response_format", f"the schema's JSON text holds {len(text)} characters; at most "
                                            f"{MAX_SCHEMA_CHARS} are served")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
    except ValueError as e:
        raise FieldError("response_format", f"the schema is not a JSON object ({e})") from None
    return compilable(grammar, "response_format", "the schema")


def compilable(grammar: str, field: str, what: str) -> str:
    """``grammar`` when llguidance compiles it within ``LIMITS``, else ``FieldError`` naming ``field``
    ("``what`` cannot be compiled: ...")."""
    error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=_limits())
    if error:
        raise FieldError(field, f"{what} cannot be compiled: {error.splitlines()[0]:.300}")
    return grammar


# llguidance's error for a token its grammar does not allow; any other error is the grammar's own (``failed``)
REFUSED = "doesn't satisfy the grammar"


def failed(m: Matcher, what: str) -> str:
    """The finish reason of a request whose matcher ``m`` failed at ``what`` (printed to the server's log):
    "error" when its grammar refused the text (a row whose grammar allows none of the model's ids: its mask kept
    them all, ``GrammarMasks.allowed``; the text after a reasoning marker, ``begun``), "grammar" when the grammar
    failed by itself: past ``LIMITS`` (a schema whose required part never ends expands without bound) or an
    llguidance error, the client's grammar, answered 400 (``flyer.serve.api_error.engine_failed``) as one that does
    not compile is."""
    error = m.llg.get_error().splitlines()[0] if m.llg.is_error() else REFUSED  # try_consume_tokens: no error set
    print(f"flyer serve: a grammar failed at {what}: {error:.300}", file=sys.stderr)
    return "error" if REFUSED in error else "grammar"


def marker_ends(tail: Sequence[int], generated: int, marker: Sequence[int]) -> bool:
    """Whether an output of ``generated`` tokens, whose last ones are ``tail`` (at least ``len(marker)`` of them
    when there are as many), ends with ``marker`` (the reasoning end marker's ids: ``SamplingOptions
    .grammar_after``). Only the output's tokens count: a prompt's tail is no marker written."""
    n = len(marker)
    return 0 < n <= generated and list(tail[len(tail) - n:]) == list(marker)


class _ByteWords:
    """UTF-8 bytes as llguidance's ``TokenizerWrapper`` reads a tokenizer: ids 0-255 the bytes, the ids past
    them (a preset's vocabulary) words without text, of which ``eos`` ends the output."""

    def __init__(self, n_vocab: int, eos: int):
        self.tokens = [bytes([i]) for i in range(256)] + [b""] * (n_vocab - 256)
        self.special_token_ids = list(range(256, n_vocab))
        self.eos_token_id, self.bos_token_id = eos, None

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def llg_tokenizer(tok, vocab_size: int) -> llguidance.LLTokenizer:
    """``_llg_tokenizer``; ``FieldError`` naming ``response_format`` when llguidance cannot read ``tok``."""
    try:
        return _llg_tokenizer(tok, vocab_size)
    except FieldError:
        raise
    except (ValueError, RuntimeError) as e:  # llguidance's refusals of a tokenizer it cannot read
        raise FieldError("response_format", f"llguidance cannot read this server's tokenizer ({e})") from None


def _llg_tokenizer(tok, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over ``vocab_size`` ids (the model's) for flyer's ``tok``: a ``TextTokenizer`` (its
    ``tokenizers`` model, every id of ``eos_ids()`` an end), or the ``ByteTokenizer`` of presets (bytes; id 256,
    a word without text, the end: presets have no EOS of their own). Built once per engine (~1 s for a 128k
    vocabulary)."""
    if isinstance(tok, TextTokenizer):
        inner = Tokenizer.from_str(tok.tok.to_str())  # without padding or truncation, which would change the words
        inner.no_padding()
        inner.no_truncation()
        n_vocab = max(vocab_size, inner.get_vocab_size(with_added_tokens=True))
        return llguidance.LLTokenizer(inner.to_str(), n_vocab=n_vocab, eos_token=list(tok.eos_ids()) or None)
    if isinstance(tok, ByteTokenizer):
        n_vocab = max(vocab_size, 257)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteWords(n_vocab, 256)), n_vocab=n_vocab)
    raise FieldError("response_format", f"structured outputs need a TextTokenizer or ByteTokenizer "
                                        f"(this server's is a {type(tok).__name__})")


class Matcher:
    """A request's llguidance matcher (``llg``) at its tokens so far, then ``held``: the drafts it consumed
    tentatively (``GrammarMasks.hold``); after the verify pass, the kept ones, which ``GrammarMasks.consume`` takes
    without consuming them again. ``opening``: while the output may still open reasoning itself (its tokens so far
    the begin marker's first ones), the marker's ids not written yet, the first of which its masks allow besides
    the grammar's; ``fresh`` the grammar's matcher at its start, for after the reasoning; ``refused``: the grammar
    refused one of the marker's tokens written, so only the marker may go on. ``watch``: the output's text while
    the grammar waits for an end marker of several tokens (``EndWatch``), else None."""

    __slots__ = ("llg", "held", "opening", "fresh", "refused", "watch")

    def __init__(self, llg: llguidance.LLMatcher, opening: Sequence[int] = (),
                 fresh: llguidance.LLMatcher | None = None, watch: EndWatch | None = None):
        self.llg, self.held = llg, []
        self.opening, self.fresh, self.refused, self.watch = tuple(opening), fresh, False, watch

    @property
    def opened(self) -> bool:
        """The output has written the whole begin marker: it reasons first (``GrammarMasks.follow``)."""
        return self.fresh is not None and not self.opening


class GrammarMasks:
    """The engine's side of structured outputs over ``vocab_size`` logits on ``device``: ``matcher`` for a
    request's grammar, ``mask`` on a step's logits, ``consume`` for the token chosen. llguidance's tokenizer is
    built from flyer's ``tok`` at construction."""

    def __init__(self, tok, vocab_size: int, device: torch.device):
        self.tokenizer, self.tok = llg_tokenizer(tok, vocab_size), tok
        self.vocab_size, self.device = vocab_size, device
        self.bitmask = llg_np.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        self.shifts = torch.arange(32, dtype=torch.int32, device=device)
        self.last: tuple[str, llguidance.LLMatcher] | None = None  # the last grammar compiled (n choices share it)

    def matcher(self, grammar: str) -> Matcher:
        """A matcher at the start of ``grammar`` (``json_grammar``'s); ``FieldError`` naming ``response_format``
        when llguidance cannot compile it with this tokenizer. A copy of the last one when it is the same grammar."""
        if self.last is None or self.last[0] != grammar:
            m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_limits())
            if m.is_error():
                raise FieldError("response_format", f"the schema cannot be compiled: "
                                                    f"{m.get_error().splitlines()[0]:.300}")
            self.last = (grammar, m)
        return Matcher(self.last[1].deep_copy())

    def start(self, opts) -> tuple[Matcher | None, Matcher | None]:
        """A request's (matcher, deferred) for its ``SamplingOptions``' grammar: the matcher from the first token;
        with ``grammar_after`` (the prompt opens reasoning) deferred until the end marker; with ``grammar_open``
        too (the output may open reasoning) from the first token, the begin marker allowed first."""
        m = self.matcher(opts.grammar)
        if not opts.grammar_after:
            return m, None
        # an end marker of several tokens is found in the output's text (the model may write it in other tokens)
        end = self.tok.decode(list(opts.grammar_after)) if len(opts.grammar_after) > 1 else ""
        watch = EndWatch(self.tok, self.tok.decode(list(opts.grammar_open)), end,
                         self.tok.decode(list(opts.grammar_at))) if end else None
        if not opts.grammar_open:
            return None, Matcher(m.llg, watch=watch)
        return Matcher(m.llg, opts.grammar_open, m.llg.deep_copy(), watch), None

    def follow(self, r, token: int) -> str | None:
        """Request ``r``'s grammar past ``token``, its last one (``r.tokens``' last): ``consume``'s finish reason;
        the grammar deferred when ``token`` completed a begin marker (reasoning opened by the output), and held
        from the next token when it completed the end marker (reasoning ended: ``marker_ends`` for a one-token
        marker, else where the output's text holds it, ``EndWatch``; text the token carries past the marker is
        the grammar's, ``begun``)."""
        m = r.matcher if r.matcher is not None else r.deferred
        rest = m.watch.add(token) if m is not None and m.watch is not None else None
        reason = self.consume(r.matcher, token) if r.matcher is not None else None
        if r.matcher is not None and r.matcher.opened:  # as if the prompt had opened it
            r.matcher, r.deferred = None, Matcher(r.matcher.fresh, watch=r.matcher.watch)
        elif r.deferred is not None and r.deferred.watch is None and \
                marker_ends(r.tokens, r.generated, r.opts.grammar_at):
            r.matcher, r.deferred = r.deferred, None  # a calls marker of one token: the grammar's first
            reason = self.consume(r.matcher, token)
        elif r.deferred is not None and (rest is not None if r.deferred.watch is not None else
                                         marker_ends(r.tokens, r.generated, r.opts.grammar_after)):
            r.matcher, r.deferred = r.deferred, None  # the end marker itself was free (a calls marker in text:
            r.matcher.watch = None  # ``rest`` starts with it, the grammar's)
            reason = self.begun(r.matcher, rest or "")
        return reason

    def ends_reasoning(self, r, more: Sequence[int]) -> bool:
        """Whether tokens ``more`` (drafts) after request ``r``'s, whose grammar waits for the end marker, would
        complete it (``follow``'s reading)."""
        if r.deferred.watch is not None:
            return r.deferred.watch.would_end(more)
        return any(marker_ends([*r.tokens[-len(end):], *more], r.generated + len(more), end)
                   for end in (r.opts.grammar_after, r.opts.grammar_at) if end)

    def begun(self, m: Matcher, text: str) -> str | None:
        """``m`` at the start of its grammar past ``text``, the content a token ending the reasoning marker carries
        after it (``"}`` of ``ink>"}``): the grammar's as if chosen under it, so the content is the grammar's from its
        first character. Leading whitespace is not (DeepSeek's models write ``</think>\n\n``; JSON and the calls'
        parser skip it). The finish reason: ``failed``'s when the grammar refuses the text, "stop" when it completes
        it."""
        text = text.lstrip()
        if not text:
            return None
        ids = self.tok.encode_ids(text, add_special_tokens=False)
        if m.llg.try_consume_tokens(ids) != len(ids):
            return failed(m, f"the text after the reasoning end marker {text[:100]!r}")
        return "stop" if m.llg.is_stopped() else None

    def allowed(self, matchers: list[Matcher]) -> torch.Tensor:
        """(B, V) bool on the logits' device: the tokens each of the B matchers allows next. llguidance fills each
        matcher's bitmask in one (B, ceil(V'/32)) int32 array, bit t % 32 of word t // 32 set where token t is
        allowed, unpacked for the B rows at once. A row whose grammar allows none of the model's ids (a tokenizer
        with words past its vocabulary) allows them all: its token then fails the grammar and ends it
        (``consume``), where a row of -inf could not sample."""
        n = len(matchers)
        if self.bitmask.shape[0] < n:
            self.bitmask = llg_np.allocate_token_bitmask(n, self.tokenizer.vocab_size)
        bm = self.bitmask[:n]
        for i, m in enumerate(matchers):  # in this thread: a pool's threads would spin against torch's
            llg_np.fill_next_token_bitmask(m.llg, bm, i)
        # llguidance's numpy helpers, not its torch ones: those torch.compile at import (seconds on every flyer command)
        bits = (torch.from_numpy(bm).to(self.device).unsqueeze(-1) >> self.shifts) & 1  # (B, W, 32)
        allowed_BV = bits.flatten(1)[:, :self.vocab_size].bool()
        for i, m in enumerate(matchers):  # the begin marker's next token too, while the output may open reasoning
            if m.opening:  # (its ids are the model's: ``Limits.check``)
                if m.refused:
                    allowed_BV[i] = False
                allowed_BV[i, m.opening[0]] = True
        return allowed_BV | ~allowed_BV.any(-1, keepdim=True)

    def mask(self, logits_NV: torch.Tensor, rows: list[tuple[int, Matcher]],
             given: list[tuple[int, torch.Tensor]] = ()) -> None:
        """Set to -inf, in place, the logits of the tokens each matcher forbids next: ``rows`` pairs a row of
        ``logits_NV`` (N, V) with its matcher (``allowed``: one fill each); ``given`` pairs a first row with
        bitmasks filled already (n, V) for it and the n - 1 rows after it (a verify pass's rows: ``hold``)."""
        idx = [row for row, _ in rows]
        masks = [self.allowed([m for _, m in rows])] if rows else []
        for first, allowed_nV in given:
            idx += range(first, first + allowed_nV.shape[0])
            masks.append(allowed_nV)
        if idx:
            i = torch.tensor(idx, device=logits_NV.device)
            logits_NV[i] = logits_NV[i].masked_fill(~torch.cat(masks), -math.inf)

    @staticmethod
    def hold(m: Matcher, token: int) -> bool:
        """``token``, a draft, consumed tentatively (``held``): False, consuming nothing, when the grammar refuses
        it (``allowed`` kept a row that allows none of the model's ids) or the output may still open reasoning (its
        verify pass chooses that token, under the mask with the marker's)."""
        if m.opening or m.llg.try_consume_tokens([token]) != 1:
            return False
        m.held.append(token)
        return True

    @staticmethod
    def settle(m: Matcher, kept: int) -> None:
        """After the verify pass: the drafts ``m`` holds past its first ``kept`` (those rejected) rolled back."""
        if len(m.held) > kept:
            m.llg.rollback(len(m.held) - kept)
            del m.held[kept:]

    @staticmethod
    def consume(m: Matcher, token: int) -> str | None:
        """``m`` advanced past ``token``, the one chosen (the first it holds: taken as it is, consumed already):
        the request's finish reason, "stop" when its grammar is complete (nothing but EOS may follow), "grammar" or
        "error" when it fails (``failed``), else None. Only a
        matcher's last held draft can complete it (``flyer.serve.speculation`` ends a row's drafts there)."""
        if m.opening and token == m.opening[0]:  # the begin marker goes on: the grammar follows it while it can
            m.opening = m.opening[1:]
            m.refused = m.refused or m.llg.try_consume_tokens([token]) != 1
            return None
        if m.opening:  # not the marker: the grammar's token from here on, unless it refused the marker's so far
            m.opening, m.fresh, m.watch = (), None, None
            if m.refused:
                return failed(m, "the reasoning begin marker")
        if m.llg.is_error():  # a mask or draft it could not compute within ``LIMITS``
            return failed(m, f"token {token}")
        if m.held and m.held[0] == token:  # a kept draft (``settle`` rolled back the rejected ones)
            m.held.pop(0)
        elif not m.llg.consume_token(token):
            return failed(m, f"token {token}")
        return "stop" if not m.held and m.llg.is_stopped() else None
