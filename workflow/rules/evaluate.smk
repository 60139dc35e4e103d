# Evaluation: every run's last stage → predictions, metrics.json, rank curve, run.json.


wildcard_constraints:
    run="|".join(RUNS) or "NO_RUNS",


def run_params(wildcards):
    node = RUNS[wildcards.run]
    chain = [
        {"stage": STAGES[h].name, "hash": h, "dir": stage_dir(h)} for h in node.stages
    ]
    last = STAGES[node.stages[-1]]
    resolved = {
        "run": node.spec,
        "stages": [STAGES[h].settings for h in node.stages],
        **{k: config[k] for k in ("model", "vision", "lm", "tokenizer", "eval")},
    }
    if last.settings.get("peft"):  # tables select PEFT runs by the presence of $.peft
        resolved["peft"] = peft_summary([STAGES[h].settings for h in node.stages])
    return params_json(
        eval=run_eval_settings(config, node.spec), run=node.name, datasets=node.eval_datasets,
        chain=chain,
        config=resolved, recipe=config["recipe"], seed=node.seed,
    )


def peft_summary(chain_settings):
    """PEFT of a run: the methods in order of first use and the prefix length (tables and
    plots query ``$.peft.prefix_length`` / ``$.peft.order``)."""
    order, blocks = [], {}
    for settings in chain_settings:
        for name, cfg in (settings.get("peft") or {}).items():
            if name not in blocks:
                order.append(name)
                blocks[name] = dict(cfg)
    out = {"order": "+".join(order), "methods": order, **blocks}
    if "prefix" in blocks:
        out["prefix_length"] = blocks["prefix"].get("num_prefix", 16)
    return out


rule evaluate:
    input:
        stage=lambda w: stage_dir(RUNS[w.run].stages[-1]),
        data=lambda w: [data_dir(d) for d in RUNS[w.run].eval_datasets],
        tokenizer=f"{R}/tokenizer",
        vision=f"{R}/backbones/vision",
    output:
        metrics=f"{R}/runs/{{run}}/metrics.json",
        predictions=f"{R}/runs/{{run}}/predictions.jsonl",
        rank=f"{R}/runs/{{run}}/rank_curve.json",
        info=f"{R}/runs/{{run}}/run.json",
    params:
        p=run_params,
        out_dir=lambda w: f"{R}/runs/{w.run}",
    log:
        f"{R}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{run}}.tsv"
    shell:
        "{VLALIGN} evaluate --params {params.p:q} --stage {input.stage} --data {input.data}"
        " --tokenizer {input.tokenizer} --vision {input.vision} --out-dir {params.out_dir}"
        " > {log} 2>&1"


def rank_datasets():
    """Every dataset a run is evaluated on: each gets the pre-trained LM's reference curve."""
    return sorted({d for r in RUNS.values() for d in r.eval_datasets})


def before_peft():
    """``(run, dataset)`` pairs: a run whose last stage is the one a PEFT run starts from (the
    model before PEFT, e.g. ``align4_s0``), on a dataset that PEFT run is evaluated on but the
    run itself is not (there its own evaluation already is that row)."""
    by_last = {tuple(r.stages): r.name for r in RUNS.values()}
    pairs = set()
    for r in RUNS.values():
        first = next((i for i, h in enumerate(r.stages) if STAGES[h].settings.get("peft")), None)
        parent = by_last.get(tuple(r.stages[:first])) if first else None
        if parent is not None:
            pairs |= {(parent, d) for d in r.eval_datasets if d not in RUNS[parent].eval_datasets}
    return sorted(pairs)


def rank_outputs():
    return [
        *[f"{R}/runs/_reference_lm/{d}/rank_curve.json" for d in rank_datasets()],
        *[f"{R}/runs/{run}/before_peft/{d}/rank_curve.json" for run, d in before_peft()],
    ]


rule reference_rank:
    input:
        lm=f"{R}/backbones/lm",
        data=data_dir("{dataset}"),
        tokenizer=f"{R}/tokenizer",
    output:
        f"{R}/runs/_reference_lm/{{dataset}}/rank_curve.json",
    params:
        p=lambda w: params_json(eval=config["eval"]),
    log:
        f"{R}/logs/reference_rank/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/reference_rank/{{dataset}}.tsv"
    shell:
        "{VLALIGN} reference-rank --params {params.p:q} --lm {input.lm} --data {input.data}"
        " --dataset {wildcards.dataset} --tokenizer {input.tokenizer} --out {output}"
        " > {log} 2>&1"


# The model before PEFT on its PEFT runs' dataset: the rank curve alone (no generation).
rule rank_before_peft:
    input:
        stage=lambda w: stage_dir(RUNS[w.run].stages[-1]),
        data=data_dir("{dataset}"),
        tokenizer=f"{R}/tokenizer",
        vision=f"{R}/backbones/vision",
    output:
        f"{R}/runs/{{run}}/before_peft/{{dataset}}/rank_curve.json",
    params:
        p=lambda w: params_json(eval=run_eval_settings(config, RUNS[w.run].spec), run=w.run),
    log:
        f"{R}/logs/rank_before_peft/{{run}}/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/rank_before_peft/{{run}}/{{dataset}}.tsv"
    shell:
        "{VLALIGN} rank --params {params.p:q} --stage {input.stage} --data {input.data}"
        " --dataset {wildcards.dataset} --tokenizer {input.tokenizer} --vision {input.vision}"
        " --reference before_peft --out {output} > {log} 2>&1"
