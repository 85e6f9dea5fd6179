"""``flyer plan``, ``flyer net`` and ``flyer info`` refuse input they cannot answer in bounded time
or with finite numbers: one line ``flyer: error: --flag: ...``, exit 2. Inputs that used to run
for ever are started in a child process with a timeout, so a regression fails instead of hanging."""

import json
import subprocess
import sys

import pytest
from child_env import child_env

from flyer.cli import main
from flyer.cluster import topology as T
from flyer.cluster.netsim import MAX_CANDIDATE_PATHS, MAX_FLOWS, build_fabric
from flyer.cluster.pipeline import schedule_cost
from flyer.config import PRESETS
from flyer.errors import FieldError

HANG_S = 120  # a refusal takes seconds (the interpreter's start); the bugs never finished


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


def run_child(*argv) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "flyer", *argv], capture_output=True, text=True,
                              timeout=HANG_S, env=child_env())
    except subprocess.TimeoutExpired:
        pytest.fail(f"flyer {' '.join(argv)} ran past {HANG_S} s")


def assert_refused(rc, err, flag, *words):
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"flyer: error: {flag}: "), (rc, err)
    for w in words:
        assert w in err[0], err


def test_plan_per_rank_world_is_bounded():
    res = run_child("plan", "--preset", "tiny", "--gpus", "100000000", "--zero", "1")
    limit = T.fat_tree3(T.PAPER_RADIX).endpoints
    assert_refused(res.returncode, res.stderr.strip().splitlines(), "--gpus", f"{limit:,}")


def test_simulate_refuses_too_many_flows():
    res = run_child("net", "simulate", "--nodes", "100000")
    assert_refused(res.returncode, res.stderr.strip().splitlines(), "--nodes", "159,998,400,000 flows",
                   f"{MAX_FLOWS:,}")


def test_simulate_refuses_too_many_candidate_paths():
    # 3,840 flows x 1,024 equal-cost ft3 paths each at radix 64: fine as flows, too many paths
    with pytest.raises(FieldError, match=f"^radix: .*{MAX_CANDIDATE_PATHS:,}"):
        build_fabric("ft3", 16, 4, radix=64)
    build_fabric("ft3", 16, 4)  # the default (smallest) radix still runs


def test_plan_refuses_mfu_over_100_percent(capsys):
    rc, _, err = run(capsys, "plan", "--gpus", "256", "--tokens-per-day", "1e15")
    assert_refused(rc, err, "--tokens-per-day", "implies MFU", "% of their 989.4 TFLOPS", "at most 100%")


@pytest.mark.parametrize("argv,flag", [
    (("--tokens-per-day", "1e-300"), "--tokens-per-day"),
    (("--tokens-per-day", "5e-324"), "--tokens-per-day"),  # underflows to 0 tokens/s
    (("--mfu", "5e-324"), "--mfu"),
    (("--price-per-gpu-hour", "1e308"), "--price-per-gpu-hour"),
    (("--extra-gpu-hours", "1.79e308", "--tokens", "1e308", "--mfu", "1e-6", "--price-per-gpu-hour", "0"),
     "--extra-gpu-hours"),  # 7e306 + 1.79e308 GPU-hours
    (("--hw", "bf16_tflops=1e300"), "--hw"),
])
def test_plan_refuses_non_finite_results(capsys, argv, flag):
    for fmt in ((), ("--json",)):
        rc, out, err = run(capsys, "plan", "--gpus", "256", *argv, *fmt)
        assert_refused(rc, err, flag, "non-finite")
        assert out == ""


def test_plan_json_is_strict_json(capsys):
    rc, out, _ = run(capsys, "plan", "--gpus", "256", "--price-per-gpu-hour", "1e300", "--json")

    def no_constant(name):
        raise AssertionError(f"{name} in flyer plan --json")

    assert rc == 0 and json.loads(out, parse_constant=no_constant)["cost_usd"] > 1e300


def test_pipeline_refuses_fb_outside_max_f_b_to_f_plus_b(capsys):
    rc, _, err = run(capsys, "net", "pipeline", "--fb", "0.0001")
    assert_refused(rc, err, "--fb", "max(F, B) = 2")
    rc, _, err = run(capsys, "net", "pipeline", "--fb", "10")  # slower than F then B: DualPipe's bubble past 1F1B's
    assert_refused(rc, err, "--fb", "F + B = 3")
    rc, out, _ = run(capsys, "net", "pipeline", "--fb", "3", "--json")
    assert rc == 0
    rc, out, _ = run(capsys, "net", "pipeline", "--fb", "2", "--json")
    assert rc == 0 and min(r["bubble"] for r in json.loads(out)) >= 0


def test_pipeline_refuses_negative_bubble_from_w(capsys):
    rc, _, err = run(capsys, "net", "pipeline", "--w", "2")  # W = B: ZB1P's (PP-1)(F+B-2W) < 0
    assert_refused(rc, err, "--w", "negative bubble")
    assert schedule_cost("1f1b", 16, 1.0, 2.0, 2.0).bubble == 45  # 1F1B does not defer W


def test_info_requires_a_preset_or_config(capsys):
    rc, out, err = run(capsys, "info")
    assert rc == 2 and out == "" and err == [f"flyer: error: PRESET: required, one of {', '.join(PRESETS)} "
                                             f"(or --config FILE)"]


def test_topology_refuses_an_empty_list(capsys):
    rc, _, err = run(capsys, "net", "topology", "--topologies", ",")
    assert_refused(rc, err, "--topologies", "at least one")


def test_simulate_bounds_message_bytes(capsys):
    for size in ("1e300", "1e-300"):
        rc, _, err = run(capsys, "net", "simulate", "--nodes", "4", "--gpus-per-node", "2", "--message-bytes", size)
        assert_refused(rc, err, "--message-bytes", "largest GPU memory")


def test_simulate_bounds_nic_bandwidth():
    # 1e300 GB/s made every rate inf and every time step 0: the event loop never ended
    res = run_child("net", "simulate", "--nodes", "4", "--gpus-per-node", "2", "--topology", "mpft", "--routing",
                    "static", "--nic-gb-s", "1e300")
    assert_refused(res.returncode, res.stderr.strip().splitlines(), "--nic-gb-s", "fastest HBM")


def test_plan_says_how_a_partial_node_is_handled(capsys):
    rc, out, err = run(capsys, "plan", "--hw", "gpus_per_node=3", "--gpus", "2048", "--json")
    assert rc == 0 and json.loads(out)["gpus"] == 2048
    assert err == ["flyer: warning: 2048 GPUs are 682 nodes of 3 and a partial node of 2; the plan counts GPUs, "
                   "not nodes"]
    # a flyer train run's per-rank bytes need whole nodes (torchrun starts as many ranks on each)
    rc, _, err = run(capsys, "plan", "--preset", "tiny", "--hw", "gpus_per_node=3", "--gpus", "8", "--zero", "1")
    assert_refused(rc, err, "--gpus", "whole nodes")
