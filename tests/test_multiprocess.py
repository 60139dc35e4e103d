"""Data-parallel training in two real processes (``accelerate launch --cpu --num_processes 2``,
gloo): every trainable tensor, the prefix encoder's included (it lives outside the VLM), is
all-reduced, so the ranks end identical and equal to one process over the same global batch;
stage0 noise is drawn per rank (issue 17 item 3).

One launch runs two tiny stages (this file is the job: ``python test_multiprocess.py --job
SPEC``): ``noisy`` (stage0 noise) and ``peft`` (prefix + LoRA + projector). Each rank dumps the
trained tensors and the noise it drew; the one-process reference runs the same job here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import ExitStack
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

GLOBAL_BATCH = 8
STEPS = 3


def _settings(kind: str, micro: int) -> dict[str, Any]:
    """The two stages of the job; ``micro`` = global batch / processes (1 process: gradient
    accumulation over 2 micro-batches reaches the same global batch)."""
    common = dict(batch_size=GLOBAL_BATCH, micro_batch_size=micro, max_steps=STEPS)
    if kind == "noisy":
        return peft_stage_settings(
            lr={"vision": 0, "projector": 1e-3, "lm": 0}, mask="bidirectional", noise=0.3,
            **common,
        )  # fmt: skip
    return peft_stage_settings(
        lr={"vision": 0, "projector": 1e-3, "lm": 0},
        # no LoRA dropout: its masks come from each process's RNG, so 1 and 2 processes would
        # drop different units (the comparison is of the all-reduce, not of dropout draws)
        peft={
            "prefix": {"lr": 1e-2, "num_prefix": 4},
            "lora": {"lr": 1e-2, "r": 4, "dropout": 0.0},
        },
        **common,
    )


# ------------------------------------------------------------------------ the job (each rank)
def _weights(session) -> dict[str, torch.Tensor]:
    """Every tensor the stage trains: the VLM's and (prefix encoder) the methods' own."""
    trained = session.unwrapped.named_parameters()
    out = {f"model.{k}": p.detach().cpu().clone() for k, p in trained if p.requires_grad}
    for method, state in (session.peft.state_dict() if session.peft else {}).items():
        out |= {f"peft.{method}.{k}": v.detach().cpu().clone() for k, v in state.items()}
    return out


def run_job(spec: dict[str, Any]) -> None:
    """Train ``spec``'s stages in this process (one rank of a launch, or the 1-process
    reference), dumping ``<dump>/<stage>_rank<r>.pt``: initial and final trained tensors, and
    every stage0 corruption (generator seed, ids before and after)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    import vlalign.models.vlm as vlm_mod
    import vlalign.train.loop as loop
    from vlalign.methods.stage import peft_hook

    # before train_stage's own PartialState: a CPU launch's ranks (see loop.process_state)
    rank = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).process_index
    real_corrupt = vlm_mod.corrupt_tokens
    for name, settings in spec["stages"].items():
        record: dict[str, Any] = {"noise": []}
        real_resume, real_finish = loop.resume, loop.finish

        def resume(session, record=record, real=real_resume):
            record["initial"] = _weights(session)
            return real(session)

        def finish(session, rows, record=record, real=real_finish, name=name):
            record["final"] = _weights(session)  # before the main process strips the methods
            torch.save(record, Path(spec["dump"]) / f"{name}_rank{rank}.pt")
            return real(session, rows)

        def corrupt(ids, mask, fraction, vocab, generator=None, protected_ids=(), record=record):
            out = real_corrupt(ids, mask, fraction, vocab, generator, protected_ids)
            record["noise"].append((generator.initial_seed(), ids.cpu(), out.cpu()))
            return out

        paths = loop.StagePaths(
            out=Path(spec["root"]) / "stages" / name,
            checkpoint_dir=Path(spec["root"]) / "checkpoints" / name,
            **{k: Path(v) for k, v in spec["paths"].items()},
        )
        with ExitStack() as stack:
            stack.enter_context(mock.patch.object(loop, "resume", resume))
            stack.enter_context(mock.patch.object(loop, "finish", finish))
            stack.enter_context(mock.patch.object(vlm_mod, "corrupt_tokens", corrupt))
            loop.train_stage(
                settings, paths, name=name, stage_hash=f"mp-{name}", seed=0, peft_hook=peft_hook
            )


