"""flyer net ep / latency / storage against the ISCA paper, the V3 report and 3FS."""

import pytest

from flyer.cluster.comm import EPScenario, ep_decode, ibgda_sweep, latency_table
from flyer.cluster.hardware import fabric
from flyer.cluster.storage import TIB, StorageCluster, storage_model
from flyer.errors import FieldError


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
    assert out["write_gb_s"] <= out["read_gb_s"] / 3 + 1e-9  # each byte on 3 nodes (the write's bound: below)
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




def test_node_limited_nvlink_stage_carries_the_fp8_scales():
    """The NVLink fan-out stage moves the dispatch payload's FP8 scales too (as the scale-out stage does)."""
    s = EPScenario(node_limit=4, dispatch_scale_bytes=4 / 128, tokens_per_device=4096)  # NVLink-bound
    out = ep_decode(s, fabric("ib"), fabric("nvlink"))
    want = (1 + 4 / 128 + 2) * 4096 * 7000 * 9 / (200.0 * 1e3)
    assert out["nvlink_us"] == pytest.approx(want)


def test_node_limited_alpha_beta_adds_both_stages_latency_per_step():
    """Alpha-beta with node-limited routing: each step pays dispatch + combine latency on IB and on NVLink."""
    out = ep_decode(EPScenario(node_limit=4), fabric("ib"), fabric("nvlink"))
    assert out["step_us_alpha_beta"] == pytest.approx(out["step_us"] + 2 * 3.7 + 2 * 3.33)


def test_alpha_beta_tpot_counts_every_micro_batch_and_layer():
    """TPOT and tokens/s in the alpha-beta variant = layers x micro_batches x (step + 2 alpha)."""
    out = ep_decode(EPScenario(), fabric("ib"))
    assert out["tpot_ms_alpha_beta"] == pytest.approx(61 * 2 * (120.96 + 2 * 3.7) / 1e3)
    assert out["tokens_per_s_alpha_beta"] == pytest.approx(1e3 / out["tpot_ms_alpha_beta"])
    assert out["tokens_per_s_alpha_beta"] < out["tokens_per_s"]


def test_nvlink_link_without_node_limit_changes_nothing():
    """Without node-limited routing every copy crosses the scale-out fabric; no NVLink second stage."""
    assert ep_decode(EPScenario(), fabric("ib"), fabric("nvlink")) == ep_decode(EPScenario(), fabric("ib"))


def test_ibgda_columns_are_ibgdas():
    """The IBGDA bandwidth column is computed from IBGDA's time; its bandwidth-bound size from its own gap
    (NIC-rate bound: 1e6 / 200e6 us x 50 GB/s = 250 bytes)."""
    s = ibgda_sweep([64, 7168, 1 << 20])
    for r in s["rows"]:
        assert r["ibgda_gb_s"] == pytest.approx(256 * r["bytes"] / r["ibgda_us"] / 1e3)
        assert r["ibgda_gb_s"] >= r["proxy_gb_s"]
    assert s["ibgda_bandwidth_bound_from_bytes"] == 250
    assert s["proxy_msg_rate"] == pytest.approx(2e6) and s["ibgda_msg_rate"] == pytest.approx(200e6)


def test_proxy_time_includes_its_handoff_latency():
    """LogGP time = L + extra (the proxy's 2 us GPU->host hand-off) + n x max(gap, bytes x G)."""
    s = ibgda_sweep([64, 1 << 20])
    row = {r["bytes"]: r for r in s["rows"]}
    assert row[64]["proxy_us"] == pytest.approx(3.7 + 2.0 + 256 * 0.5)
    assert row[64]["ibgda_us"] == pytest.approx(3.7 + 256 * 0.005)
    assert row[1 << 20]["proxy_us"] == pytest.approx(3.7 + 2.0 + 256 * (1 << 20) / 50e3)


def test_zero_message_rate_is_a_field_error():
    """``nic_msg_rate`` 0 is refused by name, not a ZeroDivisionError (API callers; the CLI bounds it)."""
    with pytest.raises(FieldError, match="^nic_msg_rate"):
        ibgda_sweep([64], nic_msg_rate=0)


def test_cross_pod_path_crosses_five_switches():
    """A three-tier cross-pod path is 5 switches (leaf, agg, core, agg, leaf): endpoint + 5 x switch."""
    got = {(r["fabric"], r["path"]): r for r in latency_table(64)}
    assert got[("ib", "cross_pod")]["switches"] == 5
    assert got[("ib", "cross_pod")]["latency_us"] == pytest.approx(2.35 + 5 * 0.45 + 64 / 50e3)
    assert got[("roce", "cross_pod")]["latency_us"] == pytest.approx(2.6 + 5 * 1.0 + 64 / 50e3)


def test_default_3fs_write_is_ssd_bound_over_the_chain():
    """Every byte is written on ``replicas`` SSDs: 180 nodes x 16 x 3 GB/s / 3 x 0.8, the SSDs the bound (a write
    of read / 3 or less alone would pass one that forgot the replicas)."""
    out = storage_model(StorageCluster())
    assert out["write_bound"] == "ssds"
    assert out["write_gb_s"] == pytest.approx(180 * 16 * 3.0 / 3 * 0.8)


def test_few_clients_bound_writes_by_their_nics_once():
    """A client sends each byte once (to the chain head): the client limit is not divided by replicas."""
    out = storage_model(StorageCluster(clients=10))
    assert out["write_bound"] == "clients" and out["read_bound"] == "clients"
    assert out["write_gb_s"] == pytest.approx(10 * 200 / 8 * 0.8) == out["read_gb_s"]


def test_capacity_and_recovery_traffic():
    """Raw and usable (over replicas) capacity; recovery bytes cross two NICs; per-node read."""
    out = storage_model(StorageCluster())
    raw = 180 * 16 * 14 * TIB
    assert out["raw_capacity_pib"] == pytest.approx(raw / 1024**5)
    assert out["usable_capacity_pib"] == pytest.approx(raw / 3 / 1024**5)
    assert out["recovery_nic_bytes"] == 2 * out["recovery_bytes"]
    assert out["read_gb_s_per_node"] == pytest.approx(out["read_gb_s"] / 180)
    assert out["write_tib_s"] == pytest.approx(out["write_gb_s"] * 1e9 / TIB)


def test_replicas_must_fit_on_distinct_nodes():
    """A chain's targets sit on distinct nodes."""
    with pytest.raises(FieldError, match="^replicas: must be <= the 2 nodes"):
        StorageCluster(nodes=2, replicas=3).validate()
    StorageCluster(nodes=3, replicas=3).validate()
