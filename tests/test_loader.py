"""Batches built by DataLoader workers (``train.num_workers``, vlalign.train.loader): the same
batches, per-step losses and resumption as batches built in the training process, including
the epoch-dependent captions of text kind ``captions``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import column, read_log, stage_paths, stage_settings, tiny_assets, train
from test_resume import _cmd, _kill_midway, _run

from vlalign.train.loader import StepBatches, resolve_num_workers
from vlalign.train.loop import (
    batch_indices,
    build_session,
    resume,
    train_step,
    write_checkpoint,
)

STEPS = 14  # 6 steps per epoch: three epochs, so three captions per image
SETTINGS = stage_settings(
    max_steps=STEPS,
    text="captions",
    max_length=48,
    mask="prefix",
    noise=0.1,
    micro_batch_size=8,
    lr={"vision": 0, "projector": 1e-3, "lm": 5e-4},
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_assets(tmp_path_factory, pretrain=False)


def test_default_workers_follow_the_cpus():
    assert resolve_num_workers(None, cpus=1) == 0
    assert resolve_num_workers(None, cpus=2) == 0  # the default DAG on 2 cores is unchanged
    assert resolve_num_workers(None, cpus=4) == 3
    assert resolve_num_workers(None, cpus=64) == 8
    assert resolve_num_workers(3, cpus=1) == 3


def test_worker_batches_equal_in_process_batches_across_epochs(assets, tmp_path):
    session = build_session(
        SETTINGS, stage_paths(assets, tmp_path, "b"), name="b", stage_hash="b", seed=0
    )

    def rows(step):
        return batch_indices(session, step), step // session.steps.steps_per_epoch

    make = lambda n: StepBatches(session.train, rows, STEPS, 8, session.pad_id, n)  # noqa: E731
    here, workers = make(0), make(2)
    texts: dict[int, set[tuple[int, ...]]] = {}  # row -> its texts over the epochs
    try:
        for step in [*range(STEPS), 3, 4, 13]:  # in order, then a restart (as a resume does)
            a, b = here.get(step), workers.get(step)
            assert a.step == b.step == step and a.n_global == b.n_global
            assert len(a.micro_batches) == len(b.micro_batches) == 2
            for ma, mb in zip(a.micro_batches, b.micro_batches):
                assert ma.keys() == mb.keys()
                for key in ma:
                    assert torch.equal(ma[key], mb[key]), (step, key)
            idx = rows(step)[0]
            seqs = [
                tuple(ids[m.bool()].tolist())
                for mb in b.micro_batches
                for ids, m in zip(mb["input_ids"], mb["attention_mask"])
            ]
            for i, seq in zip(idx, seqs, strict=True):
                texts.setdefault(i, set()).add(seq)
    finally:
        workers.close()
    # the workers honour the epoch: an image seen in three epochs had (mostly) three captions
    assert sum(len(t) > 1 for t in texts.values()) > len(texts) // 2


def test_stage_with_workers_has_the_same_losses(assets, tmp_path):
    _, out0 = train(assets, tmp_path / "w0", "s", {**SETTINGS, "num_workers": 0})
    _, out2 = train(assets, tmp_path / "w2", "s", {**SETTINGS, "num_workers": 2})
    a, b = read_log(out0), read_log(out2)
    assert len(a) == len(b) == STEPS
    np.testing.assert_allclose(column(a, "loss"), column(b, "loss"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(column(a, "grad_norm"), column(b, "grad_norm"), rtol=1e-5)


def test_in_process_resume_with_workers(assets, tmp_path):
    settings = {**SETTINGS, "num_workers": 2, "checkpoint_every": 5}
    paths = stage_paths(assets, tmp_path, "rt")
    kw = {"name": "rt", "stage_hash": "rt", "seed": 0}
    a = build_session(settings, paths, **kw)
    a.model.train()
    rows = [train_step(a, step) for step in range(7)]  # crosses the first epoch
    write_checkpoint(a, 7, rows)
    nxt_a = [train_step(a, step) for step in (7, 8)]
    a.batches.close()

    b = build_session(settings, paths, **kw)
    start, rows_b = resume(b)
    assert start == 7 and rows_b == rows
    b.model.train()
    nxt_b = [train_step(b, step) for step in (7, 8)]
    b.batches.close()
    for ra, rb in zip(nxt_a, nxt_b):
        for key in ("loss", "lr", "grad_norm"):
            assert ra[key] == rb[key], key


def test_kill_and_resume_with_workers_matches_uninterrupted_run(assets, tmp_path):
    """test_resume's pattern, the killed and the resumed job with 2 workers, the uninterrupted
    one in process."""
    from test_resume import SETTINGS as RESUME
    from test_resume import TOTAL

    out, ckpt = tmp_path / "k" / "stages" / "r", tmp_path / "k" / "checkpoints" / "r"
    cmd = _cmd(assets, out, ckpt, {**RESUME, "num_workers": 2})
    step = _kill_midway(cmd, ckpt)
    assert 4 <= step < TOTAL
    resumed = _run(cmd)
    assert f"resuming from step {step}/{TOTAL}" in resumed.stderr
    out2, ckpt2 = tmp_path / "f" / "stages" / "r", tmp_path / "f" / "checkpoints" / "r"
    _run(_cmd(assets, out2, ckpt2, {**RESUME, "num_workers": 0}))
    a, b = read_log(out), read_log(out2)
    assert len(a) == len(b) == TOTAL
    np.testing.assert_allclose(column(a, "loss"), column(b, "loss"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(column(a, "grad_norm"), column(b, "grad_norm"), rtol=1e-4)
