"""``conftest._threads``: a test's code that sets the process's thread counts (a ``Trainer`` with ``threads``,
``flyer serve --expert-threads`` in-process) leaves the next test of this worker on the counts it started with.
Before, ``test_run_safety.py``'s ``Trainer(threads=2)`` kept its worker at 2 torch threads for every later file."""

import torch

from flyer import kernels

START: dict[str, int] = {}


def test_a_test_sets_the_process_threads():
    START.update(torch=torch.get_num_threads(), experts=kernels._split["threads"])
    torch.set_num_threads(START["torch"] + 2)
    kernels.set_expert_threads(START["experts"] + 1)


def test_the_next_one_starts_with_those_the_one_before_began_with():
    assert START, "runs after the test above (a file's tests keep their order)"
    assert torch.get_num_threads() == START["torch"] and kernels._split["threads"] == START["experts"]
