"""``flyer serve``'s two processes (``flyer.serve.link``): messages framed across any split of the
byte stream; the HTTP side's queue bound from the engine's reports; either side gone ends the
other (in-flight requests answer an error, the engine's host returns, ``flyer serve`` exits and
leaves no process behind)."""

import asyncio
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from child_env import child_env
from served import handed_to_serve_http
from trained import counting_model

from flyer.cli import main
from flyer.infer.cli import ByteTokenizer
from flyer.serve.api import Api
from flyer.serve.app import Server
from flyer.serve.cli import bind
from flyer.errors import FieldError
from flyer.serve.engine import Engine, EngineConfig, Limits, QueueFull, SamplingOptions, TokenEvent
from flyer.serve.link import EngineClient, EngineGone, EngineHost, _frame, _Frames


def test_frames_survive_any_split_of_the_stream():
    msgs = [("submit", i, list(range(i * 997 % 5000)), SamplingOptions(max_tokens=i + 1)) for i in range(40)]
    msgs.append(("events", [(1, TokenEvent(5, -0.5, {5: -0.5}, "stop"))], 0, 39))
    stream = b"".join(_frame(m) for m in msgs)
    rng = random.Random(0)
    for _ in range(20):
        frames, got, at = _Frames(), [], 0
        while at < len(stream):
            n = rng.choice([1, 2, 3, 7, 4096, 1 << 16])
            got += frames.feed(stream[at:at + n])
            at += n
        assert got == msgs and not frames.buf


class _Transport:
    """What the client writes, as messages."""

    def __init__(self):
        self.frames, self.sent = _Frames(), []

    def write(self, data: bytes) -> None:
        self.sent += self.frames.feed(data)


def _client(max_queue: int = 8) -> tuple[EngineClient, _Transport]:
    """A client connected to a transport that records what it sends, its engine not started."""
    client = EngineClient(None, Limits(vocab_size=10, max_seq_len=64, block_size=4, capacity=16, max_queue=max_queue))
    t = _Transport()
    client.connection_made(t)
    return client, t


def test_the_queue_bound_counts_what_the_engine_has_not_reported():
    """Waiting = the engine's last count + the submissions sent after the last one it had received:
    never fewer than wait there (the engine admits them only after it has them)."""
    client, t = _client(max_queue=2)
    heard = []
    a = client.submit([1, 2], SamplingOptions(max_tokens=3), heard.append)
    client.submit([3], SamplingOptions(max_tokens=1), heard.append)
    with pytest.raises(QueueFull):
        client.submit([4], SamplingOptions(max_tokens=1), heard.append)
    assert [m[0] for m in t.sent] == ["submit", "submit"] and t.sent[0][2] == [1, 2]
    # the engine had both and admitted the first: one waits
    client.data_received(_frame(("events", [(a.id, TokenEvent(7))], 1, 1)))
    assert heard == [TokenEvent(7)] and not a.done
    b = client.submit([4], SamplingOptions(max_tokens=1), heard.append)
    with pytest.raises(QueueFull):
        client.submit([5], SamplingOptions(max_tokens=1), heard.append)
    client.cancel(b)
    assert t.sent[-1] == ("cancel", b.id, "cancelled")
    client.data_received(_frame(("events", [(a.id, TokenEvent(8, finish_reason="length"))], 0, b.id)))
    assert a.done and heard[-1].finish_reason == "length"
    client.cancel(a)  # done: nothing sent
    assert t.sent[-1] == ("cancel", b.id, "cancelled")


def _served(model, graceful_s=5.0, **over):
    cfg = dict(kv_cache_bytes=64 * 4 * 384 * 2, block_size=4, cache_dtype=torch.float32, prefill_chunk=8)
    engine = Engine(model, EngineConfig(**{**cfg, **over}))
    engine_end, http_end = socket.socketpair()
    server = Server(Api(EngineClient(http_end, engine.limits), ByteTokenizer(), "tiny-test"), graceful_s=graceful_s)
    sock = bind("127.0.0.1", 0)
    host = threading.Thread(target=EngineHost(engine, engine_end).serve, daemon=True)
    host.start()
    return engine, engine_end, server, server.run_in_thread(sock), host, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_the_engine_gone_ends_requests_in_flight_with_an_error_and_stops_the_server(monkeypatch):
    engine, engine_end, server, http, host, url = _served(counting_model(64))
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step()))
    body = dict(model="tiny-test", prompt=[1, 2], max_tokens=200, temperature=0, stream=True)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        engine_end.shutdown(socket.SHUT_RDWR)  # as the engine's process dying closes its end
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert json.loads(rest[-2][6:])["error"]["type"] == "server_error" and rest[-1] == "data: [DONE]"
    http.join(timeout=30)
    host.join(timeout=30)
    assert not http.is_alive() and not host.is_alive() and server.api.draining
    engine_end.close()


