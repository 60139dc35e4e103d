"""The real pipeline through `--profile slurm` on the local single-node SLURM.

A tiny but complete config (tests/configs/slurm_dag.yaml: dataset -> tokenizer -> backbones ->
features -> one training stage -> evaluation) is submitted from the repository root exactly as a
user does (`snakemake --profile slurm <target>`), with the profile derived from `slurm/` by
tests/slurm_fixture.py. Then the training job is requeued by SLURM while it runs (what
preemption with PreemptMode=REQUEUE does) and must resume from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from slurm_fixture import REPO, SlurmCluster, slurm_cluster  # noqa: F401

from vlalign.config import load_yaml, validate_config
from vlalign.runs.plan import plan

CONFIG = REPO / "tests" / "configs" / "slurm_dag.yaml"
SLURM_LOGS = REPO / ".snakemake" / "slurm_logs"
TIMEOUT = 600  # per snakemake call, a hang guard: `timeout -k` kills a hung run
GPU_RULES = {"train_stage", "evaluate", "features"}  # the profile puts these on partition gpu

SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")
RESUMING = re.compile(r"resuming from step (\d+)/(\d+)")


@dataclass(frozen=True)
class Plan:
    run: str  # "<run>_s<seed>"
    stage_hash: str
    feature_key: str
    max_steps: int
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class DagRun:
    results: Path
    plan: Plan
    proc: subprocess.CompletedProcess[str]
    run_id: str
    jobs: dict[str, str]  # SLURM job id -> rule (from the plugin's log path)


def _plan() -> Plan:
    config = validate_config(load_yaml(CONFIG), source=str(CONFIG))
    stages, runs = plan(config)
    assert len(runs) == 1 and len(stages) == 1, "slurm_dag.yaml must have one run of one stage"
    (run,) = runs.values()
    (node,) = stages.values()
    assert node.feature_key, "the stage should read the frozen-feature cache (features rule)"
    return Plan(run.name, node.hash, node.feature_key, int(node.settings["max_steps"]),
                tuple(sorted(config["datasets"])))


def _metrics_target(results: Path, p: Plan) -> str:
    return str(results / "runs" / p.run / "metrics.json")


def _snakemake_args(results: Path, p: Plan, *extra: str) -> list[str]:
    # the target comes first: --configfile takes every following word as a file
    return [_metrics_target(results, p), *extra, "--configfile", str(CONFIG),
            "--config", f"results_dir={results}"]


def _profile(cluster: SlurmCluster, dest: Path, prefix: str) -> Path:
    # keep the SLURM logs of successful jobs (they prove where each rule ran); a job-name prefix
    # of our own tells our jobs apart in squeue/sacct
    return cluster.local_profile(
        dest, mem_mb_cap=3000,
        overrides={"slurm-keep-successful-logs": True, "slurm-jobname-prefix": prefix},
    )


def _submissions(output: str) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's "submitted with SLURM jobid N (log: ...)" lines;
    the log path is `.snakemake/slurm_logs/rule_<rule>/<wildcards>/<id>.log`."""
    jobs = {}
    for jobid, log in SUBMITTED.findall(output):
        rule = re.search(r"/rule_(\w+?)/", log)
        assert rule, log
        jobs[jobid] = rule.group(1)
    return jobs


def _fail_with_logs(proc: subprocess.CompletedProcess[str], results: Path) -> None:
    """Fail with snakemake's output, the SLURM logs of this run's jobs and the rule logs."""
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    logs = [log for _, log in SUBMITTED.findall(output)]
    if (results / "logs").exists():
        logs += sorted(map(str, (results / "logs").rglob("*.log")))
    text = "\n".join(f"--- {p}\n{Path(p).read_text(errors='replace')[-1500:]}"
                     for p in logs if Path(p).is_file())
    hint = " (timed out)" if proc.returncode in (124, 137) else ""
    pytest.fail(f"snakemake exited {proc.returncode}{hint}\n--- snakemake\n{output[-5000:]}\n"
                f"{text}")


def _remove_kept_logs(jobids) -> None:
    """Delete the SLURM logs of our COMPLETED jobs (they land in the repository's .snakemake/);
    logs of failed jobs stay, as the plugin keeps them, for the post-mortem."""
    jobids = list(jobids)
    if not jobids:
        return
    for row in _sacct(jobids):
        if row["State"] == "COMPLETED":
            for path in SLURM_LOGS.glob(f"rule_*/**/{row['JobID']}.log"):
                path.unlink(missing_ok=True)


