"""``run_ranks`` for the tests: every rank forked from one forkserver that imported torch and flyer
once per session. A spawned rank spends 3-4 s of CPU importing them: 4 ranks on the 2-core CI
machine take 14 s to reach their first line, 8 ranks half a minute. The ranks still start from a
process that has run nothing but imports (no threads, no state), as under torchrun."""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

import pytest
import torch.distributed as dist

from flyer.parallel import launch
from flyer.parallel.stages import SPLIT_SCHEDULES, SPLIT_TORCH, split_backward_runs

# torch._dynamo: building any torch.optim optimizer imports it (its __init__ is dynamo-disabled), ~3 s a rank
PRELOAD = ["torch", "torch.distributed", "torch.distributed.pipelining", "torch._dynamo", "flyer.parallel.pipeline",
           "flyer.parallel.mesh", "flyer.parallel.dispatch", "flyer.train.trainer", "flyer.model.transformer"]


# zb and dualpipev runs: on an older torch (a GPU machine's image) flyer refuses them, tested on its own
needs_split_backward = pytest.mark.skipif(not split_backward_runs(),
                                          reason=f"{', '.join(SPLIT_SCHEDULES)} need torch >= {SPLIT_TORCH}")


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``flyer.parallel.launch.run_ranks(fn, world, *args)`` with the ranks forked from the server."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call)
    return launch.run_ranks(fn, world, *args, start_method="forkserver")


def run_schedules(case: Callable[[int, str], Any], schedules: dict[str, str], world: int) -> list[dict[str, Any]]:
    """Per rank, {name: ``case(rank, name)``} for each name of ``schedules`` (name -> its pipeline schedule) this
    torch runs (``split_backward_runs``: not zb / dualpipev on an older one), on ``world`` forked ranks."""
    return run_ranks(_schedule_cases, world, case, schedules)


def _schedule_cases(rank: int, case: Callable[[int, str], Any], schedules: dict[str, str]) -> dict[str, Any]:
    out = {name: case(rank, name) for name, schedule in schedules.items()
           if split_backward_runs() or schedule not in SPLIT_SCHEDULES}
    dist.destroy_process_group()
    return out