# ------------------------------------------------------------------------------------ tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(world, root: Path) -> dict[str, Any]:
    dump = root / "dump"
    dump.mkdir(parents=True)
    return {
        "root": str(root),
        "dump": str(dump),
        "paths": {
            "tokenizer": str(world.tokenizer),
            "vision": str(world.vision),
            "lm": str(world.lm),
            "data": str(world.data["world_target"]),
        },
        # micro-batches of half the global batch: one per rank, or two accumulated by 1 process
        "stages": {k: _settings(k, GLOBAL_BATCH // 2) for k in ("noisy", "peft")},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """``{"two": {stage: [rank0, rank1]}, "one": {stage: [rank0]}}`` records."""
    torch.set_num_threads(1)
    world = build_peft_world(tmp_path_factory.mktemp("mp_world"))
    two = _spec(world, tmp_path_factory.mktemp("mp_two"))
    (Path(two["root"]) / "spec.json").write_text(json.dumps(two))
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        __file__, "--job", str(Path(two["root"]) / "spec.json"),
    ]  # fmt: skip
    # torchrun's two processes on the CPU, gloo: `launch --cpu` alone starts ONE process (it
    # needs mpirun for more); ACCELERATE_USE_CPU makes `--multi_gpu` a MULTI_CPU run
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one = _spec(world, tmp_path_factory.mktemp("mp_one"))
    run_job(one)
    load = lambda spec, n: {  # noqa: E731
        k: [torch.load(Path(spec["dump"]) / f"{k}_rank{r}.pt", weights_only=False)
            for r in range(n)]
        for k in spec["stages"]
    }  # fmt: skip
    return {"two": load(two, 2), "one": load(one, 1)}


def test_ranks_end_with_identical_trained_tensors(runs):
    rank0, rank1 = runs["two"]["peft"]
    final0, final1 = rank0["final"], rank1["final"]
    assert any(k.startswith("peft.prefix.") for k in final0), sorted(final0)
    assert any(k.startswith("peft.lora.") for k in final0), sorted(final0)
    assert any(k.startswith("model.projector.") for k in final0), sorted(final0)
    assert final0.keys() == final1.keys()
    diverged = [k for k in final0 if not torch.equal(final0[k], final1[k])]
    assert not diverged, f"tensors that differ between the ranks: {diverged}"
    # and training moved them (identical because untrained would prove nothing)
    for key in ("peft.prefix.", "peft.lora.", "model.projector."):
        initial = rank0["initial"]
        moved = [k for k in final0 if k.startswith(key) and not torch.equal(final0[k], initial[k])]
        assert moved, f"no {key}* tensor changed in training"


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    two, one = runs["two"]["peft"][0]["final"], runs["one"]["peft"][0]["final"]
    assert two.keys() == one.keys()
    far = {
        k: float((two[k] - one[k]).abs().max())
        for k in two
        if not torch.allclose(two[k], one[k], atol=1e-5, rtol=0)
    }
    assert not far, f"2 processes vs 1 (max abs difference): {far}"


def test_stage0_noise_differs_per_rank(runs):
    rank0, rank1 = runs["two"]["noisy"]
    assert len(rank0["noise"]) == len(rank1["noise"]) == STEPS  # one micro-batch per step
    for (seed0, ids0, out0), (seed1, ids1, out1) in zip(
        rank0["noise"], rank1["noise"], strict=True
    ):
        assert seed0 != seed1
        assert (ids0 != out0).any() and (ids1 != out1).any()
        changed0, changed1 = ids0 != out0, ids1 != out1
        assert changed0.shape != changed1.shape or not torch.equal(changed0, changed1)
    # rank 0 keeps the single-process seeds of its micro-batch 0
    one = runs["one"]["noisy"][0]["noise"]
    assert [s for s, *_ in rank0["noise"]] == [s for s, *_ in one[::2]]


# ------------------------------------------------------------ FSDP: the config and its selection
FSDP_CONFIG = HERE.parent / "slurm" / "accelerate" / "fsdp.yaml"


def _launch_args(argv: list[str]):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    return _validate_launch_command(launch_command_parser().parse_args(argv))[0]


def test_fsdp_config_is_selected_by_the_train_command():
    """What `accelerate launch` makes of the command the train_stage rule runs with
    ``accelerate_config: slurm/accelerate/fsdp.yaml``: FSDP2, full state dict, one unit per
    decoder layer (FSDP itself cannot run on a CPU-only machine: docs/cluster.md)."""
    import shlex

    from accelerate.utils.launch import prepare_multi_gpu_env

    from vlalign.train.launch import NUM_PROCESSES, train_command

    assert train_command(None, python="py") == "py -m vlalign train"
    cmd = train_command(str(FSDP_CONFIG), python="py")
    argv = shlex.split(cmd.replace(NUM_PROCESSES, "2"))
    assert argv[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert argv[-5:] == ["-m", "vlalign", "train", "--launch", "here"]
    args = _launch_args([*argv[3:], "--params", "{}"])
    assert args.use_fsdp and not args.multi_gpu and args.num_processes == 2
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert "Qwen2DecoderLayer" in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    # why the rule does not go through `vlalign train`'s own re-exec: its --multi_gpu wins
    # over the config's distributed_type, and the run would be plain DDP
    assert not _launch_args(["--multi_gpu", *argv[3:]]).use_fsdp
    with pytest.raises(FileNotFoundError, match="no-such.yaml"):
        train_command("no-such.yaml")


if __name__ == "__main__" and sys.argv[1:2] == ["--job"]:
    run_job(json.loads(Path(sys.argv[2]).read_text()))
