"""What the engine serves: a request and the limits that decide whether it can ever run.

A ``Request`` is a prompt (token ids) with its ``SamplingOptions`` (max_tokens, greedy or
temperature / top-p with an optional seed, stop ids, logprobs, OpenAI's logit bias and penalties)
and an ``emit`` callback that hears one ``TokenEvent`` per generated token. Its state is its tokens
(prompt + generated) and its cache state: ``n_cached``, how many leading tokens have entries in its
``blocks`` of the paged cache (``n_shared`` of them taken from the prefix index; ``cached_prompt``, those at its
first admission, is reported with its first token), the chain keys of
its full blocks, and with speculation or DeepSeek-V4 the MTP cache's progress and its pool slot.

``Limits`` (vocabulary, context, cache capacity in blocks, queue length) decide whether a request
can ever run; the HTTP process knows them without the model and refuses with a ``FieldError`` what
could never run, and a full queue is ``QueueFull``. ``EngineConfig`` sizes the engine (cache bytes,
block size, batch, queue, prefill chunk, prefix sharing, speculation).

Options, events and limits cross the link between the engine's process and the HTTP process
(``flyer.serve.link``): the HTTP side imports them from here, not from the engine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from flyer.errors import FieldError
from flyer.infer.prefix_cache import PrefixCache
from flyer.infer.sampling import LogitAdjustments, SamplingParams, prompt_seen
from flyer.infer.speculative import check_speculation


# why a grammar request is refused by an engine built without a tokenizer (``Limits.grammars``)
NO_GRAMMARS = "this server's engine was started without the tokenizer that constraining an output needs"


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass(frozen=True)
class Limits:
    """What decides whether a request can ever run, known to the HTTP process without the model:
    the vocabulary, the context, the cache (``capacity`` blocks of ``block_size`` tokens), the queue,
    and ``grammars``: whether the engine has a tokenizer to mask logits with (structured outputs)."""

    vocab_size: int
    max_seq_len: int
    block_size: int
    capacity: int
    max_queue: int
    grammars: bool = True
    window_blocks: int = 0  # the most blocks a request of a model whose every layer slides holds (0: its row's)

    def blocks(self, n_tokens: int) -> int:
        """The most blocks a request of ``n_tokens`` (prompt and new) holds at once (``most_blocks``)."""
        return most_blocks(n_tokens, self.block_size, self.window_blocks)

    @property
    def room(self) -> int:
        """The most tokens one request can hold: the context, as far as the whole cache holds it (all of it where
        the cache holds a window's blocks: every layer sliding)."""
        if 0 < self.window_blocks <= self.capacity:
            return self.max_seq_len
        return min(self.max_seq_len, self.capacity * self.block_size)

    def check(self, prompt: Sequence[int], opts: "SamplingOptions") -> None:
        """``FieldError`` when the request can never run: empty prompt, token ids outside the
        vocabulary, prompt + max_tokens past the context or past the whole cache, a grammar without ``grammars``
        (naming ``response_format``: the API refuses a tool grammar itself, naming ``tool_choice`` or ``tools``),
        ``grammar_open`` ids outside the vocabulary (the mask allows them: only a library caller can pass them, the
        API leaves out a begin marker the model cannot write, ``Reasoning.grammar_markers``), negative
        ``grammar_after`` / ``grammar_at`` ids."""
        V, ctx = self.vocab_size, self.max_seq_len
        if len(prompt) == 0:
            raise FieldError("prompt", "must hold at least one token")
        if min(prompt) < 0 or max(prompt) >= V:
            raise FieldError("prompt", f"token ids must be in [0, {V})")
        if opts.max_tokens < 0:
            raise FieldError("max_tokens", f"must be >= 0 (got {opts.max_tokens})")
        _ = opts.params  # its construction checks the sampling fields' ranges
        if opts.stop_ids and (min(opts.stop_ids) < 0 or max(opts.stop_ids) >= V):
            raise FieldError("stop_token_ids", f"token ids must be in [0, {V}) (got {list(opts.stop_ids)})")
        if opts.seed is not None and not -(1 << 63) <= opts.seed < 1 << 64:
            raise FieldError("seed", f"must be in [-2**63, 2**64) (got {opts.seed})")
        opts.check_adjustments(V)
        if opts.grammar_open and (min(opts.grammar_open) < 0 or max(opts.grammar_open) >= V):
            raise FieldError("grammar_open", f"token ids must be in [0, {V}) (got {list(opts.grammar_open)})")
        for name in ("grammar_after", "grammar_at"):  # (past the vocabulary: a marker never written)
            if min(getattr(opts, name), default=0) < 0:
                raise FieldError(name, f"token ids must be >= 0 (got {list(getattr(opts, name))})")
        if opts.grammar is not None and not self.grammars:
            raise FieldError("response_format", f"json_object and json_schema are refused: {NO_GRAMMARS}; use text")
        if len(prompt) + opts.max_tokens > ctx:
            raise FieldError("max_tokens", f"a {len(prompt)}-token prompt and {opts.max_tokens} new tokens exceed "
                                           f"the model's context of {ctx} tokens")
        need = self.blocks(len(prompt) + opts.max_tokens)
        if need > self.capacity:
            raise FieldError("max_tokens", f"a {len(prompt)}-token prompt and {opts.max_tokens} new tokens need "
                                           f"{need} cache blocks; the server's cache holds {self.capacity}")


def most_blocks(n_tokens: int, block_size: int, window_blocks: int) -> int:
    """The most blocks a request of ``n_tokens`` (prompt and new) holds at once: its row's, at most ``window_blocks``
    where a model's every layer slides (0: no bound)."""
    need = math.ceil(n_tokens / block_size)
    return min(need, window_blocks) if window_blocks else need


@dataclass
class EngineConfig:
    kv_cache_bytes: int = 1 << 30  # the paged pool's size (all layers)
    block_size: int = 16  # tokens per block
    max_batch_size: int = 64  # running requests at once
    max_queue: int = 256  # waiting requests before submit refuses
    prefill_chunk: int = 256  # prompt tokens per step, over all prefilling requests
    cache_dtype: torch.dtype = torch.bfloat16
    prefix_sharing: bool = True
    prefix_cache: PrefixCache | None = None  # on-disk second tier (``open_disk_prefix_cache``)
    speculative: str | None = None  # "mtp": MTP drafts per decoding request per step, verified in the batch
    draft_tokens: int = 1  # drafts per request and step (speculative)
    # speculative: a step with more decoding rows than this drafts for none (verifying costs more than it wins back)
    speculative_max_batch: int | None = None
    # steps in fixed shapes, replayed from CUDA graphs on a GPU (``flyer.serve.graphs``); None: on a GPU for the
    # models that step so; True on the CPU: the same fixed-shape step, run eagerly (tests)
    cuda_graphs: bool | None = None

    def validate(self) -> None:
        for name in ("kv_cache_bytes", "block_size", "max_batch_size", "max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1 (got {getattr(self, name)})")
        check_speculation(self.speculative, self.draft_tokens)
        if self.speculative_max_batch is not None:
            if self.speculative_max_batch < 1:
                raise FieldError("speculative_max_batch", f"must be >= 1 (got {self.speculative_max_batch})")
            if self.speculative is None:
                raise FieldError("speculative_max_batch", "needs speculative decoding (--speculative mtp)")


@dataclass(frozen=True)
class SamplingOptions(LogitAdjustments):
    max_tokens: int = 16  # 0: the prompt only (its blocks cached; scored with prompt_logprobs), no token
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # tokens that end the request (kept in the output)
    logprobs: int | None = None  # report the chosen token's logprob and this many alternatives
    prompt_logprobs: bool = False  # report each prompt token's logprob (echo)
    # OpenAI's logit adjustments (``LogitAdjustments``): reported logprobs are the adjusted ones
    logit_bias: tuple[tuple[int, float], ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: over the prompt and the output
    grammar: str | None = None  # structured outputs: the llguidance grammar the output matches (flyer.serve.grammar)
    # the reasoning end marker's ids when the prompt opens reasoning: ``grammar`` then holds for the output after
    # them, which runs free up to there (``flyer.serve.grammar.marker_ends``); (): it holds from the first token
    grammar_after: tuple[int, ...] = ()
    # with ``grammar_after``, the begin marker's ids when the prompt neither opens nor closes reasoning: ``grammar``
    # holds from the first token, but the output may open reasoning with them instead (then as above)
    grammar_open: tuple[int, ...] = ()
    # with ``grammar_after``, a calls marker's ids that end the reasoning too and are ``grammar``'s first (Kimi's
    # tool-calls section opened inside the reasoning: ``flyer.serve.reasoning.Reasoning.grammar_at``)
    grammar_at: tuple[int, ...] = ()

    @functools.cached_property  # built once a request, not at each token it samples
    def params(self) -> SamplingParams:
        """What ``flyer.infer.sampling`` draws with (``FieldError`` naming a field out of its range)."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p)


@dataclass
class TokenEvent:
    """One generated token (``token`` None on a final event without one: cancelled, error)."""

    token: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    # "stop", "length", "cancelled"; failed: "error", "grammar" (its grammar, past its limits), "shutdown"
    finish_reason: str | None = None
    # with the first token, when asked: per prompt token (logprob, top alternatives); None first
    prompt_logprobs: list[tuple[float, dict[int, float] | None] | None] | None = None
    # with the first token: the prompt tokens taken from the prefix cache at admission (``Request.cached_prompt``)
    cached_tokens: int | None = None
    # with the last event: the prompt tokens the request wrote to the prefix cache (``Request.written_prompt``)
    written_tokens: int | None = None


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    opts: SamplingOptions
    emit: Callable[[TokenEvent], None]
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    n_cached: int = 0  # leading tokens whose cache entries are in ``blocks``
    blocks: list[int] = field(default_factory=list)
    released: int = 0  # leading blocks given back behind a sliding window (``NULL_BLOCK`` in ``blocks``)
    keys: list[str] = field(default_factory=list)  # chain keys of the leading full blocks (registered)
    generator: torch.Generator | None = None
    prompt_lp: list[tuple[float, dict[int, float] | None] | None] | None = None
    n_shared: int = 0  # leading tokens in blocks taken from the prefix index (never written)
    mtp_len: int = 0  # leading positions whose MTP cache entries are written (speculative)
    h_prev: torch.Tensor | None = None  # main hidden states (C, D) of positions [mtp_len, n_cached)
    slot: int | None = None  # its hybrid pool slot while running (DeepSeek-V4)
    matcher: Any = None  # its grammar's ``flyer.serve.grammar.Matcher``, at its tokens so far (``opts.grammar``)
    deferred: Any = None  # that matcher while the output reasons (``opts.grammar_after`` not written yet)
    submitted: float = 0.0
    last_token_at: float | None = None
    cancelled: str | None = None  # the finish reason ``Engine.cancel`` ends it with at the next step
    admitted: bool = False  # once admitted (its prompt counted), preempted or not since
    # prompt tokens its first admission took from cached blocks (shared in memory or on disk), not computed: what
    # ``usage`` reports (a recompute after preemption, which the client does not see, is not counted)
    cached_prompt: int = 0
    written_prompt: int = 0  # prompt tokens in the blocks it keyed in the prefix index first (``usage``'s writes)
    done: bool = False
    _prompt_seen: torch.Tensor | None = field(default=None, repr=False)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    def prompt_seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """The prompt's ids as a (vocab,) bool mask (``flyer.infer.sampling.prompt_seen``), built at the first
        token it is asked for (a repetition penalty's), not at each."""
        if self._prompt_seen is None:
            self._prompt_seen = prompt_seen(self.prompt, vocab, device)
        return self._prompt_seen