def _sacct(jobids, fields=("JobID", "JobName", "State", "Partition"), duplicates=False):
    cmd = ["sacct", "-X", "-n", "-P", "-j", ",".join(jobids), "-o", ",".join(fields)]
    if duplicates:
        cmd.append("--duplicates")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def _sacct_settled(jobids, timeout: float = 30) -> list[dict[str, str]]:
    """sacct records once slurmdbd has every job in a final state (it lags slurmctld)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _sacct(jobids)
        final = {r["JobID"] for r in rows if r["State"] not in ("PENDING", "RUNNING")}
        if final >= set(jobids) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


@pytest.fixture(scope="module")
def dag_run(slurm_cluster: SlurmCluster, tmp_path_factory) -> Iterator[DagRun]:  # noqa: F811
    """The whole DAG up to the run's metrics.json, every rule one sbatch job."""
    p = _plan()
    tmp = tmp_path_factory.mktemp("slurm_dag")
    results = tmp / "results"
    profile = _profile(slurm_cluster, tmp / "profile", f"vlalign_dag_{uuid.uuid4().hex[:8]}")
    proc = slurm_cluster.run_snakemake(REPO, profile, _snakemake_args(results, p),
                                       timeout=TIMEOUT)
    jobs = _submissions(proc.stdout + proc.stderr)
    try:
        _fail_with_logs(proc, results)
        run_id = RUN_ID.search(proc.stdout + proc.stderr)
        assert run_id, "the slurm executor did not print its run ID"
        yield DagRun(results, p, proc, run_id.group(1), jobs)
    finally:
        _remove_kept_logs(jobs)


@pytest.mark.slurm
def test_dag_runs_every_rule_as_a_slurm_job(dag_run: DagRun) -> None:
    results, p = dag_run.results, dag_run.plan
    # outputs of every rule family, with contents that only a real run produces
    for path in [*(results / "data" / d for d in p.datasets), results / "tokenizer",
                 results / "backbones" / "vision", results / "backbones" / "lm",
                 results / "features" / p.feature_key]:
        assert path.is_dir() and any(path.iterdir()), path
    stage = results / "stages" / p.stage_hash
    assert (stage / "model").is_dir() and (stage / "stage.json").is_file()
    assert len(_log_rows(stage / "train_log.csv")) == p.max_steps
    metrics = _read_json(results / "runs" / p.run / "metrics.json")
    values = {r["metric"]: r["value"] for r in metrics["records"] if r["run"] == p.run}
    assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(values), sorted(values)
    assert all(isinstance(v, float) for v in values.values()), values
    for name in ("predictions.jsonl", "rank_curve.json", "run.json"):
        assert (results / "runs" / p.run / name).is_file(), name

    # one SLURM job per DAG job: dataset, tokenizer, 2 backbones, features, stage, the
    # evaluated split's references, evaluate
    expected = Counter({"dataset": len(p.datasets), "tokenizer": 1, "backbone": 2,
                        "features": 1, "train_stage": 1, "references": 1, "evaluate": 1})
    assert Counter(dag_run.jobs.values()) == expected, dag_run.jobs
    assert "localrule" not in dag_run.proc.stdout + dag_run.proc.stderr  # nothing ran locally

    # SLURM's accounting: every job under this run's name, COMPLETED, GPU rules on `gpu`
    rows = {r["JobID"]: r for r in _sacct_settled(list(dag_run.jobs))}
    assert set(rows) == set(dag_run.jobs), (rows, dag_run.jobs)
    for jobid, rule in dag_run.jobs.items():
        row = rows[jobid]
        assert row["JobName"] == dag_run.run_id, row
        assert row["State"] == "COMPLETED", (rule, row)
        assert row["Partition"] == ("gpu" if rule in GPU_RULES else "cpu"), (rule, row)

    # each job's SLURM log (named after its job id) shows the job-side Snakemake ran that rule
    for jobid, rule in dag_run.jobs.items():
        (log,) = SLURM_LOGS.glob(f"rule_{rule}/**/{jobid}.log")
        text = log.read_text(errors="replace")
        assert re.search(rf"^(local)?rule {rule}:", text, flags=re.M), (log, text[-2000:])
        assert "Finished jobid" in text or "steps (100%) done" in text, (log, text[-2000:])


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _log_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError):  # not there yet
        return None


