"""The cluster models' refusals and formulas at their edges (``flyer.cluster.topology``, ``comm``, ``flags``), with
hand-computed oracles: a Slim Fly router of q = 27 uses 62 ports, the proxy's LogGP time, FP64's 8 bytes an element,
fractions at most 1."""

from types import SimpleNamespace

import pytest

from flyer.cluster import topology as T
from flyer.cluster.comm import EPScenario, ibgda_sweep
from flyer.cluster.flags import check_ranges
from flyer.errors import FieldError


def test_multi_plane_refuses_zero_planes():
    """A multi-plane fat tree needs at least one plane: planes=0 is a FieldError naming planes."""
    with pytest.raises(FieldError, match="^planes: must be >= 1"):
        T.multi_plane(64, 0)


def test_multi_rail_refuses_zero_rails_by_name():
    """rails=0 is refused as a FieldError on rails, not a ZeroDivisionError."""
    with pytest.raises(FieldError, match="^rails: "):
        T.multi_rail(64, 0)


def test_slim_fly_q_for_radix_accepts_an_exact_fit():
    """q=27 routers use exactly 62 ports (k'=41, p=21), so radix 62 picks q=27 rather than a smaller q."""
    assert T.slim_fly(27).radix == 62
    assert T.slim_fly_q_for_radix(62) == 27
    assert T.slim_fly_q_for_radix(62, prime_power=True) == 27


def test_ep_scenario_counts_must_be_positive():
    """Every count of an EP scenario, micro_batches included, is refused at 0 by name."""
    for field in ("tokens_per_device", "hidden", "experts_per_token", "layers", "micro_batches"):
        with pytest.raises(FieldError, match=f"^{field}: must be >= 1"):
            EPScenario(**{field: 0}).validate()


def test_ep_scenario_sizes_must_be_non_negative():
    """Bytes per element (FP8 scales included) and node_limit are refused below 0 by name."""
    for field in ("dispatch_bytes", "combine_bytes", "dispatch_scale_bytes", "node_limit"):
        with pytest.raises(FieldError, match=f"^{field}: must be >= 0"):
            EPScenario(**{field: -1}).validate()


def test_ibgda_sweep_refuses_zero_messages_and_zero_sizes():
    """A sweep of 0 messages, or of a 0-byte size, is refused by name rather than giving 0 GB/s rows."""
    with pytest.raises(FieldError, match="^messages: "):
        ibgda_sweep([64], messages=0)
    with pytest.raises(FieldError, match="^sizes: "):
        ibgda_sweep([0])


def test_proxy_bandwidth_column_uses_the_proxy_time():
    """proxy_gb_s = 256 x 64 B over the proxy's LogGP time 3.7 + 2 + 256 x 0.5 us (not IBGDA's)."""
    row = ibgda_sweep([64])["rows"][0]
    assert row["proxy_gb_s"] == pytest.approx(256 * 64 / (3.7 + 2.0 + 256 * 0.5) / 1e3)
    assert row["proxy_gb_s"] < row["ibgda_gb_s"] / 10


def test_bytes_per_element_flags_stop_at_fp64():
    """--dispatch-bytes and --combine-bytes accept FP64's 8 bytes per element and refuse 9."""
    check_ranges(SimpleNamespace(dispatch_bytes=8.0, combine_bytes=8.0))
    for name in ("dispatch_bytes", "combine_bytes"):
        with pytest.raises(FieldError, match=f"^{name}: must be in [\\[(]0, 8\\] bytes/element"):
            check_ranges(SimpleNamespace(**{name: 9.0}))


def test_fraction_flags_refuse_more_than_one():
    """--efficiency, --fill and --recovery-share are fractions: 1 is accepted, 1.5 refused."""
    for name in ("efficiency", "fill", "recovery_share"):
        check_ranges(SimpleNamespace(**{name: 1.0}))
        with pytest.raises(FieldError, match=f"^{name}: must be in \\[0.001, 1\\]"):
            check_ranges(SimpleNamespace(**{name: 1.5}))
