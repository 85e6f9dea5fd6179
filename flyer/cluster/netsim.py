"""Flow-level simulation of an EP all-to-all on small fat trees, with max-min fair sharing.

Every GPU sends one message of ``message_bytes`` to every GPU on another node (intra-node
traffic stays on NVLink and is not simulated). Links are full duplex: each direction is its own
capacity. Rates are max-min fair (progressive filling); when flows finish, rates are recomputed
(event-driven), so the all-to-all's completion time includes stragglers. The reported bandwidth
per GPU is the bytes a GPU sends over the network divided by that completion time.

Topologies (``nodes`` x ``gpus_per_node`` GPUs, GPU i of a node owns NIC i):

- ``mpft``: one two-tier plane per local GPU index; NIC i of every node sits on plane i.
- ``mrft``: one two-tier tree whose leaves are split into rails; NIC i on the rail-i leaves.
- ``ft3``: a three-tier fat tree; a node's NICs on consecutive edge ports (one edge switch's where its GPUs
  divide the switch's down-ports).

Forwarding: ``pxn`` first moves data over NVLink to the source node's GPU with the destination's
local index, so traffic stays in one plane/rail (required for ``mpft``); ``direct`` sends from
the source NIC. Routing places each flow on the equal-cost paths:

- ``ecmp``: one path, a hash of the flow (seeded random choice): collisions leave links unevenly
  loaded.
- ``static``: one path, destination-based (D-mod-k): the up-port at each tier is a digit of the
  destination's index, which is conflict-free for an all-to-all on a full fat tree.
- ``adaptive``: per-packet adaptive routing in its fluid limit: every flow spread evenly over all
  its equal-cost paths. On a fat tree that split loads each up-link with its switch's traffic over
  the up-ports, so the fabric carries any traffic its NICs can (line rate where D-mod-k leaves a
  partly filled tree short); a switch's queue-driven choices approach it, routing around hot spots
  a fluid split never has. (A greedy least-loaded path per flow fell short of static on full trees.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flyer.cluster.hardware import GIB, GPUS
from flyer.errors import FieldError

TOPOLOGIES = ("mpft", "mrft", "ft3")
ROUTINGS = ("ecmp", "static", "adaptive")
# Cost: ``_flows`` builds every candidate path of every flow in Python, and the event loop runs one
# max-min pass over the live flows per completion (up to one per flow): O(flows x paths + flows^2).
# The caps keep the worst case (ft3, ecmp) within seconds on one core: 45 nodes x 4 GPUs, at the
# flow cap, takes 13 s (534 completions, 142,845 filling rounds); the default 16 x 4 under one. Adaptive routing
# puts every path's links in the filling, which a fat tree's balanced loads settle in one or two completions: at
# the path cap 4-5 s and up to 0.65 GB (ft3 at radix 12: 170 x 1, direct; 43 x 4, PXN's NVLink hops on each path).
MAX_FLOWS = 2**15
MAX_CANDIDATE_PATHS = 2**20  # flows x equal-cost paths per flow
# a message is whole bytes and fits the largest HBM in the spec table; a NIC (or NVLink) cannot outrun the HBM
# it reads from. These bounds keep every rate and time step finite and > 0, so the event loop ends.
MAX_MESSAGE_BYTES = max(g.hbm_gib for g in GPUS.values()) * GIB
MAX_NIC_GB_S = max(g.hbm_tb_s for g in GPUS.values()) * 1000


@dataclass(frozen=True)
class SimFabric:
    """A cluster wired onto a fat tree: link capacities and equal-cost paths between GPUs."""

    name: str
    radix: int
    nodes: int
    gpus_per_node: int
    nic_gb_s: float
    nvlink_gb_s: float

    # endpoint id of GPU (n, i) in its tree, and the tree it belongs to (its plane, or 0)
    def endpoint(self, n: int, i: int) -> tuple[int, int]:
        G, k = self.gpus_per_node, self.radix
        if self.name == "mpft":
            return i, n
        if self.name == "mrft":
            return 0, i * (k * k // 2 // G) + n
        return 0, n * G + i

    def switch_paths(self, tree: int, src: int, dst: int) -> list[tuple]:
        """Switch sequences from endpoint ``src`` to ``dst``, in D-mod-k order: the static
        choice for destination ``dst`` is ``static_index(dst, npaths)``."""
        half = self.radix // 2
        if self.name in ("mpft", "mrft"):
            la, lb = src // half, dst // half
            if la == lb:
                return [(("leaf", tree, la),)]
            return [(("leaf", tree, la), ("spine", tree, s), ("leaf", tree, lb)) for s in range(half)]
        (pa, ea), (pb, eb) = divmod(src // half, half), divmod(dst // half, half)
        if (pa, ea) == (pb, eb):
            return [(("edge", pa, ea),)]
        if pa == pb:
            return [(("edge", pa, ea), ("agg", pa, a), ("edge", pb, eb)) for a in range(half)]
        return [(("edge", pa, ea), ("agg", pa, a), ("core", a * half + c), ("agg", pb, a), ("edge", pb, eb))
                for a in range(half) for c in range(half)]

    def static_index(self, dst: int, npaths: int) -> int:
        half = self.radix // 2
        if npaths == half * half:
            return (dst % half) * half + (dst // half) % half
        return dst % npaths


def flow_count(nodes: int, gpus_per_node: int) -> int:
    """The all-to-all's flows: every GPU to every GPU of the other nodes."""
    return nodes * (nodes - 1) * gpus_per_node**2


