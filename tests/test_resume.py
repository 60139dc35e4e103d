"""Kill a real ``vlalign train`` process mid-stage, resume it, and get the uninterrupted result.

Also: what a checkpoint left by *different* stage settings does to the next run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TinyWorld,
    column,
    read_log,
    stage_paths,
    stage_settings,
    subprocess_env,
    tiny_assets,
    train,
)

from vlalign.models.vlm import VisionLanguageModel
from vlalign.train.loop import (
    STATE_FILE,
    build_session,
    checkpoint_due,
    resume,
    train_step,
    write_checkpoint,
)
from vlalign.train.optim import lr_lambdas

TOTAL = 40  # 96 images / batch 16 = 6 steps per epoch: the run crosses several epochs
# stage0-like (noise) on captions (a different caption per epoch), LM trainable too: resuming
# must restore the noise, the data order, the caption choice and the optimizer state.
SETTINGS = stage_settings(
    max_steps=TOTAL,
    checkpoint_every=2,
    mask="bidirectional",
    noise=0.2,
    text="captions",
    max_length=48,
    lr={"vision": 0, "projector": 1e-3, "lm": 5e-4},
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyWorld:
    torch.set_num_threads(1)
    return tiny_assets(tmp_path_factory, pretrain=False)  # resumption needs no trained LM


def _cmd(assets: TinyWorld, out: Path, ckpt: Path, settings: dict) -> list[str]:
    params = {"settings": settings, "name": "resume", "hash": "0123456789ab", "seed": 0}
    return [
        sys.executable, "-m", "vlalign", "train", "--launch", "here",
        "--params", json.dumps(params),
        "--out", str(out), "--checkpoint-dir", str(ckpt),
        "--tokenizer", str(assets.tokenizer), "--vision", str(assets.vision),
        "--lm", str(assets.lm), "--data", str(assets.data["world"]),
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _checkpoint_step(ckpt: Path) -> int:
    path = ckpt / STATE_FILE
    if not path.exists():
        return -1
    # the file is replaced atomically: whatever is there is a complete checkpoint
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def _kill_midway(cmd: list[str], ckpt: Path, min_step: int = 4) -> int:
    """Start the job, SIGKILL it once a checkpoint of at least ``min_step`` exists."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"training ended (rc {proc.returncode}) before a checkpoint of step "
                    f">= {min_step} was seen: {proc.stderr.read()[-2000:]}"
                )
            if _checkpoint_step(ckpt) >= min_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                return _checkpoint_step(ckpt)
            time.sleep(0.02)
        pytest.fail("no checkpoint within 240 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def killed(assets, tmp_path_factory) -> dict:
    """A run killed midway: its out/ckpt dirs, and a pristine copy of its checkpoint."""
    root = tmp_path_factory.mktemp("killed")
    out, ckpt = root / "stages" / "resume", root / "checkpoints" / "resume"
    cmd = _cmd(assets, out, ckpt, SETTINGS)
    step = _kill_midway(cmd, ckpt)
    saved = root / "checkpoint-copy"
    shutil.copytree(ckpt, saved)
    return {"root": root, "out": out, "ckpt": ckpt, "cmd": cmd, "step": step, "copy": saved}


def test_kill_and_resume_matches_uninterrupted_run(assets, killed, tmp_path):
    out, ckpt, step = killed["out"], killed["ckpt"], killed["step"]
    assert 4 <= step < TOTAL and step % 2 == 0
    assert not out.exists(), "a killed job left a (half-written) output dir"
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    assert len(state["log"]) == step  # the log up to the checkpoint travels with it

    resumed = _run(killed["cmd"])
    assert f"resuming from step {step}/{TOTAL}" in resumed.stderr
    assert not ckpt.exists(), "checkpoint dir not removed after the stage finished"

    out2, ckpt2 = tmp_path / "stages" / "resume", tmp_path / "checkpoints" / "resume"
    fresh = _run(_cmd(assets, out2, ckpt2, SETTINGS))
    assert "resuming" not in fresh.stderr
    assert not ckpt2.exists()

    a, b = read_log(out), read_log(out2)
    assert len(a) == len(b) == TOTAL
    assert column(a, "step") == column(b, "step") == list(range(1, TOTAL + 1))
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], abs=1e-5)
    np.testing.assert_allclose(column(a, "loss"), column(b, "loss"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(column(a, "lr"), column(b, "lr"), rtol=1e-9)
    np.testing.assert_allclose(column(a, "grad_norm"), column(b, "grad_norm"), rtol=1e-4)

    sa = json.loads((out / "stage.json").read_text())
    sb = json.loads((out2 / "stage.json").read_text())
    assert sa["steps"] == sb["steps"] == TOTAL
    assert sa["heldout_loss"] == pytest.approx(sb["heldout_loss"], abs=1e-5)
    ma = VisionLanguageModel.from_pretrained(out / "model")
    mb = VisionLanguageModel.from_pretrained(out2 / "model")
    for (name, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)


def _with_checkpoint(killed: dict, root: Path, name: str) -> Path:
    """Place a copy of the killed run's checkpoint where stage ``name`` under ``root`` looks."""
    ckpt = root / "checkpoints" / name
    shutil.copytree(killed["copy"], ckpt)
    return ckpt


def test_checkpoint_with_other_trainable_tensors_fails_clearly(assets, killed, tmp_path):
    # the checkpoint holds projector + LM tensors; this stage also trains the encoder
    ckpt = _with_checkpoint(killed, tmp_path, "s")
    settings = {**SETTINGS, "lr": {"vision": 1e-4, "projector": 1e-3, "lm": 5e-4}}
    with pytest.raises(ValueError, match=r"state\.pt: checkpoint was written by a stage"):
        train(assets, tmp_path, "s", settings)
    assert (ckpt / STATE_FILE).exists()  # nothing destroyed ...
    assert not (tmp_path / "stages" / "s").exists()  # ... nothing half-written


def test_checkpoint_with_fewer_trainable_tensors_fails(assets, killed, tmp_path):
    # the other direction: this stage trains only the projector
    ckpt = _with_checkpoint(killed, tmp_path, "s")
    settings = {**SETTINGS, "lr": {"vision": 0, "projector": 1e-3, "lm": 0}}
    # the checkpoint records the settings it was written under
    with pytest.raises(ValueError, match="other settings"):
        train(assets, tmp_path, "s", settings)
    assert (ckpt / STATE_FILE).exists()
    assert not (tmp_path / "stages" / "s").exists()


def test_checkpoint_from_other_settings_is_not_resumed_silently(assets, killed, tmp_path):
    _with_checkpoint(killed, tmp_path, "s")
    settings = {**SETTINGS, "lr": {"vision": 0, "projector": 3e-3, "lm": 5e-4}}
    try:
        train(assets, tmp_path, "s", settings)
    except (ValueError, RuntimeError) as e:  # failing clearly is acceptable
        assert "checkpoint" in str(e) or STATE_FILE in str(e)
        return
    # ... and so is a clean start: the LR column must be the new settings' schedule
    warmup = round(SETTINGS["warmup_ratio"] * TOTAL)
    groups = [{"lr": 3e-3}, {"lr": 5e-4}]
    fs = lr_lambdas(groups, "cosine", TOTAL, warmup, SETTINGS["min_lr"])
    expect = [max(g["lr"] * f(s) for g, f in zip(groups, fs)) for s in range(TOTAL)]
    np.testing.assert_allclose(column(read_log(tmp_path / "stages" / "s"), "lr"), expect)


def test_checkpoint_then_resume_round_trip_in_process(assets, tmp_path):
    """The steps alone: a session checkpointed after 2 steps and a fresh session resumed from
    that checkpoint take the same third step."""
    paths = stage_paths(assets, tmp_path, "rt")
    kw = {"name": "rt", "stage_hash": "rt", "seed": 0}
    a = build_session(SETTINGS, paths, **kw)
    assert resume(a) == (0, [])  # no checkpoint yet: from step 0
    a.model.train()
    rows = [train_step(a, step) for step in range(2)]
    assert checkpoint_due(a, 2) and not checkpoint_due(a, 3) and not checkpoint_due(a, TOTAL)
    write_checkpoint(a, 2, rows)
    third_a = train_step(a, 2)  # the global RNG is where the checkpoint recorded it

    b = build_session(SETTINGS, paths, **kw)
    start, rows_b = resume(b)
    assert start == 2 and rows_b == rows
    b.model.train()
    third_b = train_step(b, 2)
    for key in ("loss", "lr", "grad_norm"):
        assert third_b[key] == third_a[key], key
    for (name, pa), (_, pb) in zip(a.unwrapped.named_parameters(), b.unwrapped.named_parameters()):
        assert torch.equal(pa, pb), name
    assert b.scheduler.last_epoch == a.scheduler.last_epoch == 3
