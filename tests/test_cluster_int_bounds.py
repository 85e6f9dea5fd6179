"""Absurd integers, as rules: every int flag of ``flyer plan`` and ``flyer net *`` (read from the argparse
parsers) fed 10**15 or 2**63-1 says one line ``flyer: error: --flag: must be ...`` naming its range and unit,
and exits 2; a value below its range (0, -1) is refused by name likewise; its bounds themselves are accepted,
and the range edges run fast and print numbers of sane length. The int flags' ranges are one table,
``flyer.cluster.flags.INT_FLAG_RANGES``, checked with the float flags' before the command runs."""

import json
import re
import time

import pytest
from test_hostile_input import numeric_flags, outcome

from flyer.cli import build_parser, check_numbers
from flyer.cluster import flags as cluster_flags

INT_FLAGS = [(p, f) for p, f in numeric_flags(build_parser(), types=(int,)) if p[0] in ("plan", "net")]


def ids(x):
    return " ".join(x) if isinstance(x, tuple) else x


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def sane(out: str) -> bool:
    """No nan or inf, and no number of 25 digits or more (thousands separators dropped)."""
    plain = re.sub(r"(?<=\d),(?=\d{3})", "", out)
    return not re.search(r"\b(nan|inf)\b", plain, re.I) and not re.search(r"\d{25}", plain)


def test_every_int_flag_has_exactly_one_range():
    """A new int flag of plan or net without a range fails here."""
    assert len(INT_FLAGS) >= 35
    table = cluster_flags.INT_FLAG_RANGES
    assert {dest(f) for _, f in INT_FLAGS} == set(table)
    assert not set(table) & set(cluster_flags.FLAG_RANGES)
    for name, r in table.items():
        assert r.whole and r.why and isinstance(r.least, int) and isinstance(r.most, int), name
        assert 0 <= r.least <= r.most < 10**15, name  # 10**15 and 2**63-1 are outside every range
        assert (r.least == 0) == (name in cluster_flags.ZERO_OK), name  # 0 is allowed exactly where flyer.cli allows it


@pytest.mark.parametrize("path,flag", INT_FLAGS, ids=ids)
def test_absurd_ints_are_refused_by_name_with_the_range(path, flag, capsys):
    for value in (10**15, 2**63 - 1):
        rc, err, out = outcome(capsys, [*path, f"{flag}={value}"])
        assert rc == 2 and out == "" and len(err) == 1 and err[0].startswith(f"flyer: error: {flag}: must be "), \
            (value, rc, err)
        r = cluster_flags.INT_FLAG_RANGES[dest(flag)]
        assert f"[{r.least:,}, {r.most:,}]" in err[0] and r.unit in err[0], err


@pytest.mark.parametrize("path,flag", INT_FLAGS, ids=ids)
def test_values_below_the_range_are_refused_by_name(path, flag, capsys):
    least = cluster_flags.INT_FLAG_RANGES[dest(flag)].least
    for value in sorted({-1, 0, least - 1} - {least} if least > 0 else {-1}):
        rc, err, out = outcome(capsys, [*path, f"{flag}={value}"])
        assert rc == 2 and out == "" and len(err) == 1 and err[0].startswith(f"flyer: error: {flag}: "), \
            (value, rc, err)


@pytest.mark.parametrize("path,flag", INT_FLAGS, ids=ids)
def test_the_bounds_pass_both_checks(path, flag):
    parser = build_parser()
    r = cluster_flags.INT_FLAG_RANGES[dest(flag)]
    for value in (r.least, r.most):
        args = parser.parse_args([*path, f"{flag}={value}"])
        check_numbers(parser, args)  # flyer.cli's sign check agrees with the table's lower bound
        cluster_flags.check_ranges(args)


def test_defaults_are_in_range():
    parser = build_parser()
    for path in sorted({p for p, _ in INT_FLAGS}):
        cluster_flags.check_ranges(parser.parse_args(list(path)))


@pytest.mark.parametrize("argv,words", [
    (["plan", "--seq-len", "1000000000000000"], "--seq-len: must be in [1, 100,000,000] tokens, 10x the longest"),
    (["plan", "--micro-batch", "100000000000000000"], "--micro-batch: must be in [1, 65,536] sequences"),
    (["plan", "--pp", "1000000000000000"], "--pp: must be in [1, 65,536] stages"),
    (["plan", "--gpus", "100000001"], "--gpus: must be in [1, 100,000,000] GPUs"),
    (["plan", "--zero", "2"], "--zero: must be in [0, 1], ZeRO stage 0"),
    (["net", "topology", "--radix", "100000000000"], "--radix: must be in [4, 102,400] ports, 100x the 1,024 ports"),
    (["net", "topology", "--planes", "1000000000000"], "--planes: must be in [1, 1,024] planes"),
    (["net", "topology", "--sf-q", "1"], "--sf-q: must be in [3, 45,509], MMS's smallest q up to"),
    (["net", "simulate", "--gpus-per-node", "100000"],
     "--gpus-per-node: must be a whole number of GPUs in [1, 65,536] (got 100000)"),
    (["net", "pipeline", "--pp", "65537"], "--pp: must be in [1, 65,536] stages"),
    (["net", "latency", "--bytes", "199715979265"], "--bytes: must be in [0, 199,715,979,264] bytes"),
])
def test_refusal_names_the_flag_range_and_unit(argv, words, capsys):
    rc, err, out = outcome(capsys, argv)
    assert rc == 2 and out == "" and len(err) == 1 and err[0].startswith(f"flyer: error: {words}"), err


