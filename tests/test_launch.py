"""``flyer.parallel.launch.free_port``: the job store's port is drawn below the kernel's ephemeral range, where no
outgoing connection (another job's gloo ranks) can take it between the check and the store's bind; a taken port is
passed over; without a known range, the kernel's bind(0) choice."""

import socket

from flyer.parallel import launch


def test_the_port_is_drawn_below_the_ephemeral_range_and_free(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("40000\t60999\n")
    monkeypatch.setattr(launch, "EPHEMERAL", tmp_path / "range")
    for _ in range(20):
        port = launch.free_port()
        assert 10_000 <= port < 40_000
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: the store can take it


def test_a_taken_port_is_passed_over(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("40000 60999")
    monkeypatch.setattr(launch, "EPHEMERAL", tmp_path / "range")
    with socket.socket() as held, socket.socket() as free:
        held.bind(("127.0.0.1", 0))
        free.bind(("127.0.0.1", 0))
        taken, other = held.getsockname()[1], free.getsockname()[1]
        free.close()
        draws = iter([taken, other])
        monkeypatch.setattr(launch._draw, "randrange", lambda lo, hi: next(draws))
        assert launch.free_port() == other


def test_without_a_known_range_the_kernel_chooses(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "EPHEMERAL", tmp_path / "missing")
    monkeypatch.setattr(launch._draw, "randrange", lambda lo, hi: (_ for _ in ()).throw(AssertionError("drawn")))
    assert 0 < launch.free_port() < 65536
