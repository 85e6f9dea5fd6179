"""Flow-level all-to-all simulation: max-min fairness and routing on small fat trees."""

import numpy as np
import pytest

from flyer.cluster.netsim import build_fabric, max_min_rates, simulate
from flyer.errors import FieldError


def test_max_min_textbook():
    # links 0 (cap 1) and 1 (cap 2); flow 0 uses both, flow 1 link 0, flow 2 link 1
    f = np.array([0, 0, 1, 2])
    links = np.array([0, 1, 0, 1])
    rates = max_min_rates(f, links, np.array([1.0, 2.0]), 3)
    assert rates == pytest.approx([0.5, 0.5, 1.5])


def reference_max_min(flows: list[list[int]], caps: list[float]) -> list[float]:
    """Progressive filling as the definition reads, one flow and link at a time: raise every unfrozen flow by the
    smallest fair share left on a link (the same tolerance), freeze the flows on the links that saturates."""
    rates, rem, level = [0.0] * len(flows), list(caps), 0.0
    live = {f for f, links in enumerate(flows) if links}
    while live:
        count = [sum(link in flows[f] for f in live) for link in range(len(caps))]
        share = [rem[k] / count[k] if count[k] else float("inf") for k in range(len(caps))]
        inc = min(share)
        level += inc
        rem = [rem[k] - inc * count[k] for k in range(len(caps))]
        full = {k for k in range(len(caps)) if count[k] and share[k] <= inc * (1 + 1e-9) + 1e-12}
        for f in [f for f in live if full & set(flows[f])]:
            rates[f] = level
            live.discard(f)
    return rates


def test_max_min_equals_the_definition_on_random_sharing():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_links = int(rng.integers(1, 12))
        flows = [sorted(rng.choice(n_links, size=int(rng.integers(0, min(n_links, 4) + 1)), replace=False).tolist())
                 for _ in range(int(rng.integers(1, 30)))]
        caps = rng.choice([0.5, 1.0, 2.0, 3.0, 50.0], size=n_links).tolist()
        f = np.array([i for i, links in enumerate(flows) for _ in links], dtype=np.int64)
        links = np.array([k for ls in flows for k in ls], dtype=np.int64)
        order = rng.permutation(f.size)  # incidences in any order, as the function allows
        got = max_min_rates(f[order], links[order], np.array(caps), len(flows))
        assert got.tolist() == reference_max_min(flows, caps)


def reference_weighted_max_min(flows: list[dict[int, float]], caps: list[float]) -> list[float]:
    """``reference_max_min`` with each flow's links carrying a share of its rate (``{link: share}``)."""
    rates, rem, level = [0.0] * len(flows), list(caps), 0.0
    live = {f for f, links in enumerate(flows) if links}
    while live:
        load = [sum(flows[f].get(link, 0.0) for f in live) for link in range(len(caps))]
        share = [rem[k] / load[k] if load[k] > 1e-9 else float("inf") for k in range(len(caps))]
        inc = min(share)
        level += inc
        rem = [rem[k] - inc * load[k] for k in range(len(caps))]
        full = {k for k in range(len(caps)) if load[k] > 1e-9 and share[k] <= inc * (1 + 1e-9) + 1e-12}
        for f in [f for f in live if full & set(flows[f])]:
            rates[f] = level
            live.discard(f)
    return rates


def test_weighted_max_min_equals_the_definition_on_random_sharing():
    """A flow spread over several paths (adaptive routing) loads each link with its share of the flow's rate: the
    rates equal the definition's progressive filling and are max-min fair."""
    assert max_min_rates(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([1.0, 1.0]), 2,
                         np.array([0.5, 0.5, 1.0])) == pytest.approx([2 / 3, 2 / 3])
    rng = np.random.default_rng(1)
    for _ in range(200):
        n_links = int(rng.integers(1, 12))
        flows = []
        for _ in range(int(rng.integers(1, 30))):
            links = rng.choice(n_links, size=int(rng.integers(0, min(n_links, 4) + 1)), replace=False).tolist()
            flows.append({k: float(rng.choice([0.1, 0.25, 1 / 3, 0.7, 1.0])) for k in sorted(links)})
        caps = rng.choice([0.5, 1.0, 2.0, 3.0, 50.0], size=n_links).tolist()
        f = np.array([i for i, links in enumerate(flows) for _ in links], dtype=np.int64)
        links = np.array([k for ls in flows for k in ls], dtype=np.int64)
        weight = np.array([w for ls in flows for w in ls.values()])
        got = max_min_rates(f, links, np.array(caps), len(flows), weight)
        assert got == pytest.approx(reference_weighted_max_min(flows, caps), rel=1e-12)
        # max-min fairness itself: no link over its capacity, and every flow crosses a full link on which no
        # flow gets more (the relative slack: the sums' rounding, a few ulps of a handful of terms)
        load = np.bincount(links, weights=weight * got[f], minlength=n_links)
        assert np.all(load <= np.array(caps) * (1 + 1e-9))
        for i, ls in enumerate(flows):
            assert not ls or any(load[k] >= caps[k] * (1 - 1e-9) and got[i] >= max(got[j] for j in range(len(flows))
                                                                                 if k in flows[j]) * (1 - 1e-9)
                                 for k in ls)


