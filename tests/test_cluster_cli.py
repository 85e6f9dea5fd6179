"""The CLI interface acceptance checks use: every subcommand prints JSON with --json."""

import json

import pytest

from flyer.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_json(capsys):
    rc, out, _ = run(capsys, "plan", "--preset", "dsv3", "--gpu", "h800", "--gpus", "2048", "--tokens", "14.8e12",
                     "--seq-len", "4096", "--tokens-per-day", "272.8e9", "--json")
    assert rc == 0
    o = json.loads(out)
    assert o["flops_per_token_causal"] == pytest.approx(250e9, rel=0.005)
    assert o["flops_per_token_noncausal"] == pytest.approx(281e9, rel=0.005)
    assert o["gpu_hours"] == pytest.approx(2.664e6, rel=0.005)
    assert o["days"] == pytest.approx(54.25, abs=0.01)
    assert o["cost_usd"] == pytest.approx(2 * o["gpu_hours"])
    assert o["mfu_causal"] == pytest.approx(0.3894, rel=0.005)


def test_topology_json_and_plot(capsys, tmp_path):
    png = tmp_path / "topo.png"
    rc, out, _ = run(capsys, "net", "topology", "--radix", "64", "--json", "--plot", str(png))
    rows = json.loads(out)
    assert rc == 0 and [r["name"] for r in rows] == ["ft2", "mpft", "ft3", "sf", "df"]
    for r in rows:
        assert {"endpoints", "switches", "links", "cost_usd", "cost_per_endpoint_usd"} <= set(r)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ep_json(capsys):
    rc, out, _ = run(capsys, "net", "ep", "--json")
    o = json.loads(out)
    assert o["step_us"] == pytest.approx(120.96) and o["tpot_ms"] == pytest.approx(14.757, abs=0.001)
    assert {"layer_us", "tokens_per_s"} <= set(o)
    _, out, _ = run(capsys, "net", "ep", "--bandwidth-gb-s", "900", "--json")
    assert json.loads(out)["step_us"] == pytest.approx(6.72)
    _, out, _ = run(capsys, "net", "ep", "--preset", "dsv3", "--json")
    assert json.loads(out)["hidden"] == 7168


@pytest.mark.parametrize("argv", [
    ("net", "latency"), ("net", "storage"), ("net", "pipeline"),
    ("net", "simulate", "--nodes", "4", "--gpus-per-node", "2", "--topology", "mpft"),
])
def test_every_subcommand_json_and_table(capsys, argv):
    rc, out, _ = run(capsys, *argv, "--json")
    assert rc == 0 and json.loads(out)
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and out.strip() and not out.lstrip().startswith(("{", "["))


def test_the_dualpipev_row_says_it_counts_devices(capsys):
    """Beside rows by stages, DualPipeV's is by devices (two half-stages each): the table says so."""
    _, out, _ = run(capsys, "net", "pipeline", "--pp", "16")
    assert "dualpipev: 16 devices of two half-stages each" in out and "16 stages on 8 devices" in out


@pytest.mark.parametrize("argv, flag", [
    (("plan", "--pp", "3"), "--pp"),
    (("plan", "--gpu", "a100"), "--gpu"),
    (("plan", "--hw", "nope=1"), "--hw"),
    (("plan", "--mfu", "1.5"), "--mfu"),
    (("net", "topology", "--radix", "63"), "--radix"),
    (("net", "ep", "--fabric", "ethernet"), "--fabric"),
    (("net", "ep", "--bandwidth-gb-s", "0"), "--bandwidth-gb-s"),
    (("net", "storage", "--replicas", "0"), "--replicas"),
    (("net", "pipeline", "--pp", "15", "--schedule", "dualpipe"), "--pp"),
])
def test_user_errors_are_one_line(capsys, argv, flag):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("flyer: error:") and flag in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, line", [
    (("plan", "--pp", "3"), "--pp: must divide the 2048 GPUs (got 3)"),
    (("plan", "--gpus-per-node", "0"), "--gpus-per-node: must be >= 1 (got 0)"),
    (("plan", "--micro-batch", "0"), "--micro-batch: must be >= 1 (got 0)"),
    (("net", "topology", "--df-g", "600"), "--df-g: must be in [2, a*h+1 = 513] (got 600)"),
    (("net", "ep", "--node-limit", "4", "--nvlink-gb-s", "0"), "--nvlink-gb-s: must be > 0 (got 0.0)"),
    (("net", "simulate", "--nodes", "1"), "--nodes: must be >= 2 (got 1)"),
    (("net", "pipeline", "--w", "3"), "--w: the weight-gradient part must be <= the backward time 2.0 (got 3.0)"),
])
def test_cli_words_the_field_as_its_flag(capsys, argv, line):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and err == f"flyer: error: {line}\n"


def test_flags_are_those_of_the_chosen_subcommand():
    from flyer.cli import build_parser, flags

    parser = build_parser()
    f = flags(parser, parser.parse_args(["net", "simulate"]))
    assert f["gpus_per_node"] == "--gpus-per-node" and f["topology"] == "--topology" and "hw" not in f
    f = flags(parser, parser.parse_args(["plan"]))
    assert f["micro_batch"] == "--micro-batch" and f["hw"] == "--hw" and "topology" not in f


def test_ep_table_says_what_a_node_limit_sends(capsys):
    """The table's header and rows agree with its bytes under --node-limit: 4 scale-out copies a token, not one per
    expert (3 bytes x 32 tokens x 4 x 7000 = 2,688,000), and the NVLink fan-out the step overlaps."""
    _, out, _ = run(capsys, "net", "ep", "--fabric", "ib", "--node-limit", "4")
    o = json.loads(run(capsys, "net", "ep", "--fabric", "ib", "--node-limit", "4", "--json")[1])
    assert o["bytes_per_step"] == 3 * 32 * o["scaleout_copies_per_token"] * 7000 == 2_688_000
    assert f"{o['scaleout_copies_per_token']} copies a token" in out.splitlines()[0]
    assert f"NVLink fan-out (overlapped)  {o['nvlink_us']:.2f} us" in out
    assert "copies a token" not in run(capsys, "net", "ep", "--fabric", "ib")[1]


def test_plan_memory_rows_show_small_sizes(capsys):
    """A small preset's memory rows read 0.00 GiB (all of them, the total too): each is written in the largest
    unit that shows it, and the JSON keeps GiB."""
    assert main(["plan", "--preset", "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {name: next(line for line in lines if line.strip().startswith(name)) for name in (
        "weights (BF16)", "gradients (FP32)", "optimizer (ZeRO-1)", "activations (estimate)", "total  ")}
    assert not any("0.00 GiB" in line for line in rows.values()), rows
    assert "MiB" in rows["weights (BF16)"] and rows["total  "].endswith("of 80 GiB HBM (fits)")
    assert main(["plan", "--preset", "tiny", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory"]
    assert 0 < m["weights_gib"] < 0.01
