"""The engine and the HTTP side in two processes, joined by a socket pair.

In one process the HTTP side (uvicorn, JSON, an SSE chunk per token) and the scheduler share the
interpreter lock: on a GPU, where a step is the host's Python and kernel launches, 16 streaming
clients got 0.75x the engine alone's rate that way (``docs/performance.md``). ``flyer serve`` steps
the engine in its main process (``EngineHost``) and serves HTTP in a child process whose ``Api``
speaks to the engine through an ``EngineClient``: neither waits for the other's lock, and each
ends when the other goes.

Messages are pickled tuples, each framed by its 4-byte length:

    HTTP -> engine   ("submit", id, prompt, SamplingOptions), ("cancel", id, finish reason), ("metrics",)
    engine -> HTTP   ("events", [(id, TokenEvent), ...], waiting, last id received)   once a step
                     ("metrics", Prometheus text)                                      in order asked

The engine reads between steps and blocks only in its own writes, which the HTTP side's event loop
always reads; the HTTP side's writes never block (asyncio buffers them): neither can wait on the
other. Closing either end ends the other: the engine's host returns when the HTTP process goes,
and the HTTP process answers its requests in flight with an error and stops when the engine goes.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import select
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from flyer.errors import FieldError
from flyer.serve.request import Limits, QueueFull, SamplingOptions, TokenEvent

if TYPE_CHECKING:  # only a type here: the HTTP side (api.py) imports this module without the engine
    from flyer.serve.engine import Engine

_LENGTH = struct.Struct("!I")
_READ = 1 << 20


def _frame(msg) -> bytes:
    b = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(b)) + b


class _Frames:
    """Messages out of a byte stream that arrives in pieces."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        self.buf += data
        out, at = [], 0
        while len(self.buf) - at >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(self.buf, at)
            if len(self.buf) - at - _LENGTH.size < n:
                break
            at += _LENGTH.size
            out.append(pickle.loads(self.buf[at:at + n]))
            at += n
        del self.buf[:at]
        return out


class EngineHost:
    """The engine's side: steps ``engine`` while it has requests, hears the HTTP side between steps
    and sends each step's events in one message, until the HTTP side closes the link."""

    def __init__(self, engine: Engine, sock: socket.socket):
        self.engine, self.sock, self.frames = engine, sock, _Frames()
        self.requests: dict[int, object] = {}  # link id -> the engine's request
        self.events: list[tuple[int, TokenEvent]] = []
        self.last_id = -1  # the last submission received
        self.reported: tuple[int, int] | None = None

    def serve(self) -> None:
        """Until the link closes; then the requests left are dropped (no one is left to hear them)."""
        self.sock.setblocking(True)
        try:
            while self._receive(wait=not self.engine.busy):
                if self.engine.busy:
                    self.engine.safe_step()
                self._send_events()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the HTTP side is gone

    def _receive(self, wait: bool) -> bool:
        """Handle every message that has arrived (``wait``: block for the first); False at the end of the link."""
        while select.select([self.sock], [], [], None if wait else 0)[0]:
            data = self.sock.recv(_READ)
            if not data:
                return False
            for msg in self.frames.feed(data):
                self._handle(msg)
            wait = False
        return True

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, prompt, opts = msg
            self.last_id = rid
            try:  # the HTTP side checked the request and bounds the queue (EngineClient)
                self.requests[rid] = self.engine.submit(prompt, opts, self._emitter(rid), bounded=False)
            except FieldError as e:
                print(f"flyer serve: request refused by the engine: {e}", file=sys.stderr)
                self.events.append((rid, TokenEvent(None, finish_reason="error")))
        elif kind == "cancel":
            r = self.requests.get(msg[1])
            if r is not None:
                self.engine.cancel(r, msg[2])
        elif kind == "metrics":
            self.sock.sendall(_frame(("metrics", self.engine.metrics.render())))

    def _emitter(self, rid: int) -> Callable[[TokenEvent], None]:
        def emit(e: TokenEvent) -> None:
            self.events.append((rid, e))
            if e.finish_reason is not None:
                self.requests.pop(rid, None)
        return emit

    def _send_events(self) -> None:
        state = (len(self.engine.waiting), self.last_id)
        if self.events or state != self.reported:
            self.sock.sendall(_frame(("events", self.events, *state)))
            self.events, self.reported = [], state