def test_static_and_adaptive_routing_reach_line_rate_on_full_trees():
    # D-mod-k is conflict-free for an all-to-all on a full fat tree; adaptive (every path, evenly) balances it too
    for topo, nodes, g in (("mpft", 8, 4), ("mrft", 8, 4), ("ft3", 4, 4)):
        for routing in ("static", "adaptive"):
            assert simulate(topo, routing, nodes=nodes, gpus_per_node=g, message_bytes=1e5)["fraction_of_nic"] == \
                pytest.approx(1.0), (topo, routing)


@pytest.mark.parametrize("topo, nodes, g, radix, static", [
    ("ft3", 2, 3, 4, 0.75), ("ft3", 2, 4, 6, 2 / 3), ("ft3", 4, 4, 6, 0.8), ("ft3", 16, 4, None, 1.0),
    ("mrft", 4, 2, 4, 1.0), ("mpft", 6, 3, None, 1.0)])
def test_adaptive_routing_keeps_line_rate_where_static_falls_short(topo, nodes, g, radix, static):
    """Adaptive routing (per-packet, its fluid limit: each flow over all its equal-cost paths) keeps a fat tree's
    all-to-all at line rate, also on partly filled trees where D-mod-k collides (ft3 2 x 3 at radix 4: 0.75 of the
    NIC); the greedy least-loaded path per flow it replaced fell short of static even on full trees (0.92). Without
    random choices it reads no seed."""
    runs = [simulate(topo, "adaptive", nodes, g, radix, message_bytes=1e5, seed=seed) for seed in (0, 1)]
    assert runs[0] == runs[1] and runs[0]["fraction_of_nic"] == pytest.approx(1.0)
    assert simulate(topo, "static", nodes, g, radix, message_bytes=1e5)["fraction_of_nic"] == pytest.approx(static)


def test_ecmp_loses_bandwidth_on_three_tier():
    ecmp = simulate("ft3", "ecmp", nodes=4, gpus_per_node=4, message_bytes=1e5)
    static = simulate("ft3", "static", nodes=4, gpus_per_node=4, message_bytes=1e5)
    adaptive = simulate("ft3", "adaptive", nodes=4, gpus_per_node=4, message_bytes=1e5)
    assert ecmp["fraction_of_nic"] < 0.9 * static["fraction_of_nic"]
    assert ecmp["fraction_of_nic"] < adaptive["fraction_of_nic"]
    assert ecmp["completion_us"] > static["completion_us"]


def test_multi_plane_equals_multi_rail():
    # same radix, same per-plane / per-rail structure: the paper saw equal all-to-all bandwidth
    for routing in ("ecmp", "static", "adaptive"):
        a = simulate("mpft", routing, nodes=8, gpus_per_node=2, message_bytes=1e5, seed=1)
        b = simulate("mrft", routing, nodes=8, gpus_per_node=2, message_bytes=1e5, seed=1)
        assert a["radix"] == b["radix"]
        assert a["bandwidth_per_gpu_gb_s"] == pytest.approx(b["bandwidth_per_gpu_gb_s"], rel=0.1), routing


def test_line_rate_time_is_exact():
    out = simulate("mpft", "static", nodes=4, gpus_per_node=2, message_bytes=1e6)
    per_gpu = (4 - 1) * 2 * 1e6
    assert out["completion_us"] == pytest.approx(per_gpu / 50e9 * 1e6)


def test_errors():
    with pytest.raises(FieldError, match="^topology: unknown topology 'torus'") as e:
        build_fabric("torus", 4, 2)
    assert e.value.field == "topology"
    with pytest.raises(FieldError, match="^forwarding: direct is impossible"):
        simulate("mpft", "static", nodes=4, gpus_per_node=2, forwarding="direct")
    with pytest.raises(FieldError, match="^routing: unknown routing"):
        simulate("ft3", "random", nodes=4, gpus_per_node=2)
