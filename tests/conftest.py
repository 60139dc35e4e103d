"""Shared fixtures: the repository, the Snakemake CLI of this venv, the tiny pipeline config.

Tests never reach the network: the hub and datasets libraries are put offline for the session
(the environment is set at import time so that subprocesses started by any test inherit it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "tiny.yaml"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs TEST_WORKERS xdist workers (CORES + 1) on the cores: one torch thread
    # each (inherited by the snakemake and training subprocesses), else the workers' thread
    # pools fight for the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# The modules with the longest module fixtures (measured, `--durations`), started first so
# that `--dist loadfile` does not leave one of them for the end on a single worker.
LONGEST_FIRST = (
    "test_slurm_pipeline.py", "test_pipeline_full.py", "test_grounding_alignment.py",
    "test_determinism.py", "test_recaption.py", "test_slurm.py", "test_paper_smoke.py",
    "test_preemption.py",
)


# Modules that must run on the same worker, one after the other: both submit to the one local
# SLURM node (2 CPUs), and test_slurm.py needs its two jobs running side by side.
SAME_WORKER = {"test_slurm.py": "slurm", "test_slurm_pipeline.py": "slurm"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the modules of SAME_WORKER grouped into one unit of work."""
    from xdist.scheduler import LoadFileScheduling

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(Path(scope).name, scope)

    return Scheduler(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def snakemake_bin() -> Path:
    """The ``snakemake`` script installed next to the interpreter running the tests."""
    path = Path(sys.executable).with_name("snakemake")
    if not path.exists():
        pytest.fail(f"snakemake not found next to {sys.executable} (expected {path})")
    return path


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    """A complete pipeline config with tiny sizes (replaces config/config.yaml)."""
    assert TINY_CONFIG.exists(), TINY_CONFIG
    return TINY_CONFIG


def run_snakemake(
    snakemake_bin: Path, args: Sequence[str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI from the repo root (where the Snakefile is); stdout and stderr merged.

    Callers pass ``--config results_dir=<tmp>`` so nothing lands in the repo's ``results/``
    (Snakemake's own metadata still goes to ``<repo>/.snakemake/``, which git ignores).
    """
    return subprocess.run(
        [str(snakemake_bin), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )


@pytest.fixture(scope="session")
def snakemake(snakemake_bin: Path):
    """``snakemake(args, timeout=...)`` → CompletedProcess (see :func:`run_snakemake`)."""

    def _run(args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_snakemake(snakemake_bin, args, timeout)

    return _run
