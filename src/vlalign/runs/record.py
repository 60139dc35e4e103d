"""The run record: what a run is (its base run, seed, grid, PEFT order, prefix length, chain),
computed once from the planner's nodes and written as ``runs/<run>/run.json``.

Tables and plots select and group runs by these fields (``runs`` columns in the results
database), never by parsing a run name or reaching into the config JSON. The fields are declared
once, on :class:`RunRecord`: the writer (:func:`write_run_record`), the reader
(:meth:`RunRecord.from_json`) and the database columns (:data:`RECORD_COLUMNS`) all use that list,
so renaming a field renames the column and a table query that still names the old one fails.

Also here: the evaluate rule's parameters and which extra rank curves the DAG computes (the
logic behind ``workflow/rules/evaluate.smk``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlalign.runs.plan import RunNode, StageNode, run_eval_settings

# Version of the run.json format. 1 (no ``record_version`` key): the fields below were not
# written; they are derived from the run name and the config when read (:func:`_legacy_fields`).
RECORD_VERSION = 2
# Config sections every run's resolved config carries (runs.config in the database).
CONFIG_SECTIONS = ("model", "vision", "lm", "tokenizer", "eval")


class RunRecordError(ValueError):
    """A run record is malformed; the message names the file (or source) and key."""


def _field(sql: str, types: tuple[type, ...], nullable: bool = False) -> Any:
    """A record field: its DuckDB column type and the JSON types it accepts."""
    return field(metadata={"sql": sql, "types": types, "nullable": nullable})


@dataclass(frozen=True)
class ChainLink:
    """One stage of a run's chain: its name, content hash and directory."""

    stage: str
    hash: str
    dir: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"stage": self.stage, "hash": self.hash}
        if self.dir is not None:
            out["dir"] = self.dir
        return out


