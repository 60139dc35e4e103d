# Evaluation: every run's last stage → predictions, metrics.json, rank curve, run.json.
# The run record (run.json's fields) and which extra rank curves exist: vlalign.runs.record.
from vlalign.runs.plan import run_eval_settings
from vlalign.runs.record import evaluate_params


wildcard_constraints:
    run="|".join(RUNS) or "NO_RUNS",


def caption_references(run):
    """The tokenized references of each dataset a run's captions are scored on."""
    ev = run_eval_settings(config, RUNS[run].spec)
    if ev["task"] not in ("caption", "both"):
        return []
    return [f"{R}/references/{d}/{ev['split']}.json" for d in RUNS[run].eval_datasets]


# A split's reference captions, PTB-tokenized once for every run scored against them.
rule references:
    input:
        data_dir("{dataset}"),
    output:
        f"{R}/references/{{dataset}}/{{split}}.json",
    wildcard_constraints:
        split="train|val|test",
    log:
        f"{R}/logs/references/{{dataset}}_{{split}}.log",
    benchmark:
        f"{R}/benchmarks/references/{{dataset}}_{{split}}.tsv"
    shell:
        "{VLALIGN} references --data {input} --split {wildcards.split} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        stage=lambda w: stage_dir(RUNS[w.run].stages[-1]),
        data=lambda w: [data_dir(d) for d in RUNS[w.run].eval_datasets],
        references=lambda w: caption_references(w.run),
        tokenizer=f"{R}/tokenizer",
        vision=f"{R}/backbones/vision",
    output:
        metrics=f"{R}/runs/{{run}}/metrics.json",
        predictions=f"{R}/runs/{{run}}/predictions.jsonl",
        rank=f"{R}/runs/{{run}}/rank_curve.json",
        info=f"{R}/runs/{{run}}/run.json",
    params:
        p=lambda w: params_json(**evaluate_params(config, RUNS[w.run], STAGES, stage_dir)),
        out_dir=lambda w: f"{R}/runs/{w.run}",
    log:
        f"{R}/logs/evaluate/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{run}}.tsv"
    shell:
        "{VLALIGN} evaluate --params {params.p:q} --stage {input.stage} --data {input.data}"
        " --tokenizer {input.tokenizer} --vision {input.vision} --out-dir {params.out_dir}"
        " --references {input.references} > {log} 2>&1"


rule reference_rank:
    input:
        lm=f"{R}/backbones/lm",
        data=data_dir("{dataset}"),
        tokenizer=f"{R}/tokenizer",
    output:
        rank=f"{R}/runs/_reference_lm/{{dataset}}/rank_curve.json",
        # its cross-entropy on AI-generated vs human text of the same images (seed 002 Fig. 5a)
        text_loss=f"{R}/runs/_reference_lm/{{dataset}}/text_loss.json",
    params:
        p=lambda w: params_json(eval=config["eval"]),
    log:
        f"{R}/logs/reference_rank/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/reference_rank/{{dataset}}.tsv"
    shell:
        "{VLALIGN} reference-rank --params {params.p:q} --lm {input.lm} --data {input.data}"
        " --dataset {wildcards.dataset} --tokenizer {input.tokenizer} --out {output.rank}"
        " --text-loss-out {output.text_loss} > {log} 2>&1"


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
