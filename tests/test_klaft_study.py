"""KLAFT's study (seed 000) as the configs declare it: the default DAG's runs (full KLAFT from
the projector-aligned model, TCM alone as a PEFT of the frozen aligned model, the Table 4
ablation cells and the low-data grid at one seed), the overlay's seeds on the same cells, each
ablation cell differing from full KLAFT in exactly what it changes, the low-data grid on 0.1 %
and 1 % of the data, and the two study tables on a results tree of KLAFT runs."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from helpers import write_metrics, write_run, write_stage

from vlalign.config import REPO_ROOT, load_config, load_yaml
from vlalign.results.db import ingest
from vlalign.results.tables import load_specs, render_all
from vlalign.runs.plan import plan

DEFAULT = REPO_ROOT / "config" / "config.yaml"
EXTRA = REPO_ROOT / "config" / "recipes" / "klaft_extra.yaml"
TABLES = REPO_ROOT / "config" / "tables"
KLAFT = {"mam", "tcm", "mrm", "itm"}


@pytest.fixture(scope="module")
def extra_plan():
    return plan(load_config(DEFAULT, load_yaml(EXTRA)))


def _last(stages, runs, run: str) -> dict:
    return stages[runs[run].stages[-1]].settings


def test_default_dag_runs_klaft_and_tcm_as_peft() -> None:
    stages, runs = plan(load_config(DEFAULT))
    full = _last(stages, runs, "klaft_s0")
    assert set(full["peft"]) == KLAFT and full["dataset"] == "world_target"
    tcm = full["peft"]["tcm"]
    # seed 000's defaults: K = 10, ω = 0.2, additive shift; every λ of Eq. 9 is 0.1
    assert (tcm["num_topics"], tcm["omega"], tcm["shift"]) == (10, 0.2, "add")
    peft = full["peft"]
    assert tcm["lambda_ttm"] == peft["mrm"]["lambda"] == peft["itm"]["lambda"] == 0.1
    assert full["peft"]["mrm"]["mask_ratio"] == 0.15
    # MaL (the projector) trains with the KLAFT modules; the LM and the encoder stay frozen
    assert full["lr"]["projector"] > 0 and full["lr"]["lm"] == full["lr"]["vision"] == 0
    # Adam as the paper (its β's; rates and steps are not given: docs/klaft.md)
    assert tuple(full["optimizer"]["betas"]) == (0.9, 0.999)
    assert runs["klaft_s0"].stages[:-1] == runs["recap_s0"].stages
    peft = _last(stages, runs, "klaft_tcm_peft_s0")
    assert set(peft["peft"]) == {"tcm"} and peft["lr"]["projector"] == 0  # Table 6: TCM only
    assert runs["klaft_tcm_peft_s0"].stages[:-1] == runs["align4_s0"].stages
    for run in ("klaft", "klaft_tcm_peft"):
        assert f"{run}_s1" in runs and runs[f"{run}_s1"].stages[-1] != runs[f"{run}_s0"].stages[-1]


ABLATIONS = ("klaft_omega0", "klaft_omega04", "klaft_k0", "klaft_k5", "klaft_k20", "klaft_mul",
             "klaft_affine", "klaft_no_mam", "klaft_no_ttm", "klaft_no_mrm", "klaft_no_itm")


def test_default_dag_runs_table4_and_low_data_at_one_seed(extra_plan) -> None:
    """The default DAG holds every cell of both study tables (seed 0: the budget); the overlay
    adds seeds to the same cells and changes nothing else of them."""
    stages, runs = plan(load_config(DEFAULT))
    low = ("klaft_low_data-data_fraction0.001", "klaft_low_data-data_fraction0.01")
    cells = {r for r in runs if r.startswith("klaft_") and runs[r].base not in (
        "klaft", "klaft_tcm_peft")}
    assert cells == {f"{c}_s0" for c in (*ABLATIONS, *low)}
    extra_stages, extra_runs = extra_plan
    for run in cells:
        assert runs[run].stages == extra_runs[run].stages, run  # the same stages, reused
        assert extra_runs[run].spec["eval"] == {**runs[run].spec["eval"], "meteor": True}, run
    assert {f"{c}_s1" for c in ABLATIONS} <= set(extra_runs)
    assert {f"{c}_s3" for c in low} <= set(extra_runs)


def test_ablation_cells_change_exactly_their_factor(extra_plan) -> None:
    stages, runs = extra_plan
    base = _last(stages, runs, "klaft_s0")
    expect = {
        "klaft_omega0": ("tcm", "omega", 0.0), "klaft_omega04": ("tcm", "omega", 0.4),
        "klaft_k5": ("tcm", "num_topics", 5), "klaft_k20": ("tcm", "num_topics", 20),
        "klaft_mul": ("tcm", "shift", "mul"), "klaft_affine": ("tcm", "shift", "affine"),
        "klaft_no_ttm": ("tcm", "lambda_ttm", 0.0),
    }
    for run, (method, key, value) in expect.items():
        cell = _last(stages, runs, f"{run}_s0")
        assert cell["peft"][method][key] == value, run
        changed = {**cell["peft"][method], key: base["peft"][method][key]}
        assert changed == base["peft"][method], run
        assert {m: s for m, s in cell["peft"].items() if m != method} == \
            {m: s for m, s in base["peft"].items() if m != method}, run
    for run, removed in (("klaft_k0", "tcm"), ("klaft_no_mam", "mam"), ("klaft_no_mrm", "mrm"),
                         ("klaft_no_itm", "itm")):
        cell = _last(stages, runs, f"{run}_s0")
        assert set(cell["peft"]) == KLAFT - {removed}, run
    # everything but the methods is the same stage: data, rates, schedule
    assert {*expect, "klaft_k0", "klaft_no_mam", "klaft_no_mrm", "klaft_no_itm"} == set(ABLATIONS)
    for run in ABLATIONS:
        cell = _last(stages, runs, f"{run}_s0")
        assert {k: v for k, v in cell.items() if k != "peft"} == \
            {k: v for k, v in base.items() if k != "peft"}, run
        assert runs[f"{run}_s0"].stages[:-1] == runs["recap_s0"].stages


def test_mal_variants_are_runs_with_their_own_projector(extra_plan, snakemake, tmp_path) -> None:
    """MaL (seed 000 §3.2) selected per run: the overlay's MLP and transformer KLAFT runs build
    their stage0 with that projector (the linear one is `klaft`), share no stage with `klaft`,
    train the same ft_klaft, record the projector, and the train jobs receive it."""
    stages, runs = extra_plan
    base = _last(stages, runs, "klaft_s0")
    assert {stages[h].model["projector"] for h in runs["klaft_s0"].stages} == {"linear"}
    for run, kind in (("klaft_mal_mlp_s0", "mlp2x_gelu"),
                      ("klaft_mal_transformer_s0", "transformer")):
        assert [stages[h].name for h in runs[run].stages] == ["stage0", "stage1", "ft_klaft"]
        assert {stages[h].model["projector"] for h in runs[run].stages} == {kind}
        assert not set(runs[run].stages) & set(runs["klaft_s0"].stages)
        assert _last(stages, runs, run) == base
        for a, b in zip(runs[run].stages, runs["klaft_s0"].stages):
            assert stages[a].settings == stages[b].settings
    proc = snakemake(["-n", "-p", f"{tmp_path}/runs/klaft_mal_transformer_s0/metrics.json",
                      "--configfile", str(DEFAULT), str(EXTRA),
                      "--config", f"results_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    trains = [line for line in proc.stdout.splitlines() if " -m vlalign train " in line]
    assert len(trains) == 3 and all('"projector": "transformer"' in t for t in trains), trains
    evaluate = next(line for line in proc.stdout.splitlines() if " -m vlalign evaluate " in line)
    assert '"model": {"attn_implementation": "sdpa", "projector": "transformer"' in evaluate


def test_low_data_cells_train_on_their_fraction(extra_plan) -> None:
    stages, runs = extra_plan
    cells = {r: _last(stages, runs, r) for r in runs if r.startswith("klaft_low_data-")}
    # the paper's protocol: 4 seeds at 0.1 %, 1 % and 100 % (the klaft run)
    assert sorted(s["data_fraction"] for s in cells.values()) == [0.001] * 4 + [0.01] * 4
    assert len({runs[r].stages[-1] for r in cells}) == 8  # each (fraction, seed) its own stage
    assert {f"klaft_s{s}" for s in range(4)} <= set(runs)
    assert runs["klaft_s3"].spec["eval"] == {"task": "caption", "num_beams": 1, "meteor": True}


def _klaft_results(root, seeds=(0, 1, 2, 3)):
    """A results tree of KLAFT runs: full KLAFT better than w/o TCM on every seed, the
    low-data cells worse than full data."""
    results = root / "results"
    rng = np.random.default_rng(0)
    cider = {("klaft", None): 0.50, ("klaft_k0", None): 0.30, ("klaft_tcm_peft", None): 0.10,
             ("klaft_low_data", 0.001): 0.05, ("klaft_low_data", 0.01): 0.15}
    for seed in seeds:
        for (base, frac), c in cider.items():
            grid = base if frac is not None else None
            run = f"{base}-data_fraction{frac}_s{seed}" if grid else f"{base}_s{seed}"
            h = write_stage(results, "ft_klaft", {"run": run}, rng, 4, 3.0, 0.2)
            config = {"seed": seed, "run": {"study": "klaft", "grid": grid},
                      "stages": [{"name": "ft_klaft", "data_fraction": frac or 1.0}]}
            write_run(results, run, seed, [("ft_klaft", h)], config, grid=grid)
            vals = {"CIDEr": c + 0.01 * rng.standard_normal(), "Bleu_1": 0.6, "r_TCM": 0.2,
                    "grounding_gap": 0.3}
            write_metrics(results, run, "ft_klaft", {"world_target": vals}, [])
    return results


def test_study_tables_render_klaft_rows(tmp_path) -> None:
    results = _klaft_results(tmp_path)
    db = tmp_path / "r.duckdb"
    ingest(results, db)
    specs = {s.name: s for s in load_specs(TABLES)}
    tables = tmp_path / "tables"
    tables.mkdir()
    for name in ("klaft_ablation", "klaft_low_data"):
        assert "'$.run.study') = 'klaft'" in specs[name].query
        (tables / f"{name}.yaml").write_text((TABLES / f"{name}.yaml").read_text())
    render_all(db, tables, tmp_path / "out")
    abl = pd.read_csv(tmp_path / "out" / "klaft_ablation.csv")
    assert list(abl["method"]) == ["klaft", "klaft_k0", "klaft_tcm_peft"]  # Table 4's order
    abl = abl.set_index("method")
    assert abl.loc["klaft", "CIDEr"] == pytest.approx(50, abs=2)
    assert abl.loc["klaft", "grounding_gap"] == pytest.approx(0.3)  # nats, not ×100
    tex = (tmp_path / "out" / "klaft_ablation.tex").read_text()
    assert r"KLAFT ($\omega$ = 0.2, K = 10, AD)" in tex and "K = 0 (no TCM)" in tex
    # w/o TCM: CIDEr 20 points below full KLAFT on 4 paired seeds, significant at p < 0.01
    deltas = [(float(d), float(p)) for d, p in
              re.findall(r"\$\\Delta\$ (-?[\d.]+) \[[^]]*\], p(?:=|\$<\$)([\d.]+)", tex)]
    assert any(abs(d + 20) < 3 and p < 0.01 for d, p in deltas), deltas
    low = pd.read_csv(tmp_path / "out" / "klaft_low_data.csv")
    assert list(low["data"]) == ["0.1 %", "1.0 %", "100 %"]
    assert list(low["CIDEr"]) == pytest.approx([5, 15, 50], abs=2)  # fewer pairs, lower


def test_paper_overlay_dry_runs_klaft_on_coco_after_mal_on_cc(snakemake, tmp_path) -> None:
    """KLAFT on the real backbones (config/recipes/klaft_paper.yaml): MaL on Conceptual
    Captions once, then KLAFT on COCO (KLAFT's splits) at 100 %, 1 % and 0.1 %, 4 seeds each."""
    paper = REPO_ROOT / "config" / "recipes" / "paper.yaml"
    overlay = REPO_ROOT / "config" / "recipes" / "klaft_paper.yaml"
    cfg = load_config(paper, load_yaml(overlay))
    coco = cfg["datasets"]["coco_klaft"]
    assert coco["val_from_train"] == 5000 and "restval" in coco["split_values"]["test"]
    stages, runs = plan(cfg)
    cells = [r for r in runs if r.startswith("klaft_coco")]
    assert len(cells) == 3 * 4
    assert len({runs[r].stages[0] for r in cells}) == 1  # one MaL pre-training on CC
    assert stages[runs[cells[0]].stages[0]].settings["dataset"] == "cc3m"
    assert {stages[runs[r].stages[-1]].settings["data_fraction"] for r in cells} == {
        0.001, 0.01, 1.0}
    results = tmp_path / "paper"
    proc = snakemake(["-n", *(f"{results}/runs/{r}/metrics.json" for r in cells),
                      "--configfile", str(paper), str(overlay),
                      "--config", f"results_dir={results}"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    table = proc.stdout.split("Job stats:", 1)[1]
    assert re.search(r"^download\s+1\s*$", table, re.M), table  # CC from its URL list
    assert re.search(r"^evaluate\s+12\s*$", table, re.M), table