MAX_RADIX = str(102_400)
EDGES = [  # the bounds together, with the flags that make them valid for each other
    ["plan", "--gpus", "100000000", "--seq-len", "100000000", "--micro-batch", "65536", "--gpus-per-node", "65536"],
    ["plan", "--gpus", "1", "--seq-len", "1", "--micro-batch", "1", "--gpus-per-node", "1", "--pp", "1", "--ep", "1"],
    ["plan", "--preset", "tiny", "--gpus", "8", "--zero", "1", "--dp", "8", "--vocab-size", "4194304"],
    ["plan", "--preset", "tiny", "--gpus", "1", "--zero", "0", "--dp", "1", "--vocab-size", "1"],
    ["net", "topology", "--radix", MAX_RADIX, "--topologies", "ft2,mpft,mrft,ft3,sf,df", "--planes", "1024",
     "--rails", "1024"],
    ["net", "topology", "--radix", MAX_RADIX, "--topologies", "sf", "--sf-q", "45509"],
    ["net", "topology", "--radix", MAX_RADIX, "--topologies", "df", "--df-a", "51200", "--df-p", "1", "--df-h",
     "51200", "--df-g", str(102_400**2 // 4 + 1)],
    ["net", "topology", "--radix", "4", "--topologies", "ft2,mpft,mrft,ft3", "--planes", "1", "--rails", "1"],
    ["net", "topology", "--topologies", "sf,df", "--sf-q", "3", "--df-g", "2"],
    ["net", "ep", "--tokens-per-device", "1048576", "--hidden", "262144", "--layers", "4096", "--experts-per-token",
     "1024", "--micro-batches", "1024", "--node-limit", "1024"],
    ["net", "ep", "--tokens-per-device", "1", "--hidden", "1", "--layers", "1", "--experts-per-token", "1",
     "--micro-batches", "1", "--node-limit", "0"],
    ["net", "latency", "--bytes", "199715979264", "--messages", "1000000000", "--proxy-threads", "4096",
     "--gpu-issuers", "65536"],
    ["net", "latency", "--bytes", "0", "--messages", "1", "--proxy-threads", "1", "--gpu-issuers", "1"],
    ["net", "simulate", "--nodes", "4", "--gpus-per-node", "2", "--topology", "mpft", "--routing", "ecmp", "--seed",
     "4294967295"],
    ["net", "simulate", "--nodes", "2", "--gpus-per-node", "1", "--radix", "4", "--topology", "mrft", "--seed", "0"],
    ["net", "storage", "--nodes", "1000000", "--nics-per-node", "256", "--ssds-per-node", "1024", "--replicas",
     "1024", "--clients", "100000000"],
    ["net", "storage", "--nodes", "1", "--nics-per-node", "1", "--ssds-per-node", "1", "--replicas", "1",
     "--clients", "1"],
    ["net", "pipeline", "--pp", "65536"],
    ["net", "pipeline", "--pp", "1"],
]


@pytest.mark.parametrize("argv", EDGES, ids=lambda a: " ".join(a[:4]))
def test_range_edges_run_fast_and_print_sane_numbers(argv, capsys):
    t0 = time.perf_counter()
    rc, err, out = outcome(capsys, argv)
    took = time.perf_counter() - t0
    assert rc == 0, err
    assert sane(out), out
    # closed forms (net topology builds no graph): milliseconds; plan's per-rank table may first import torch
    assert took < (10 if "--zero" in argv else 1), took


def test_one_storage_node_has_no_recovery_time_rather_than_inf(capsys):
    # the lower edge of --nodes: no survivor to re-replicate to (it printed "inf min" and JSON Infinity)
    def no_constant(name):
        raise AssertionError(f"{name} in flyer net storage --json")

    rc, err, out = outcome(capsys, ["net", "storage", "--nodes", "1", "--replicas", "1", "--json"])
    assert rc == 0 and json.loads(out, parse_constant=no_constant)["recovery_min"] is None, err
    rc, err, out = outcome(capsys, ["net", "storage", "--nodes", "1", "--replicas", "1"])
    assert rc == 0 and "no surviving node" in out and sane(out), out
