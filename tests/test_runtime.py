"""flyer.runtime: tune_malloc (freed multi-MiB blocks are reused, not faulted in afresh), the memory check, thread
counts, the CPU kind and the precision decisions taken from the hardware (forced here)."""

import contextvars
import io
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from flyer import runtime
from flyer.errors import FieldError

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


def test_available_memory_on_the_host_is_in_bytes(monkeypatch):
    """The host's ``MemAvailable`` is reported in bytes (``/proc/meminfo`` gives KiB)."""
    meminfo = "MemTotal:       4000 kB\nMemFree:        1000 kB\nMemAvailable:   3000 kB\n"
    monkeypatch.setattr(runtime, "open", lambda path: io.StringIO(meminfo), raising=False)
    assert runtime.available_memory("cpu") == 3000 * 1024


def test_require_memory_refuses_only_past_what_is_available(monkeypatch):
    """``require_memory`` refuses a need above the memory available, naming the field, allows one equal to it, and
    allows anything when the memory available cannot be told (None)."""
    monkeypatch.setattr(runtime, "available_memory", lambda device: 1 << 30)
    runtime.require_memory(1 << 30, "cpu", "kv_cache_bytes", "the cache")
    with pytest.raises(FieldError, match="the cache needs about"):
        runtime.require_memory((1 << 30) + 1, "cpu", "kv_cache_bytes", "the cache")
    monkeypatch.setattr(runtime, "available_memory", lambda device: None)
    runtime.require_memory(1e30, "cpu", "kv_cache_bytes", "the cache")


def test_thread_counts_are_bounded_by_four_a_core():
    """Thread counts in [1, 4 x cores] are taken; 0 and one past the bound are refused naming the field."""
    assert runtime.max_threads() == 4 * (os.cpu_count() or 1)
    runtime.check_threads(1, "threads")
    runtime.check_threads(runtime.max_threads(), "threads")
    for n in (0, runtime.max_threads() + 1):
        with pytest.raises(FieldError, match=r"must be in \[1, "):
            runtime.check_threads(n, "threads")


def test_assume_cpu_holds_only_inside_its_block():
    """``assume_cpu`` changes the CPU kind inside its block only: after it (nested or not) the kind is as before."""
    before = runtime.cpu_kind()
    others = [k for k in runtime.CPU_KINDS if k != before]
    with runtime.assume_cpu(others[0]):
        with runtime.assume_cpu(others[1]):
            assert runtime.cpu_kind() == others[1]
        assert runtime.cpu_kind() == others[0]
    assert runtime.cpu_kind() == before


def test_a_gpu_that_only_emulates_bf16_has_no_bf16_hardware(monkeypatch):
    """A GPU without BF16 tensor cores (pre-Ampere: PyTorch supports BF16 only by emulation) is "reference", so
    ``auto`` precision picks FP32 there: flyer asks without counting emulation."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.bf16_gemm_kind("cuda") == "reference"
    assert runtime.resolve_precision("auto", "cuda") == "fp32"


def test_native_gemm_dtypes():
    """FP32 and FP64 GEMMs are always native, on the CPU too."""
    for dtype in (torch.float32, torch.float64):
        assert runtime.native_gemm("cpu", dtype) and runtime.native_gemm("cuda", dtype)


@pytest.mark.parametrize("precision", ["bf16", "fp8", "fp32"])
def test_autocast_per_precision(precision):
    """bf16 and fp8 runs compute under BF16 autocast (the FP8 recipe runs all but its FP8 GEMMs in BF16); fp32
    under none."""
    with runtime.autocast(precision, "cpu"):
        assert torch.is_autocast_enabled("cpu") is (precision != "fp32")
        if precision != "fp32":
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16


_VAR = contextvars.ContextVar("proposed_var", default="unset")


def test_carried_calls_run_in_copies_of_the_captured_context():
    """A ``carried`` function sees the context variables set where it was wrapped (not where it is called), each
    call in a copy of its own: a call may run inside another call, and what one call sets does not leak into the
    next."""
    seen = []

    def fn(depth):
        seen.append((depth, _VAR.get()))
        _VAR.set(f"set by {depth}")
        if depth:
            wrapped(depth - 1)
    token = _VAR.set("captured")
    try:
        wrapped = runtime.carried(fn)
    finally:
        _VAR.reset(token)
    wrapped(1)
    wrapped(0)
    assert seen == [(1, "captured"), (0, "captured"), (0, "captured")]


def test_other_devices_gemms():
    """FP16 GEMMs are native on a GPU (the CPU asks oneDNN); a device other than the CPU and CUDA (here MPS) is
    taken to multiply BF16 in hardware."""
    assert runtime.native_gemm("cuda", torch.float16)
    assert runtime.bf16_gemm_kind("mps") == "hardware" and runtime.native_gemm("mps", torch.bfloat16)


@pytest.mark.parametrize("x86,bf16,amx,avx512_bf16,kind", [
    (False, True, False, False, "arm_bf16"), (False, False, False, False, "arm"),
    (True, False, True, True, "avx2"), (True, True, True, True, "amx"),
    (True, True, False, True, "avx512_bf16"), (True, True, False, False, "avx512")])
def test_cpu_kind_detection(monkeypatch, x86, bf16, amx, avx512_bf16, kind):
    """The detected CPU kind from what oneDNN and the CPU report (forced here): Arm with or without oneDNN's BF16;
    on x86 AVX2 without it, else AMX, AVX512-BF16 or AVX-512."""
    monkeypatch.setattr(runtime, "_x86", lambda: x86)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert runtime._detect_cpu_kind.__wrapped__(True) == kind
    assert runtime._detect_cpu_kind.__wrapped__(False) == ("arm" if not x86 else "avx2")
