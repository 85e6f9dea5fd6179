"""Training-run edges a mutation sweep of ``flyer.train.metrics`` / ``flyer.train.rundir`` found unpinned: the step
sums' weights, the GEMM peak against torch's own FLOP count on a fake clock, metrics written as standard JSON,
TensorBoard's fields, damaged log lines, a failed rewrite's temporary, the run lock's file, new paths past a dangling
link, a resume with no checkpoint, step 0's log, and the stop signals' handlers."""

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flyer.errors import DataError
from flyer.train import metrics
from flyer.train.rundir import (LOCK_NAME, METRICS_NAME, STOP_SIGNALS, RunLock, StopSignals, choose_start,
                                new_paths, remove_new, start_metrics)

bf16 = torch.bfloat16


class _FakeClock:
    """``time.perf_counter`` for code under test: it moves only when a timed call takes its next duration."""

    def __init__(self, durations):
        self.t, self.durations = 0.0, list(durations)

    def __call__(self) -> float:
        return self.t

    def tick(self) -> None:
        self.t += self.durations.pop(0)


def test_step_sums_weigh_each_term():
    """Mutant M2 (the weight dropped): a term's sum is sum(value * weight), untouched terms stay 0.0."""
    s = metrics.StepSums("loss", "aux_loss")
    s.add("loss", torch.tensor(1.5), 0.25)
    s.add("loss", torch.tensor(2.0), 0.5)  # 0.375 + 1.0: exact in binary
    assert s.floats() == {"loss": 1.375, "aux_loss": 0.0}


def test_median_seconds_is_the_median_of_the_timed_calls(monkeypatch):
    """Two warm-up calls not timed, then (seconds=0) the fewest calls, 3: their median. Mutant M20 (the fastest)."""
    clock = _FakeClock([9.0, 9.0, 5.0, 1.0, 3.0])
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=clock))
    assert metrics.median_seconds(clock.tick, seconds=0) == 3.0
    assert not clock.durations


def test_gemm_peak_is_torchs_flop_count_over_the_fastest_call(monkeypatch):
    """An (m x k) @ (k x n) GEMM of shape (m, k, n) (not square), its FLOPs as torch's FlopCounterMode counts the same
    product, over the fastest timed call (the warm-up not timed). Mutants M8 (m k n), M9 (k, n swapped), M10 (the
    slowest call)."""
    m, k, n = 3, 5, 7
    clock = _FakeClock([7.0, 2.0, 4.0, 3.0])  # the warm-up, then the 3 timed calls of seconds=0
    shapes = []

    def mm(a, b, **kw):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        clock.tick()
        return torch.mm(a, b)

    monkeypatch.setattr(metrics.lowp, "mm", mm)
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=clock))
    rate = metrics.measure_gemm_peak(torch.float32, "cpu", shape=(m, k, n), seconds=0)
    with FlopCounterMode(display=False) as counter:
        torch.mm(torch.randn(m, k), torch.randn(k, n))
    assert shapes == [((m, k), (k, n))] * 4 and not clock.durations
    assert rate == counter.get_total_flops() / 2.0


def test_metrics_log_writes_non_finite_values_as_null(tmp_path):
    """Standard JSON has no NaN or Infinity (jq, JavaScript and strict parsers refuse them): a diverged step's
    values are written as null. Mutant M1 (written as Python's json writes them: NaN, Infinity)."""
    def strict(name):
        raise ValueError(f"not standard JSON: {name}")

    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=strict) for line in lines] == [
        {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}]


def test_tensorboard_log_writes_each_field_but_the_step(tmp_path):
    """The step is each scalar's x, not a scalar of its own (not: a 'comm/step' series); non-numeric,
    boolean and non-finite fields are left out, unknown numeric ones go under comm/."""
    calls = []
    log = metrics.TensorBoardLog(tmp_path, enabled=False)
    log._w = type("W", (), {"add_scalar": lambda self, *a: calls.append(a), "close": lambda self: None})()
    log.write({"step": 7, "loss": 2.5, "lr": 1e-3, "flag": True, "note": "x", "mfu": math.nan, "ep_bytes": 12})
    assert calls == [("loss/total", 2.5, 7), ("optim/lr", 1e-3, 7), ("comm/ep_bytes", 12, 7)]


