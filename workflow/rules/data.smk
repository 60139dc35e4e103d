# Data: every dataset normalised to one schema; the tokenizer trained on (or adapted to) it.


rule dataset:
    output:
        directory(f"{R}/data/{{dataset}}"),
    params:
        p=lambda w: params_json(
            spec=config["datasets"][w.dataset], world=config["world"], seed=config["seed"]
        ),
    log:
        f"{R}/logs/dataset/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/dataset/{{dataset}}.tsv"
    shell:
        "{VLALIGN} dataset --name {wildcards.dataset} --params {params.p:q} --out {output} > {log} 2>&1"


def tokenizer_inputs(wildcards):
    if config["tokenizer"]["source"] == "train":
        return [data_dir(d) for d in config["tokenizer"]["corpus"]]
    return []


rule tokenizer:
    input:
        tokenizer_inputs,
    output:
        directory(f"{R}/tokenizer"),
    params:
        p=lambda w: params_json(tokenizer=config["tokenizer"], lm_source=config["lm"]["source"]),
    log:
        f"{R}/logs/tokenizer.log",
    benchmark:
        f"{R}/benchmarks/tokenizer.tsv"
    shell:
        "{VLALIGN} tokenizer --params {params.p:q} --data {input} --out {output} > {log} 2>&1"
