"""The HTTP application over ``flyer.serve.api.Api``'s routes (FastAPI) and the server that runs it (uvicorn).

``build_app`` wires the routes (listed in ``flyer.serve.api``'s docstring) and answers every error in OpenAI's shape,
counted by status in ``/metrics``; ``Server`` runs it, each answer naming its request (``RequestId``), and drains on a
signal.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flyer.errors import FieldError
from flyer.serve.api_error import ApiError
from flyer.serve.body_limit import MAX_BODY_BYTES, BodyLimit
from flyer.serve.request_id import RequestId
from flyer.serve.responses import Responses
from flyer.serve.schema import ChatBody, CompletionBody, error_field, field_name

if TYPE_CHECKING:
    from flyer.serve.api import Api


def _validation_message(err: RequestValidationError, content_type: str | None = None) -> tuple[str, str | None]:
    """(message, param) of a body FastAPI refused: its first error's field as the body spells it (``error_field``);
    of a union's errors on it, the deepest (``stop: ["a", 3]``: ``stop[1]``, not ``stop``'s "not a string"). A body
    that is no JSON object at all (none, or sent as another ``content_type``, which FastAPI does not parse) says so."""
    errors = [e for e in err.errors() if e.get("loc", ())[:1] == ("body",)] or err.errors()
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if tuple(errors[0].get("loc", ())) == ("body",):
        media = (content_type or "").partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return (f"the request body must be a JSON object sent as Content-Type: application/json (got "
                    f"{media or 'no Content-Type'})"), None
        return "the request body must be a JSON object", None
    paths = [error_field(tuple(e.get("loc", ()))[1:], err.body) if e.get("loc", ())[:1] == ("body",) else
             list(e.get("loc", ())) for e in errors]
    first = max((k for k in range(len(errors)) if paths[k][:1] == paths[0][:1]), key=lambda k: (len(paths[k]), -k))
    param = field_name(paths[first]) or None
    msg = errors[first].get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def build_app(api: Api, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving ``api``'s routes, with OpenAI-shaped errors; a request body past
    ``max_body_bytes`` answers 413 before it is parsed (``BodyLimit``)."""
    app = FastAPI(title="flyer serve", docs_url=None, redoc_url=None, openapi_url=None)
    def refuse(status: int):
        api.metrics.rejected.labels(str(status)).inc()

    def too_large(nbytes: int) -> JSONResponse:
        refuse(413)
        return ApiError(413, f"the request body holds more than {max_body_bytes:,} bytes (at least {nbytes:,})",
                        code="request_too_large").response()
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, refused=too_large)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        refuse(e.status)
        return e.response()

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, e: FieldError):
        refuse(400)
        return ApiError(400, str(e), param=e.field, code=getattr(e, "code", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        try:  # FastAPI validates the body before a route runs: a bad key (or draining) answers first
            api.check_access(request)
        except ApiError as err:
            return await _api_error(request, err)
        refuse(400)
        message, param = _validation_message(e, request.headers.get("content-type"))
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        refuse(e.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        refuse(500)
        return ApiError(500, f"internal error ({type(e).__name__})", "server_error").response()

    @app.get("/health")
    async def health():
        if api.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        text = await api.engine.render_metrics() + api.metrics.render()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": api.model_name, "object": "model", "created": api.created, "owned_by": "flyer"}

    @app.get("/v1/models")
    async def models(request: Request):
        api.check_access(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")  # a path: served names may hold slashes (org/name)
    async def retrieve_model(request: Request, model: str):
        api.check_access(request, model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await api.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatBody):
        return await api.chat(request, body)

    Responses(api).add_routes(app)
    return app


class Server(uvicorn.Server):
    """uvicorn's server over ``api``: a signal (or ``stop``) first marks the API draining (a request that reaches it
    before uvicorn's next tick closes the listener answers 503, ``/health`` too: new connections are refused after),
    then uvicorn stops accepting and waits for the
    requests in flight to finish, ``graceful_s`` at most: those still running then end in OpenAI's shape (503 JSON;
    a stream's error event and [DONE]: ``EngineClient.end_all``), ``END_MARGIN_S`` before uvicorn would cut them
    off. The engine's link is opened on its event loop before it serves and closed after; the engine gone stops
    the server."""

    END_MARGIN_S = 2.0  # for the ended requests' last bytes to go out before uvicorn cancels their handlers

    def __init__(self, api: Api, graceful_s: float = 60.0, max_body_bytes: int = MAX_BODY_BYTES):
        # RequestId outside the app: its answers to errors no handler takes (a 500) are named too
        super().__init__(uvicorn.Config(RequestId(build_app(api, max_body_bytes)), log_level="warning",
                                        timeout_graceful_shutdown=graceful_s,
                                        lifespan="off"))
        self.api, self.graceful_s = api, graceful_s
        api.engine.on_lost = self.stop

    async def shutdown(self, sockets=None) -> None:
        ending = asyncio.get_running_loop().call_later(max(0.0, self.graceful_s - self.END_MARGIN_S),
                                                       self.api.engine.end_all)
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    async def serve(self, sockets=None) -> None:
        await self.api.engine.connect()
        try:
            await super().serve(sockets)
        finally:
            self.api.engine.close()

    def handle_exit(self, sig, frame) -> None:
        self.api.draining = True
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        self.api.draining = True
        self.should_exit = True

    def run_in_thread(self, sock) -> threading.Thread:
        """Serve on the bound socket ``sock`` from a thread (tests, benchmarks); ``stop`` ends it."""
        t = threading.Thread(target=self.run, kwargs={"sockets": [sock]}, daemon=True, name="flyer-http")
        t.start()
        while not self.started and t.is_alive():
            time.sleep(0.01)
        return t
