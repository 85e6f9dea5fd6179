"""What the process runs on and how: the CPU's kind and what its BF16 GEMMs run on, the
``--precision auto`` choice, the memory still available, and glibc malloc tuning.

``tune_malloc``: a training step allocates and frees the same multi-MiB activations every layer,
and glibc returns such blocks to the kernel, so each comes back as fresh zero pages (a page fault
per 4 KiB, about 10% of a small-preset CPU step). Keeping them in the heap is what jemalloc or
tcmalloc under ``LD_PRELOAD`` would give, with nothing to install.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import os
import platform

import torch

from flyer.errors import FieldError

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

# What a CPU's BF16 GEMMs run on, by the kind of CPU (measured on 2 cores; docs/performance.md):
# - "hardware": BF16 dot products in hardware (AVX512-BF16, AMX, Arm BF16): faster than FP32;
# - "widened": oneDNN kernels that widen BF16 to FP32 inside (AVX-512 without BF16): ~0.2x FP32;
# - "reference": ATen's scalar reference GEMM (AVX2 only, no oneDNN BF16 kernels): ~0.02x FP32.
BF16_GEMM_KINDS = ("hardware", "widened", "reference")
CPU_KINDS = {"amx": "hardware", "avx512_bf16": "hardware", "arm_bf16": "hardware", "avx512": "widened",
             "avx2": "reference", "arm": "reference"}
_assumed_cpu: contextvars.ContextVar[str | None] = contextvars.ContextVar("flyer_assumed_cpu", default=None)


def available_memory(device: str | torch.device) -> int | None:
    """Bytes still available on ``device``: a GPU's free memory, or the host's ``MemAvailable``
    (Linux; else the free physical pages). None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def require_memory(need: float, device: str | torch.device, field: str, what: str) -> None:
    """Raise ``FieldError(field)`` when ``need`` bytes (``what`` needs them) exceed what ``device``
    has available, before anything is allocated, instead of an out-of-memory kill."""
    have = available_memory(device)
    if have is not None and need > have:
        raise FieldError(field, f"{what} needs about {need / 2**30:,.1f} GiB, but {torch.device(device)} has "
                                f"{have / 2**30:,.1f} GiB available")


def max_threads() -> int:
    """The bound of every thread count a user sets (``threads``, ``expert_threads``): 4 a core. More threads than
    cores only take turns (the kernels' spin while they wait); 4x still allows a count the machine reports too low,
    far below the tens of thousands at which OpenMP aborts or the process segfaults."""
    return 4 * (os.cpu_count() or 1)


def check_threads(n: int, field: str) -> None:
    """``FieldError(field)`` unless 1 <= n <= ``max_threads()``."""
    if not 1 <= n <= max_threads():
        raise FieldError(field, f"must be in [1, {max_threads()}] (4 per CPU core; got {n})")


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.cache
def _detect_cpu_kind(mkldnn_enabled: bool) -> str:
    onednn_bf16 = (mkldnn_enabled and torch.backends.mkldnn.is_available()
                   and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    if not _x86():
        return "arm_bf16" if onednn_bf16 else "arm"
    if not onednn_bf16:
        return "avx2"
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"


def cpu_kind() -> str:
    """This CPU's kind as far as BF16 GEMMs go (a key of ``CPU_KINDS``): the one ``assume_cpu``
    set, else detected (oneDNN's BF16 support, then AMX / AVX512-BF16 on x86)."""
    return _assumed_cpu.get() or _detect_cpu_kind(torch.backends.mkldnn.enabled)


def carried(fn):
    """``fn``, to be run later or on another thread under the switches set where ``carried`` was called:
    ``assume_cpu``, ``flyer.model.lowp.emulation`` and ``flyer.kernels.disabled`` are context variables, which a
    backward's recomputation (run by autograd, after the ``with`` blocks closed) and a worker thread would not see.
    Each call runs in a copy of its own, so a call may begin while another runs (a region's forward that
    backpropagates inside itself recomputes it)."""
    ctx = contextvars.copy_context()
    return lambda *args, **kwargs: ctx.copy().run(fn, *args, **kwargs)


@contextlib.contextmanager
def assume_cpu(kind: str):
    """Take every CPU-dependent decision as on a CPU of ``kind`` inside the block (tests force each
    kind this way, whatever machine they run on). The arithmetic still runs on this CPU."""
    if kind not in CPU_KINDS:
        raise ValueError(f"cpu kind must be one of {', '.join(CPU_KINDS)} (got {kind!r})")
    token = _assumed_cpu.set(kind)
    try:
        yield
    finally:
        _assumed_cpu.reset(token)


def bf16_gemm_kind(device: str | torch.device) -> str:
    """What ``device``'s BF16 GEMMs run on (``BF16_GEMM_KINDS``). CUDA: "hardware" where the GPU
    has BF16 tensor cores (Ampere and newer), else "reference" (PyTorch emulates them)."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_KINDS[cpu_kind()]
    if device.type == "cuda":
        return "hardware" if torch.cuda.is_bf16_supported(including_emulation=False) else "reference"
    return "hardware"


def native_gemm(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` has kernels of its own for ``dtype`` GEMMs (not ATen's scalar reference
    GEMM). FP32 and FP64 always; BF16 unless ``bf16_gemm_kind`` is "reference"; CPU FP16 where
    oneDNN has FP16 kernels."""
    device = torch.device(device)
    if dtype in (torch.float32, torch.float64):
        return True
    if dtype == torch.bfloat16:
        return bf16_gemm_kind(device) != "reference"
    if device.type == "cpu" and dtype == torch.float16:
        return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()))
    return device.type != "cpu"


def bf16_hardware(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies BF16 in hardware, so BF16 GEMMs beat FP32 ones."""
    return bf16_gemm_kind(device) == "hardware"


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto``: BF16 where the device multiplies BF16 in hardware (``bf16_hardware``), else FP32;
    any other choice as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision != "auto":
        return precision
    return "bf16" if bf16_hardware(device) else "fp32"


def autocast(precision: str, device: str | torch.device):
    """The autocast context a resolved ``precision`` computes under: BF16 for bf16 and fp8 (the FP8
    recipe runs everything outside its FP8 GEMMs in BF16), nothing for fp32."""
    device = torch.device(device)
    if precision in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
