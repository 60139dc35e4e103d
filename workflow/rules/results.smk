# Results: the only writer of the DuckDB file, then tables and plots from SQL.
from vlalign.config import ConfigError

# Table declarations: the tables_dir key, relative to the workflow's directory (not the cwd).
TABLES_DIR = Path(workflow.basedir) / config["tables_dir"]
if not TABLES_DIR.is_dir():
    raise ConfigError(f"tables_dir: {TABLES_DIR} is not a directory")
TABLE_SPECS = sorted(str(p) for p in TABLES_DIR.glob("*.yaml"))
# a declaration's name must be its file stem (vlalign.results.tables.load_spec checks it)
TABLE_NAMES = [Path(p).stem for p in TABLE_SPECS]


# Claim declarations (docs/results.md#claims), relative to the workflow's directory too.
CLAIMS_DIR = Path(workflow.basedir) / config["claims_dir"]
if not CLAIMS_DIR.is_dir():
    raise ConfigError(f"claims_dir: {CLAIMS_DIR} is not a directory")
CLAIM_SPECS = sorted(str(p) for p in CLAIMS_DIR.glob("*.yaml"))


rule aggregate:
    input:
        all_run_outputs(),
        recaption_quality_inputs(),
    output:
        f"{R}/results.duckdb",
    log:
        f"{R}/logs/aggregate.log",
    benchmark:
        f"{R}/benchmarks/aggregate.tsv"
    shell:
        "{VLALIGN} results ingest --results {R} --db {output} > {log} 2>&1"


rule tables:
    input:
        db=f"{R}/results.duckdb",
        specs=TABLE_SPECS,
    output:
        tex=report(
            expand(f"{R}/tables/{{name}}.tex", name=TABLE_NAMES),
            caption="../report/tables.rst",
            category="Tables",
        ),
        csv=expand(f"{R}/tables/{{name}}.csv", name=TABLE_NAMES),
        md=report(
            expand(f"{R}/tables/{{name}}.md", name=TABLE_NAMES),
            caption="../report/tables.rst",
            category="Tables",
        ),
    log:
        f"{R}/logs/tables.log",
    benchmark:
        f"{R}/benchmarks/tables.tsv"
    shell:
        "{VLALIGN} results tables --db {input.db} --tables-dir {TABLES_DIR:q} --out {R}/tables"
        " > {log} 2>&1"


rule plots:
    input:
        f"{R}/results.duckdb",
    output:
        report(
            directory(f"{R}/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        f"{R}/logs/plots.log",
    benchmark:
        f"{R}/benchmarks/plots.tsv"
    shell:
        "{VLALIGN} results plots --db {input} --out {output} > {log} 2>&1"


rule claims:
    input:
        db=f"{R}/results.duckdb",
        specs=CLAIM_SPECS,
    output:
        md=report(f"{R}/claims/claims.md", caption="../report/claims.rst", category="Claims"),
        tex=f"{R}/claims/claims.tex",
        csv=f"{R}/claims/claims.csv",
        png=report(f"{R}/claims/claims.png", caption="../report/claims.rst", category="Claims"),
    log:
        f"{R}/logs/claims.log",
    benchmark:
        f"{R}/benchmarks/claims.tsv"
    shell:
        "{VLALIGN} results claims --db {input.db} --claims-dir {CLAIMS_DIR:q} --out {R}/claims"
        " > {log} 2>&1"
