"""flyer.runtime.tune_malloc: freed multi-MiB blocks are reused, not faulted in afresh."""

import json
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, torch
from flyer.runtime import tune_malloc
torch.set_num_threads(1)  # glibc's heap policy differs once a second thread allocates: pin one
applied = tune_malloc() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(4 << 20)  # 16 MiB, the size of a small-preset activation block
def layer():  # a few 16 MiB temporaries alive at once, freed together, as in a model's layer
    live = [x * 2 for _ in range(4)]
    return sum(float(t[0]) for t in live)
for _ in range(3):
    layer()
before = faults()
for _ in range(20):
    layer()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _run(mode: str, env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_removes_page_faults_of_repeated_large_temporaries():
    plain, tuned = _run("plain"), _run("tuned")
    assert tuned["applied"] is True
    # tuned: 20 rounds of four 16 MiB temporaries (4096 pages each) reuse the same heap blocks, so
    # at most a few blocks' worth of pages fault in. Untuned, glibc hands the freed top of the heap
    # back to the kernel and the pages fault in again (up to ~80 blocks' worth when run alone; its
    # dynamic thresholds make the untuned count depend on what ran before, so it is only a bound)
    assert tuned["faults"] < 3 * 4096, tuned
    assert plain["faults"] >= tuned["faults"], (plain, tuned)


def test_tune_malloc_opt_out():
    assert _run("tuned", {"FLYER_TUNE_MALLOC": "0"})["applied"] is False
