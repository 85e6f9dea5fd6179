"""Accelerator and fabric spec table: the inputs every cluster estimate starts from.

Peaks are vendor data-sheet numbers for dense (non-sparse) tensor-core math, per GPU. Bandwidths
are per GPU and per direction: ``nvlink_gb_s`` in gigabytes per second, ``nic_gbit_s`` in
gigabits per second (one NIC per GPU is the HGX/DGX layout). Any field can be overridden from
the command line (``flyer plan --hw bf16_tflops=900``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flyer.errors import FieldError

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float  # dense BF16 tensor-core peak (the MFU denominator)
    fp8_tflops: float  # dense FP8 tensor-core peak
    hbm_gib: float  # HBM capacity, GiB
    hbm_tb_s: float  # HBM bandwidth, TB/s
    nvlink_gb_s: float  # NVLink bandwidth per GPU per direction, GB/s
    nic_gbit_s: float  # scale-out NIC line rate per GPU, Gb/s
    gpus_per_node: int  # size of the NVLink domain the GPU sits in

    @property
    def nic_gb_s(self) -> float:
        """NIC line rate in gigabytes per second."""
        return self.nic_gbit_s / 8.0


# H800: the export variant of H100 SXM with NVLink cut to 400 GB/s bidirectional (200 per
# direction; the V3 report measures ~160 GB/s achievable); same tensor cores and HBM.
GPUS: dict[str, GPUSpec] = {
    "h800": GPUSpec("H800", 989.4, 1978.9, 80, 3.35, 200, 400, 8),
    "h100": GPUSpec("H100", 989.4, 1978.9, 80, 3.35, 450, 400, 8),
    "h200": GPUSpec("H200", 989.4, 1978.9, 141, 4.8, 450, 400, 8),
    "b200": GPUSpec("B200", 2250, 4500, 180, 8.0, 900, 400, 8),
    "gb200": GPUSpec("GB200", 2500, 5000, 186, 8.0, 900, 800, 72),
}


@dataclass(frozen=True)
class HWRange:
    """The values ``--hw`` accepts for one ``GPUSpec`` field: ``least <= value <= most`` in ``unit``
    (``whole``: an integer count)."""

    least: float
    most: float
    unit: str
    whole: bool = False


# Every field divides an estimate or sizes the machine, so each floor is > 0, and far enough below any real part
# that nothing underflows; each ceiling leaves 100x or more room over the largest GPU announced.
HW_RANGES: dict[str, HWRange] = {
    # peaks: 1 GFLOP/s (under one CPU core; tiny peaks underflow throughput) to 1 EFLOP/s (200x GB200's 5 PFLOP/s FP8)
    "bf16_tflops": HWRange(1e-3, 1e6, "TFLOPS"),
    "fp8_tflops": HWRange(1e-3, 1e6, "TFLOPS"),
    # memory: ~1 MiB (less than any accelerator's) to ~1 PiB (3,700x B300's 288 GB of HBM)
    "hbm_gib": HWRange(1e-3, 1e6, "GiB"),
    # bandwidths: 1 MB/s (below any GPU link) to 1 PB/s (125x B200's 8 TB/s HBM, the fastest link a GPU has)
    "hbm_tb_s": HWRange(1e-6, 1e3, "TB/s"),
    "nvlink_gb_s": HWRange(1e-3, 1e6, "GB/s"),
    "nic_gbit_s": HWRange(8e-3, 8e6, "Gb/s"),
    # whole GPUs: 1 to 65,536 in one NVLink domain (a 64-port three-tier fat tree; NVL576 is the largest announced)
    "gpus_per_node": HWRange(1, 2**16, "GPUs", whole=True),
}


def hw_problem(field: str, value: float, shown: str | None = None) -> str | None:
    """Why ``value`` cannot be hardware field ``field`` (a ``HW_RANGES`` key), worded to follow the
    field's name; None when it can. ``shown``: the value as the user wrote it."""
    r, shown = HW_RANGES[field], value if shown is None else shown
    if r.whole:
        if not (r.least <= value <= r.most and float(value).is_integer()):  # range first: nan, inf, 10**400
            return f"must be a whole number of {r.unit} in [{r.least:,}, {r.most:,}] (got {shown})"
    elif not r.least <= value <= r.most:  # nan fails both comparisons
        return (f"must be a finite number > 0 in [{r.least:g}, {r.most:g}] {r.unit}, room for any real GPU (outside "
                f"it estimates are meaningless or non-finite; got {shown})")
    return None


def gpu_spec(gpu: str, hw: dict[str, str] | None = None) -> GPUSpec:
    """The named GPU, with ``hw`` (hardware field -> value) overrides applied: each value parsed as a
    number and checked against ``HW_RANGES``."""
    key = gpu.lower()
    if key not in GPUS:
        raise FieldError("gpu", f"unknown GPU '{gpu}' (choose from: {', '.join(GPUS)})")
    spec = GPUS[key]
    if not hw:
        return spec
    kw = {}
    for k, v in hw.items():
        if k not in HW_RANGES:
            raise FieldError("hw", f"unknown hardware field '{k}' (known: {', '.join(HW_RANGES)})")
        try:
            num = float(v)
        except ValueError:
            raise FieldError("hw", f"{k} must be a number (got {v!r})") from None
        problem = hw_problem(k, num, v)
        if problem:
            raise FieldError("hw", f"{k} {problem}")
        kw[k] = int(num) if HW_RANGES[k].whole else num
    return dataclasses.replace(spec, **kw)


@dataclass(frozen=True)
class LinkClass:
    """One kind of link in an alpha-beta model: a fixed latency plus bytes over bandwidth."""

    name: str
    latency_us: float  # end-to-end small-message latency (alpha)
    bandwidth_gb_s: float  # per-GPU per-direction bandwidth (1 / beta), GB/s

    def time_us(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency_us + nbytes / (self.bandwidth_gb_s * 1e3)


# Latencies are the ISCA paper's 64-byte cross-leaf measurements (same-leaf for NVLink);
# bandwidths are line rates: 400 Gb/s = 50 GB/s for IB and RoCE, the H800's 200 GB/s NVLink.
FABRICS: dict[str, LinkClass] = {
    "ib": LinkClass("InfiniBand 400G", 3.7, 50.0),
    "roce": LinkClass("RoCE 400G", 5.6, 50.0),
    "nvlink": LinkClass("NVLink (H800)", 3.33, 200.0),
    "nvl72": LinkClass("NVLink 5 (GB200 NVL72)", 3.33, 900.0),
}


def fabric(name: str, bandwidth_gb_s: float | None = None, latency_us: float | None = None) -> LinkClass:
    if name not in FABRICS:
        raise FieldError("fabric", f"unknown fabric '{name}' (choose from: {', '.join(FABRICS)})")
    link = FABRICS[name]
    if bandwidth_gb_s is not None:
        if bandwidth_gb_s <= 0:
            raise FieldError("bandwidth_gb_s", f"must be > 0 (got {bandwidth_gb_s})")
        link = dataclasses.replace(link, bandwidth_gb_s=bandwidth_gb_s)
    if latency_us is not None:
        if latency_us < 0:
            raise FieldError("latency_us", f"must be >= 0 (got {latency_us})")
        link = dataclasses.replace(link, latency_us=latency_us)
    return link