def test_the_http_side_gone_returns_the_host_mid_request(monkeypatch):
    engine, engine_end, server, http, host, url = _served(counting_model(64))
    with httpx.stream("POST", url + "/v1/completions", json=dict(model="tiny-test", prompt=[1, 2], max_tokens=200,
                                                                 stream=True), timeout=30) as r:
        assert next(r.iter_lines()).startswith("data: {")
        server.api.engine.transport.close()  # as the HTTP process dying closes its end
        host.join(timeout=30)
        assert not host.is_alive()
    server.stop()
    http.join(timeout=30)
    engine_end.close()


def _start(tmp_path, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "flyer", "serve", "--preset", "tiny", "--port", "0",
                             "--kv-cache-memory", "8M", "--threads", "1", "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    line = proc.stdout.readline()
    assert "ready on" in line, line + proc.stderr.read()
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    http = next(int(c) for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read())
    return proc, line.split()[4], http


def _gone(pid: int, within: float = 30) -> bool:
    for _ in range(int(within / 0.05)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is gone too
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cli_exits_when_its_http_process_dies_and_that_one_when_the_engine_dies(tmp_path):
    proc, url, http = _start(tmp_path)
    try:
        assert httpx.get(url + "/health").status_code == 200
        os.kill(http, signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        err = proc.stderr.read().strip().splitlines()
        assert err[-1] == "flyer serve: the HTTP process ended with exit code -9", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc, url, http = _start(tmp_path)
    try:
        proc.kill()  # SIGKILL: nothing of flyer runs to stop the child; the closed link does
        proc.wait()
        assert _gone(http)
    finally:
        if not _gone(http, 0.1):
            os.kill(http, signal.SIGKILL)


def test_limits_pickle_for_the_http_process():
    lim = Limits(vocab_size=10, max_seq_len=64, block_size=4, capacity=3, max_queue=2)
    assert pickle.loads(pickle.dumps(lim)) == lim and lim.room == 12


def test_a_drain_out_of_time_ends_what_is_left_in_openais_shape(monkeypatch):
    """SIGTERM: a request that finishes within the drain's time answers 200; one still running when it runs out
    answers a 503 JSON error, a stream its error event and [DONE] (not uvicorn's plain-text 500 and a cut stream),
    and both processes stop."""
    engine, engine_end, server, http, host, url = _served(counting_model(64), graceful_s=Server.END_MARGIN_S + 1)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.05), step()))  # 200 tokens: 10 s, past the drain
    body = dict(model="tiny-test", prompt=[1, 2], temperature=0)
    out = {}

    def ask(name, **kw):
        with httpx.Client(base_url=url, timeout=30) as c:
            if not kw.get("stream"):
                r = c.post("/v1/completions", json={**body, **kw})
                out[name] = (r.status_code, r.json())
                return
            with c.stream("POST", "/v1/completions", json={**body, **kw}) as r:
                out[name] = (r.status_code, [ln for ln in r.iter_lines() if ln.startswith("data: ")])

    clients = [threading.Thread(target=ask, args=a, kwargs=k) for a, k in
               ((("short",), dict(max_tokens=3)), (("long",), dict(max_tokens=200)),
                (("stream",), dict(max_tokens=200, stream=True)))]
    for t in clients:
        t.start()
    # the drain once the engine holds all three: a connection still in the listening socket's backlog when the
    # server stops is reset (a fixed 0.5 s was too short for a loaded 2-core machine)
    deadline = time.monotonic() + 60
    while server.api.engine.last_sent < 2:  # the client's request ids 0, 1, 2 sent
        assert time.monotonic() < deadline, out
        time.sleep(0.01)
    server.handle_exit(signal.SIGTERM, None)
    for t in clients:
        t.join(timeout=30)
    assert out["short"][0] == 200 and out["short"][1]["choices"][0]["finish_reason"] == "length"
    assert out["long"][0] == 503 and out["long"][1]["error"]["code"] == "unavailable"
    lines = out["stream"][1]
    assert json.loads(lines[-2][6:])["error"]["code"] == "unavailable" and lines[-1] == "data: [DONE]"
    http.join(timeout=30)
    host.join(timeout=30)
    assert not http.is_alive() and not host.is_alive()
    engine_end.close()


