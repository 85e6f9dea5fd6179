"""Absurd magnitudes, as rules: every numeric flag of ``flyer plan`` and ``flyer net *`` fed 1e300
and 1e-300 either runs and prints only finite numbers of sane length, or says one line
``flyer: error: --flag: ...`` and exits 2. The float flags' ranges are one table,
``flyer.cluster.flags.FLAG_RANGES``, checked before the command runs."""

import re

import pytest
from test_hostile_input import numeric_flags, outcome, quick_args

from flyer.cli import build_parser
from flyer.cluster import flags as cluster_flags

CLUSTER_FLAGS = [(p, f) for p, f in numeric_flags(build_parser()) if p[0] in ("plan", "net")]
FLOAT_FLAGS = [(p, f) for p, f in numeric_flags(build_parser(), types=(float,)) if p[0] in ("plan", "net")]


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


@pytest.mark.parametrize("path,flag", CLUSTER_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x)
def test_absurd_magnitudes_run_sanely_or_are_refused_by_name(path, flag, tmp_path, capsys):
    for value in ("1e300", "1e-300"):
        rc, err, out = outcome(capsys, [*path, *quick_args(path, tmp_path, ""), f"{flag}={value}"])
        if rc == 0:
            assert not re.search(r"\b(nan|inf)\b", out, re.I), (value, out)
            assert not re.search(r"\d{25}", out), (value, out)
        else:
            assert rc == 2 and len(err) == 1 and err[0].startswith(f"flyer: error: {flag}: "), (value, rc, err)


def test_every_float_flag_has_exactly_one_range():
    assert len(CLUSTER_FLAGS) >= 50 and len(FLOAT_FLAGS) >= 30
    dests = [dest(f) for _, f in FLOAT_FLAGS]
    assert len(dests) == len(set(dests)), "a dest shared by two subcommands: key the table by subcommand"
    assert set(dests) == set(cluster_flags.FLAG_RANGES)


def test_defaults_are_in_range_and_zero_stays_allowed_where_it_was():
    parser = build_parser()
    for path, flag in FLOAT_FLAGS:
        default = parser.parse_args(list(path)).__dict__[dest(flag)]
        r = cluster_flags.FLAG_RANGES[dest(flag)]
        assert default is None or r.problem(default, False) is None, (flag, default)
        if dest(flag) in cluster_flags.ZERO_OK:
            assert r.least == 0, flag


@pytest.mark.parametrize("argv,words", [
    (["plan", "--tokens", "1e19"], "--tokens: must be in [1, 1e18] tokens"),
    (["plan", "--mfu", "1e-4"], "--mfu: must be in [0.001, 1], a fraction"),
    (["net", "ep", "--combine-bytes", "9"], "--combine-bytes: must be in (0, 8] bytes/element"),
    (["net", "ep", "--bandwidth-gb-s", "1e-4"], "--bandwidth-gb-s: must be in [0.001, 1e6] GB/s"),
    (["net", "ep", "--latency-us", "2e6"], "--latency-us: must be in [0, 1e6] us"),
    (["net", "latency", "--nic-msg-rate", "10"], "--nic-msg-rate: must be in [1000, 1e12] messages/s"),
    (["net", "storage", "--nic-gbit-s", "1e-3"], "--nic-gbit-s: must be in [0.008, 8e6] Gb/s"),
    (["net", "storage", "--ssd-tib", "1e5"], "--ssd-tib: must be in [0.001, 10000] TiB"),
    (["net", "storage", "--recovery-share", "1e-4"], "--recovery-share: must be in [0.001, 1]"),
    (["net", "pipeline", "--f", "2e6"], "--f: must be in [1e-6, 1e6]"),
    (["net", "pipeline", "--b", "1e-7"], "--b: must be in [1e-6, 1e6]"),
    (["net", "pipeline", "--stage-param-gib", "2e6"], "--stage-param-gib: must be in [0, 1e6] GiB"),
])
def test_refusal_names_the_flag_range_and_unit(argv, words, capsys):
    rc, err, out = outcome(capsys, argv)
    assert rc == 2 and out == "" and len(err) == 1 and err[0].startswith(f"flyer: error: {words}"), err


@pytest.mark.parametrize("argv", [
    ["plan", "--gpus", "256", "--tokens", "1e18", "--mfu", "0.001"],
    ["net", "ep", "--bandwidth-gb-s", "0.001", "--latency-us", "1e6", "--dispatch-bytes", "8", "--combine-bytes", "8"],
    ["net", "latency", "--nic-msg-rate", "1000", "--proxy-overhead-us", "1e6", "--gpu-overhead-us", "0"],
    ["net", "storage", "--nic-gbit-s", "0.008", "--efficiency", "0.001", "--recovery-share", "0.001", "--ssd-tib",
     "1e4", "--ssd-write-gb-s", "0.001"],
    ["net", "pipeline", "--f", "1e6", "--b", "1e6", "--w", "0", "--fb", "2e6", "--stage-param-gib", "1e6"],
])
def test_range_edges_run_and_print_sane_numbers(argv, capsys):
    rc, err, out = outcome(capsys, argv)
    assert rc == 0, err
    assert not re.search(r"\b(nan|inf)\b", out, re.I) and not re.search(r"\d{25}", out), out
