"""Reusable helpers for tests that run Snakemake on a real single-node SLURM.

The cluster is the one `scripts/slurm_local.sh` sets up (SLURM + slurmdbd accounting, partitions
`cpu` and `gpu`, fake count-only GPUs). Use it from a test module with::

    from slurm_fixture import slurm_cluster  # noqa: F401  (registers the fixture)

    @pytest.mark.slurm
    def test_x(slurm_cluster, tmp_path):
        profile = slurm_cluster.local_profile(tmp_path / "profile")
        proc = slurm_cluster.run_snakemake(tmp_path, profile, ["all"], timeout=300)
        slurm_cluster.assert_ok(proc, tmp_path)

`local_profile` derives a profile from the real `slurm/` profile that fits this small node (the
real one asks for 8 CPUs and 64 GB per GPU job), so the structure under test - executor,
partitions, GPU requests, requeue, retries - is the one users run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "slurm"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def _script(cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), cmd], capture_output=True, text=True, timeout=timeout
    )


def _node_facts() -> dict[str, Any]:
    """CPUs, memory and GPU count of the local node, as SLURM sees them."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "node", "localhost"],
        capture_output=True, text=True, check=True,
    ).stdout
    cpus = int(re.search(r"\bCPUTot=(\d+)", out).group(1))
    mem = int(re.search(r"\bRealMemory=(\d+)", out).group(1))
    gpu = re.search(r"\bGres=gpu:(?:[\w.]+:)?(\d+)", out)
    parts = subprocess.run(
        ["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True
    ).stdout.split()
    return {"cpus": cpus, "mem_mb": mem, "gpus": int(gpu.group(1)) if gpu else 0,
            "partitions": parts}


@dataclass(frozen=True)
class SlurmCluster:
    """The running local cluster and helpers to drive Snakemake against it."""

    cpus: int
    mem_mb: int
    gpus: int
    partitions: tuple[str, ...]
    started_here: bool

    def local_profile(
        self,
        dest: Path,
        base: Path = PROFILE,
        mem_mb_cap: int = 2000,
        overrides: dict[str, Any] | None = None,
        set_resources: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write `dest/config.yaml`: `base/config.yaml` with resources clamped to this node.

        CPUs per job -> 1 (so jobs run side by side on 2 cores), memory -> `mem_mb_cap`, GPUs ->
        at most the node's fake GPUs, partitions unknown here -> "" (the default partition),
        account -> "" (guessed), first status check after 2 s. `overrides` replace top-level
        keys; `set_resources` ({rule: {resource: value}}) is merged into set-resources after
        clamping. Returns `dest`, to pass as `--profile`.
        """
        cfg = yaml.safe_load((base / "config.yaml").read_text())
        groups = [cfg.get("default-resources") or {}]
        groups += list((cfg.get("set-resources") or {}).values())
        for res in groups:
            for key in ("cpus_per_gpu", "cpus_per_task"):
                if key in res:
                    res[key] = 1
            if "mem_mb" in res:
                res["mem_mb"] = min(int(res["mem_mb"]), mem_mb_cap)
            if res.get("slurm_partition") and res["slurm_partition"] not in self.partitions:
                res["slurm_partition"] = ""
            if "slurm_account" in res:
                res["slurm_account"] = ""
            if "gpu" in res:
                if self.gpus == 0:
                    for key in ("gpu", "gpu_model", "cpus_per_gpu", "gres"):
                        res.pop(key, None)
                else:
                    res["gpu"] = min(int(res["gpu"]), self.gpus)
                    res["gpu_model"] = ""  # the fake GPUs have no model
        for rule, res in (set_resources or {}).items():
            cfg.setdefault("set-resources", {}).setdefault(rule, {}).update(res)
        cfg["slurm-init-seconds-before-status-checks"] = 2
        cfg["latency-wait"] = 5
        cfg.update(overrides or {})
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return dest

    def snakemake_cmd(
        self, profile: Path, targets: Sequence[str] = (), timeout: int = 300,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The snakemake command line, wrapped in `timeout -k` (a lost job must not hang CI)."""
        return ["timeout", "-k", "15", str(timeout), str(SNAKEMAKE),
                "--profile", str(profile), *extra, *targets]

    def run_snakemake(
        self, workdir: Path, profile: Path, targets: Sequence[str] = (), timeout: int = 300,
        extra: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.snakemake_cmd(profile, targets, timeout, extra),
            cwd=workdir, capture_output=True, text=True, timeout=timeout + 30,
        )

    def assert_ok(self, proc: subprocess.CompletedProcess[str], workdir: Path) -> None:
        """Fail with snakemake's output and every SLURM job log if the run failed."""
        if proc.returncode == 0:
            return
        logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
        text = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
        hint = " (timed out)" if proc.returncode in (124, 137) else ""
        pytest.fail(
            f"snakemake exited {proc.returncode}{hint}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}\n{text}"
        )

    def sacct(self, jobid: int | str, fields: Sequence[str] = ("JobID", "State", "Partition"),
              duplicates: bool = False) -> list[dict[str, str]]:
        """Accounting records of one job (with `duplicates`: every run of a requeued job)."""
        cmd = ["sacct", "-X", "-n", "-P", "-j", str(jobid), "-o", ",".join(fields)]
        if duplicates:
            cmd.append("--duplicates")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "the local SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "needs root to install SLURM and run its daemons (scripts/slurm_local.sh)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Install (if needed) and start the local cluster; stop it afterwards if we started it.

    Daemons are stopped by the PIDs the script recorded, never by name. A cluster that was
    already running before the session (e.g. started by hand) is left running.
    """
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    inst = _script("install")
    if inst.returncode != 0:
        pytest.skip(f"could not install SLURM packages (no package registry?):\n{inst.stderr}")
    was_running = _script("status", timeout=60).returncode == 0
    start = _script("start", timeout=300)
    if start.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh start failed:\n{start.stdout}\n{start.stderr}")
    facts = _node_facts()
    try:
        yield SlurmCluster(
            cpus=facts["cpus"], mem_mb=facts["mem_mb"], gpus=facts["gpus"],
            partitions=tuple(facts["partitions"]), started_here=not was_running,
        )
    finally:
        if not was_running:
            _script("stop", timeout=120)
