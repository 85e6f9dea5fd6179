"""What every route answers with besides its result: OpenAI's error shape (``ApiError``, ``ContextLengthError``) and
server-sent events."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from flyer.errors import FieldError


class ApiError(Exception):
    """An HTTP error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        # a lone surrogate a client sent (a model name, a key in a field's path) as its escape: UTF-8 holds none
        message, param = (t if t is None else t.encode("utf-8", "backslashreplace").decode() for t in (message, param))
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # a 429's Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ContextLengthError(FieldError):
    """A prompt, or a prompt and its max_tokens, past what one request can hold: 400 naming ``field`` (the prompt's,
    or the max_tokens the client sent) with OpenAI's code."""

    code = "context_length_exceeded"


def engine_failed(reason: str = "error", grammar_field: str = "response_format") -> ApiError:
    """The error a request the engine ended with ``reason`` answers: "error" (it failed), "shutdown" (a drain ran
    out of time: ``flyer.serve.app.Server``) or "grammar" (its grammar, from ``grammar_field``, failed by itself:
    ``flyer.serve.grammar.failed``)."""
    if reason == "shutdown":
        return ApiError(503, "the server shut down before this request finished", "server_error", code="unavailable")
    if reason == "grammar":
        return ApiError(400, "the output's grammar went past the server's grammar limits while generating (a "
                             "required part that never ends, or a schema too complex to follow; see the server's "
                             "log)", param=grammar_field, code="invalid_value")
    return ApiError(500, "the engine failed on this request (see the server's log)", "server_error")


def sse_event(obj, event: str | None = None) -> bytes:
    """``obj`` as one server-sent event (JSON data), named ``event`` when given (the Responses API names them)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj)}\n\n".encode()