@dataclass(frozen=True)
class RunRecord:
    """A run's identity, one column of ``runs`` per field."""

    run: str = _field("VARCHAR PRIMARY KEY", (str,))  # "<base_run>_s<seed>"
    base_run: str = _field("VARCHAR", (str,))  # the run (or grid cell) in the config
    seed: int | None = _field("INTEGER", (int,), nullable=True)  # None: a v1 file without one
    grid: str | None = _field("VARCHAR", (str,), nullable=True)  # the sweep it is a cell of
    method_order: str | None = _field("VARCHAR", (str,), nullable=True)  # "prefix+lora"
    prefix_length: int | None = _field("INTEGER", (int,), nullable=True)  # None: no prefix
    # run.json: the stages as {stage, hash, dir}; database: the stage names, in order
    chain: tuple[ChainLink, ...] = _field("VARCHAR[]", (list,))

    @property
    def stage_names(self) -> list[str]:
        return [link.stage for link in self.chain]

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["chain"] = [link.to_json() for link in self.chain]
        return out

    def db_row(self) -> dict[str, Any]:
        """The record's columns of the ``runs`` table (keys: :data:`RECORD_COLUMNS`)."""
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["chain"] = self.stage_names
        return row

    @classmethod
    def from_json(cls, obj: Any, source: str | Path) -> RunRecord:
        """Read the record fields of a run.json object (or of the evaluate rule's parameters).

        A run.json without ``record_version`` (written before the record existed) is read with
        the fields derived from its run name and config; a newer version is refused.
        """
        if not isinstance(obj, dict):
            raise RunRecordError(f"{source}: expected a JSON object")
        version = obj.get("record_version", 1)
        if version == 1 and "base_run" not in obj:
            obj = {**obj, **_legacy_fields(obj, source)}
        elif version not in (1, RECORD_VERSION):
            raise RunRecordError(
                f"{source}: record_version is {version!r}, this vlalign reads versions 1 and "
                f"{RECORD_VERSION}"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in obj:
                raise RunRecordError(f"{source}: missing key {f.name!r}")
            value = obj[f.name]
            ok_types = f.metadata["types"]
            if value is None and f.metadata["nullable"]:
                values[f.name] = None
                continue
            # bool is an int subclass: a seed or prefix length of `true` is a mistake
            if isinstance(value, bool) or not isinstance(value, ok_types):
                expected = " or ".join(t.__name__ for t in ok_types)
                raise RunRecordError(
                    f"{source}: key {f.name!r} must be {expected}"
                    f"{' or null' if f.metadata['nullable'] else ''}, got {value!r}"
                )
            values[f.name] = value
        values["chain"] = tuple(_link(link, i, source) for i, link in enumerate(values["chain"]))
        return cls(**values)


# The runs table's record columns and their DuckDB types, in field order.
RECORD_COLUMNS: dict[str, str] = {f.name: f.metadata["sql"] for f in fields(RunRecord)}
RECORD_FIELDS: tuple[str, ...] = tuple(RECORD_COLUMNS)


def _link(obj: Any, i: int, source: str | Path) -> ChainLink:
    where = f"{source}: chain[{i}]"
    if not isinstance(obj, dict):
        raise RunRecordError(f"{where} must be an object with 'stage' and 'hash'")
    for key in ("stage", "hash"):
        if not isinstance(obj.get(key), str):
            raise RunRecordError(f"{where}: key {key!r} must be a string, got {obj.get(key)!r}")
    if obj.get("dir") is not None and not isinstance(obj["dir"], str):
        raise RunRecordError(f"{where}: key 'dir' must be a string")
    return ChainLink(obj["stage"], obj["hash"], obj.get("dir"))


def _legacy_fields(obj: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """The record fields of a version-1 run.json, from what it did write: the run name
    (``<base>_s<seed>``), ``config.run.grid`` and the ``config.peft`` summary."""
    run, seed = obj.get("run"), obj.get("seed")
    if not isinstance(run, str):
        raise RunRecordError(f"{source}: missing key 'run'")
    if seed is None:
        m = re.search(r"_s([0-9]+)$", run)
        seed = int(m.group(1)) if m else None
    suffix = f"_s{seed}"
    base = run.removesuffix(suffix) if seed is not None else run
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    run_cfg = config.get("run") if isinstance(config.get("run"), dict) else {}
    peft = config.get("peft") if isinstance(config.get("peft"), dict) else {}
    return {
        "base_run": base,
        "seed": seed,
        "grid": run_cfg.get("grid"),
        "method_order": peft.get("order"),
        "prefix_length": peft.get("prefix_length"),
        "chain": obj.get("chain", []),
    }


# ---------------------------------------------------------------------------------------------
# from the plan


def default_prefix_length() -> int:
    """The prefix method's own default ``num_prefix`` (imported only when a prefix block omits
    it: the method module pulls in torch, which DAG construction otherwise does not need)."""
    from vlalign.methods.prefix import PrefixMethod

    return int(PrefixMethod.defaults["num_prefix"])


def peft_summary(chain_settings: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The PEFT of a run whose last stage trains PEFT methods: the methods in order of first use
    (``order``: "prefix+lora"), each method's block where it first appears, and the prefix
    length (``num_prefix`` of that first prefix block). None when the last stage has none."""
    if not chain_settings or not chain_settings[-1].get("peft"):
        return None
    order: list[str] = []
    blocks: dict[str, dict[str, Any]] = {}
    for settings in chain_settings:
        for name, cfg in (settings.get("peft") or {}).items():
            if name not in blocks:
                order.append(name)
                blocks[name] = dict(cfg or {})
    out: dict[str, Any] = {"order": "+".join(order), "methods": order, **blocks}
    if "prefix" in blocks:
        length = blocks["prefix"].get("num_prefix")
        out["prefix_length"] = int(default_prefix_length() if length is None else length)
    return out


def build_record(
    node: RunNode, stages: Mapping[str, StageNode], stage_dir: Callable[[str], str]
) -> RunRecord:
    """The record of one planned run; ``stage_dir(hash)`` gives a stage's directory."""
    summary = peft_summary([stages[h].settings for h in node.stages]) or {}
    return RunRecord(
        run=node.name,
        base_run=node.base,
        seed=node.seed,
        grid=node.spec.get("grid"),
        method_order=summary.get("order"),
        prefix_length=summary.get("prefix_length"),
        chain=tuple(ChainLink(stages[h].name, h, stage_dir(h)) for h in node.stages),
    )


def evaluate_params(
    config: Mapping[str, Any],
    node: RunNode,
    stages: Mapping[str, StageNode],
    stage_dir: Callable[[str], str],
) -> dict[str, Any]:
    """Parameters of the evaluate rule: the run record's fields, the run's eval settings and
    datasets, the recipe, and its resolved config (with the ``peft`` summary when it has PEFT)."""
    record = build_record(node, stages, stage_dir)
    chain_settings = [stages[h].settings for h in node.stages]
    resolved: dict[str, Any] = {
        "run": node.spec,
        "stages": chain_settings,
        **{k: config[k] for k in CONFIG_SECTIONS},
        "model": stages[node.stages[0]].model,  # with the run's own model: overrides
    }
    summary = peft_summary(chain_settings)
    if summary is not None:
        resolved["peft"] = summary
    return {
        **record.to_json(),
        "eval": run_eval_settings(dict(config), node.spec),
        "datasets": list(node.eval_datasets),
        "config": resolved,
        "recipe": config["recipe"],
    }


def rank_datasets(runs: Mapping[str, RunNode]) -> list[str]:
    """Every dataset a run is evaluated on: each gets the pre-trained LM's reference curve."""
    return sorted({d for r in runs.values() for d in r.eval_datasets})


def before_peft(
    runs: Mapping[str, RunNode], stages: Mapping[str, StageNode]
) -> list[tuple[str, str]]:
    """``(run, dataset)`` pairs: a run whose chain is what a PEFT run starts from (the model
    before PEFT, e.g. ``align4_s0``), on a dataset that PEFT run is evaluated on but the run
    itself is not (there its own evaluation already is that row)."""
    by_chain = {tuple(r.stages): r.name for r in runs.values()}
    pairs: set[tuple[str, str]] = set()
    for r in runs.values():
        first = next((i for i, h in enumerate(r.stages) if stages[h].resolved.peft), None)
        parent = by_chain.get(tuple(r.stages[:first])) if first else None
        if parent is not None:
            pairs |= {(parent, d) for d in r.eval_datasets if d not in runs[parent].eval_datasets}
    return sorted(pairs)


# ---------------------------------------------------------------------------------------------
# writing run.json


def write_run_record(
    out_dir: str | Path, params: Mapping[str, Any], started: str | None = None
) -> Path:
    """Write ``out_dir/run.json``: the record (from the evaluate rule's ``params``), recipe and
    resolved config, and provenance (git commit, package versions, device, start and end).

    ``started``: ISO time the run began (its first stage); now when unknown.
    """
    from vlalign.io_utils import write_json_atomic
    from vlalign.runs.provenance import device_name, git_commit, package_versions

    if "base_run" not in params:  # not built by evaluate_params: refuse to guess the fields
        raise RunRecordError("evaluate --params: no record fields (base_run, ...); rebuild the DAG")
    record = RunRecord.from_json(dict(params), source="evaluate --params")
    start = started or datetime.now(UTC).isoformat()
    path = Path(out_dir) / "run.json"
    write_json_atomic(
        path,
        {
            "record_version": RECORD_VERSION,
            **record.to_json(),
            "recipe": params.get("recipe"),
            "config": params.get("config", {}),
            "git_commit": git_commit(),
            "packages": package_versions(),
            "start": start,
            "end": datetime.now(UTC).isoformat(),
            "device": device_name(),
        },
    )
    return path
