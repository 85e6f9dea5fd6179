import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests are small: one thread avoids oversubscription when several test processes share 2 cores.
torch.set_num_threads(int(os.environ.get("FLYER_TEST_THREADS", "1")))
# ... and in the processes tests start (CLI runs, benches, torchrun's ranks): torch would give each one a thread a
# core, and two test workers' children spinning on 2 cores take many times as long; a test that means threads says so
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Held weights' GEMMs take the same path on every CPU kind, here and in the processes tests start;
# tests of the other path set ``kernels.blas_narrower`` themselves.
os.environ["FLYER_BLAS_NARROWER"] = "0"


def pytest_collection_modifyitems(config, items):
    """The slowest files first (``tests/file_seconds.json``, written by ``tests/file_seconds.py``), each file's tests
    together and in their order: ``make test`` runs xdist with ``--no-loadscope-reorder``, which hands the files out
    in this order (its own puts the files with most tests first, and so a file of a few long tests last, where it
    made the tail of a run)."""
    seconds = json.loads((Path(__file__).parent / "file_seconds.json").read_text())
    first: dict[Path, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
    items.sort(key=lambda item: (-seconds.get(item.path.name, 0.0), first[item.path]))


def pytest_sessionstart(session):
    """Build (or load) the fused CPU kernels once, up front: the spawned ranks of the distributed
    tests then load them from the cache instead of building them inside a collective's timeout."""
    from flyer import kernels

    kernels.cpu_ops()


@pytest.fixture(scope="session", autouse=True)
def _scratch(tmp_path_factory):
    """Temporary files of every process the session starts (torchrun's, the CLI's) go under the session's own folder,
    which pytest removes after a passing run: nothing is left in the machine's /tmp. This process keeps its own
    (multiprocessing removes its folder there at exit, after pytest has removed the session's)."""
    scratch = str(tmp_path_factory.mktemp("tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", tempfile.gettempdir())
        mp.setenv("TMPDIR", scratch)
        yield scratch


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer and shard cache for every training test of the session."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """Thread counts a test's code sets for the process (a ``Trainer`` with ``threads``, ``flyer serve`` or
    ``generate`` run in-process) put back after it: else every later file on this worker runs with them (results
    depending on which files shared the worker, and two workers oversubscribing the cores)."""
    from flyer import kernels

    torch_threads, expert_threads = torch.get_num_threads(), kernels._split["threads"]
    yield
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if kernels._split["threads"] != expert_threads:
        kernels.set_expert_threads(expert_threads)


@pytest.fixture(params=["kernels", "eager"])
def cpu_kernels(request):
    """Run a test with flyer's fused CPU kernels (skipped where they could not be built) and with
    the eager PyTorch code they replace. The value says which."""
    from flyer import kernels

    if request.param == "kernels":
        if not kernels.usable(torch.zeros(1)):
            pytest.skip("flyer's fused CPU kernels are not built here (no C++ compiler?)")
        yield True
    else:
        with kernels.disabled():
            yield False
