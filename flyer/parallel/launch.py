"""Run a function on N local processes with a torchrun-like environment (tests, benchmarks).

``run_ranks(fn, world, *args)`` spawns ``world`` processes, sets RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT as torchrun does, limits each to one intra-op thread,
calls ``fn(rank, *args)`` and returns every rank's return value. ``fn`` must be importable (module
level). The callee joins the job with ``init_distributed`` exactly as under torchrun; the calling
process hosts the job's store (``job_store``), as torchrun's agent does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def job_store() -> dist.TCPStore:
    """A job's rendezvous store, hosted by this process on a loopback port the kernel chose (``.port``) and held
    until dropped, as torchrun's agent hosts one: its ranks join with MASTER_PORT set to that port and
    TORCHELASTIC_USE_AGENT_STORE=True (torchrun's agents: ``--rdzv-endpoint`` at that port, ``--rdzv-conf is_host=0``).
    A port only checked free, for rank 0 to bind seconds later once the ranks have started, can be taken in between
    (EADDRINUSE: seen in CI, with the tests' jobs running side by side)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _worker(rank: int, fn: Callable, world: int, port: int, out_dir: str, threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
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
    store = job_store()
    try:
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(_worker, args=(fn, world, store.port, d, threads, args), nprocs=world, join=True,
                               start_method=start_method)
            return [torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    finally:
        del store  # closed now, not once a raised error's traceback (which holds this frame) is dropped


__all__ = ["run_ranks", "job_store"]
