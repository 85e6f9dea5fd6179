"""Fused CPU kernels for the element-wise passes that dominate a CPU training step after the GEMMs.

``cpu_ops.cpp`` is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja are needed; the build, ~1 minute, is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). Each kernel replaces several eager passes over memory with one:

- ``xent_chunk``: a chunk of logits to log p(target) and softmax - onehot (the fused loss);
- ``swiglu`` / ``swiglu_backward``: the routed experts' activation and its gradient;
- ``combine`` / ``combine_backward`` / ``segment_sum``: the MoE's weighted FP32 sum of each
  token's expert outputs, and its gradients.
- ``rms_norm`` / ``rms_norm_backward``: RMSNorm of each row and its gradients;
- ``fp8_dequantize``: FP8 codes (1x128 tiles or 128x128 blocks) times their scales, as FP32 (the
  operands of the CPU FP8 GEMM emulation), bit for bit the eager table lookup and multiply.

The eager code stays as the fallback and the oracle: the callers use a kernel only where
``usable(...)`` says so (CPU tensors of float32/bfloat16/float16, the extension built), and tests
compare the two. ``FLYER_CPU_KERNELS=0`` turns the kernels off; so does ``disabled()`` in a block.
When the build fails (no compiler), flyer warns once and runs the eager code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
_state: dict = {"module": None, "tried": False, "off": 0}


def _capability_flags() -> list[str]:
    """Compile for the vector ISA that ATen itself dispatches to on this CPU."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mfma"]
    if cap == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return []


def cpu_ops():
    """The compiled extension module, or None when it is turned off or could not be built."""
    if _state["off"] or os.environ.get("FLYER_CPU_KERNELS", "1") == "0":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            from torch.utils.cpp_extension import load

            if shutil.which("ninja") is None:  # the ninja wheel's binary, when its bin/ is not on PATH
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

            # the source's path and contents in the name: builds of different flyer versions or
            # checkouts live side by side in the cache instead of rebuilding each other
            digest = hashlib.sha256(str(_SOURCE.resolve()).encode() + _SOURCE.read_bytes()).hexdigest()[:12]
            _state["module"] = load(name=f"flyer_cpu_ops_{digest}", sources=[str(_SOURCE)],
                                    extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *_capability_flags()],
                                    extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, ...: the eager code is correct, only slower
            warnings.warn(f"flyer: fused CPU kernels unavailable, using eager PyTorch ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e})", stacklevel=2)
    return _state["module"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: all on the CPU, float32/bfloat16/float16, built."""
    return (all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)
            and cpu_ops() is not None)


@contextlib.contextmanager
def disabled():
    """Run the eager code inside the block (the oracle in tests and benchmarks)."""
    _state["off"] += 1
    try:
        yield
    finally:
        _state["off"] -= 1


def token_rows(src_N: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of rows by token for ``combine``/``segment_sum``: (offsets (T+1,), rows) with token t's
    rows ``rows[offsets[t]:offsets[t+1]]`` ascending. ``src_N[r]`` is row r's token; values
    ``>= n_tokens`` (pad rows) belong to no token."""
    rows = torch.argsort(src_N, stable=True)
    counts = torch.bincount(src_N, minlength=n_tokens + 1)[:n_tokens]
    offsets = torch.zeros(n_tokens + 1, dtype=torch.long, device=src_N.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, rows


__all__ = ["cpu_ops", "usable", "disabled", "token_rows", "KERNEL_DTYPES"]
