"""Run a function on N local processes with a torchrun-like environment (tests, benchmarks).

``run_ranks(fn, world, *args)`` spawns ``world`` processes, sets RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT (loopback, a free port) as torchrun does, limits each
to one intra-op thread, calls ``fn(rank, *args)`` and returns every rank's return value. ``fn``
must be importable (module level). The callee joins the job with ``init_distributed`` exactly as
under torchrun.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux: the ports bind(0) and connect() hand out
_draw = random.Random()  # seeded from the OS: a test seeding ``random`` must not make two processes draw alike


def free_port() -> int:
    """A free loopback TCP port for a job's store, drawn at random below the kernel's ephemeral range. A port from
    that range (bind(0)'s) can be handed to another process's outgoing connection (gloo's ranks make many) between
    this check and the store binding it: EADDRINUSE; one drawn outside it is taken only by another such draw."""
    try:
        low = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for _ in range(64 if low > 10_000 else 0):
        port = _draw.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no range known (or no free port drawn): the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world: int, port: int, out_dir: str, threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = fn(rank, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1,
              start_method: str = "spawn") -> list[Any]:
    """``[fn(0, *args), ..., fn(world - 1, *args)]``, each in its own process; a failing rank
    raises here with its traceback. ``start_method``: ``spawn`` starts a fresh interpreter per rank,
    as torchrun does; ``forkserver`` forks each rank from one server process that imported the
    modules ``multiprocessing.set_forkserver_preload`` names once (the tests: a spawned rank spends
    seconds importing torch)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(fn, world, free_port(), d, threads, args), nprocs=world, join=True,
                           start_method=start_method)
        return [torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in range(world)]


__all__ = ["run_ranks", "free_port"]
