"""One HTTP request's generation: its choices submitted to the engine, their events as tokens arrive, cancellation
when the client goes or a stop string ends a choice, ``usage``, and best_of's ranking of candidates."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import AsyncIterator, Iterator

from fastapi import Request

from flyer.errors import FieldError
from flyer.serve.api_error import ApiError, engine_failed, sse_event
from flyer.serve.choice import Choice
from flyer.serve.link import EngineClient, EngineGone
from flyer.serve.request import QueueFull, SamplingOptions, TokenEvent

# finish reasons that fail the whole request: the engine failed ("error"), its grammar did ("grammar"), a drain
# ran out of time ("shutdown"); ``engine_failed`` answers each
FAILED = ("error", "grammar", "shutdown")
DISCONNECT_POLL_S = 1.0  # how often a request's handler asks whether its client is still there


def mean_logprob(c: Choice) -> float:
    """Choice ``c``'s score as a best_of candidate: the mean logprob of the tokens it generated (every one, as
    ``usage`` counts them: a stop string cuts the text, not the sequence sampled), each the one the engine reports
    (after logit bias, penalties and a grammar's mask, before temperature and top-p). OpenAI's definition ("the
    highest log probability per token"), not vLLM's sum, which favours the candidates that end soonest; the model's
    own likelihood, not the sampling distribution's, which at temperature 0 scores every token 0. -inf without tokens
    (max_tokens 0: every candidate alike, in order)."""
    lps = [e.logprob for e in c.events if e.token is not None]
    return math.fsum(lps) / len(lps) if lps else -math.inf


def best_candidates(scores: list[float], per_prompt: int, n: int) -> list[int]:
    """Indices of each prompt's ``n`` best candidates, best first, prompts in order: ``scores[k]`` is candidate k's,
    prompt i's being ``i per_prompt`` to ``(i + 1) per_prompt - 1``. Ties keep the lower index first (a stable sort:
    greedy candidates are all equal)."""
    out = []
    for i in range(0, len(scores), per_prompt):
        out += sorted(range(i, i + per_prompt), key=lambda k: -scores[k])[:n]
    return out


class Generation:
    """Every choice of one HTTP request submitted to ``engine`` (decoded by ``tok``) (at construction, so a refusal
    answers with its status before any response starts): ``n`` per prompt (best_of's candidates on completions),
    choice k = i n + j the j-th of prompt i (as OpenAI numbers them; with a seed, sampled with seed + j). ``events``
    yields (choice index, its state, event) as tokens arrive and cancels what is left when its consumer
    stops early (client gone, stop string, error). ``field``: the one named when they exceed the queue."""

    def __init__(self, engine: EngineClient, tok, request: Request, prompts: list[list[int]], opts: SamplingOptions,
                 stops: list[str], n: int = 1, field: str | None = None):
        self.engine, self.request, self.prompts, self.n = engine, request, prompts, n
        for p in prompts:
            self.engine.check(p, opts)
        queue = self.engine.limits.max_queue
        if len(prompts) * n > queue:  # a 429 would have the client retry in vain
            raise FieldError(field or ("n" if n > 1 else "prompt"), f"{len(prompts)} prompt(s) x {n} choice(s) "
                                                                    f"exceed the server's queue of {queue} requests")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reasoning_tokens = None  # chat with a reasoning parser: choice -> its reasoning tokens (``usage``)
        self.failed: str | None = None  # a choice's finish reason that fails the request (``FAILED``)
        self.grammar_field = "response_format"  # the field its grammar comes from (``engine_failed``)
        self.choices = [Choice(tok, stops) for _ in range(len(prompts) * n)]
        self.reqs = []
        try:
            for k in range(len(self.choices)):
                seeded = opts if opts.seed is None else dataclasses.replace(opts, seed=(opts.seed + k % n) % (1 << 64))
                self.reqs.append(self.engine.submit(self.prompt_of(k), seeded, self._emitter(k)))
        except QueueFull as err:
            self.cancel()
            raise ApiError(429, f"too many requests waiting: {err}", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineGone as err:
            raise ApiError(503, f"the server is shutting down ({err})", "server_error", code="unavailable") from None
        except BaseException:  # the choices submitted before a refusal must not run on
            self.cancel()
            raise

    def prompt_of(self, k: int) -> list[int]:
        """Choice k's prompt."""
        return self.prompts[k // self.n]

    def _emitter(self, i: int):
        return lambda e: self.queue.put_nowait((i, e))

    def cancel(self) -> None:
        for r in self.reqs:
            if not r.done:
                self.engine.cancel(r)

    async def events(self) -> AsyncIterator[tuple[int, Choice, TokenEvent]]:
        live = len(self.choices)
        loop = asyncio.get_running_loop()
        polled = loop.time()
        try:
            while live:
                # a client gone (closed, timed out) is seen within DISCONNECT_POLL_S, tokens flowing or not:
                # a non-streaming response writes nothing before its end that could fail
                if loop.time() - polled >= DISCONNECT_POLL_S:
                    polled = loop.time()
                    if await self.request.is_disconnected():
                        return
                try:  # wait_for (a task and a timer) only when nothing has arrived yet
                    i, e = self.queue.get_nowait() if not self.queue.empty() else \
                        await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                c = self.choices[i]
                if c.finish_reason is not None:
                    continue  # a token after a stop string, before the cancel landed
                c.add(e)
                if c.finish_reason in FAILED:  # the request fails as a whole, no choice's chunk
                    self.failed = c.finish_reason
                    return
                if c.finish_reason is not None:
                    live -= 1
                    if not self.reqs[i].done:  # a stop string matched here: the engine counts it as one
                        self.engine.cancel(self.reqs[i], c.finish_reason)
                yield i, c, e
        finally:
            self.cancel()

    async def wait(self) -> None:
        """Every choice to its end (non-streaming); a failure answers ``engine_failed``'s error."""
        async for _ in self.events():
            pass
        if self.failed:
            raise engine_failed(self.failed, self.grammar_field)

    def stream_tail(self, head: dict, usage: bool) -> Iterator[dict]:
        """A stream's last chunks: OpenAI's error body when the engine failed (the official client raises
        it), else the usage chunk when asked for."""
        if self.failed:
            yield engine_failed(self.failed, self.grammar_field).body()
        elif usage:
            yield {**head, "choices": [], "usage": self.usage()}

    def stream_end(self, head: dict, usage: bool) -> Iterator[bytes]:
        """``stream_tail`` as server-sent events, then [DONE]."""
        yield from map(sse_event, self.stream_tail(head, usage))
        yield b"data: [DONE]\n\n"

    def usage(self) -> dict:
        """OpenAI's ``usage``: each prompt counted once, its ``cached_tokens`` the fewest its choices took from the
        prefix cache (a prompt's n choices share it: the first computes what the others take)."""
        p, c = sum(len(x) for x in self.prompts), sum(len(ch.ids) for ch in self.choices)
        took = [next((e.cached_tokens for e in ch.events if e.cached_tokens is not None), 0) for ch in self.choices]
        cached = sum(min(took[i * self.n:(i + 1) * self.n]) for i in range(len(self.prompts)))
        # a block is keyed once, by whichever choice filled it first: the choices' writes add up
        written = sum(next((e.written_tokens for e in ch.events if e.written_tokens is not None), 0)
                      for ch in self.choices)
        out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
               "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written}}
        if self.reasoning_tokens is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": sum(map(self.reasoning_tokens, self.choices))}
        return out
