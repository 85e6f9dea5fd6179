"""flyer net ep / latency / storage against the ISCA paper, the V3 report and 3FS."""

import pytest

from flyer.cluster.comm import EPScenario, ep_decode, ibgda_sweep, latency_table
from flyer.cluster.hardware import fabric
from flyer.cluster.storage import StorageCluster, storage_model


def test_ep_decode_isca_bound():
    out = ep_decode(EPScenario(), fabric("ib"))
    assert out["step_us"] == pytest.approx(120.96)  # (1+2) x 32 x 9 x 7000 / 50 GB/s
    assert out["layer_us"] == pytest.approx(2 * 120.96)
    assert out["tpot_ms"] == pytest.approx(14.76, abs=0.005)
    assert 67 <= out["tokens_per_s"] < 68  # "about 67 tokens/s"
    assert out["step_us_alpha_beta"] == pytest.approx(120.96 + 2 * 3.7)


def test_ep_decode_nvl72_and_bandwidth_override():
    nvl = ep_decode(EPScenario(), fabric("nvl72"))
    assert nvl["step_us"] == pytest.approx(6.72)
    assert nvl["tokens_per_s"] == pytest.approx(1200, rel=0.02)  # ISCA: ~1,200 tokens/s on GB200 NVL72
    same = ep_decode(EPScenario(), fabric("ib", bandwidth_gb_s=900))
    assert same["step_us"] == pytest.approx(nvl["step_us"])


def test_ep_decode_node_limited_and_real_hidden():
    v3 = ep_decode(EPScenario(hidden=7168), fabric("ib"))
    assert v3["step_us"] == pytest.approx(120.96 * 7168 / 7000)
    lim = ep_decode(EPScenario(node_limit=4), fabric("ib"), fabric("nvlink"))
    assert lim["scaleout_copies_per_token"] == 4
    assert lim["step_us"] == pytest.approx(max(120.96 * 4 / 9, lim["nvlink_us"]))
    scales = ep_decode(EPScenario(dispatch_scale_bytes=4 / 128), fabric("ib"))
    assert scales["dispatch_us"] == pytest.approx(40.32 * (1 + 4 / 128))


def test_latency_table_matches_measurements():
    got = {(r["fabric"], r["path"]): r["latency_us"] for r in latency_table(64)}
    assert got[("ib", "same_leaf")] == pytest.approx(2.8, abs=0.01)
    assert got[("ib", "cross_leaf")] == pytest.approx(3.7, abs=0.01)
    assert got[("roce", "same_leaf")] == pytest.approx(3.6, abs=0.01)
    assert got[("roce", "cross_leaf")] == pytest.approx(5.6, abs=0.01)
    assert got[("nvlink", "intra_node")] == pytest.approx(3.33, abs=0.01)
    assert got[("ib", "cross_pod")] > got[("ib", "cross_leaf")]


def test_ibgda_matters_for_small_messages_only():
    s = ibgda_sweep([64, 7168, 1 << 20])
    speed = {r["bytes"]: r["speedup"] for r in s["rows"]}
    assert speed[64] > 10 and speed[7168] > 2
    assert speed[1 << 20] == pytest.approx(1.0, abs=0.01)
    assert s["proxy_bandwidth_bound_from_bytes"] == 25000  # 0.5 us x 50 GB/s
    assert all(r["ibgda_gb_s"] <= 50.0 for r in s["rows"])


def test_3fs_read_near_published():
    out = storage_model(StorageCluster())
    assert out["read_tib_s"] == pytest.approx(6.6, rel=0.02)  # 3FS: ~6.6 TiB/s on 180 nodes
    assert out["read_bound"] == "storage_nics"
    assert out["write_gb_s"] <= out["read_gb_s"] / 3 + 1e-9 or out["write_bound"] == "ssds"
    assert out["recovery_tib"] == pytest.approx(16 * 14 * 0.5)
    assert out["read_line_tib_s"] == pytest.approx(180 * 50e9 / 1024**4)  # 2 x 200 Gb/s a node
    two = storage_model(StorageCluster(replicas=2, ssd_write_gb_s=100))
    assert two["write_gb_s"] == pytest.approx(180 * 50 / 2 * 0.8)


@pytest.mark.parametrize("nodes", [10, 180, 1000])
def test_3fs_recovery_copies_into_the_one_recovering_node(nodes):
    """3FS keeps a chain's targets: each predecessor copies its state into the returning (or replaced) node, so a
    node's data enters one node's NIC and SSDs, whatever the cluster's size (design notes, "Data recovery")."""
    c = StorageCluster(nodes=nodes)
    out = storage_model(c)
    into = min(2 * 200 / 8 * c.efficiency, 16 * c.ssd_write_gb_s) * c.recovery_share  # GB/s: the NICs here
    assert out["recovery_gb_s"] == pytest.approx(into) == pytest.approx(20.0)
    assert out["recovery_s"] == pytest.approx(16 * 14 * 1024**4 * 0.5 / 1e9 / into)
    assert 1.5 < out["recovery_s"] / 3600 < 2  # 112 TiB at 20 GB/s
