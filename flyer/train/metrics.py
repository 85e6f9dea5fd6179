"""Metrics: a JSON-lines log, TensorBoard scalars, the GEMM peak of this machine, and MFU estimates."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from flyer.config import ConfigError
from flyer.errors import DataError
from flyer.model import lowp
from flyer.model.counts import mtp_training_flops_per_token, training_flops_per_token
from flyer.runtime import bf16_gemm_kind, native_gemm


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as strict JSON takes it: a non-finite value (a skipped step's loss) is null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed each write)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self._f = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(strict_record(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):  # a flush that failed was a write that failed, reported there
                self._f.close()
            self._f = None


# TensorBoard tag of each metrics.jsonl field; other numeric fields (EP traffic) go under comm/
TENSORBOARD_TAGS = {
    "loss": "loss/total", "main_loss": "loss/main", "mtp_loss": "loss/mtp", "aux_loss": "loss/aux",
    "indexer_loss": "loss/indexer", "dpo_loss": "loss/dpo", "rewards_chosen": "dpo/rewards_chosen",
    "rewards_rejected": "dpo/rewards_rejected", "reward_accuracy": "dpo/accuracy", "reward_margin": "dpo/margin",
    "val_loss": "loss/val", "lr": "optim/lr", "grad_norm": "optim/grad_norm", "skipped_total": "optim/skipped_steps",
    "indexer_grad_norm": "optim/indexer_grad_norm",
    "tokens_per_s": "speed/tokens_per_s", "step_time_s": "speed/step_time_s", "mfu": "speed/mfu",
    "load_imbalance": "moe/load_imbalance", "bias_min": "moe/bias_min", "bias_max": "moe/bias_max",
}


class StepSums:
    """Running sums of a step's loss terms kept where they were computed: adding a tensor does not wait for the
    device, and ``floats`` reads them all with one transfer (a ``.item()`` per term and micro-batch stalls the
    host on each, so it cannot queue the next micro-batch's kernels behind this one's)."""

    def __init__(self, *names: str):
        self.terms: dict[str, torch.Tensor | float] = dict.fromkeys(names, 0.0)

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        self.terms[name] = self.terms[name] + value.detach().double() * weight  # as Python floats would add

    def floats(self) -> dict[str, float]:
        tensors = [k for k, v in self.terms.items() if isinstance(v, torch.Tensor)]
        read = dict(zip(tensors, torch.stack([self.terms[k] for k in tensors]).tolist() if tensors else []))
        return {k: read[k] if k in read else v for k, v in self.terms.items()}


def require_tensorboard() -> None:
    """Raise ``ConfigError`` naming the train option when the optional tensorboard package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (optional dependency: the 'tensorboard' extra)
    except ImportError:
        raise ConfigError("train option 'tensorboard': needs the tensorboard package "
                          "(pip install tensorboard, or flyer[tensorboard])") from None


