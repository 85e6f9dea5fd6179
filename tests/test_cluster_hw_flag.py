"""``flyer plan --hw FIELD=VALUE`` takes only values a real (or near-future) GPU could have: a number of the
field's type, finite, inside the field's ``HW_RANGES``; anything else is one line naming ``--hw`` and the
field, exit 2. (``plan`` is the only command with ``--hw``.)"""

import dataclasses
import json

import pytest

from flyer.cli import main
from flyer.cluster.hardware import GPUS, HW_RANGES, GPUSpec, gpu_spec
from flyer.errors import FieldError

PLAN = ("plan", "--preset", "tiny", "--gpus", "8")
FIELDS = ("bf16_tflops", "hbm_gib", "nic_gbit_s", "gpus_per_node")  # a peak, a size, a bandwidth, a count


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.strip().splitlines()


def plan_json(capsys, *hw):
    rc, out, err = run(capsys, *PLAN, *(a for kv in hw for a in ("--hw", kv)), "--json")
    assert rc == 0 and err == [], err
    return json.loads(out)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", ["1e300", "0", "-1", "nan", "inf", "-inf", "abc", ""])
def test_plan_refuses_an_absurd_hw_value(capsys, field, value):
    for fmt in ((), ("--json",)):
        rc, out, err = run(capsys, *PLAN, "--hw", f"{field}={value}", *fmt)
        assert rc == 2 and out == "" and len(err) == 1, (rc, out, err)
        assert err[0].startswith(f"flyer: error: --hw: {field} must be "), err
        assert f"got {value!r}" in err[0] if value in ("abc", "") else f"got {value})" in err[0], err


@pytest.mark.parametrize("kv", ["gpus_per_node=2.5", "gpus_per_node=0.5", "gpus_per_node=65537", "bf16_tflops=1e7",
                                "hbm_gib=1e-300", "fp8_tflops=5e-324", "hbm_tb_s=1e4", "nvlink_gb_s=1e7"])
def test_plan_refuses_hw_values_outside_the_field_range(capsys, kv):
    rc, _, err = run(capsys, *PLAN, "--hw", kv)
    field = kv.split("=")[0]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"flyer: error: --hw: {field} must be "), err


def test_gpus_per_node_flag_is_bounded_like_the_field(capsys):
    rc, _, err = run(capsys, *PLAN, "--gpus-per-node", "100000")
    assert rc == 2 and err == ["flyer: error: --gpus-per-node: must be a whole number of GPUs in [1, 65,536] "
                               "(got 100000)"]
    assert plan_json(capsys)["gpus_per_node"] == 8
    rc, out, _ = run(capsys, *PLAN, "--gpus-per-node", "4", "--json")
    assert rc == 0 and json.loads(out)["gpus_per_node"] == 4


def test_a_sensible_hw_override_changes_the_plan(capsys):
    base = plan_json(capsys)
    fast = plan_json(capsys, "bf16_tflops=1978.8")  # twice the H800's peak: same MFU, half the GPU-hours
    assert fast["peak_bf16_tflops"] == 1978.8 and base["peak_bf16_tflops"] == 989.4
    assert fast["training_gpu_hours"] == pytest.approx(base["training_gpu_hours"] / 2)
    small = plan_json(capsys, "hbm_gib=0.001", "gpus_per_node=4.0")  # 4.0: a whole number written as a float
    assert small["memory"]["hbm_gib"] == 0.001 and not small["memory"]["fits"] and small["gpus_per_node"] == 4
    assert base["memory"]["fits"]


def test_range_edges_are_accepted():
    for field, r in HW_RANGES.items():
        for v in (r.least, r.most):
            assert getattr(gpu_spec("h800", {field: str(v)}), field) == v
    with pytest.raises(FieldError, match="^hw: bf16_tflops must be a finite number > 0 in "):
        gpu_spec("h800", {"bf16_tflops": "1e300"})


def test_ranges_cover_every_field_and_every_gpu_in_the_table():
    assert list(HW_RANGES) == [f.name for f in dataclasses.fields(GPUSpec) if f.name != "name"]
    for gpu in GPUS.values():
        for field, r in HW_RANGES.items():
            v = getattr(gpu, field)
            least = r.least if r.whole else 100 * r.least  # 100x room either way; a count's floor is 1
            assert least <= v and 100 * v <= r.most, (gpu.name, field, v)