@dataclass(eq=False)
class Submitted:
    """A request sent to the engine; ``done`` once its final event has arrived."""

    id: int
    emit: Callable[[TokenEvent], None]
    done: bool = False


class EngineGone(Exception):
    """The engine's process closed the link."""


class EngineClient(asyncio.Protocol):
    """The engine as the HTTP side sees it: ``check``, ``submit``, ``cancel``, ``render_metrics``,
    ``limits``. ``connect`` (on the event loop that serves HTTP) before the first request; events are
    handed to each request's ``emit`` on that loop.

    The queue bound is kept here, from the engine's last report: the requests it had waiting, plus
    those sent since the last one it had received. That is never fewer than wait there now (but for
    preempted requests, which the engine puts back in its queue), so a 429 is answered at submission,
    before the response starts."""

    def __init__(self, sock: socket.socket, limits: Limits, on_lost: Callable[[], None] = lambda: None):
        self.sock, self.limits, self.on_lost = sock, limits, on_lost
        self.frames = _Frames()
        self.live: dict[int, Submitted] = {}
        self.ids = itertools.count()
        self.last_sent = -1
        self.waiting, self.received = 0, -1  # the engine's last report
        self.metric_waiters: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    async def connect(self) -> None:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self, self.sock)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---- the API's side ---------------------------------------------------------------------
    def check(self, prompt: Sequence[int], opts: SamplingOptions) -> None:
        self.limits.check(prompt, opts)

    def submit(self, prompt: Sequence[int], opts: SamplingOptions, emit: Callable[[TokenEvent], None]) -> Submitted:
        """Send a request that passed ``check`` (the API checks every choice before it submits any);
        ``QueueFull`` or ``EngineGone`` instead when it cannot be sent."""
        if self.lost or self.transport is None:
            raise EngineGone("the engine has stopped")
        if self.waiting + self.last_sent - self.received >= self.limits.max_queue:
            raise QueueFull(f"{self.limits.max_queue} requests are waiting already")
        r = Submitted(next(self.ids), emit)
        self.live[r.id] = r
        self.last_sent = r.id
        self.transport.write(_frame(("submit", r.id, list(prompt), opts)))
        return r

    def cancel(self, r: Submitted, reason: str = "cancelled") -> None:
        """End ``r`` with ``reason`` (``Engine.cancel``) unless it has ended."""
        if not r.done and not self.lost:
            self.transport.write(_frame(("cancel", r.id, reason)))

    def end_all(self, reason: str = "shutdown") -> None:
        """End every request in flight now, with ``reason``: the engine's copies cancelled, each request's last event
        heard here (a drain out of time: its response ends in OpenAI's shape before the server stops)."""
        for r in list(self.live.values()):
            self.cancel(r, reason)
            r.done = True
            r.emit(TokenEvent(None, finish_reason=reason))
        self.live.clear()

    async def render_metrics(self) -> bytes:
        """The engine's Prometheus text (asked across the link; empty once the engine is gone)."""
        if self.lost:
            return b""
        fut = asyncio.get_running_loop().create_future()
        self.metric_waiters.append(fut)
        self.transport.write(_frame(("metrics",)))
        return await fut

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for msg in self.frames.feed(data):
            if msg[0] == "events":
                _, events, self.waiting, self.received = msg
                for rid, e in events:
                    r = self.live.get(rid)
                    if r is None:
                        continue
                    if e.finish_reason is not None:
                        r.done = True
                        del self.live[rid]
                    r.emit(e)
            else:
                fut = self.metric_waiters.popleft()
                if not fut.done():
                    fut.set_result(msg[1])

    def connection_lost(self, exc) -> None:
        self.lost = True
        for r in list(self.live.values()):
            r.done = True
            r.emit(TokenEvent(None, finish_reason="error"))
        self.live.clear()
        for fut in self.metric_waiters:
            if not fut.done():
                fut.set_result(b"")
        self.on_lost()
