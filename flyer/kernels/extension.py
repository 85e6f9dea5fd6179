"""Building and loading flyer's fused CPU kernels (``flyer.kernels``, the facade that calls them).

``cpu_ops.cpp`` is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja are needed; the build, ~1 minute, is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). A kernel runs where ``usable(...)`` says so (CPU tensors of
float32/bfloat16/float16, the extension built). ``FLYER_CPU_KERNELS=0`` turns the kernels off; so
does ``disabled()`` in a block. When the build fails (no compiler), flyer warns once and runs the
eager code. A build killed midway (Ctrl-C on the first run) leaves torch's lock file behind, on which
every later load would wait forever: flyer's loads take an OS lock of their own, which
dies with its process, and clear a lock file left by a dead one (``_build_lock``).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
# FLYER_CPU_KERNELS=0 is read once: ``cpu_ops`` runs a few hundred times a decode step
_state: dict = {"module": None, "tried": False, "env_off": os.environ.get("FLYER_CPU_KERNELS", "1") == "0"}
# ``disabled``'s switch: a context variable, so that a backward's recomputation and a worker thread can carry the
# value their forward ran under (``flyer.runtime.carried``)
_off: contextvars.ContextVar[bool] = contextvars.ContextVar("flyer_kernels_off", default=False)


def capability_flags(cap: str | None = None) -> list[str]:
    """Compile for the vector ISA ``cap``, by default the one ATen itself dispatches to on this CPU."""
    cap = cap or torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mfma"]
    if cap == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return []


def build(capability: str | None = None):
    """Compile (or load from the cache) the extension for ``capability`` (default: what ATen
    dispatches to here; tests build the AVX2 variant on an AVX-512 CPU to run its own code)."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its bin/ is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    name = extension_name(capability or torch.backends.cpu.get_cpu_capability())
    with _build_lock(Path(build_directory(name))):
        return load(name=name, sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *capability_flags(capability)],
                    extra_ldflags=["-fopenmp"], verbose=False)


def extension_name(capability: str, source: Path = _SOURCE, torch_dir: str | None = None) -> str:
    """The extension's name, and so its build directory's: the digest of the source's path and contents and of
    the torch it compiles against (``torch_dir``, default this one's install directory, and its version), then
    the ISA. Builds of different flyer versions, checkouts, environments or ISAs (ATEN_CPU_CAPABILITY=avx2 forced)
    live side by side: one directory for two environments rebuilt it at every switch (torch's include paths are
    in the compile command, which ninja compares)."""
    torch_dir = torch_dir or str(Path(torch.__file__).parent)
    key = "\0".join([str(source.resolve()), torch_dir, torch.__version__]).encode() + source.read_bytes()
    return f"flyer_cpu_ops_{hashlib.sha256(key).hexdigest()[:12]}_{capability.lower()}"


def build_directory(name: str) -> str:
    """Where ``load`` builds extension ``name`` (under ``TORCH_EXTENSIONS_DIR``, by default
    ``~/.cache/torch_extensions/<python>_<accelerator>``): torch's own rule, which it keeps private."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, False)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an exclusive ``flock`` on ``build_dir`` for a load, and clear torch's ``lock`` file
    there: torch creates it for a build and removes it after, and waits without end while it
    exists. The kernel drops a ``flock`` when its process dies, so a ``lock`` file found under ours
    is from a build that was killed, not one in progress."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "flyer.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def build_failure(message: str) -> str:
    """One line of a failed build's output that says why: the compiler's first error (a full disk, a missing
    header), where ninja's last line says only that it stopped; else the last line."""
    lines = message.strip().splitlines()
    return next((ln.strip() for ln in lines if re.search(r"\berror:", ln, re.I)), lines[-1] if lines else message)


def cpu_ops():
    """The compiled extension module, or None when it is turned off or could not be built."""
    if _state["env_off"] or _off.get():
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = build()
        except Exception as e:  # no compiler, no ninja, ...: the eager code is correct, only slower
            warnings.warn(f"fused CPU kernels unavailable, using eager PyTorch ({type(e).__name__}: "
                          f"{build_failure(str(e))})", stacklevel=2)
    return _state["module"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: all on the CPU, float32/bfloat16/float16, built."""
    return (all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)
            and cpu_ops() is not None)


@contextlib.contextmanager
def disabled():
    """Run the eager code inside the block (the oracle in tests and benchmarks): in this thread and context only
    (another thread, an engine's scheduler, keeps its kernels; ``flyer.runtime.carried`` takes the switch along)."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


__all__ = ["KERNEL_DTYPES", "build", "build_directory", "capability_flags", "cpu_ops", "disabled", "extension_name",
           "usable"]
