# Config validation, shared paths and input functions.
import json
import re
import sys
from pathlib import Path

from vlalign.runs.record import before_peft, rank_datasets

from vlalign.config import validate_config

# The package's schema (vlalign/schemas/config.schema.yaml), the world's own checks and the
# cross-references: what `vlalign plan` runs too. Stage settings are checked by plan() (train.smk).
validate_config(config, source="config")

R = config["results_dir"]
# The interpreter running Snakemake also runs the jobs (same venv locally, on SLURM nodes too).
VLALIGN = f"{sys.executable} -m vlalign"
DATASETS = sorted(config["datasets"])


wildcard_constraints:
    dataset="|".join(re.escape(d) for d in DATASETS),  # recaptioned: <d>+recap-<n>
    kind="vision|lm",


def params_json(**kwargs):
    """The part of the config a rule depends on, as one JSON argument (params-change trigger)."""
    return json.dumps(kwargs, sort_keys=True)


def data_dir(name):
    return f"{R}/data/{name}"


def rank_outputs():
    """The reference rank curves (vlalign.runs.record decides which exist)."""
    return [
        *[f"{R}/runs/_reference_lm/{d}/{f}" for d in rank_datasets(RUNS)
          for f in ("rank_curve.json", "text_loss.json")],
        *[f"{R}/runs/{run}/before_peft/{d}/rank_curve.json" for run, d in before_peft(RUNS, STAGES)],
    ]


def all_run_outputs():
    """Everything the aggregate rule ingests."""
    return [
        *[f"{R}/runs/{run}/metrics.json" for run in RUNS],
        *[f"{R}/runs/{run}/run.json" for run in RUNS],
        *rank_outputs(),
    ]


def final_outputs():
    return [
        *[data_dir(d) for d in DATASETS],
        f"{R}/tokenizer",
        f"{R}/backbones/vision",
        f"{R}/backbones/lm",
        f"{R}/results.duckdb",
        *[f"{R}/tables/{name}.{ext}" for name in TABLE_NAMES for ext in ("tex", "csv", "md")],
        *[f"{R}/claims/claims.{ext}" for ext in ("md", "tex", "csv", "png")],
        f"{R}/plots",
    ]
