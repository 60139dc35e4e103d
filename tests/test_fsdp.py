"""Sharded training (FSDP2) on the CPU (issue 17 item 8): the launch the ``train_stage`` rule
runs for ``accelerate_config: slurm/accelerate/fsdp.yaml`` (``accelerate launch --config_file``,
here with ``ACCELERATE_USE_CPU``), in two real processes with gloo.

accelerate runs an FSDP config on CPU processes as DDP; the trainer then shards the model itself
(``vlalign.train.sharding.shard_on_cpu``), so what is checked is the trainer's sharded state
handling: each rank holds half of every trained tensor; the stage output written from the
gathered weights equals one process's; a checkpoint written sharded resumes in one process, and
one written by one process resumes sharded, to the same result.

This file is also the job (``python test_fsdp.py --job SPEC``): one stage, optionally stopped
after its checkpoint, or resumed from one copied into its checkpoint directory.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as the job script by accelerate launch
    sys.path.insert(0, str(HERE))

from helpers import subprocess_env  # noqa: E402
from peft_fixtures import build_peft_world  # noqa: E402
from peft_fixtures import stage_settings as peft_stage_settings  # noqa: E402

FSDP_CONFIG = HERE.parent / "slurm" / "accelerate" / "fsdp.yaml"
GLOBAL_BATCH = 8
STEPS = 4
STOP_AT = 2  # the interrupted runs stop after the checkpoint of step 2


class Stopped(Exception):
    """Raised in a job to end it after its checkpoint, as a killed job would."""


def _settings() -> dict[str, Any]:
    # prefix (outside the VLM) + LoRA (inside the LM's sharded layers) + the projector (in the
    # root unit); no LoRA dropout, whose masks differ between process counts
    return peft_stage_settings(
        lr={"vision": 0, "projector": 1e-3, "lm": 0},
        peft={
            "prefix": {"lr": 1e-2, "num_prefix": 4},
            "lora": {"lr": 1e-2, "r": 4, "dropout": 0.0},
        },
        batch_size=GLOBAL_BATCH,
        micro_batch_size=2,  # gradients accumulated over 2 micro-batches per rank (4 in 1 process)
        max_steps=STEPS,
        checkpoint_every=STOP_AT,
    )


# ------------------------------------------------------------------------ the job (each rank)
def run_job(spec: dict[str, Any]) -> None:
    """Train the stage in this process; write ``<root>/shards_rank<r>.json``: whether the model
    was sharded and the fraction of the trained tensors' elements this rank holds."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    import vlalign.train.loop as loop
    from vlalign.methods.stage import peft_hook
    from vlalign.train.sharding import is_sharded

    root = Path(spec["root"])
    rank = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).process_index
    real_resume, real_step = loop.resume, loop.train_step

    def resume(session):
        trained = [p for p in session.root.parameters() if p.requires_grad]
        local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in trained)
        info = {
            "sharded": is_sharded(session.root),
            "held": local / sum(p.numel() for p in trained),
        }
        (root / f"shards_rank{rank}.json").write_text(json.dumps(info))
        return real_resume(session)

    def train_step(session, step):
        if step == spec.get("stop_at"):
            raise Stopped(step)
        return real_step(session, step)

    paths = loop.StagePaths(
        out=root / "out",
        checkpoint_dir=root / "checkpoint",
        **{k: Path(v) for k, v in spec["paths"].items()},
    )
    with (
        mock.patch.object(loop, "resume", resume),
        mock.patch.object(loop, "train_step", train_step),
    ):
        try:
            loop.train_stage(
                spec["settings"], paths, name="fsdp", stage_hash="fsdp", seed=0, peft_hook=peft_hook
            )
        except Stopped:
            pass


# ------------------------------------------------------------------------------------ tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(world, root: Path, **extra: Any) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    spec = {
        "root": str(root),
        "paths": {
            "tokenizer": str(world.tokenizer),
            "vision": str(world.vision),
            "lm": str(world.lm),
            "data": str(world.data["world_target"]),
        },
        "settings": _settings(),
        **extra,
    }
    (root / "spec.json").write_text(json.dumps(spec))
    return spec


