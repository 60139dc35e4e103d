"""Experiment trackers (``train.log_with``): each stage's per-step log rows through accelerate's
trackers (TensorBoard, Weights & Biases, MLflow), next to ``train_log.csv``.

The events are written while the stage trains, to ``<checkpoint dir>/trackers/`` by default (it
survives a preempted job like the checkpoint; a resumed job appends new event files), and copied
into the stage's output as ``trackers/`` when it finishes (``StagePaths.trackers`` set: written
there and left in place). W&B and MLflow also honour their own settings (``WANDB_MODE``,
``WANDB_DIR``, ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRACKERS_DIR = "trackers"
LOG_WITH = ("tensorboard", "wandb", "mlflow", "all")


def tracker_dir(checkpoint_dir: Path, override: Path | None) -> Path:
    return override if override is not None else checkpoint_dir / TRACKERS_DIR


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested settings as the flat scalars every tracker accepts (``lr.projector``; lists and
    None as JSON text)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def start_trackers(accelerator, name: str, stage_hash: str, seed: int, settings) -> None:
    """``init_trackers`` for the stage (a no-op when ``settings.log_with`` is None)."""
    if settings.log_with is None:
        return
    run_name = f"{name}-{stage_hash}"
    accelerator.init_trackers(
        project_name=name,
        config={"stage": name, "hash": stage_hash, "seed": seed, **flat_config(settings)},
        init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}},
    )


def log_row(accelerator, settings, row: Mapping[str, float]) -> None:
    """One ``train_log.csv`` row (loss, lr, grad_norm, throughput, the methods' loss terms)."""
    if settings.log_with is not None:
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
