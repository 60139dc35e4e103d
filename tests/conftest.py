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
