"""The OpenAI routes over the engine's link (FastAPI), in the shapes the official ``openai`` client reads.

    GET  /health                200 {"status": "ok"} when serving, 503 while draining (until the listener closes)
    GET  /metrics               Prometheus text (``flyer.serve.metrics``)
    GET  /v1/models             the one served model (a list of one)
    GET  /v1/models/{model}     that model (404 for any other name)
    POST /v1/completions        prompt: text, list of texts, token ids or lists of token ids;
                                max_tokens, temperature, top_p, stop, seed, stream (+ stream_options),
                                vLLM's top_k, min_p, repetition_penalty, stop_token_ids (both routes),
                                logprobs (0-20), echo (prompt tokens scored, as evaluation harnesses ask),
                                suffix (fill-in-the-middle: the text is the middle; ``flyer.data.fim``),
                                best_of (candidates per prompt; the n best by mean logprob: ``flyer.serve.generation``)
                                response_format (both routes): text, json_object, json_schema (``flyer.serve.grammar``)
    POST /v1/chat/completions   messages rendered by the tokenizer's chat template (as transformers'
                                ``apply_chat_template`` renders it; ``flyer.data.chat_template``), else a default;
                                stream with ``delta`` chunks, ``stream_options.include_usage``;
                                tools, tool_choice, tool messages: calls in the format the chat template
                                writes (``flyer.serve.tools``: V3.1 / V3.2-Exp's, V3-0324 / R1's, V3.2 / V4's DSML,
                                Kimi K2's), or the one ``tool_call_parser`` names;
                                chat_template_kwargs, reasoning_effort (OpenAI's: a template variable as vLLM
                                passes it, V4's levels mapped; ``flyer.data.chat_template.effort_kwargs``);
                                with a reasoning parser, ``reasoning_content`` apart from
                                ``content`` (``flyer.serve.reasoning``), and a prompt that opens reasoning has
                                its grammar (tool_choice, response_format) hold after the reasoning
    POST /v1/responses          OpenAI's Responses API over the chat route (``flyer.serve.responses``)
    GET  /v1/responses/{id}     a stored response; DELETE forgets it; GET .../input_items lists its input items

Every response carries ``usage``, with ``prompt_tokens_details.cached_tokens``: the prompt tokens the engine took
from its prefix cache instead of computing them (0 with prefix sharing off), and ``cache_write_tokens``: those it
wrote there. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (a field's type or value, a prompt too
long for the context), 401 for a missing or wrong API key, 404 for an unknown model or route, 413 for a body past
``MAX_BODY_BYTES`` (``flyer.serve.body_limit``), 429 when the queue is full, 503 while draining. A bug answers 500
in the same shape, never with a traceback (the handlers: ``flyer.serve.app``); in a stream, whose status is sent,
it ends the stream with OpenAI's error event (the ``openai`` client raises it).
The request bodies and their field checks are ``flyer.serve.schema``'s.

Stop strings are matched on the decoded text here (the engine knows token ids only); a match
ends the engine request (finish reason "stop": ``Engine.cancel``), so its blocks are freed at the next step. A
client that disconnects cancels its requests the same way ("cancelled"). The engine runs in another process
(``flyer.serve.link``): the routes speak to it through an ``EngineClient`` and hear its events on the event loop.
Prompts are encoded (and conversations rendered) on a thread (``flyer.serve.tokenize``), not on that loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import time
import uuid
from typing import AsyncIterator

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from flyer.data.chat_template import chat_renderer, effort_kwargs, renders_developer
from flyer.data.deepseek_encoding import ChatEncoding, ChatTemplate
from flyer.data.fim import fim_prompt
from flyer.errors import FieldError
from flyer.serve.api_error import ApiError, ContextLengthError, sse_event
from flyer.serve.choice import Choice, calls_content
from flyer.serve.generation import Generation, best_candidates, mean_logprob
from flyer.serve.grammar import json_grammar
from flyer.serve.link import EngineClient
from flyer.serve.metrics import ApiMetrics
from flyer.serve.reasoning import PARSERS, Reasoning, Split
from flyer.serve.request import NO_GRAMMARS, SamplingOptions, TokenEvent
from flyer.serve.sampling_defaults import OPENAI_DEFAULTS
from flyer.serve.schema import JINJA_ROLES, Body, ChatBody, CompletionBody
from flyer.serve.tools import (ToolCall, chosen_format, content_end, marked_text, marker_ids, parse_tool_calls,
                               tool_grammar)
from flyer.serve.tokenize import TokenPieces, token_starts
from flyer.serve.tools_kimi import calls_so_far

class Api:
    """The routes, over one engine and tokenizer; ``draining`` makes new requests answer 503."""

    def __init__(self, engine: EngineClient, tokenizer, model_name: str, api_key: str | None = None,
                 chat_template: ChatTemplate = None, reasoning_parser: str | None = None,
                 tool_call_parser: str = "auto", sampling_defaults: dict[str, float] | None = None):
        """``reasoning_parser``: a ``flyer.serve.reasoning.PARSERS`` name, or None: all output is content.
        ``tool_call_parser``: a ``flyer.serve.tools.TOOL_PARSERS`` name, or "auto": the chat template's format.
        ``sampling_defaults``: what a request's unset sampling fields take (``flyer.serve.sampling_defaults``)."""
        self.engine, self.tok, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.sampling_defaults = dict(sampling_defaults or {})
        if reasoning_parser is not None and reasoning_parser not in PARSERS:
            raise FieldError("reasoning_parser", f"must be one of {sorted(PARSERS)} (got {reasoning_parser!r})")
        self.reasoning = None if reasoning_parser is None else PARSERS[reasoning_parser]
        self.render_chat = chat_renderer(chat_template, self._special_tokens())
        self.encoding = chat_template if isinstance(chat_template, ChatEncoding) else None  # its roles
        self.developer_role = "developer" if renders_developer(chat_template) else "system"
        self.tool_format = chosen_format(tool_call_parser, chat_template)  # the format calls are written and read in
        self.pieces = TokenPieces(tokenizer, lambda: engine.limits.vocab_size)  # logprobs' token texts and bytes
        self.draining = False
        self.created = int(time.time())
        self.metrics = ApiMetrics()

    def _special_tokens(self) -> dict[str, str]:
        named = getattr(self.tok, "special_tokens", None)  # byte tokens (a --preset) have none
        return named() if named is not None else {}

    # ---- request handling ---------------------------------------------------------------
    def check_access(self, request: Request, model: str | None = None) -> None:
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, key = auth.strip().partition(" ")
            if scheme.lower() != "bearer" or key.strip() != self.api_key:  # RFC 9110: the scheme in any case
                raise ApiError(401, "Incorrect API key provided" if auth else "Missing API key (Authorization: "
                               "Bearer KEY)", code="invalid_api_key")
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="unavailable")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                           param="model", code="model_not_found")

    def _options(self, body: Body, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                 echo: bool = False, prompt_field: str = "prompt", tokens_field: str = "max_tokens",
                 prompt_name: str = "prompt") -> SamplingOptions:
        """The engine's options of ``body``: ``max_tokens`` (the field ``tokens_field``'s; None: the rest of the room)
        new tokens after a prompt of ``prompt_len`` tokens (the field ``prompt_field``'s). ``ContextLengthError``, as
        vLLM splits it: naming the prompt's field when it leaves no room for a token, else ``tokens_field`` when
        ``max_tokens`` is past the room left (OpenAI's code for both); ``prompt_name``: what the messages call the
        prompt."""
        lim = self.engine.limits
        held = f"the model's context of {lim.max_seq_len} tokens" if lim.room == lim.max_seq_len else \
            f"the server's cache of {lim.capacity} blocks ({lim.room} tokens)"
        if prompt_len > lim.room or prompt_len == lim.room and max_tokens != 0:  # echo scoring a full window fits
            raise ContextLengthError(prompt_field, f"a {prompt_len}-token {prompt_name} leaves no room for a new "
                                                   f"token in {held}")
        # no limit (chat's unset, completions' null): the rest of the context, as far as the cache holds it
        if max_tokens is None:
            max_tokens = lim.room - prompt_len
        elif prompt_len + max_tokens > lim.room:
            unset = "" if tokens_field in body.model_fields_set else " (unset: its default)"
            raise ContextLengthError(tokens_field, f"{max_tokens}{unset} new tokens after a {prompt_len}-token "
                                                   f"{prompt_name} exceed {held}: at most {lim.room - prompt_len}")
        fmt = body.response_format  # compiled here, so that a schema llguidance refuses answers 400
        grammar = None if fmt is None or fmt.type == "text" else json_grammar(fmt.schema_or_object())
        sampling = self.sampling(body)
        return SamplingOptions(max_tokens=max_tokens, temperature=sampling["temperature"], top_p=sampling["top_p"],
                               top_k=max(sampling["top_k"], 0), min_p=sampling["min_p"], seed=body.seed,
                               stop_ids=(*self.tok.eos_ids(), *(body.stop_token_ids or ())), logprobs=logprobs,
                               prompt_logprobs=echo and logprobs is not None, logit_bias=body.token_bias(),
                               frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                               repetition_penalty=sampling["repetition_penalty"], grammar=grammar)

    def sampling(self, body) -> dict[str, float]:
        """``body``'s sampling fields (``OPENAI_DEFAULTS``' names), each unset one the server's default: its
        checkpoint's (``sampling_defaults``), else OpenAI's."""
        return {k: v if (v := getattr(body, k, None)) is not None else self.sampling_defaults.get(k, default)
                for k, default in OPENAI_DEFAULTS.items()}

    def _prompts(self, prompt, suffix: str | None = None,
                 starts: bool = False) -> tuple[list[list[int]], list[list[int] | None] | None]:
        """The request's prompts as ids (call it off the event loop: ``flyer.serve.tokenize``); with a ``suffix``
        (text prompts only: ``CompletionBody.check_fields``) each text's fill-in-the-middle prompt (``fim_prompt``),
        the same suffix after each. With ``starts`` (echo's ``text_offset``) and text prompts, also where each
        token starts in its text (``token_starts``; None: the text is the ids' decode); else None."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not prompt:
            raise FieldError("prompt", "must not be empty")
        if isinstance(prompt[0], int):
            return [list(prompt)], None
        if not isinstance(prompt[0], str):
            return [list(p) for p in prompt], None
        if suffix:
            return [fim_prompt(self.tok, p, suffix) for p in prompt], None
        if not starts:
            return [self.tok.encode_ids(p) for p in prompt], None
        ids, where = zip(*(token_starts(self.tok, p) for p in prompt))
        return list(ids), list(where)

    def _token_text(self, t: int) -> str:
        return self.pieces.text(t)

    def _completion_logprobs(self, c: Choice, tokens: range, prompt: list[int] | None = None, at: int = 0,
                             starts: list[int] | None = None) -> dict:
        """OpenAI's logprobs of the echoed ``prompt`` (None: not echoed; its first token has none), then of
        choice ``c``'s tokens ``tokens`` (indices into ``c.ids``). ``text_offset``: where each token's text
        starts in the returned text, whose generated part starts at ``at``: the prompt's tokens' ``starts`` in its
        text (None: in its decode, the echoed text of token ids)."""
        def top(d: dict[int, float] | None, token: int, lp: float) -> dict[str, float]:
            """The top tokens' logprobs and the chosen token's, as OpenAI's (up to logprobs + 1 of them)."""
            out = {self._token_text(k): v for k, v in (d or {}).items()}
            out.setdefault(self._token_text(token), lp)
            return out

        texts, lps, tops, offsets = [], [], [], []
        if prompt is not None:
            plp = next((e.prompt_logprobs for e in c.events if e.prompt_logprobs is not None), None) or []
            decoded = Choice(self.tok, [])  # the prompt's offsets in its text, decoded as a generation is
            for j, t in enumerate(prompt):
                decoded.add(TokenEvent(t, finish_reason="length" if j == len(prompt) - 1 else None))
                lp = plp[j] if j < len(plp) else None
                texts.append(self._token_text(t))
                lps.append(None if lp is None else lp[0])
                tops.append(None if lp is None else top(lp[1], t, lp[0]))
            offsets += decoded.starts if starts is None else starts
        for j in tokens:
            e = c.events[j]
            texts.append(self._token_text(e.token))
            lps.append(e.logprob)
            tops.append(top(e.top_logprobs, e.token, e.logprob))
            offsets.append(at + c.starts[j])
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def completions(self, request: Request, body: CompletionBody) -> Response:
        self.check_access(request, body.model)
        body.check_fields()
        echo_starts = body.echo and body.logprobs is not None  # text_offset: where the tokens start in the prompt
        prompts, starts = await asyncio.to_thread(self._prompts, body.prompt, body.suffix, echo_starts)
        opts = self._options(body, body.max_tokens, max(len(p) for p in prompts), body.logprobs, body.echo,
                             prompt_name="FIM prompt (the prompt, suffix and markers)" if body.suffix else "prompt")
        per_prompt = body.candidates()
        ranked = per_prompt > body.n  # best_of = n returns every candidate, in order, as n alone does (and streams)
        if ranked and opts.logprobs is None:  # the score needs each token's logprob; the response leaves them out
            opts = dataclasses.replace(opts, logprobs=0)
        gen = Generation(self.engine, self.tok, request, prompts, opts, body.stop_strings(), per_prompt,
                          "best_of" if ranked else None)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        # echo: a text prompt as sent (OpenAI's and vLLM's; its decode would drop special tokens' text), token ids
        # as their decode
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt if isinstance(body.prompt[0], str) \
            else None
        prefix = ["" if not body.echo else texts[k // per_prompt] if texts else self.tok.decode(gen.prompt_of(k))
                  for k in range(len(gen.choices))]

        def logprobs(i: int, c: Choice, tokens: range | None = None, echo: bool = body.echo) -> dict | None:
            """Choice i's logprobs of ``tokens`` (None: every token its text keeps), after the echoed prompt's;
            None when not asked for or there are none."""
            if body.logprobs is None or (tokens is not None and not tokens and not echo):
                return None
            tokens = range(c.kept()) if tokens is None else tokens
            return self._completion_logprobs(c, tokens, gen.prompt_of(i) if echo else None, len(prefix[i]),
                                             starts[i // per_prompt] if echo and starts else None)

        if not body.stream:
            await gen.wait()
            picked = best_candidates([mean_logprob(c) for c in gen.choices], per_prompt, body.n) if ranked \
                else range(len(gen.choices))  # usage counts every candidate, as OpenAI bills them
            out = [{"index": i, "text": prefix[k] + gen.choices[k].text, "finish_reason": gen.choices[k].finish_reason,
                    "logprobs": logprobs(k, gen.choices[k])} for i, k in enumerate(picked)]
            return JSONResponse({**head, "choices": out, "usage": gen.usage()})

        if (body.stream_options or {}).get("include_usage"):
            head["usage"] = None  # OpenAI's chunks before the usage chunk carry it null
        async def sse() -> AsyncIterator[bytes]:
            echoed = [not body.echo] * len(gen.choices)
            async for i, c, e in gen.events():
                if not echoed[i]:  # with the choice's first event: it carries the prompt's logprobs
                    echoed[i] = True
                    yield sse_event({**head, "choices": [{"index": i, "text": prefix[i], "finish_reason": None,
                                                          "logprobs": logprobs(i, c, range(0), echo=True)}]})
                text, tokens = c.delta(), c.delta_tokens()
                if e.token is not None or c.finish_reason is not None:  # a chunk per token: clients time them
                    yield sse_event({**head, "choices": [{"index": i, "text": text, "finish_reason": c.finish_reason,
                                                          "logprobs": logprobs(i, c, tokens, echo=False)}]})
            for end in gen.stream_end(head, (body.stream_options or {}).get("include_usage", False)):
                yield end
        return StreamingResponse(sse(), media_type="text/event-stream")

    def _chat_prompt(self, body: ChatBody) -> list[int]:
        return self._chat_ids(body)[1]

    def _chat_ids(self, body: ChatBody) -> tuple[str, list[int]]:
        """(``body``'s prompt text, its ids): the template's text is the whole prompt (its own BOS included), as
        transformers encodes it. Rendered and encoded off the event loop by the routes."""
        text = self._chat_text(body)
        return text, self.tok.encode_ids(text, add_special_tokens=False)

    def _chat_text(self, body: ChatBody) -> str:
        """``body``'s messages rendered, each as transformers' ``apply_chat_template`` passes it (``chat_renderer``:
        no key set to null, a reasoning sent as ``reasoning`` or ``thinking`` under ``reasoning_content`` too)."""
        roles = self.encoding.roles if self.encoding is not None else JINJA_ROLES
        for i, m in enumerate(body.messages):
            if m.role not in roles:  # latest_reminder: DeepSeek-V4's role only
                raise FieldError(f"messages[{i}].role", f"this model's chat format takes {', '.join(roles)} "
                                                        f"(got {m.role!r})")
        messages = [m.model_dump() for m in body.messages]
        for m in messages:  # a template without a developer branch would drop it: its instructions as system's
            if m["role"] == "developer":
                m["role"] = self.developer_role
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
        fmt = body.response_format  # a release's encoder writes it into the prompt, a template not; its grammar holds
        fmt = None if fmt is None or fmt.type == "text" else fmt.model_dump(by_alias=True, exclude_none=True)
        try:
            extra = effort_kwargs(self.encoding, body.reasoning_effort, body.chat_template_kwargs)
            return self.render_chat(messages, tools, extra=extra, response_format=fmt)
        except jinja2.TemplateError as e:
            raise FieldError("messages", f"the chat template cannot render them: {e}") from None

    async def chat(self, request: Request, body: ChatBody) -> Response:
        result = await self.chat_result(request, body)
        if isinstance(result, dict):
            return JSONResponse(result)

        async def sse() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(result) as chunks:
                async for chunk in chunks:
                    yield sse_event(chunk)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")

    async def chat_result(self, request: Request, body: ChatBody, spans: bool = False) -> dict | AsyncIterator[dict]:
        """A chat completion as OpenAI's JSON object, or (``body.stream``) its chunks as they come, ending with the
        usage chunk when asked for or the error body when the engine failed (``Generation.stream_tail``): the
        chat route writes them out, ``flyer.serve.responses`` reads them. ``spans`` (the Responses route's, never in
        chat's JSON): each choice (each chunk's) also carries ``content_span`` ``[lo, hi]``: its ``logprobs.content``
        entries ``lo:hi`` are the content's tokens (``content_tokens``), not the reasoning's, its end marker's or the
        calls'."""
        self.check_access(request, body.model)
        body.check_fields()
        text, prompt = await asyncio.to_thread(self._chat_ids, body)
        top = body.top_logprobs or 0
        limit = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        opts = self._options(body, getattr(body, limit), len(prompt), top if body.logprobs else None,
                             prompt_field="messages", tokens_field=limit)
        mode, name = body.tool_mode()
        parse, parallel, fmt = mode != "none", body.parallel_tool_calls, self.tool_format
        if mode in ("required", "named") and not self.engine.limits.grammars:
            raise FieldError("tool_choice", f"{'required' if mode == 'required' else 'a named function'} "
                                            f"is refused: {NO_GRAMMARS}; use auto or none")
        formatted = mode == "auto" and opts.grammar is not None and self.engine.limits.grammars
        # "auto" with a strict function: text, or text then calls that match their schemas (as OpenAI's strict
        # mode promises; every call's, the non-strict functions' too, as "required" holds them)
        strict = mode == "auto" and opts.grammar is None and any(t.function.strict for t in body.tools)
        if strict and not self.engine.limits.grammars:
            raise FieldError("tools", f"a strict function is refused: {NO_GRAMMARS}; set strict false")
        if mode in ("required", "named") or formatted or strict:
            # a calls block whose arguments match the schemas; under "auto" a response_format rules the reply
            # instead, and a call stays possible
            functions = [t.function.model_dump(exclude_none=True) for t in body.tools]
            schema = body.response_format.schema_or_object() if formatted else None
            content = ({"type": "object"} if schema is None else schema) if formatted else None  # json_object: None
            grammar = tool_grammar(functions, self.tok, name, parallel, fmt, calls_so_far(body.messages),  # Kimi IDX
                                   content, text_first=strict)
            opts = dataclasses.replace(opts, grammar=grammar)
        think = Reasoning(self.reasoning, self.tok, Reasoning.opens(self.reasoning, text))
        if opts.grammar is not None:  # held after the reasoning the prompt opens, or the output opens with its tokens
            after, opening = think.grammar_markers(self.tok, text, self.engine.limits.vocab_size)
            at = think.grammar_at(self.tok, after, fmt.calls_begin if mode in ("required", "named") or formatted
                                  or strict else None)  # a grammar that may open with a calls block
            opts = dataclasses.replace(opts, grammar_after=after, grammar_open=opening, grammar_at=at)
        gen = Generation(self.engine, self.tok, request, [prompt], opts, body.stop_strings(), body.n)
        if mode in ("required", "named") or strict:
            gen.grammar_field = "tools"
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name}

        def split(c: Choice) -> Split:
            return think.split(c.text, c.ids, c.kept(), c.starts, c.finish_reason is not None, id(c))
        if self.reasoning is not None:
            gen.reasoning_tokens = lambda c: think.reasoning_tokens(split(c), c.kept())

        def content_logprobs(events: list[TokenEvent]) -> dict | None:
            if not body.logprobs:
                return None
            return {"content": [self._chat_logprob(e.token, e.logprob, e.top_logprobs) for e in events]}

        def tool_calls(c: Choice, s: Split) -> tuple[str | None, list[ToolCall]] | None:
            if not parse or s.content is None:
                return None
            return self._tool_calls(c, parallel, s.token, think.content_head(c.text, c.starts, c.kept(), s))

        def finish(c: Choice, calls: tuple | None) -> str:
            """The choice's finish reason: "tool_calls" for an answer with calls, but "length" for one cut short (its
            calls those before the cut, ``parse_tool_calls``): the client learns the answer is incomplete."""
            return "tool_calls" if calls and calls[1] and c.finish_reason != "length" else c.finish_reason

        # while tools are parsed, content streams up to the first calls marker, as its token or as text
        begin, call_at = marker_ids(self.tok, fmt).get(fmt.calls_begin), {}

        def content_tokens(c: Choice, s: Split, calls: tuple | None) -> range:
            """Indices into ``c.ids`` of the content's tokens: from the split's first content token (or the one
            before, the end marker's, when it carries content text too) up to the calls block's marker (``calls``:
            parsed; None: no block, the content runs to the end); empty before the content begins."""
            kept = c.kept()
            if s.content is None:
                return range(kept, kept)
            lo = s.token - 1 if think.content_head(c.text, c.starts, kept, s) else s.token
            if calls is None:
                return range(lo, kept)
            hi = next((k for k in range(s.token, kept) if c.ids[k] == begin), None)
            if hi is None:  # the marker in text tokens: those that start before it are the content's
                at = c.text.find(fmt.calls_begin, s.content)
                hi = bisect.bisect_left(c.starts, at, lo, kept) if at >= 0 else kept
            return range(lo, hi)

        def span(tokens: range, c: Choice | None = None, s: Split | None = None, calls: tuple | None = None) -> dict:
            """``content_span`` of choice ``c`` (a chunk of it) whose logprobs are those of ``tokens``, when ``spans``
            (none: chat's own JSON, which computes nothing for it); no choice: an empty span."""
            if not spans:
                return {}
            content = range(0) if c is None else content_tokens(c, s, calls)
            lo = min(max(content.start, tokens.start), tokens.stop)
            return {"content_span": [lo - tokens.start, max(lo, min(content.stop, tokens.stop)) - tokens.start]}

        if not body.stream:
            await gen.wait()
            out = []
            for i, c in enumerate(gen.choices):
                s = split(c)
                calls = tool_calls(c, s)
                message = think.message(c.text, s) if calls is None else \
                    think.message(c.text, s, calls[0], [call.openai() for call in calls[1]])
                out.append({"index": i, "message": message, "finish_reason": finish(c, calls),
                            "logprobs": content_logprobs(c.events[:c.kept()]),
                            **span(range(c.kept()), c, s, calls)})
            return {**head, "choices": out, "usage": gen.usage()}

        head["object"] = "chat.completion.chunk"
        if (body.stream_options or {}).get("include_usage"):
            head["usage"] = None  # OpenAI's chunks before the usage chunk carry it null

        # a forced call's answer has no content: null from the first chunk, as OpenAI's (the SDK's stream helper
        # then gives the whole answer's null); else "" until the text shows
        opening = None if mode in ("required", "named") else ""

        async def chunks() -> AsyncIterator[dict]:
            for i in range(len(gen.choices)):
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": opening},
                                            "finish_reason": None, "logprobs": None, **span(range(0))}]}
            async for i, c, e in gen.events():
                s, sent = split(c), c.sent
                calls = tool_calls(c, s) if c.finish_reason is not None else None
                if calls is not None:  # what is not yet streamed: reasoning, content before the calls; the calls
                    content, streamed = calls[0] or "", c.text[s.content:max(sent, s.content)]
                    rest = content[len(streamed):] if content.startswith(streamed) else ""
                    c.delta()
                    delta, tokens = think.delta(c.text, c.sent, s, rest, id(c)), c.delta_tokens()
                    lp = content_logprobs([c.events[j] for j in tokens])
                    deltas = [{"index": k, **call.openai()} for k, call in enumerate(calls[1])]
                    if delta or lp:
                        yield {**head, "choices": [{"index": i, "delta": delta, "finish_reason": None,
                                                    "logprobs": lp, **span(tokens, c, s, calls)}]}
                    if deltas:  # the calls, then the finish in a chunk of its own, as OpenAI streams them (the
                        # SDK's stream helper closes a call's arguments on a later chunk's finish_reason)
                        yield {**head, "choices": [{"index": i, "delta": {"tool_calls": deltas}, "finish_reason": None,
                                                    "logprobs": None, **span(range(0))}]}
                    yield {**head, "choices": [{"index": i, "delta": {}, "finish_reason": finish(c, calls),
                                                "logprobs": None, **span(range(0))}]}
                    continue
                if parse and s.content is not None and begin is not None and e.token == begin and i not in call_at \
                        and c.starts[-1] >= s.content:  # decoding may skip the marker's token
                    call_at[i] = c.starts[-1]
                upto = s.safe if not parse or s.content is None else \
                    min(content_end(c.text, max(sent, s.content), fmt), call_at.get(i, len(c.text)))
                if parse and s.content is not None and sent <= s.content \
                        and calls_content(c.text[s.content:upto]) is None:
                    upto = min(upto, s.content)  # blank so far: null should calls follow, so none of it streams yet
                c.delta(upto)
                delta, tokens = think.delta(c.text, c.sent, s, key=id(c)), c.delta_tokens()
                if e.token is not None or c.finish_reason is not None:  # a chunk per token: clients time them
                    lp = content_logprobs([c.events[j] for j in tokens]) if tokens else None
                    # before the end no calls are parsed: what streamed is the content's up to the calls marker
                    yield {**head, "choices": [{"index": i, "delta": delta, "finish_reason": c.finish_reason,
                                                "logprobs": lp, **span(tokens, c, s)}]}
            for end in gen.stream_tail(head, (body.stream_options or {}).get("include_usage", False)):
                yield end
        return chunks()

    def _tool_calls(self, c: Choice, parallel: bool, start: int = 0,
                    head: str = "") -> tuple[str | None, list[ToolCall]] | None:
        """Choice ``c``'s (content, calls; the first only when not ``parallel``) when ``head`` and its text from token
        ``start`` on (the content, after any reasoning; markers written out, up to a stop string) hold a well-formed
        calls block, or one cut short by the length limit (``parse_tool_calls``); else None: served as content."""
        fmt = self.tool_format
        return parse_tool_calls(head + marked_text(self.tok, c.ids[start:c.kept()], fmt), fmt, parallel,
                                cut=c.finish_reason == "length")

    def _chat_logprob(self, token: int, logprob: float, top: dict[int, float] | None) -> dict:
        def entry(t: int, lp: float) -> dict:
            text, raw = self.pieces.of(t)
            return {"token": text, "logprob": lp, "bytes": list(raw)}
        return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or {}).items()]}
