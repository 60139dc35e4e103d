"""The `slurm/` profile on a real single-node SLURM (scripts/slurm_local.sh).

Scratch workflows in tmp_path use the pipeline's rule names (`dataset`, `train_stage`,
`aggregate`) so that the profile's per-rule resources (GPU partition, --gpus, requeue, retries)
are what is exercised. See tests/slurm_fixture.py for the fixture and helpers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from slurm_fixture import PROFILE, REPO, SCRIPT, SlurmCluster, slurm_cluster  # noqa: F401

GPU_RULES = {"train_stage", "evaluate", "features", "rank_before_peft", "recaption_shard"}
CPU_RULES = {"dataset", "tokenizer", "backbone", "reference_rank", "aggregate",
             "tables", "plots"}

# Each job records who ran it: the SLURM job id and the GPUs SLURM granted.
ENV_LINE = ("rule={rule} job=$SLURM_JOB_ID gpus=${{SLURM_GPUS_ON_NODE:-none}} "
            "cvd=${{CUDA_VISIBLE_DEVICES:-none}}")

DAG_SNAKEFILE = f"""
ENV = "{ENV_LINE}"

rule all:
    input: "out/aggregate.txt"

rule dataset:
    output: "out/dataset.txt"
    shell: "echo " + ENV + " > {{output}}"

rule train_stage:
    output: "out/train_stage.txt"
    shell: "echo " + ENV + " > {{output}}"

rule aggregate:
    input: "out/dataset.txt", "out/train_stage.txt"
    output: "out/aggregate.txt"
    shell: "cat {{input}} > {{output}} && echo " + ENV + " >> {{output}}"
"""

# A resumable "trainer": one step per `delay` seconds, checkpoint after every step (atomic
# replace), resume from the checkpoint when it exists, log each (re)start.
COUNTER_PY = """
import json, os, sys, time
ckpt, out, steps, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
os.makedirs(ckpt, exist_ok=True)
state = os.path.join(ckpt, "state.json")
step = json.load(open(state))["step"] if os.path.exists(state) else 0
job = os.environ.get("SLURM_JOB_ID", "")
with open(os.path.join(ckpt, "starts.log"), "a") as f:
    f.write(f"{step} {job}\\n")

def save(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)

while step < steps:
    time.sleep(delay)
    step += 1
    save(state, {"step": step, "job": job, "pid": os.getpid()})
save(out, {"step": step, "job": job})
"""

STEPS = 14
# The checkpoint dir is NOT an output: Snakemake deletes incomplete outputs before a retry.
RESUME_SNAKEFILE = f"""
rule all:
    input: expand("out/{{name}}.json", name=["requeued", "crashed"])

rule train_stage:
    output: "out/{{name}}.json"
    params: ckpt="checkpoints/{{name}}"
    shell: "python3 counter.py {{params.ckpt}} {{output}} {STEPS} 0.5"
