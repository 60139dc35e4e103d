"""Preemption and exclusivity of one stage's training.

- :class:`StopSignals`: while the training loop runs, SIGTERM / SIGUSR1 (what SLURM sends before
  it kills a job: on preemption, at the time limit, or ``--signal=...@<s>`` ahead of it) only set
  a flag; the loop finishes the optimizer step in progress, writes its checkpoint and raises
  :class:`Preempted`, which ``vlalign train`` turns into exit code :data:`PREEMPTED_EXIT_CODE`.
  A requeued or retried job then resumes from that checkpoint, losing only the time since the
  signal.
- :func:`checkpoint_lock`: an exclusive ``fcntl.flock`` on ``<checkpoint dir>/trainer.lock``, so
  that a second trainer on the same stage (an orphan of a killed Snakemake job, two Snakemake
  sessions) fails at once instead of racing on the checkpoint. The kernel releases the lock when
  its process dies, however it dies: a lock file left behind by a crash blocks nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": distinct from a
# crash (1), bad input (2, vlalign's CLI), a signal death (128 + n) and timeout(1)'s 124 / 137;
# a cluster may requeue on it (slurm.conf RequeueExit=75).
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LOCK_FILE = "trainer.lock"


class Preempted(Exception):  # noqa: N818  (a condition, not an error)
    """Training stopped on a signal after writing its checkpoint at ``step``."""

    def __init__(self, stage: str, signum: int | None, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        by = signal.Signals(signum).name if signum else "another process's stop signal"
        super().__init__(
            f"stage {stage}: stopped by {by} after step {step}; "
            f"checkpoint {checkpoint} (a rerun resumes from it)"
        )


class CheckpointLocked(RuntimeError):
    """Another live process trains this stage (holds the checkpoint dir's lock)."""


class StopSignals:
    """Context manager: SIGTERM / SIGUSR1 set :attr:`received` instead of killing the process;
    the previous handlers are restored on exit. A no-op off the main thread (Python delivers
    signals to the main thread only)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def stop_requested(stop: StopSignals, accelerator) -> bool:
    """Whether any process received a stop signal: with several processes they agree (one
    all-reduce per step), so that every rank checkpoints after the same step."""
    if accelerator.num_processes == 1:
        return stop.received is not None
    import torch

    flag = torch.tensor([int(stop.received is not None)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


_HELD: set[int] = set()  # descriptors of the checkpoint locks this process holds


def close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors of the parent's
    checkpoint locks. A flock belongs to the open file, so a worker keeping the descriptor
    would keep the lock held after its trainer died, until the orphaned worker exits."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: Path, stage: str = "stage") -> Iterator[Path]:
    """Hold ``checkpoint_dir/trainer.lock`` exclusively (recording this PID and host in it);
    :class:`CheckpointLocked` naming the file and the holder's PID when another process has it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            raise CheckpointLocked(
                f"stage {stage}: {path} is locked by another trainer of this stage "
                f"(pid {holder}); it is still running (an orphan of a killed job?): stop "
                "that process or wait for it, do not train one stage twice at once"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _HELD.add(fd)
        yield path
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock (also released by the kernel if the process dies)
