"""Provenance recorded with every run: git commit, package versions, device."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

PACKAGES = (
    "vlalign",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "snakemake",
    "pycocoevalcap",
    "rouge-score",
    "duckdb",
    "pandas",
)


def git_commit(repo: Path | None = None) -> str:
    """``<sha>`` or ``<sha>-dirty``; "unknown" outside a git checkout.

    Without ``repo``, git finds the checkout that holds this module."""
    repo = repo or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return "cpu"