def _launch_fsdp(spec: dict[str, Any]) -> None:
    """The rule's launch: ``accelerate launch --config_file fsdp.yaml --num_processes 2``."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        __file__, "--job", str(Path(spec["root"]) / "spec.json"),
    ]  # fmt: skip
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _resume_from(spec: dict[str, Any], stopped: dict[str, Any]) -> None:
    checkpoint = Path(stopped["root"]) / "checkpoint"
    assert (checkpoint / "state.pt").is_file(), "the stopped run wrote no checkpoint"
    assert not (Path(stopped["root"]) / "out").exists()
    shutil.copytree(checkpoint, Path(spec["root"]) / "checkpoint")


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a stage output (model/ and peft/ safetensors), by file and name."""
    from safetensors.torch import load_file

    files = sorted(out.rglob("*.safetensors"))
    assert any("peft" in f.parts for f in files) and any("model" in f.parts for f in files)
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Stage outputs: ``one`` (one process), ``fsdp`` (2 sharded processes), ``fsdp_to_one``
    (stopped sharded, resumed in one process), ``one_to_fsdp`` (the reverse)."""
    torch.set_num_threads(1)
    world = build_peft_world(tmp_path_factory.mktemp("fsdp_world"))
    base = tmp_path_factory.mktemp("fsdp")
    specs = {name: _spec(world, base / name) for name in ("one", "fsdp")}
    run_job(specs["one"])
    _launch_fsdp(specs["fsdp"])

    stopped = _spec(world, base / "stopped_fsdp", stop_at=STOP_AT)
    _launch_fsdp(stopped)
    specs["fsdp_to_one"] = _spec(world, base / "fsdp_to_one")
    _resume_from(specs["fsdp_to_one"], stopped)
    run_job(specs["fsdp_to_one"])

    stopped = _spec(world, base / "stopped_one", stop_at=STOP_AT)
    run_job(stopped)
    specs["one_to_fsdp"] = _spec(world, base / "one_to_fsdp")
    _resume_from(specs["one_to_fsdp"], stopped)
    _launch_fsdp(specs["one_to_fsdp"])
    return {name: Path(spec["root"]) for name, spec in specs.items()}


def test_each_rank_holds_half_of_every_trained_tensor(runs):
    for rank in (0, 1):
        info = json.loads((runs["fsdp"] / f"shards_rank{rank}.json").read_text())
        assert info["sharded"], "the FSDP launch trained an unsharded model"
        assert info["held"] == pytest.approx(0.5, abs=0.05), info
    one = json.loads((runs["one"] / "shards_rank0.json").read_text())
    assert not one["sharded"] and one["held"] == 1.0


def _log(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    far = {
        k: float((a[k].float() - b[k].float()).abs().max())
        for k in a
        if not torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0)
    }
    assert not far, f"{what} (max abs difference): {far}"


@pytest.mark.parametrize("name", ["fsdp", "fsdp_to_one", "one_to_fsdp"])
def test_sharded_stage_output_equals_one_process(runs, name):
    one = _tensors(runs["one"] / "out")
    _assert_close(_tensors(runs[name] / "out"), one, f"{name} vs one process")
    s_one = json.loads((runs["one"] / "out" / "stage.json").read_text())
    s_other = json.loads((runs[name] / "out" / "stage.json").read_text())
    assert s_other["heldout_loss"] == pytest.approx(s_one["heldout_loss"], abs=1e-5)
    assert s_other["steps"] == STEPS
    # the log's global-batch loss and gradient norm (gathered over the shards) are one process's
    log, log_one = (_log(runs[n] / "out") for n in (name, "one"))
    assert len(log) == STEPS
    for key in ("loss", "grad_norm"):
        got, want = [float(r[key]) for r in log], [float(r[key]) for r in log_one]
        assert got == pytest.approx(want, rel=1e-4), key
    assert not (runs[name] / "checkpoint").exists()


def test_the_stage_moved_its_trained_tensors(runs):
    """Equal outputs prove nothing if nothing trained: LoRA's B starts at zero."""
    lora_b = {k: v for k, v in _tensors(runs["fsdp"] / "out").items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), sorted(lora_b)


def test_a_layer_class_the_model_lacks_is_named():
    from vlalign.train.sharding import shard_on_cpu

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Qwen2DecoderLayr.*Linear"):
        shard_on_cpu(model, ["Qwen2DecoderLayr"])


if __name__ == "__main__" and sys.argv[1:2] == ["--job"]:
    run_job(json.loads(Path(sys.argv[2]).read_text()))
