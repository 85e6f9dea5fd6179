"""A bound on what one HTTP request may send (``flyer serve``): its body is read, up to ``max_bytes``, before
FastAPI parses it, so no request makes the server buffer or parse more than that.

``BodyLimit`` is plain ASGI middleware. A body whose ``Content-Length`` says more is refused before a byte is
read; one sent in chunks (no length) is refused once its chunks pass the bound. Either answers ``refused()`` (the
API's 413 in OpenAI's error shape); a body within the bound reaches the app as one message, and the app's later
``receive`` calls (a streaming handler watching for the client's disconnect) go to the connection as before.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.responses import Response

MAX_BODY_BYTES = 32 << 20  # far past any prompt a context holds as JSON (128K token ids: ~1 MB)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyLimit:
    """``app`` behind a bound of ``max_bytes`` on each request's body; ``refused()`` the response past it."""

    def __init__(self, app, max_bytes: int, refused: Callable[[int], Response]):
        self.app, self.max_bytes, self.refused = app, max_bytes, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self.refused(int(length))(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body ended
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self.refused(len(body))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


__all__ = ["BodyLimit", "MAX_BODY_BYTES"]
