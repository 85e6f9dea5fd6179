"""The physical range of every numeric flag of ``flyer plan`` and ``flyer net``: a value outside it
is refused by name in one line (``check_ranges``, before the command runs), so no accepted input
prints inf, nan or a number of absurd length, or runs unbounded."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from flyer.cluster import topology as T
from flyer.cluster.hardware import HW_RANGES, hw_problem
from flyer.cluster.netsim import MAX_MESSAGE_BYTES, MAX_NIC_GB_S
from flyer.errors import FieldError

# numeric flags that may be 0, or any sign (the command line refuses the others at 0 or below)
ZERO_OK = {"price_per_gpu_hour", "extra_gpu_hours", "switch_price_per_port", "endpoint_link_usd", "switch_link_usd",
           "node_limit", "latency_us", "proxy_overhead_us", "proxy_latency_us", "gpu_overhead_us", "seed", "w",
           "stage_param_gib", "microbatch_activation_gib", "bytes", "dispatch_bytes", "zero"}
SIGNED = {"switch_price_base"}  # the fitted line's intercept


@dataclass(frozen=True)
class FlagRange:
    """The values a numeric flag accepts: ``least <= value <= most`` in ``unit``; ``why`` says where
    the bounds come from, in the one-line error. A ``least`` of 0 on a flag outside ``ZERO_OK`` is
    exclusive (the command line refuses 0 first). ``whole``: an int flag, its numbers printed exactly;
    ``hw``: the flag sets that ``--hw`` field, so it is checked and worded as ``--hw`` checks it."""

    least: float
    most: float
    unit: str
    why: str
    whole: bool = False
    hw: str = ""

    def problem(self, value: float, zero_ok: bool) -> str | None:
        """Why ``value`` is out of range, worded to follow the flag; None when it is in range."""
        if self.hw:
            return hw_problem(self.hw, value)
        if self.least <= value <= self.most:
            return None
        low = "(" if self.least == 0 and not zero_ok else "["
        unit = f" {self.unit}" if self.unit else ""
        num, outside = ("{:,}".format, "meaningless") if self.whole else (_g, "meaningless or non-finite")
        return (f"must be in {low}{num(self.least)}, {num(self.most)}]{unit}, {self.why}; outside it results are "
                f"{outside} (got {num(value)})")


def _g(x: float) -> str:
    """``x`` short: 1e6, 0.001, 1.5e11 (``:g`` without its exponent's plus sign and zero padding)."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:g}")


def _like(hw_field: str, why: str, least: float | None = None) -> FlagRange:
    """The ``--hw`` field's range (``HW_RANGES``) for a flag of the same quantity."""
    r = HW_RANGES[hw_field]
    return FlagRange(r.least if least is None else least, r.most, r.unit, why)


def _count(least: int, most: int, unit: str, why: str) -> FlagRange:
    """The range of an int flag: a count or size in whole ``unit``."""
    return FlagRange(least, most, unit, why, whole=True)


US_1S = 1e6  # microseconds in a second: a latency or per-message overhead beyond it is an outage, not a delay
# Every float flag of plan and net, checked before the command runs (``_checked``): bad input is refused
# by name, and no in-range input prints inf, nan or a number of absurd length. Order is check order.
FLAG_RANGES: dict[str, FlagRange] = {
    # plan. GPU-hours: a million GPUs for a century is 8.8e11
    "extra_gpu_hours": FlagRange(0, 1e12, "GPU-hours", "room for a million GPUs running a century"),
    # tokens: ~30,000x the largest corpus yet trained on (Qwen3's 36T); GPU-hours and days stay printable
    "tokens": FlagRange(1, 1e18, "tokens", "up to 30,000x the largest corpus yet trained on"),
    # a token a day (a stopped cluster) up; the MFU <= 100% check bounds it tighter for the GPUs given
    "tokens_per_day": FlagRange(1, 1e18, "tokens/day", "as --tokens, per day"),
    # under 0.1% of peak the GPUs idle, they do not train; over 1 is more than the hardware does
    "mfu": FlagRange(1e-3, 1, "", "a fraction of the BF16 peak"),
    # a millisecond (a tiny model's step) to a year; the MFU <= 100% check bounds it tighter
    "step_seconds": FlagRange(1e-3, 3.2e7, "s", "a millisecond to a year"),
    # cost only scales with the price and require_finite (costs.py) refuses an overflowing product; a 1e300
    # price is kept valid (test_plan_json_is_strict_json runs it for a huge but finite cost)
    "price_per_gpu_hour": FlagRange(0, sys.float_info.max, "USD/GPU-hour", "any finite price"),
    # net topology: the ISCA paper's fit is 350.4 USD/port - 892.3, cables 981 / 2,405 USD; ~1,000x room
    "switch_price_per_port": FlagRange(0, 1e6, "USD/port", "up to 3,000x the paper's 350 USD"),
    "switch_price_base": FlagRange(-1e6, 1e6, "USD", "a fitted intercept within a port price either side"),
    "endpoint_link_usd": FlagRange(0, 1e6, "USD/link", "up to 1,000x the paper's 981 USD"),
    "switch_link_usd": FlagRange(0, 1e6, "USD/link", "up to 400x the paper's 2,405 USD"),
    # net ep: bytes per element, 0 (no dispatch traffic) to FP64's 8 (FP8 1, BF16 2)
    "dispatch_bytes": FlagRange(0, 8, "bytes/element", "FP8 1, BF16 2, FP64 8"),
    "combine_bytes": FlagRange(0, 8, "bytes/element", "FP8 1, BF16 2, FP64 8"),
    # bandwidths: HW_RANGES's 1 MB/s (below any GPU link) to 1 PB/s (125x the fastest link a GPU has)
    "bandwidth_gb_s": _like("nvlink_gb_s", "1 MB/s to 1 PB/s, room for any real link"),
    "nvlink_gb_s": _like("nvlink_gb_s", "1 MB/s to 1 PB/s, room for any real link"),
    "latency_us": FlagRange(0, US_1S, "us", "0 to 1 s"),
    # net latency: 1K msg/s (200,000x below a ConnectX-7's ~200M) to 1T msg/s (5,000x above it)
    "nic_msg_rate": FlagRange(1e3, 1e12, "messages/s", "room for any RDMA NIC"),
    "proxy_overhead_us": FlagRange(0, US_1S, "us", "0 to 1 s"),
    "proxy_latency_us": FlagRange(0, US_1S, "us", "0 to 1 s"),
    "gpu_overhead_us": FlagRange(0, US_1S, "us", "0 to 1 s"),
    # net simulate: netsim's own bounds (a message must fit in a GPU; a NIC no faster than HBM)
    "message_bytes": FlagRange(1, MAX_MESSAGE_BYTES, "bytes", "up to the largest GPU memory in the spec table"),
    "nic_gb_s": FlagRange(HW_RANGES["nvlink_gb_s"].least, MAX_NIC_GB_S, "GB/s",
                          "1 MB/s up to the fastest HBM in the spec table"),
    # net storage: NICs as --hw nic_gbit_s, SSD bandwidths as the other bandwidths (1 MB/s to 1 PB/s)
    "nic_gbit_s": _like("nic_gbit_s", "1 MB/s to 1 PB/s, room for any real NIC"),
    "client_nic_gbit_s": _like("nic_gbit_s", "1 MB/s to 1 PB/s, room for any real NIC"),
    "ssd_read_gb_s": _like("nvlink_gb_s", "1 MB/s to 1 PB/s, room for any real drive"),
    "ssd_write_gb_s": _like("nvlink_gb_s", "1 MB/s to 1 PB/s, room for any real drive"),
    # 1 GiB to 10 PiB per drive: 80x the largest shipping SSD (122.88 TB)
    "ssd_tib": FlagRange(1e-3, 1e4, "TiB", "1 GiB to 10 PiB, room for any real drive"),
    # fractions: below 0.1% the cluster is down, not slow (and recovery times run to absurd lengths)
    "efficiency": FlagRange(1e-3, 1, "", "a fraction of line rate"),
    "fill": FlagRange(1e-3, 1, "", "a fraction of raw capacity"),
    "recovery_share": FlagRange(1e-3, 1, "", "a fraction of each survivor's bandwidth"),
    # net pipeline: chunk times in one unit of the user's choosing, 12 decades (in ms: 1 ns to a 17-minute chunk)
    "f": FlagRange(1e-6, 1e6, "", "a chunk time in any one unit"),
    "b": FlagRange(1e-6, 1e6, "", "a chunk time in any one unit"),
    "w": FlagRange(0, 1e6, "", "a chunk time in any one unit (0: no deferred weight gradient)"),
    "fb": FlagRange(1e-6, 2e6, "", "at most F + B, each at most 1e6"),
    # memory: 0 (not counted) to HW_RANGES's 1 PiB (3,700x the largest GPU's HBM)
    "stage_param_gib": _like("hbm_gib", "up to 1 PiB", least=0),
    "microbatch_activation_gib": _like("hbm_gib", "up to 1 PiB", least=0),
}


# Every int flag of plan and net, checked with the float flags: the command line only bounds them below 2**64, and a
# 16-digit --seq-len or --radix printed nonsense (a 19-digit prime --sf-q: ~2 minutes of trial division).
# A dest two subcommands share names one quantity (pp: stages, radix: ports, nodes: machines), one range.
# net topology is closed forms plus a walk down from q ~ 4k/9 to a fitting Slim Fly q: at the largest
# --radix, --sf-q and --df-* it takes milliseconds (no graph is built; topology.py builds graphs in tests).
MAX_RADIX = 100 * 1024  # 100x the 1,024 ports of the largest switch ASIC (Broadcom Tomahawk 6 at 100G)
MAX_GPUS = 10**8  # 100x the million-GPU clusters announced
# per-rank bytes are lists (and table rows) of world size, built in Python loops; a world beyond the
# largest cluster the paper's switches wire (three-tier fat tree of 64 ports: 65,536 GPUs) is refused
MAX_RUN_WORLD = T.fat_tree3(T.PAPER_RADIX).endpoints
INT_FLAG_RANGES: dict[str, FlagRange] = {
    # plan
    "gpus": _count(1, MAX_GPUS, "GPUs", "100x the million-GPU clusters announced"),
    "gpus_per_node": FlagRange(HW_RANGES["gpus_per_node"].least, HW_RANGES["gpus_per_node"].most, "GPUs",
                               "as --hw gpus_per_node", whole=True, hw="gpus_per_node"),
    "seq_len": _count(1, 10**8, "tokens", "10x the longest context a model ships (Llama 4 Scout's 10M)"),
    "micro_batch": _count(1, 2**16, "sequences", "4x DeepSeek-V3's whole 15,360-sequence batch in one micro-batch"),
    "batch_size": _count(1, 2**24, "sequences", "1,000x DeepSeek-V3's 15,360-sequence batch"),
    # ranks of a run (pp is also net pipeline's): at most one per GPU of the largest run plan lists per rank
    "pp": _count(1, MAX_RUN_WORLD, "stages", "a stage per GPU of a three-tier fat tree of 64-port switches"),
    "ep": _count(1, MAX_RUN_WORLD, "ranks", "a rank per GPU of a three-tier fat tree of 64-port switches"),
    "dp": _count(1, MAX_RUN_WORLD, "ranks", "a rank per GPU of a three-tier fat tree of 64-port switches"),
    "zero": _count(0, 1, "", "ZeRO stage 0 (replicated) or 1 (optimizer state sharded), the two flyer train runs"),
    "vocab_size": _count(1, 2**22, "tokens", "16x the largest vocabulary shipped (Gemma 3's 262,144)"),
    # net topology (radix is also net simulate's, where netsim's flow and path caps bound it tighter)
    "radix": _count(4, MAX_RADIX, "ports", "100x the 1,024 ports of the largest switch ASIC"),
    "planes": _count(1, 1024, "planes", "a plane per NIC, beyond the 576 GPUs of the largest NVLink domain"),
    "rails": _count(1, 1024, "rails", "a rail per NIC, beyond the 576 GPUs of the largest NVLink domain"),
    # MMS needs q = 4w + d with w >= 1; a larger q or Dragonfly router needs more ports than the largest --radix
    "sf_q": _count(3, T.slim_fly_q_for_radix(MAX_RADIX), "",
                   "MMS's smallest q up to the largest whose routers fit the largest --radix"),
    "df_a": _count(1, MAX_RADIX, "routers/group", "a router's ports are at most the largest --radix"),
    "df_p": _count(1, MAX_RADIX, "endpoints/router", "a router's ports are at most the largest --radix"),
    "df_h": _count(1, MAX_RADIX, "global links/router", "a router's ports are at most the largest --radix"),
    "df_g": _count(2, MAX_RADIX**2 // 4 + 1, "groups", "a*h+1 with a+h at most the largest --radix"),
    # net ep: the ISCA paper's scenario is 32 tokens x 9 experts x hidden 7K, 61 layers, 2 micro-batches
    "tokens_per_device": _count(1, 2**20, "tokens", "32,768x the paper's 32; a long prefill chunk fits"),
    "hidden": _count(1, 2**18, "", "14x the widest model yet (PaLM's 18,432)"),
    "layers": _count(1, 4096, "layers", "32x the deepest model yet (Llama 3.1 405B's 126)"),
    "experts_per_token": _count(1, 1024, "experts", "over 100x DeepSeek-V3's 8 routed + 1 shared"),
    "micro_batches": _count(1, 1024, "micro-batches", "512x the paper's 2 overlapped micro-batches"),
    "node_limit": _count(0, 1024, "nodes", "0 (the paper's bound) or a node per expert a token reaches"),
    # net latency
    "bytes": _count(0, MAX_MESSAGE_BYTES, "bytes", "up to the largest GPU memory in the spec table"),
    "messages": _count(1, 10**9, "messages", "5 s of a ConnectX-7's ~200M messages/s"),
    "proxy_threads": _count(1, 4096, "threads", "5x the 768 hardware threads of a two-socket 192-core server"),
    "gpu_issuers": _count(1, 2**16, "warps", "7x the warps a B200 holds (148 SMs x 64)"),
    # net simulate (nodes is also net storage's); netsim's flow cap bounds nodes and GPUs tighter
    "nodes": _count(1, 10**6, "nodes", "a million machines, 5,000x 3FS's 180 storage nodes"),
    "seed": _count(0, 2**32 - 1, "", "any 32-bit seed"),
    # net storage: 3FS's 180 nodes of 2 x 200 Gb/s NICs and 16 SSDs, 3 replicas, 500 clients
    "nics_per_node": _count(1, 256, "NICs", "128x 3FS's 2; more than a server has PCIe slots"),
    "ssds_per_node": _count(1, 1024, "SSDs", "64x 3FS's 16; over 10x the densest storage server"),
    "replicas": _count(1, 1024, "replicas", "over 300x 3FS's 3"),
    "clients": _count(1, MAX_GPUS, "clients", "a client per GPU of the largest --gpus"),
}


def check_ranges(args) -> None:
    """Raise ``FieldError`` for the first flag of ``FLAG_RANGES`` or ``INT_FLAG_RANGES`` set outside its range
    (the parsed subcommand's flags only: the others are absent from ``args``)."""
    for dest, r in (*FLAG_RANGES.items(), *INT_FLAG_RANGES.items()):
        value = getattr(args, dest, None)
        problem = None if value is None else r.problem(value, dest in ZERO_OK)
        if problem:
            raise FieldError(dest, problem)
