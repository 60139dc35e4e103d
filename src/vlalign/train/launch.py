"""The command a ``train_stage`` job runs: ``vlalign train`` (which re-executes itself under
``accelerate launch --multi_gpu`` when it sees several GPUs), or, when the profile names an
accelerate config (resource ``accelerate_config``, e.g. ``slurm/accelerate/fsdp.yaml``),
``accelerate launch`` with that config.

Why not ``vlalign train``'s own re-exec for a config: it passes ``--multi_gpu``, and accelerate
reads ``distributed_type`` from a config file only when no launch mode is given on the command
line, so an FSDP config would silently run as DDP (``tests/test_multiprocess.py`` checks both).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

# one process per GPU SLURM granted on the node; 1 outside SLURM
NUM_PROCESSES = "${SLURM_GPUS_ON_NODE:-1}"


def train_command(accelerate_config: str | None, python: str = sys.executable) -> str:
    """The shell command (without ``train``'s own arguments) of one stage's trainer."""
    if not accelerate_config:
        return f"{shlex.quote(python)} -m vlalign train"
    if not Path(accelerate_config).is_file():
        raise FileNotFoundError(
            f"resource accelerate_config: no accelerate config file {accelerate_config!r} "
            "(relative paths are from the directory snakemake runs in)"
        )
    return (
        f"{shlex.quote(python)} -m accelerate.commands.launch"
        f" --config_file {shlex.quote(str(accelerate_config))}"
        f" --num_processes {NUM_PROCESSES} -m vlalign train --launch here"
    )
