"""Accelerator and fabric spec table: the inputs every cluster estimate starts from.

Peaks are vendor data-sheet numbers for dense (non-sparse) tensor-core math, per GPU. Bandwidths
are per GPU and per direction: ``nvlink_gb_s`` in gigabytes per second, ``nic_gbit_s`` in
gigabits per second (one NIC per GPU is the HGX/DGX layout). Any field can be overridden from
the command line (``flyer plan --hw bf16_tflops=900``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

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


def gpu_spec(gpu: str, hw: dict[str, str] | None = None) -> GPUSpec:
    """The named GPU, with ``hw`` (hardware field -> value) overrides applied (values parsed as numbers)."""
    key = gpu.lower()
    if key not in GPUS:
        raise FieldError("gpu", f"unknown GPU '{gpu}' (choose from: {', '.join(GPUS)})")
    spec = GPUS[key]
    if not hw:
        return spec
    known = {f.name: f for f in fields(GPUSpec) if f.name != "name"}
    kw = {}
    for k, v in hw.items():
        if k not in known:
            raise FieldError("hw", f"unknown hardware field '{k}' (known: {', '.join(known)})")
        try:
            num = float(v)
        except ValueError:
            raise FieldError("hw", f"{k} must be a number (got {v!r})") from None
        if not 0 < num < math.inf:
            raise FieldError("hw", f"{k} must be a finite number > 0 (got {v})")
        kw[k] = int(num) if known[k].type in (int, "int") else num
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
