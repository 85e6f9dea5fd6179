"""Fabric-simulation edges a mutation sweep of ``flyer.cluster.netsim`` found unpinned: the fabric's bounds
inclusive, PXN's NVLink hop binding at its capacity (the closed-form bound the oracle), each GPU's starting
bandwidth from the flows' max-min rates, link indices past a byte, and an NVLink rate of 0 or NaN, which made
the event loop run forever."""

import numpy as np
import pytest

from flyer.cluster.netsim import MAX_CANDIDATE_PATHS, MAX_FLOWS, _flows, build_fabric, max_min_rates, simulate
from flyer.errors import FieldError



def test_build_fabric_bounds_are_inclusive_and_odd_radix_refused():
    # mpft at an explicit radix: k^2/2 endpoints per plane, exactly the 8 nodes fit radix 4
    assert build_fabric("mpft", 8, 2, radix=4).radix == 4
    # flows == MAX_FLOWS (2 nodes x 128 GPUs: 2 * 1 * 128^2 = 2^15) is allowed; paths 2 each
    assert 2 * 1 * 128**2 == MAX_FLOWS
    build_fabric("mpft", 2, 128, radix=4)
    # flows x paths == MAX_CANDIDATE_PATHS (2^15 x 32) is allowed, one more path per flow is not
    assert MAX_FLOWS * 32 == MAX_CANDIDATE_PATHS
    build_fabric("mpft", 2, 128, radix=64)
    with pytest.raises(FieldError, match="^radix: "):
        build_fabric("mpft", 2, 128, radix=66)
    with pytest.raises(FieldError, match="^radix: 5 is odd"):
        build_fabric("mpft", 4, 2, radix=5)
    with pytest.raises(FieldError, match="^nodes: must be >= 2"):
        build_fabric("mpft", 1, 2)


def test_simulate_refuses_zero_nic_and_fractional_message():
    with pytest.raises(FieldError, match="^nic_gb_s: "):
        simulate("mpft", "static", nodes=4, gpus_per_node=2, nic_gb_s=0.0)
    with pytest.raises(FieldError, match="^message_bytes: "):
        simulate("mpft", "static", nodes=4, gpus_per_node=2, message_bytes=0.5)


def test_ft3_forwards_direct_by_default_and_others_pxn():
    assert simulate("ft3", "static", nodes=4, gpus_per_node=4, message_bytes=1e5)["forwarding"] == "direct"
    assert simulate("mrft", "static", nodes=4, gpus_per_node=2, message_bytes=1e5)["forwarding"] == "pxn"


def test_pxn_crosses_nvlink_and_is_bound_by_it():
    # mrft 4 x 2, pxn: GPU (n, i)'s flows to the other local index j (3 nodes x 1 index) cross its NVLink link
    # gpu->nvs; at 1 GB/s those 3 MB take 3 ms, the capacity bound, and the NICs (6 flows on 50 GB/s) never bind
    nodes, g, msg, nvl = 4, 2, 1e6, 1.0
    bound_us = (nodes - 1) * (g - 1) * msg / (nvl * 1e9) * 1e6
    pxn = simulate("mrft", "static", nodes=nodes, gpus_per_node=g, forwarding="pxn", message_bytes=msg,
                   nvlink_gb_s=nvl)
    assert pxn["completion_us"] == pytest.approx(bound_us)
    direct = simulate("mrft", "static", nodes=nodes, gpus_per_node=g, forwarding="direct", message_bytes=msg,
                      nvlink_gb_s=nvl)
    assert direct["completion_us"] < bound_us  # no NVLink hop


def test_initial_gpu_bandwidth_is_each_gpus_summed_flow_rates():
    # line rate (conflict-free static routing): every GPU's flows start at its NIC's rate in all
    out = simulate("mpft", "static", nodes=4, gpus_per_node=2, message_bytes=1e5)
    assert out["initial_min_gpu_gb_s"] == pytest.approx(50.0)
    assert out["initial_mean_gpu_gb_s"] == pytest.approx(50.0)
    # ecmp on ft3: recomputed from the flows' max-min rates (flows are source-major, the seed's rng as simulate's)
    fab = build_fabric("ft3", 4, 4)
    f, links, weight, caps = _flows(fab, "ecmp", "direct", np.random.default_rng(0))
    rates = max_min_rates(f, links, caps, f.max() + 1, weight)
    per_gpu = rates.reshape(16, -1).sum(axis=1)
    out = simulate("ft3", "ecmp", nodes=4, gpus_per_node=4, message_bytes=1e5)
    assert out["initial_min_gpu_gb_s"] == per_gpu.min()
    assert out["initial_mean_gpu_gb_s"] == pytest.approx(per_gpu.mean())
    assert per_gpu.min() < per_gpu.mean()  # the case tells min from mean


def test_max_min_with_more_links_than_a_byte_indexes():
    # 300 links, flow f alone on link f and flow 300 + f on link f too: each gets half its link's capacity
    n = 300
    caps = np.arange(1, n + 1, dtype=float)
    f = np.concatenate([np.arange(n), np.arange(n, 2 * n)])
    links = np.concatenate([np.arange(n), np.arange(n)])
    rates = max_min_rates(f, links, caps, 2 * n)
    assert rates.tolist() == np.concatenate([caps / 2, caps / 2]).tolist()


@pytest.mark.parametrize("nvlink", [0.0, -1.0, float("nan")])
def test_simulate_refuses_an_nvlink_rate_that_is_not_positive(nvlink):
    """The pxn flows that cross NVLink got rate 0: dt inf, remaining NaN, and the event loop never ended."""
    with pytest.raises(FieldError, match="^nvlink_gb_s: must be in"):
        simulate("mrft", "static", nodes=4, gpus_per_node=2, nvlink_gb_s=nvlink)
