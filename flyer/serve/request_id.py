"""Every HTTP answer of ``flyer serve`` names its request in an ``x-request-id`` header, as OpenAI's API does (its
official client reads it into a response's ``_request_id``; logs and proxies quote it): the client's own
``X-Request-Id`` where it sent a usable one (as vLLM's servers echo it), else a new ``req_`` and 32 hex digits.

``RequestId`` is plain ASGI middleware, so streamed answers and the errors other middleware answers carry it too.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII, as long as a log line quotes whole


def request_id(sent: bytes | None) -> bytes:
    """The id of a request whose ``X-Request-Id`` header is ``sent`` (None: none)."""
    return sent if sent is not None and _USABLE.fullmatch(sent) else b"req_" + uuid.uuid4().hex.encode()


class RequestId:
    """``app`` with each HTTP response's start given the request's ``x-request-id`` (``request_id``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(dict(scope.get("headers") or ()).get(b"x-request-id"))

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":  # no route sets the header itself
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, named)


__all__ = ["RequestId", "request_id"]