def build_fabric(name: str, nodes: int, gpus_per_node: int, radix: int | None = None,
                 nic_gb_s: float = 50.0, nvlink_gb_s: float = 200.0) -> SimFabric:
    """The smallest fat tree of kind ``name`` that holds the cluster (or one of ``radix``)."""
    if name not in TOPOLOGIES:
        raise FieldError("topology", f"unknown topology '{name}' (choose from: {', '.join(TOPOLOGIES)})")
    if nodes < 2:
        raise FieldError("nodes", f"must be >= 2 (got {nodes})")
    if gpus_per_node < 1:
        raise FieldError("gpus_per_node", f"must be >= 1 (got {gpus_per_node})")
    flows = flow_count(nodes, gpus_per_node)
    if flows > MAX_FLOWS:
        raise FieldError("nodes", f"{nodes} nodes x {gpus_per_node} GPUs make {flows:,} flows; the flow simulator "
                                  f"(O(flows^2) worst case) takes at most {MAX_FLOWS:,}")

    def fits(k: int, default: bool = False) -> bool:
        if name == "mrft" or (name == "mpft" and default):  # mpft defaults to mrft's radix: same planes/rails
            return k % gpus_per_node == 0 and k * k // 2 // gpus_per_node >= nodes
        if name == "mpft":
            return k * k // 2 >= nodes
        return k**3 // 4 >= nodes * gpus_per_node

    field = "radix" if radix is not None else "nodes"  # what to change when the paths below are too many
    if radix is None:
        radix = next(k for k in range(4, 4097, 2) if fits(k, default=True))
    elif radix < 4 or radix % 2 or not fits(radix):
        raise FieldError("radix", f"{radix} is odd, too small, or (mrft) not a multiple of the {gpus_per_node} GPUs "
                                  f"per node for {name}")
    paths = (radix // 2) ** (2 if name == "ft3" else 1)  # equal-cost paths between far endpoints
    if flows * paths > MAX_CANDIDATE_PATHS:
        raise FieldError(field, f"{name} at radix {radix} gives each of the {flows:,} flows {paths:,} equal-cost "
                                f"paths; the flow simulator builds at most {MAX_CANDIDATE_PATHS:,} in all")
    return SimFabric(name, radix, nodes, gpus_per_node, nic_gb_s, nvlink_gb_s)


def _flows(fab: SimFabric, routing: str, forwarding: str, rng: np.random.Generator):
    """The flows' (flow, link, share) incidences, grouped by flow (the share of the flow's bytes the directed link
    carries: 1 on a single path), and the link capacities (GB/s)."""
    if forwarding not in ("pxn", "direct"):
        raise FieldError("forwarding", f"must be 'pxn' or 'direct' (got {forwarding!r})")
    if fab.name == "mpft" and forwarding == "direct":
        raise FieldError("forwarding", "direct is impossible on mpft: planes are not connected to each other")
    if routing not in ROUTINGS:
        raise FieldError("routing", f"unknown routing '{routing}' (choose from: {', '.join(ROUTINGS)})")
    link_id: dict[tuple, int] = {}
    caps: list[float] = []

    def link(u, v, cap: float) -> int:
        if (u, v) not in link_id:
            link_id[(u, v)] = len(caps)
            caps.append(cap)
        return link_id[(u, v)]

    G = fab.gpus_per_node
    choices = []  # per flow: candidate paths (each a list of link ids)
    for n in range(fab.nodes):
        for i in range(G):
            for m in range(fab.nodes):
                if m == n:
                    continue
                for j in range(G):
                    via = j if forwarding == "pxn" else i
                    prefix = []
                    if via != i:  # NVLink hop to the forwarding GPU of the source node
                        prefix = [link(("gpu", n, i), ("nvs", n), fab.nvlink_gb_s),
                                  link(("nvs", n), ("gpu", n, via), fab.nvlink_gb_s)]
                    tree, src = fab.endpoint(n, via)
                    _, dst = fab.endpoint(m, j)
                    sa, sb = ("ep", tree, src), ("ep", tree, dst)
                    cands = []
                    for sw in fab.switch_paths(tree, src, dst):
                        hops = [sa, *sw, sb]
                        cands.append(prefix + [link(hops[h], hops[h + 1], fab.nic_gb_s) for h in range(len(hops) - 1)])
                    choices.append((cands, dst))
    if routing == "ecmp":
        paths = [[c[int(rng.integers(len(c)))]] for c, _ in choices]
    elif routing == "static":
        paths = [[c[fab.static_index(d, len(c))]] for c, d in choices]
    else:
        paths = [c for c, _ in choices]
    f_idx = np.repeat(np.arange(len(paths)), [sum(map(len, p)) for p in paths])
    l_idx = np.fromiter((k for p in paths for path in p for k in path), dtype=np.int64, count=f_idx.size)
    share = (1 / np.array([len(p) for p in paths]))[f_idx]  # a flow's bytes split evenly over its paths
    # a link several of a flow's paths cross (its NVLink hops, its first and last hop) carries their shares summed
    key, where = np.unique(f_idx * len(caps) + l_idx, return_inverse=True)
    return key // len(caps), key % len(caps), np.bincount(where, weights=share), np.asarray(caps)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(starts[i], ends[i])`` over i, without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def max_min_rates(f_idx: np.ndarray, l_idx: np.ndarray, caps: np.ndarray, n_flows: int,
                  weight: np.ndarray | None = None) -> np.ndarray:
    """Max-min fair rate of every flow by progressive filling.

    ``f_idx[e], l_idx[e]`` list the (flow, link) incidences of the flows to share ``caps``
    (link capacities); flows are numbered ``0 .. n_flows-1``; ``weight[e]`` is the share of the flow's
    rate that link carries (default 1: each flow on one path). Each round raises every unfrozen
    flow by the smallest fair share left on any link, then freezes the flows crossing the links
    that round saturated. A round touches the links and the incidences of the flows it freezes only
    (the per-link loads are kept, not recounted): an all-to-all's rates take hundreds of rounds.
    """
    n_links = caps.shape[0]
    weight = np.ones(f_idx.size) if weight is None else weight
    rates = np.zeros(n_flows)
    rem = caps.astype(float).copy()
    count = np.bincount(l_idx, weights=weight, minlength=n_links)  # a unit raise of every unfrozen flow, per link
    # incidences grouped by flow (``simulate``'s are already) and by link (a radix sort where ids fit 16 bits)
    by_flow = np.arange(f_idx.size) if np.all(f_idx[1:] >= f_idx[:-1]) else np.argsort(f_idx, kind="stable")
    flow_start = np.searchsorted(f_idx[by_flow], np.arange(n_flows + 1))
    by_link = np.argsort(l_idx.astype(np.uint16) if n_links <= 2**16 else l_idx, kind="stable")
    link_start = np.searchsorted(l_idx[by_link], np.arange(n_links + 1))
    frozen = np.diff(flow_start) == 0  # a flow crossing no link is never raised
    level = 0.0
    while not frozen.all():
        used = count > 1e-9  # summed shares that went back to zero keep a rounding's remainder; a share is >= 2^-20
        share = np.full(n_links, np.inf)
        share[used] = rem[used] / count[used]
        inc = share.min()
        level += inc
        rem -= inc * count
        saturated = np.flatnonzero(used & (share <= inc * (1 + 1e-9) + 1e-12))
        crossing = f_idx[by_link[_ranges(link_start[saturated], link_start[saturated + 1])]]
        newly = np.unique(crossing[~frozen[crossing]])
        frozen[newly] = True
        rates[newly] = level
        gone = by_flow[_ranges(flow_start[newly], flow_start[newly + 1])]
        count -= np.bincount(l_idx[gone], weights=weight[gone], minlength=n_links)
    return rates


