"""A server inside a test, on 127.0.0.1 at a free port and stopped by the test: ``serving(api)`` runs an ``Api``
(over whatever engine client it holds: a scripted one, or a link) while in the block; ``EngineServer`` puts an
``Engine`` behind it as ``flyer serve`` joins them (``EngineHost`` and ``EngineClient`` over a socket pair), the
engine on a thread of this process. ``handed_to_http`` is what ``flyer serve`` would hand its HTTP process."""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import openai
import pytest

import flyer.serve.cli as serve_cli
from flyer.cli import main
from flyer.serve.api import Api
from flyer.serve.app import Server
from flyer.serve.cli import bind
from flyer.serve.link import EngineClient, EngineHost


@contextlib.contextmanager
def serving(api: Api, **server_kw) -> Iterator[str]:
    """``api`` served while in the block (``Server`` keyword arguments: ``server_kw``); yields its base URL."""
    server, sock = Server(api, graceful_s=5, **server_kw), bind("127.0.0.1", 0)
    thread = server.run_in_thread(sock)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.stop()
        thread.join(timeout=30)
        sock.close()


def gone_mid_request(server: "EngineServer", body: dict, within_s: float = 60) -> None:
    """POST ``body`` to /v1/completions (not streamed: nothing is written before its end) and close the connection
    once the engine holds the request, as a client that gave up does: no client-side clock, which a loaded machine
    can run out before the request reaches the engine."""
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(data), data))
        deadline = time.monotonic() + within_s
        while not server.engine.busy:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.005)


def client(url: str, api_key: str = "none", **kw) -> openai.OpenAI:
    """The official client of the server at ``url``: no retries, a minute's timeout."""
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)


class EngineServer:
    """``engine`` served behind ``make_api(its EngineClient)`` until ``close`` (or the end of a ``with`` block);
    ``start_engine=False``: the engine hears nothing (its queue only fills)."""

    def __init__(self, engine, make_api: Callable[[EngineClient], Api], start_engine: bool = True, **server_kw):
        engine_end, http_end = socket.socketpair()
        self.engine, self.engine_end = engine, engine_end
        self.api = make_api(EngineClient(http_end, engine.limits))
        self.host = threading.Thread(target=EngineHost(engine, engine_end).serve, daemon=True)
        if start_engine:
            self.host.start()
        self._stack = contextlib.ExitStack()
        self.url = self._stack.enter_context(serving(self.api, **server_kw))

    def client(self, **kw) -> openai.OpenAI:
        return client(self.url, **kw)

    def close(self) -> None:
        self._stack.close()
        if self.host.is_alive():  # the server closed the link: the host returns
            self.host.join(timeout=30)
        self.engine_end.close()

    def __enter__(self) -> "EngineServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Started(Exception):
    """The HTTP process ``flyer serve`` was about to start (not started)."""


def handed_to_http(monkeypatch, *flags: str) -> tuple:
    """What ``flyer serve --preset tiny ... FLAGS`` hands the HTTP process it starts, taken where the process would
    start (it is not): (limits, tokenizer, model name, api key, chat template, *the parsers), the ``Api``'s
    arguments after its engine client."""
    args = handed_to_serve_http(monkeypatch, *flags)
    # the URL (6th) is the HTTP side's own, the drain timeout (last) its server's
    return tuple(a for i, a in enumerate(args[:-1]) if i != 5)


def handed_to_serve_http(monkeypatch, *flags: str, source: tuple[str, ...] = ("--preset", "tiny")) -> tuple:
    """``handed_to_http``'s arguments of ``flyer.serve.cli.serve_http`` after its sockets, all of them (``source``:
    the model's flags)."""
    handed = []

    class Context:
        def Process(self, target, name, daemon, args):
            handed.append(args)
            raise _Started
    monkeypatch.setattr(serve_cli.multiprocessing, "get_context", lambda method: Context())
    with pytest.raises(_Started):
        main(["serve", *source, "--device", "cpu", "--port", "0", "--kv-cache-memory", "1M",
              "--threads", "1", "--expert-threads", "1", *flags])
    link, sock, *args = handed.pop()
    link.close()
    sock.close()
    return tuple(args)