def test_read_metrics_passes_over_lines_that_are_no_record(tmp_path):
    """A boolean step is no integer step, and a line nested too deep for the parser (RecursionError) is passed over
    like any other damaged line."""
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": true, "loss": 3.0}\n' + "[" * 100_000 + "\n"
                 '{"step": 2, "loss": 1.0}\n')
    assert metrics.read_metrics(p) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


def test_truncate_metrics_that_fails_leaves_no_temporary(tmp_path, monkeypatch):
    """A rewrite that fails after its temporary was written (the rename refused) takes the temporary away and
    leaves the log as it was (not: the temporary left behind)."""

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n')

    def refuse(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", refuse)
    with pytest.raises(DataError, match="cannot rewrite it to step 1"):
        metrics.truncate_metrics(p, 1)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_gemm_ways_off_the_cpu_is_the_devices_own_kernel():
    """A GPU's BF16 GEMM has one way, its own kernel (not: the CPU's ways offered for a CUDA device)."""
    assert metrics.gemm_ways(bf16, "cuda") == {"bfloat16 (cuda)": None}
    assert metrics.gemm_ways(torch.float32, "cpu") == {"float32 (cpu)": None}


def test_progress_postfix_shows_an_indexer_loss_of_zero():
    """The indexer's KL loss is shown whenever the record has one, 0.0 included (not: hidden at 0.0)."""
    rec = {"loss": 5.47, "main_loss": 5.47, "indexer_loss": 0.0, "tokens_per_s": 1234.4}
    assert metrics.progress_postfix(rec, None) == {"loss": "5.470", "indexer": "0.000", "tok/s": "1234"}


def test_the_run_lock_file_holds_only_this_owners_pid(tmp_path):
    """A PID left by an earlier owner is replaced, not appended to (not: a second run would be told
    'pid 999\\n<ours>')."""

    (tmp_path / LOCK_NAME).write_text("999\n")
    lock = RunLock(tmp_path)
    try:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        lock.close()


def test_new_paths_stop_at_a_dangling_link(tmp_path):
    """A dangling symbolic link exists as a link: it is not new, and nothing above it is (not: listed)."""
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert new_paths(tmp_path / "link" / "out") == [(tmp_path / "link" / "out").absolute()]


def test_remove_new_takes_away_an_empty_directory_named_as_the_lock(tmp_path):
    """Only the lock file is unlinked; a directory of that name is an empty directory like any other (not:
    unlinked, which fails, so it stays)."""
    d = tmp_path / "out" / LOCK_NAME
    d.mkdir(parents=True)
    f = tmp_path / LOCK_NAME
    f.write_text("1\n")
    remove_new([d, d.parent, f])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_resume_with_no_checkpoint_starts_fresh(tmp_path):
    """Resuming where no checkpoint was ever written is a start at step 0, not an error (not: a
    CheckpointError 'none of the 0 checkpoint(s) is valid')."""
    said = []
    assert choose_start(tmp_path, resume=True, log=said.append) is None and said == []


def test_start_metrics_at_step_0_trims_instead_of_moving_the_log(tmp_path):
    """Step 0 is a checkpoint's step like any other: the log keeps its step-0 records in place (not: moved
    to metrics.jsonl.1 as a fresh run's)."""
    (tmp_path / METRICS_NAME).write_text('{"step": 0}\n{"step": 1}\n')
    start_metrics(tmp_path, 0, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_NAME]
    assert (tmp_path / METRICS_NAME).read_text() == '{"step": 0}\n'


def test_stop_signals_keep_the_first_and_restore_the_handlers():
    """The first stop signal is the one noted (not: the last), and leaving restores each handler as it was
    (not: flyer's left installed, so a later Ctrl-C would be swallowed)."""

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with StopSignals() as stop:
        assert all(signal.getsignal(s) == stop._note for s in STOP_SIGNALS)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    assert stop.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
