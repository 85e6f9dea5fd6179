"""Process-level settings for CPU training speed, and which low-precision GEMMs a device runs natively.

glibc's malloc serves every allocation above its mmap threshold (dynamic, 128 KiB to 32 MiB) with a
fresh ``mmap`` and unmaps it on free, and it returns heap memory above its trim threshold to the
kernel. A training step allocates and frees the same multi-MiB activations every layer, so each one
comes back as new zero pages and pays a page fault per 4 KiB: on the small preset that was 1.4-1.6
million faults in 8 steps and about 10% of step time (measured with ``getrusage``). ``tune_malloc``
keeps those blocks in the heap instead (what jemalloc or tcmalloc under ``LD_PRELOAD`` would give,
with nothing to install).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform

import torch

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: blocks up to 32 MiB stay in the heap
TRIM_THRESHOLD = 1 << 30  # free heap kept for reuse before any is returned to the kernel
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep freed blocks up to 32 MiB in glibc's heap for reuse. Process-wide, idempotent.

    Returns True when applied; False off glibc or when ``FLYER_TUNE_MALLOC=0`` is set.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("FLYER_TUNE_MALLOC", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return _tuned


PRECISIONS = ("auto", "fp32", "bf16", "fp8")


def native_gemm(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` runs ``dtype`` GEMMs on native kernels.

    On the CPU, ATen sends BF16/FP16 GEMMs to oneDNN only where oneDNN has kernels for them (x86
    with AVX-512 or AMX, Arm with BF16 instructions). Elsewhere, an AVX2-only x86 CPU for one, it
    falls back to a scalar reference GEMM: 1.9 GFLOP/s in BF16 against 100 GFLOP/s in FP32,
    measured on 2 cores of an AMD EPYC (Zen 3). FP32 and FP64 are always native.
    """
    device = torch.device(device)
    if dtype in (torch.float32, torch.float64):
        return True
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return False
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        return False
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def bf16_hardware(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies BF16 in hardware, so BF16 GEMMs beat FP32 ones: a CUDA GPU
    with BF16, an x86 CPU with AVX512-BF16 or AMX, an Arm CPU whose BF16 instructions oneDNN uses.
    An AVX-512 CPU without them has oneDNN BF16 GEMMs (``native_gemm``), but they widen to FP32
    inside and run slower than FP32 ones (oneDNN's and OpenVINO's notes on BF16 "simulation")."""
    device = torch.device(device)
    if not native_gemm(device, torch.bfloat16):
        return False
    if device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto``: BF16 where the device multiplies BF16 in hardware (``bf16_hardware``), else FP32;
    any other choice as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision != "auto":
        return precision
    return "bf16" if bf16_hardware(device) else "fp32"


def precision_note(precision: str, device: str | torch.device) -> str | None:
    """A one-line note when ``precision`` asks ``device`` for BF16 GEMMs it has no native kernels for."""
    device = torch.device(device)
    if precision not in ("bf16", "fp8") or native_gemm(device, torch.bfloat16):
        return None
    from flyer.model.lowp import emulated

    if device.type != "cpu":
        how = "are emulated"
    elif emulated("cpu", torch.bfloat16):
        how = "run through the FP32 kernel on BF16-rounded operands (flyer.model.lowp), slower than fp32"
    else:
        how = "run on ATen's scalar reference kernel (FLYER_LOWP_EMULATION=0), tens of times slower than fp32"
    return (f"note: {device.type} has no native BF16 GEMMs here (on a CPU oneDNN needs AVX-512, AMX or Arm BF16): "
            f"{precision}'s BF16 GEMMs {how}; --precision auto picks fp32 here")


def autocast(precision: str, device: str | torch.device):
    """The autocast context a resolved ``precision`` computes under: BF16 for bf16 and fp8 (the FP8
    recipe runs everything outside its FP8 GEMMs in BF16), nothing for fp32."""
    device = torch.device(device)
    if precision in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
