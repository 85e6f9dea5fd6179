"""Communication models: EP dispatch/combine (alpha-beta), 64-byte latency, CPU proxy vs IBGDA.

EP decode bound (ISCA paper, section on bandwidth-bound decode). Per EP step each device sends
``tokens`` tokens to ``experts_per_token`` experts (routed + shared), FP8 on dispatch and BF16
on combine::

    bytes  = (dispatch_bytes + combine_bytes) x tokens x copies x hidden
    step   = bytes / bandwidth                 (+ 2 x latency in the alpha-beta variant)
    layer  = micro_batches x step              (two micro-batches: one computes while the
                                                other communicates, so a layer is comm-bound)
    TPOT   = layers x layer;  tokens/s = 1 / TPOT

``copies`` is every expert copy for the paper's bound. With node-limited routing (``node_limit``
M > 0) a token crosses the scale-out fabric once per target node (at most M, one NIC each) and
is fanned out to its experts over NVLink; the two stages pipeline, so the slower one bounds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flyer.cluster.hardware import FABRICS, LinkClass
from flyer.errors import FieldError


@dataclass(frozen=True)
class EPScenario:
    tokens_per_device: int = 32
    hidden: int = 7000  # the ISCA paper rounds DeepSeek-V3's 7168 to "7K"
    experts_per_token: int = 9  # 8 routed + 1 shared
    layers: int = 61
    dispatch_bytes: float = 1.0  # FP8
    combine_bytes: float = 2.0  # BF16
    dispatch_scale_bytes: float = 0.0  # per element; 4/128 with one FP32 scale per 128 channels
    micro_batches: int = 2
    node_limit: int = 0  # M nodes per token; 0 = every copy crosses the scale-out fabric

    def validate(self) -> None:
        for name in ("tokens_per_device", "hidden", "experts_per_token", "layers", "micro_batches"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1 (got {getattr(self, name)})")
        for name in ("dispatch_bytes", "combine_bytes", "dispatch_scale_bytes", "node_limit"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0 (got {getattr(self, name)})")
        if self.node_limit > self.experts_per_token:  # M nodes can only hold experts a token reaches
            raise FieldError("node_limit", f"must be <= {{experts_per_token}} = {self.experts_per_token}, the most "
                                           f"nodes a token reaches (got {self.node_limit})", ("experts_per_token",))


def ep_decode(s: EPScenario, fabric: LinkClass, nvlink: LinkClass | None = None) -> dict:
    """Dispatch, combine, step, layer, TPOT and tokens/s for one EP decode scenario."""
    s.validate()
    per_copy = s.tokens_per_device * s.hidden
    scaleout_copies = s.experts_per_token if s.node_limit == 0 else min(s.node_limit, s.experts_per_token)
    d_bytes = (s.dispatch_bytes + s.dispatch_scale_bytes) * per_copy * scaleout_copies
    c_bytes = s.combine_bytes * per_copy * scaleout_copies
    dispatch_us = fabric.time_us(d_bytes, messages=0)
    combine_us = fabric.time_us(c_bytes, messages=0)
    step_us = dispatch_us + combine_us
    alpha_us = 2 * fabric.latency_us
    nvlink_us = 0.0
    if s.node_limit and nvlink is not None:  # second stage: fan out to every expert copy
        nv_bytes = (s.dispatch_bytes + s.dispatch_scale_bytes + s.combine_bytes) * per_copy * s.experts_per_token
        nvlink_us = nvlink.time_us(nv_bytes, messages=0)
        step_us = max(step_us, nvlink_us)
        alpha_us += 2 * nvlink.latency_us
    layer_us = s.micro_batches * step_us
    tpot_ms = s.layers * layer_us / 1e3
    ab_tpot_ms = s.layers * s.micro_batches * (step_us + alpha_us) / 1e3
    return {
        **asdict(s),
        "fabric": fabric.name,
        "bandwidth_gb_s": fabric.bandwidth_gb_s,
        "latency_us": fabric.latency_us,
        "scaleout_copies_per_token": scaleout_copies,
        "bytes_per_step": d_bytes + c_bytes,
        "dispatch_us": dispatch_us,
        "combine_us": combine_us,
        "nvlink_us": nvlink_us,
        "step_us": step_us,
        "layer_us": layer_us,
        "tpot_ms": tpot_ms,
        "tokens_per_s": 1e3 / tpot_ms,
        "step_us_alpha_beta": step_us + alpha_us,
        "tpot_ms_alpha_beta": ab_tpot_ms,
        "tokens_per_s_alpha_beta": 1e3 / ab_tpot_ms,
    }


# ---- small-message latency ------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyModel:
    """latency = endpoint overhead (both NICs, PCIe, verbs) + switches x per-switch latency
    + bytes / bandwidth (cut-through: serialised once)."""

    name: str
    endpoint_us: float
    switch_us: float
    bandwidth_gb_s: float

    def latency_us(self, switches: int, nbytes: int = 64) -> float:
        return self.endpoint_us + switches * self.switch_us + nbytes / (self.bandwidth_gb_s * 1e3)


# Fitted to the ISCA paper's 64-byte latencies (IB 2.8 / 3.7 us, RoCE 3.6 / 5.6 us at 1 / 3 switches)
# to give what they do not: 5-switch (three-tier) paths and other sizes.
LATENCY_MODELS = {
    "ib": LatencyModel("InfiniBand", 2.35, 0.45, 50.0),
    "roce": LatencyModel("RoCE", 2.6, 1.0, 50.0),
    "nvlink": LatencyModel("NVLink", 3.33, 0.0, 200.0),
}


def latency_table(nbytes: int = 64) -> list[dict]:
    """Same-leaf (1 switch), cross-leaf (3) and cross-pod (5, three-tier) latency per fabric."""
    rows = []
    for key, m in LATENCY_MODELS.items():
        paths = {"intra_node": 1} if key == "nvlink" else {"same_leaf": 1, "cross_leaf": 3, "cross_pod": 5}
        for path, sw in paths.items():
            rows.append({"fabric": key, "path": path, "switches": sw, "bytes": nbytes,
                         "latency_us": m.latency_us(sw, nbytes)})
    return rows


# ---- CPU proxy versus GPU-initiated RDMA (IBGDA), LogGP-style ---------------------------------
@dataclass(frozen=True)
class RDMAIssue:
    """How work requests reach the NIC.

    ``overhead_us`` is the per-message cost on the issuing side (o in LogGP); ``issuers`` how
    many agents issue in parallel (CPU proxy threads, or GPU warps with IBGDA);
    ``extra_latency_us`` a fixed added delay (GPU -> host signal + proxy polling).
    """

    name: str
    overhead_us: float
    issuers: int
    extra_latency_us: float

    def gap_us(self, nic_msg_rate: float) -> float:
        """Time between consecutive messages: issuer-bound or NIC message-rate-bound."""
        return max(self.overhead_us / self.issuers, 1e6 / nic_msg_rate)


def rdma_time_us(issue: RDMAIssue, messages: int, nbytes: int, link: LinkClass, nic_msg_rate: float) -> float:
    """LogGP: T = L + extra + n x max(g, bytes x G) for ``messages`` messages of ``nbytes``."""
    per_msg = max(issue.gap_us(nic_msg_rate), nbytes / (link.bandwidth_gb_s * 1e3))
    return link.latency_us + issue.extra_latency_us + messages * per_msg


def ibgda_sweep(sizes: list[int], messages: int = 256, link: LinkClass = FABRICS["ib"],
                nic_msg_rate: float = 200e6, proxy: RDMAIssue | None = None,
                ibgda: RDMAIssue | None = None) -> dict:
    """Time and effective bandwidth of ``messages`` sends per size, CPU proxy versus IBGDA.

    Defaults (assumptions, all flags): one proxy thread at 0.5 us per work request plus a 2 us
    GPU-to-proxy hand-off; IBGDA with 0.2 us per request on each of 128 issuing warps, so the
    NIC's message rate (200 M/s) is the cap. The proxy stops mattering once a message takes
    longer on the wire than the proxy needs to post it: size >= gap x bandwidth.
    """
    proxy = proxy or RDMAIssue("cpu_proxy", 0.5, 1, 2.0)
    ibgda = ibgda or RDMAIssue("ibgda", 0.2, 128, 0.0)
    if messages < 1:
        raise FieldError("messages", f"must be >= 1 (got {messages})")
    if nic_msg_rate <= 0:
        raise FieldError("nic_msg_rate", f"must be > 0 (got {nic_msg_rate})")
    rows = []
    for size in sizes:
        if size < 1:
            raise FieldError("sizes", f"must be positive byte counts (got {size})")
        tp = rdma_time_us(proxy, messages, size, link, nic_msg_rate)
        tg = rdma_time_us(ibgda, messages, size, link, nic_msg_rate)
        rows.append({"bytes": size, "proxy_us": tp, "ibgda_us": tg, "speedup": tp / tg,
                     "proxy_gb_s": messages * size / tp / 1e3, "ibgda_gb_s": messages * size / tg / 1e3})
    bw = link.bandwidth_gb_s * 1e3  # bytes per us
    return {
        "messages": messages, "link": link.name, "bandwidth_gb_s": link.bandwidth_gb_s,
        "nic_msg_rate": nic_msg_rate,
        "proxy_msg_rate": 1e6 / proxy.gap_us(nic_msg_rate), "ibgda_msg_rate": 1e6 / ibgda.gap_us(nic_msg_rate),
        "proxy_bandwidth_bound_from_bytes": math.ceil(proxy.gap_us(nic_msg_rate) * bw),
        "ibgda_bandwidth_bound_from_bytes": math.ceil(ibgda.gap_us(nic_msg_rate) * bw),
        "rows": rows,
    }