def simulate(name: str, routing: str, nodes: int = 16, gpus_per_node: int = 4, radix: int | None = None,
             forwarding: str | None = None, message_bytes: float = 1e6, seed: int = 0,
             nic_gb_s: float = 50.0, nvlink_gb_s: float = 200.0) -> dict:
    """All-to-all completion time and achieved bandwidth per GPU (GB/s and fraction of the NIC)."""
    if not 1 <= message_bytes <= MAX_MESSAGE_BYTES:
        raise FieldError("message_bytes", f"must be in [1, {MAX_MESSAGE_BYTES:,.0f}], up to the largest GPU memory "
                                          f"in the spec table (got {message_bytes:g})")
    for field, rate in (("nic_gb_s", nic_gb_s), ("nvlink_gb_s", nvlink_gb_s)):  # 0 or NaN: a flow never ends
        if not 0 < rate <= MAX_NIC_GB_S:
            raise FieldError(field, f"must be in (0, {MAX_NIC_GB_S:g}], up to the fastest HBM in the spec table "
                                    f"(got {rate:g})")
    fab = build_fabric(name, nodes, gpus_per_node, radix, nic_gb_s, nvlink_gb_s)
    forwarding = forwarding or ("direct" if name == "ft3" else "pxn")
    f_idx, l_idx, share, caps = _flows(fab, routing, forwarding, np.random.default_rng(seed))
    flows = flow_count(nodes, gpus_per_node)
    remaining = np.full(flows, float(message_bytes))
    t = 0.0  # seconds
    first_rates = None
    events = 0
    alive = np.arange(flows)  # flows still sending; incidences compacted to them
    while alive.size:
        rates = max_min_rates(f_idx, l_idx, caps, alive.size, share) * 1e9  # bytes/s, indexed like alive
        if first_rates is None:
            first_rates = rates / 1e9
        dt = np.min(remaining[alive] / rates)
        t += dt
        remaining[alive] -= rates * dt
        done = remaining[alive] <= message_bytes * 1e-9
        renumber = np.cumsum(~done) - 1
        keep = ~done[f_idx]
        f_idx, l_idx, share = renumber[f_idx[keep]], l_idx[keep], share[keep]
        alive = alive[~done]
        events += 1
    per_gpu_bytes = (nodes - 1) * gpus_per_node * message_bytes
    bw = per_gpu_bytes / t / 1e9
    gpus = nodes * gpus_per_node
    start_bw = first_rates.reshape(gpus, -1).sum(axis=1)  # flows are generated source-major
    return {
        "topology": name, "routing": routing, "forwarding": forwarding, "radix": fab.radix,
        "nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": gpus, "flows": flows,
        "message_bytes": message_bytes, "completion_us": float(t * 1e6), "events": events,
        "bandwidth_per_gpu_gb_s": float(bw), "fraction_of_nic": float(bw / nic_gb_s),
        "initial_min_gpu_gb_s": float(start_bw.min()), "initial_mean_gpu_gb_s": float(start_bw.mean()),
    }