def _running_job(prefix: str, rule: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%j|%k"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        jobid, name, comment = line.split("|", 2)
        if name.startswith(prefix + "_") and comment.startswith(f"rule_{rule}"):
            return jobid
    return None


@pytest.mark.slurm
def test_requeued_training_job_resumes_from_checkpoint(
    slurm_cluster: SlurmCluster, dag_run: DagRun, tmp_path: Path  # noqa: F811
) -> None:
    """Retrain the stage (--forcerun) and let SLURM requeue its job mid-run: the requeued job
    (same job id) must continue from the checkpoint, not start over."""
    results, p = dag_run.results, dag_run.plan
    ckpt = results / "checkpoints" / p.stage_hash / "state.pt"
    train_log = results / "logs" / "train_stage" / f"{p.stage_hash}.log"
    assert not ckpt.parent.exists(), "a finished stage must have removed its checkpoint"
    prefix = f"vlalign_requeue_{uuid.uuid4().hex[:8]}"
    profile = _profile(slurm_cluster, tmp_path / "profile", prefix)
    started = time.time()
    cmd = slurm_cluster.snakemake_cmd(
        profile, _snakemake_args(results, p, "--forcerun", "train_stage"), timeout=TIMEOUT
    )
    # output to files: a pipe nobody reads while we poll could fill up and block snakemake
    out_file, err_file = tmp_path / "snakemake.out", tmp_path / "snakemake.err"
    with out_file.open("w") as fout, err_file.open("w") as ferr, subprocess.Popen(
        cmd, cwd=REPO, stdout=fout, stderr=ferr, text=True
    ) as proc:
        try:
            # wait for a checkpoint at step >= 4 of the running job, then requeue that job
            deadline, step, jobid = time.monotonic() + 300, None, None
            while time.monotonic() < deadline and proc.poll() is None:
                jobid = jobid or _running_job(prefix, "train_stage")
                step = _checkpoint_step(ckpt) if jobid else None
                if step is not None and step >= 4:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"no checkpoint at step >= 4 (job {jobid}, step {step})")
            assert step < p.max_steps - 10, f"training too fast to interrupt: step {step}"
            subprocess.run(["scontrol", "requeue", jobid], check=True, timeout=30)
            requeued_at = time.time()
            proc.wait(timeout=TIMEOUT + 30)
        except (AssertionError, subprocess.SubprocessError) as e:
            proc.kill()
            proc.wait()
            out, err = out_file.read_text(), err_file.read_text()
            _remove_kept_logs(_submissions(out + err))
            pytest.fail(f"{e}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-4000:]}")
    out, err = out_file.read_text(), err_file.read_text()
    jobs = _submissions(out + err)
    try:
        _fail_with_logs(subprocess.CompletedProcess(cmd, proc.returncode, out, err), results)

        # only the forced stage and its evaluation were submitted; the stage once (requeue keeps
        # the job id, Snakemake did not resubmit)
        assert sorted(jobs.values()) == ["evaluate", "train_stage"], jobs
        assert jobs[jobid] == "train_stage"
        states = [r["State"] for r in _sacct([jobid], duplicates=True)]
        assert states == ["REQUEUED", "COMPLETED"], states

        # the requeued run resumed from a checkpoint at or after the one we saw, not from 0
        text = train_log.read_text(errors="replace")
        resumed = [(int(a), int(b)) for a, b in RESUMING.findall(text)]
        assert len(resumed) == 1, text[-3000:]
        (resume_step, total), = resumed
        assert total == p.max_steps
        assert step <= resume_step < p.max_steps, (step, resume_step)
        assert train_log.stat().st_mtime > requeued_at  # written by the second run

        # the stage trained exactly max_steps steps in total, each once, then cleaned up
        stage = results / "stages" / p.stage_hash
        rows = _log_rows(stage / "train_log.csv")
        assert [int(r["step"]) for r in rows] == list(range(1, p.max_steps + 1))
        assert _read_json(stage / "stage.json")["steps"] == p.max_steps
        assert not ckpt.parent.exists()
        # and the evaluation of the retrained stage ran afterwards
        assert (results / "runs" / p.run / "metrics.json").stat().st_mtime > requeued_at
        assert (stage / "stage.json").stat().st_mtime > started
    finally:
        _remove_kept_logs(jobs)
