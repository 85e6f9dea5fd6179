"""``flyer.parallel.launch``: ``run_ranks`` hosts its job's store (``job_store``), bound before any rank starts."""

import os
import socket

import torch
import torch.distributed as dist



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