def test_the_drain_timeout_reaches_the_http_process_and_a_bad_one_is_one_line(monkeypatch, capsys):
    assert handed_to_serve_http(monkeypatch, "--drain-timeout", "5")[-1] == 5.0
    for bad in ("0", "inf", "nan"):
        assert main(["serve", "--preset", "tiny", "--device", "cpu", "--drain-timeout", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flyer: error: --drain-timeout: "), err


class _FakeEngine:
    """What ``EngineHost`` reads of an engine: submit (refusing prompts holding 0), cancel, waiting, busy."""

    def __init__(self):
        self.waiting, self.cancelled, self.emits, self.busy = [], [], {}, False

    def submit(self, prompt, opts, emit, bounded=True):
        if 0 in prompt:
            raise FieldError("prompt", "holds 0")
        self.waiting.append(prompt)
        self.emits[len(self.emits)] = emit
        return len(self.emits) - 1

    def cancel(self, r, reason):
        self.cancelled.append((r, reason))


def _host():
    a, b = socket.socketpair()
    host = EngineHost(_FakeEngine(), a)
    frames = _Frames()

    def sent():
        b.setblocking(False)
        out = []
        try:
            while data := b.recv(1 << 20):
                out += frames.feed(data)
        except BlockingIOError:
            pass
        return out
    return host, sent, (a, b)


def test_the_host_reports_the_last_submission_and_the_queue_each_once():
    """The host sends the engine's events, queue length and the last submission it received once each: a change
    of queue alone is reported, and nothing new sends nothing."""
    host, sent, socks = _host()
    try:
        host._handle(("submit", 3, [1, 2], SamplingOptions(max_tokens=2)))
        host._send_events()  # no event yet, but the queue changed: reported
        assert sent() == [("events", [], 1, 3)]
        host._send_events()  # nothing new: nothing sent
        assert sent() == []
        host.engine.emits[0](TokenEvent(5))
        host._send_events()
        host._send_events()  # the events are sent once
        assert sent() == [("events", [(3, TokenEvent(5))], 1, 3)]
    finally:
        for s in socks:
            s.close()


def test_the_host_answers_a_refused_submission_with_an_error_and_passes_a_cancels_reason(capsys):
    """A submission the engine refuses ends at once with finish_reason "error" (and a line on stderr); a cancel
    reaches the engine with its reason, and one for a request already ended reaches nothing."""
    host, sent, socks = _host()
    try:
        host._handle(("submit", 0, [0], SamplingOptions(max_tokens=2)))
        host._send_events()
        assert sent() == [("events", [(0, TokenEvent(None, finish_reason="error"))], 0, 0)]
        assert "request refused by the engine" in capsys.readouterr().err
        host._handle(("submit", 1, [1], SamplingOptions(max_tokens=2)))
        host._handle(("cancel", 1, "shutdown"))
        assert host.engine.cancelled == [(0, "shutdown")]
        host.engine.emits[0](TokenEvent(None, finish_reason="shutdown"))
        assert host.requests == {}  # ended: forgotten, a later cancel reaches nothing
        host._handle(("cancel", 1, "cancelled"))
        assert host.engine.cancelled == [(0, "shutdown")]
    finally:
        for s in socks:
            s.close()




def test_the_client_forgets_a_finished_request_and_skips_events_of_unknown_ones():
    """A request's final event removes it from the client (the engine gone later sends it no second end), and an
    event for an id the client does not know is skipped."""
    client, _ = _client()
    heard = []
    a = client.submit([1], SamplingOptions(max_tokens=1), heard.append)
    client.data_received(_frame(("events", [(a.id, TokenEvent(3, finish_reason="length")), (99, TokenEvent(4))],
                                 0, a.id)))
    assert heard == [TokenEvent(3, finish_reason="length")] and a.done and client.live == {}
    client.connection_lost(None)  # the engine gone after it finished: no second final event
    assert heard == [TokenEvent(3, finish_reason="length")]


def test_the_engine_gone_answers_an_error_and_the_metrics_asked_empty():
    """The engine's connection lost: requests in flight end with "error", metrics asked before or after get an empty
    page, and a new submission raises ``EngineGone``."""
    client, _ = _client()
    heard = []
    client.submit([1], SamplingOptions(max_tokens=4), heard.append)

    async def ask():
        got = asyncio.ensure_future(client.render_metrics())
        await asyncio.sleep(0)
        client.connection_lost(None)
        return await asyncio.wait_for(got, 5), await asyncio.wait_for(client.render_metrics(), 5)
    assert asyncio.run(ask()) == (b"", b"")
    assert heard == [TokenEvent(None, finish_reason="error")]
    with pytest.raises(EngineGone):
        client.submit([1], SamplingOptions(max_tokens=1), heard.append)


def test_end_all_ends_each_request_once():
    """``end_all`` ends each request in flight with its reason and tells the engine; a later cancel sends nothing."""
    client, t = _client()
    heard = []
    r = client.submit([1], SamplingOptions(max_tokens=4), heard.append)
    client.end_all("shutdown")
    assert heard == [TokenEvent(None, finish_reason="shutdown")] and r.done
    assert t.sent[-1] == ("cancel", r.id, "shutdown")
    client.cancel(r)  # ended: nothing more sent
    assert t.sent[-1] == ("cancel", r.id, "shutdown") and len(t.sent) == 2
