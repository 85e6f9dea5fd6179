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


def test_static_routing_reaches_line_rate_on_full_trees():
    # D-mod-k is conflict-free for an all-to-all on a full fat tree; greedy adaptive comes close
    for topo, nodes, g in (("mpft", 8, 4), ("mrft", 8, 4), ("ft3", 4, 4)):
        assert simulate(topo, "static", nodes=nodes, gpus_per_node=g, message_bytes=1e5)["fraction_of_nic"] == \
            pytest.approx(1.0), topo
        assert simulate(topo, "adaptive", nodes=nodes, gpus_per_node=g, message_bytes=1e5)["fraction_of_nic"] >= 0.9


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