"""


def _parse_env_lines(text: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in text.splitlines():
        kv = dict(item.split("=", 1) for item in line.split())
        rows[kv["rule"]] = kv
    return rows


# ------------------------------------------------------------------ profile, no cluster needed


def test_profile_gpu_rules_ask_for_gpus_cpu_rules_do_not() -> None:
    cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert cfg["executor"] == "slurm"
    assert cfg["retries"] >= 1 and cfg["slurm-requeue"] is True
    defaults = cfg["default-resources"]
    assert not {"gpu", "gres", "gpu_model"} & set(defaults), "CPU rules must not ask for GPUs"
    assert "qos" not in defaults or defaults["qos"], "qos: '' would become sbatch --qos ''"
    per_rule = cfg["set-resources"]
    assert set(per_rule) <= GPU_RULES | CPU_RULES, f"unknown rules {set(per_rule) - GPU_RULES}"
    for rule in GPU_RULES:
        res = per_rule[rule]
        assert int(res["gpu"]) >= 1 and res["slurm_partition"], rule
        assert int(res["cpus_per_gpu"]) >= 1 and int(res["mem_mb"]) > 0, rule
    for rule in CPU_RULES & set(per_rule):
        assert not {"gpu", "gres"} & set(per_rule[rule]), rule
    # one place: evaluate inherits partition / GPU model from train_stage via the YAML merge key
    ev, tr = per_rule["evaluate"], per_rule["train_stage"]
    assert ev["slurm_partition"] == tr["slurm_partition"] and ev["gpu_model"] == tr["gpu_model"]


def test_profile_signals_training_before_the_time_limit() -> None:
    """train_stage jobs get SIGTERM ahead of the time limit (the trainer checkpoints the step in
    progress and exits 75, the retry resumes); the GPU rules inheriting its template do not."""
    per_rule = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    extra = per_rule["train_stage"]["slurm_extra"].strip("'")
    assert re.fullmatch(r"--signal=TERM@\d+", extra), extra  # steps, not B: (the batch shell)
    for rule in GPU_RULES - {"train_stage"}:
        assert not per_rule[rule].get("slurm_extra"), rule
    # the trainer replaces the rule's bash, which SIGTERM would kill before the checkpoint
    train_smk = (REPO / "workflow" / "rules" / "train.smk").read_text()
    assert '"exec {params.launch} --params ' in train_smk
    assert 'else f"{VLALIGN} train"' in train_smk  # params.launch without accelerate_config


def test_profile_rule_names_exist_in_workflow() -> None:
    rules_dir = REPO / "workflow" / "rules"
    defined = set()
    for smk in [REPO / "Snakefile", *rules_dir.glob("*.smk")]:
        if smk.exists():
            defined |= set(re.findall(r"^rule (\w+):", smk.read_text(), flags=re.M))
    if "train_stage" not in defined:
        pytest.skip("the pipeline does not define train_stage yet")
    per_rule = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    missing = set(per_rule) - defined
    assert not missing, f"the profile names rules the workflow lacks: {missing}"


# ------------------------------------------------------------------ real cluster


@pytest.mark.slurm
def test_cluster_up_and_gpu_gres(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    assert len(re.findall(r"running pid=\d+", status.stdout)) == 5
    # `start` on a running cluster is a no-op
    again = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
    assert again.returncode == 0 and "already running" in again.stderr
    assert {"cpu", "gpu"} <= set(slurm_cluster.partitions)
    out = tmp_path / "gpu.out"
    subprocess.run(
        ["sbatch", "--wait", "-p", "gpu", "--gpus=1", "-o", str(out),
         "--wrap", "echo gpus=$SLURM_GPUS_ON_NODE"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    assert out.read_text().strip() == "gpus=1"


@pytest.mark.slurm
def test_profile_runs_dag_on_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "Snakefile").write_text(DAG_SNAKEFILE)
    # two GPUs if the node has them: the job step must see all of them (multi-GPU training)
    ngpu = min(2, slurm_cluster.gpus)
    profile = slurm_cluster.local_profile(
        tmp_path / "profile", set_resources={"train_stage": {"gpu": ngpu}}
    )
    proc = slurm_cluster.run_snakemake(tmp_path, profile, timeout=240)
    slurm_cluster.assert_ok(proc, tmp_path)

    rows = _parse_env_lines((tmp_path / "out" / "aggregate.txt").read_text())
    assert set(rows) == {"dataset", "train_stage", "aggregate"}
    jobs = {rule: row["job"] for rule, row in rows.items()}
    assert all(j.isdigit() for j in jobs.values()), jobs  # ran inside SLURM jobs
    assert len(set(jobs.values())) == 3, jobs  # one job per rule
    # the GPU rule got the GPU the profile asks for, the CPU rules none
    if ngpu:
        assert rows["train_stage"]["gpus"] == str(ngpu)
        assert len(rows["train_stage"]["cvd"].split(",")) == ngpu, rows["train_stage"]
    assert rows["dataset"]["gpus"] == "none" and rows["aggregate"]["gpus"] == "none"
    parts = {r: slurm_cluster.sacct(j)[0]["Partition"] for r, j in jobs.items()}
    assert parts["train_stage"] == "gpu" and parts["dataset"] == "cpu", parts


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for_steps(paths: list[Path], min_step: int, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [_read_json(p) for p in paths]
        if all(s and s["step"] >= min_step for s in states):
            return states
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    pytest.fail(f"jobs did not reach step {min_step}: {states}\n{out[-3000:]}\n{err[-3000:]}")


@pytest.mark.slurm
def test_interrupted_training_resumes_from_checkpoint(
    slurm_cluster: SlurmCluster, tmp_path: Path  # noqa: F811
) -> None:
    """Two resumable jobs run side by side; one is requeued by SLURM (`scontrol requeue`, what
    preemption with PreemptMode=REQUEUE does), the other crashes (its process is SIGKILLed, as by
    the OOM killer) and is resubmitted by Snakemake (`retries`). Both must resume, not restart."""
    (tmp_path / "Snakefile").write_text(RESUME_SNAKEFILE)
    (tmp_path / "counter.py").write_text(textwrap.dedent(COUNTER_PY))
    profile = slurm_cluster.local_profile(tmp_path / "profile")
    ckpt = tmp_path / "checkpoints"
    with subprocess.Popen(
        slurm_cluster.snakemake_cmd(profile, timeout=300), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        req, crash = _wait_for_steps(
            [ckpt / "requeued" / "state.json", ckpt / "crashed" / "state.json"], 3, proc, 150
        )
        subprocess.run(["scontrol", "requeue", req["job"]], check=True, timeout=30)
        os.kill(crash["pid"], signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=330)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    slurm_cluster.assert_ok(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                            tmp_path)

    def starts(name: str) -> list[tuple[int, str]]:
        lines = (ckpt / name / "starts.log").read_text().split("\n")
        return [(int(s), j) for s, j in (line.split() for line in lines if line)]

    for name, victim in (("requeued", req), ("crashed", crash)):
        final = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert final["step"] == STEPS, (name, final)
        runs = starts(name)
        assert len(runs) == 2, (name, runs)
        assert runs[0][0] == 0 and runs[0][1] == victim["job"]
        assert runs[1][0] >= victim["step"] >= 3, f"{name} started over: {runs}"

    # SLURM requeue: the same job id ran twice; Snakemake retry: a new job id
    req_runs, crash_runs = starts("requeued"), starts("crashed")
    assert req_runs[1][1] == req["job"]
    states = [r["State"] for r in slurm_cluster.sacct(req["job"], duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states
    assert crash_runs[1][1] != crash["job"]
    assert slurm_cluster.sacct(crash["job"])[0]["State"] == "FAILED"
    assert slurm_cluster.sacct(crash_runs[1][1])[0]["State"] == "COMPLETED"
