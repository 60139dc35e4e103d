"""Preemption (SIGTERM / SIGUSR1 checkpoint the step in progress and exit 75), the checkpoint
dir's lock (one trainer per stage) and the experiment trackers (``train.log_with``).

The kill-and-resume comparison of tests/test_resume.py, with a signal instead of SIGKILL: the
job loses nothing since the last periodic checkpoint, only the time since the signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyWorld, column, read_log, stage_settings, subprocess_env, tiny_assets, train
from test_resume import SETTINGS, _checkpoint_step, _cmd, _run

from vlalign.config import ConfigError
from vlalign.runs.settings import StageSettings
from vlalign.train import loop
from vlalign.train.preemption import (
    LOCK_FILE,
    PREEMPTED_EXIT_CODE,
    CheckpointLocked,
    Preempted,
    StopSignals,
)

TOTAL = 120  # long enough that the signal lands mid-stage
EVERY = 5  # the periodic checkpoint the test waits for before it signals
PREEMPT = {**SETTINGS, "max_steps": TOTAL, "checkpoint_every": EVERY}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyWorld:
    torch.set_num_threads(1)
    return tiny_assets(tmp_path_factory, pretrain=False)


def _signal_midway(cmd: list[str], ckpt: Path, sig: int) -> tuple[int, str]:
    """Start the job, send ``sig`` once its first periodic checkpoint exists; → (rc, stderr)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    deadline = time.monotonic() + 240
    try:
        while _checkpoint_step(ckpt) < EVERY:
            if proc.poll() is not None:
                pytest.fail(f"training ended (rc {proc.returncode}) before the signal")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_sigterm_checkpoints_step_in_progress_and_resumes_exactly(assets, tmp_path):
    out, ckpt = tmp_path / "a" / "stages" / "resume", tmp_path / "a" / "checkpoints" / "resume"
    cmd = _cmd(assets, out, ckpt, {**PREEMPT, "log_with": "tensorboard"})
    rc, err = _signal_midway(cmd, ckpt, signal.SIGTERM)
    assert rc == PREEMPTED_EXIT_CODE, err[-3000:]
    step = _checkpoint_step(ckpt)
    # the checkpoint the signal wrote, after the periodic one it waited for
    assert EVERY < step < TOTAL, step
    assert f"stopped by SIGTERM after step {step}" in err
    assert not out.exists(), "a preempted job left a (half-written) output dir"
    state = torch.load(ckpt / loop.STATE_FILE, map_location="cpu", weights_only=False)
    assert state["step"] == step and len(state["log"]) == step

    resumed = _run(cmd)
    assert f"resuming from step {step}/{TOTAL}" in resumed.stderr
    assert not ckpt.exists()

    # the uninterrupted run, without trackers (log_with is not part of the stage's identity)
    out2, ckpt2 = tmp_path / "b" / "stages" / "resume", tmp_path / "b" / "checkpoints" / "resume"
    fresh = _run(_cmd(assets, out2, ckpt2, PREEMPT))
    assert "resuming" not in fresh.stderr
    assert not (out2 / "trackers").exists()
    a, b = read_log(out), read_log(out2)
    assert column(a, "step") == column(b, "step") == list(range(1, TOTAL + 1))  # each once
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], abs=1e-5)
    np.testing.assert_allclose(column(a, "loss"), column(b, "loss"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(column(a, "lr"), column(b, "lr"), rtol=1e-9)

    # TensorBoard: both attempts' event files, every step once, the train_log.csv values
    logdir = out / "trackers" / "resume"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one per attempt
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        events = _scalars(logdir, tag)
        assert [s for s, _ in events] == list(range(1, TOTAL + 1)), tag
        np.testing.assert_allclose([v for _, v in events], column(a, tag), rtol=1e-6)  # float32


class _SignalAt:
    """``train_step`` that sends this process ``sig`` while step ``at`` runs."""

    def __init__(self, sig: int, at: int) -> None:
        self.sig, self.at, self.real = sig, at, loop.train_step

    def __call__(self, session, step):
        if step == self.at:
            signal.raise_signal(self.sig)  # lands mid-step: the step must still complete
        return self.real(session, step)


def test_sigusr1_in_process_stops_after_the_step_and_restores_handlers(
    assets, tmp_path, monkeypatch
):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(loop, "train_step", _SignalAt(signal.SIGUSR1, at=2))
    settings = stage_settings(max_steps=20, checkpoint_every=10_000)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 3") as e:
        train(assets, tmp_path, "usr1", settings)
    assert e.value.step == 3 and e.value.signum == signal.SIGUSR1
    ckpt = tmp_path / "checkpoints" / "usr1"
    assert _checkpoint_step(ckpt) == 3
    assert not (tmp_path / "stages" / "usr1").exists()
    assert {s: signal.getsignal(s) for s in previous} == previous  # handlers restored
    # ... and the lock was released: the rerun resumes and finishes
    monkeypatch.undo()  # the real train_step
    result, out = train(assets, tmp_path, "usr1", settings)
    assert result["steps"] == 20 and column(read_log(out), "step") == list(range(1, 21))


def test_stop_signals_restores_previous_handlers():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with StopSignals() as stop:
            signal.raise_signal(signal.SIGUSR1)
            assert stop.received == signal.SIGUSR1
        signal.raise_signal(signal.SIGUSR1)  # back to the handler installed before
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from vlalign.train.preemption import checkpoint_lock
with checkpoint_lock(Path(sys.argv[1]), "holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_trainer_fails_fast_and_a_killed_holder_blocks_nothing(assets, tmp_path):
    ckpt = tmp_path / "checkpoints" / "lk"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(ckpt)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        settings = stage_settings(max_steps=2)
        t0 = time.monotonic()
        with pytest.raises(CheckpointLocked) as e:
            train(assets, tmp_path, "lk", settings)
        assert time.monotonic() - t0 < 5, "the second trainer must fail before it builds a model"
        assert str(ckpt / LOCK_FILE) in str(e.value) and f"pid {holder.pid} " in str(e.value)
        assert not (tmp_path / "stages" / "lk").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
        holder.wait()
    assert (ckpt / LOCK_FILE).read_text().startswith(f"{holder.pid} ")  # stale, unlocked
    result, out = train(assets, tmp_path, "lk", stage_settings(max_steps=2))
    assert result["steps"] == 2 and not ckpt.exists()


def test_log_with_is_checked_and_not_part_of_the_stage_hash():
    base = StageSettings.from_dict(stage_settings())
    tb = StageSettings.from_dict(stage_settings(log_with="tensorboard"))
    assert base.log_with is None and tb.log_with == "tensorboard"
    assert base.semantic() == tb.semantic()
    assert loop.checkpoint_identity("h", base) == loop.checkpoint_identity("h", tb)
    with pytest.raises(ConfigError, match="log_with"):
        StageSettings.from_dict(stage_settings(log_with="neptune"))
