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


def reference_dataset():
    return config["eval"].get("reference_dataset") or next(
        (r.eval_datasets[0] for r in RUNS.values()), DATASETS[0]
    )


rule reference_rank:
    input:
        lm=f"{R}/backbones/lm",
        data=lambda w: data_dir(reference_dataset()),
        tokenizer=f"{R}/tokenizer",
    output:
        f"{R}/runs/_reference_lm/rank_curve.json",
    params:
        p=lambda w: params_json(eval=config["eval"]),
    log:
        f"{R}/logs/reference_rank.log",
    benchmark:
        f"{R}/benchmarks/reference_rank.tsv"
    shell:
        "{VLALIGN} reference-rank --params {params.p:q} --lm {input.lm} --data {input.data}"
        " --tokenizer {input.tokenizer} --out {output} > {log} 2>&1"
