"""A run directory (``TrainConfig.out``): owned by one process at a time, and holding either a
fresh run or the continuation of the run whose checkpoints it holds, never a mix of two runs.

``RunLock(out)`` takes an advisory ``fcntl.flock`` on ``out/.lock`` (which records the owner's
PID); the kernel drops it when the process ends, however it ends. ``choose_start`` decides, under
that lock, where a run starts: nothing (a fresh directory), or the newest valid checkpoint.
``StopSignals`` turns a stop signal into a checkpoint at the next step boundary instead of lost progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import threading
from pathlib import Path

from flyer.errors import CheckpointError, FieldError
from flyer.train import checkpoint as ckpt
from flyer.train.metrics import truncate_metrics

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"


def usable_dir(path: Path, field: str) -> Path:
    """Create ``path`` (and its parents) as a writable directory, or raise ``FieldError(field)``
    saying why not (a file is in the way, a parent is a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FieldError(field, f"{path} is a file, not a directory") from None
    except NotADirectoryError:
        raise FieldError(field, f"{path} lies under a file, not a directory") from None
    except OSError as e:
        raise FieldError(field, f"cannot create directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FieldError(field, f"{path} is not writable")
    return path


class RunLock:
    """Exclusive ownership of run directory ``out`` by this process (created when missing).
    Raises ``FieldError('out')`` naming the holder's PID when another process owns it."""

    def __init__(self, out: Path):
        usable_dir(out, "out")
        try:
            self._f = open(out / LOCK_NAME, "a+")  # a file object: closed (and unlocked) if garbage-collected
        except OSError as e:  # a directory, a dangling link, a file this user may not write
            raise FieldError("out", f"cannot open the run's lock file {out / LOCK_NAME}: {e.strerror or e}") from None
        self._dir: int | None = None
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._dir = _locked_dir(out)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "unknown"
            self.close()
            raise FieldError("out", f"{out} is in use by another run (pid {holder}); wait for it to end "
                                    "or use another run directory") from None
        try:  # the PID only tells a second run who holds the lock; a full disk still fails here, in one line
            self._f.truncate(0)
            self._f.write(f"{os.getpid()}\n")
            self._f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # its close flushes the unwritten PID again
                self.close()
            self._f = None
            raise FieldError("out", f"cannot write the run's lock file {out / LOCK_NAME}: {e.strerror or e}") from None

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:  # (from __del__: an __init__ that failed may have set neither)
            self._f.close()  # closing the last descriptor releases the flock
            self._f = None
        if getattr(self, "_dir", None) is not None:
            os.close(self._dir)
            self._dir = None

    def __del__(self) -> None:  # as the lock file's object closes when collected, the directory's descriptor too
        self.close()


def _locked_dir(out: Path) -> int | None:
    """A descriptor of the directory ``out`` holding its exclusive lock (``BlockingIOError``: another holds it), or
    None where the file system cannot lock a directory (NFS: only files open for writing). The lock file's alone
    would let a second run in once the file is deleted (its lock goes with its inode)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise
        return None


def new_paths(*paths: Path) -> list[Path]:
    """Those of ``paths`` and their ancestors that do not exist yet, deepest first: what a start that is refused
    takes away again (``remove_new``), so a mistyped flag leaves no empty run directory behind."""
    new: set[Path] = set()
    for path in paths:
        path = Path(path).absolute()
        for p in (path, *path.parents):
            if p.exists() or p.is_symlink():
                break
            new.add(p)
    return sorted(new, key=lambda p: len(p.parts), reverse=True)


def remove_new(paths: list[Path]) -> None:
    """Remove ``paths`` (from ``new_paths``) where they are still empty directories, or the run's lock file; a
    directory something was written to since stays, with what it holds."""
    for p in paths:
        with contextlib.suppress(OSError):
            if p.name == LOCK_NAME and not p.is_dir():
                p.unlink()
            else:
                p.rmdir()


def describe_run(out: Path, found: list[Path]) -> str | None:
    """What an earlier run left in ``out`` (its checkpoints, its metrics), or None when nothing."""
    parts = []
    if found:
        parts.append(f"{len(found)} checkpoint(s), newest {found[0].name}")
    if (out / METRICS_NAME).exists():
        parts.append(METRICS_NAME)
    return ", ".join(parts) or None


def choose_start(out: Path, resume: bool, log=print) -> Path | None:
    """The checkpoint a run in ``out`` starts from (None: step 0); nothing is changed on disk.

    Fresh (``resume`` false): ``out`` must hold no earlier run (checkpoints or metrics), else
    ``FieldError('resume')``. Resuming: the newest valid checkpoint; None when there are no
    checkpoints at all; ``CheckpointError`` when there are some but none is valid. Invalid newer
    checkpoints passed over are reported to ``log``.
    """
    root = out / "checkpoints"
    found = ckpt.list_checkpoints(root)
    if not resume:
        earlier = describe_run(out, found)
        if earlier:
            raise FieldError("resume", f"not set, but {out} already holds a run ({earlier}); set it to continue "
                                       "that run, or use another run directory")
        return None
    valid, problems = ckpt.newest_valid_checkpoint(root)
    if valid is None and found:
        raise CheckpointError(f"none of the {len(found)} checkpoint(s) in {root} is valid ({problems[0]}); "
                              "nothing was changed: repair or move them, or use another run directory")
    for problem in problems:
        log(f"warning: {problem}; falling back to the previous checkpoint")
    return valid


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # preemption, Ctrl-C, a closed terminal


def start_metrics(out: Path, step: int | None, log=print, unlogged: dict | None = None) -> None:
    """Ready ``out``'s metrics log for a run starting at ``step`` (None: a fresh run from step 0). A resumed
    run's log loses the records past its checkpoint's step, and gains the checkpoint's ``unlogged`` record of that
    step where a full disk kept it out (``truncate_metrics``); a fresh run in a directory with a log (a resume
    that found no checkpoint: moved away?) keeps that log under the next free ``metrics.jsonl.N``, since its
    records describe steps no checkpoint holds (kept, not truncated to none)."""
    metrics = out / METRICS_NAME
    if not metrics.exists() and unlogged is None:
        return
    if step is None:
        kept = next(p for n in itertools.count(1) if not (p := metrics.with_name(f"{METRICS_NAME}.{n}")).exists())
        metrics.rename(kept)
        log(f"the earlier {METRICS_NAME} is now {kept.name}")
    else:
        truncate_metrics(metrics, step, unlogged)


class StopSignals:
    """While entered, SIGTERM, SIGINT and SIGHUP are noted in ``signum`` (the first one) instead of
    ending the process, so the loop can checkpoint and stop between steps. Handlers can only be
    set from the main thread; elsewhere the signals keep their usual effect."""

    def __enter__(self) -> StopSignals:
        self.signum: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def _note(self, signum: int, _frame) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