class TensorBoardLog:
    """Writes each record's numeric fields as TensorBoard scalars at its ``step`` (tags:
    ``TENSORBOARD_TAGS``). ``purge_step``: events from that step on, left by an earlier run in
    ``logdir``, are dropped (a resumed run rewrites them)."""

    def __init__(self, logdir: Path, enabled: bool = True, purge_step: int | None = None):
        self._w = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: imported only when asked for

            self._w = SummaryWriter(str(logdir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        if self._w is None:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._w.add_scalar(TENSORBOARD_TAGS.get(k, f"comm/{k}"), v, record["step"])

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log (none where there is no file): each line that is a JSON object with an integer
    step, as every record the trainer writes has; any other line (cut short by a crash or a full disk, damaged: bytes
    that are no UTF-8, a key's name hit, JSON of another kind) is passed over. A directory in its place is a
    ``DataError``."""
    if not path.exists():
        return []
    if not path.is_file():
        raise DataError(f"{path}: not a file (the run's metrics log)")
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r["step"], bool):
            out.append(r)
    return out


def truncate_metrics(path: Path, last_step: int, unlogged: dict | None = None) -> None:
    """Drop records after ``last_step`` (written by a run that died after its last checkpoint), and the lines that
    are no record (``read_metrics``); ``unlogged``: the record of ``last_step`` its run could not write (a full disk;
    its checkpoint holds it), added where the log lacks it. Rewritten whole or not at all: a ``DataError`` where it
    cannot be (a full disk), the log as it was."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    if unlogged is not None and unlogged.get("step") == last_step and all(r["step"] != last_step for r in records):
        records.append(unlogged)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a directory in tmp's place: removing it fails as writing it did
            tmp.unlink(missing_ok=True)
        where = f": {Path(e.filename).name}" if e.filename else ""  # the temporary in the way, where it is
        raise DataError(f"{path}: cannot rewrite it to step {last_step} ({e.strerror or e}{where})") from None


def median_seconds(fn, device: str | torch.device = "cpu", seconds: float = 0.2) -> float:
    """Median seconds per call of ``fn`` over about ``seconds`` of calls (at least 3), after two
    warm-up calls; the device is synchronised around each call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_gemm_peak(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", n: int | None = None,
                      seconds: float = 0.3, shape: tuple[int, int, int] | None = None,
                      emulate: bool | None = None) -> float:
    """Achieved FLOP/s of an (m x k) @ (k x n) GEMM in ``dtype`` on this device; square n x n x n
    unless ``shape`` = (m, k, n) is given. Default n: 1024 on CPU, 8192 on CUDA (a GPU needs a
    large GEMM to reach its peak: 1024 gives an H200 less than a tenth of it). The rate of the
    fastest of the calls made in ``seconds`` (at least 3). Runs the GEMM as flyer's model does
    (``lowp.mm``, BF16 through the FP32 kernel where ``lowp.emulated``); ``emulate`` forces that
    choice either way (``lowp.emulation``)."""
    if n is None:
        n = 8192 if torch.device(device).type == "cuda" else 1024
    m, k, n = shape or (n, n, n)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    cuda = torch.device(device).type == "cuda"
    best, spent, calls = math.inf, 0.0, 0
    # None keeps the caller's setting (an outer ``emulation`` block included)
    with lowp.emulation(emulate) if emulate is not None else contextlib.nullcontext():
        lowp.mm(a, b)  # warm up (kernel selection, AMX tile config)
        while spent < seconds or calls < 3:
            t0 = time.perf_counter()
            lowp.mm(a, b)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best, spent, calls = min(best, dt), spent + dt, calls + 1
    # the fastest call: a peak, not an average over whatever else the (shared) machine was doing
    return 2.0 * m * k * n / best


def gemm_ways(dtype: torch.dtype, device: str | torch.device) -> dict[str, bool | None]:
    """Each way ``device`` offers ``dtype`` GEMMs, named, with the ``emulate`` choice that runs it:
    the device's own kernels (unless only ATen's scalar reference GEMM), and on a CPU the FP32
    kernel on low-precision-rounded operands (``flyer.model.lowp``)."""
    device = torch.device(device)
    if dtype not in lowp.LOWP or device.type != "cpu":
        return {f"{str(dtype).removeprefix('torch.')} ({device.type})": None}
    name = str(dtype).removeprefix("torch.")
    ways: dict[str, bool | None] = {}
    if native_gemm(device, dtype):
        kind = f", {bf16_gemm_kind(device)}" if dtype == torch.bfloat16 else ""
        ways[f"{name} oneDNN kernel (cpu{kind})"] = False
    ways[f"{name} through the fp32 kernel (cpu, flyer.model.lowp)"] = True
    return ways


_PEAKS: dict[tuple, tuple[float, str]] = {}  # fastest_gemm's measurements in this process


def fastest_gemm(dtype: torch.dtype, device: str | torch.device = "cpu", **kwargs) -> tuple[float, str]:
    """(FLOP/s, name) of the fastest way ``device`` offers ``dtype`` GEMMs (``gemm_ways``): the MFU
    denominator at a step's precision. ``kwargs`` go to ``measure_gemm_peak``. Measured once per process for each
    dtype, device, set of ways and ``kwargs``: the machine's peak does not change, and each measurement takes
    0.3 s a way, which a process building many trainers (tests, a notebook) would pay for each."""
    ways = gemm_ways(dtype, device)
    key = (dtype, str(torch.device(device)), tuple(ways.items()), tuple(sorted(kwargs.items())))
    if key not in _PEAKS:
        rates = {name: measure_gemm_peak(dtype, device, emulate=emulate, **kwargs) for name, emulate in ways.items()}
        best = max(rates, key=rates.get)
        _PEAKS[key] = rates[best], best
    return _PEAKS[key]


def model_flops_per_token(cfg, seq_len: int, indexer_train: str = "off") -> float:
    """Training FLOPs per token of the main model plus its MTP modules (causal attention), DSA indexers trained as
    ``indexer_train`` trains them (``flyer.model.counts.layer_flops_per_token``)."""
    return (training_flops_per_token(cfg, seq_len, causal=True, indexer_train=indexer_train)
            + mtp_training_flops_per_token(cfg, seq_len, indexer_train))


def progress_postfix(rec: dict[str, Any], val_loss: float | None) -> dict[str, str]:
    """The progress bar's fields: the next-token loss (comparable with validation), the MTP loss
    beside it when the model has MTP modules, the last validation loss and tokens/s."""
    post = {"loss": f"{rec.get('main_loss', rec['loss']):.3f}"}  # DPO: its loss
    if rec.get("mtp_loss"):
        post["mtp"] = f"{rec['mtp_loss']:.3f}"
    if "indexer_loss" in rec:
        post["indexer"] = f"{rec['indexer_loss']:.3f}"
    if val_loss is not None:
        post["val"] = f"{val_loss:.3f}"
    post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
    return post
