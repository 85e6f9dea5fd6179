"""``flyer.parallel.launch``: ``run_ranks`` hosts its job's store, bound before any rank starts; ``free_port`` (for
jobs a test starts itself) draws below the kernel's ephemeral range, where no outgoing connection (another job's gloo
ranks) can take it between the check and the store's bind; a taken port is passed over; without a known range, the
kernel's bind(0) choice."""

import os
import socket

import torch
import torch.distributed as dist

from flyer.parallel import launch


def _rank(rank: int) -> tuple[bool, float]:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
            free = True
        except OSError:
            free = False
    dist.init_process_group("gloo")
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return free, t.item()


def test_run_ranks_holds_the_store_port_before_any_rank_starts():
    """The CI failure this fixes: the port was checked free, then bound by rank 0 seconds later, once the ranks had
    started; another job's process took it in between (EADDRINUSE). Now no rank can bind it: it is held already."""
    from tests.ranks import run_ranks  # the tests' forkserver start

    assert run_ranks(_rank, 2) == [(False, 3.0), (False, 3.0)]


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
