# Data: every dataset normalised to one schema; the tokenizer trained on (or adapted to) it.


# A URL list (source urls:<path>) is fetched by the download rule; every other source by the
# dataset rule. The two rules share the output pattern, so each is restricted to its datasets.
URL_DATASETS = [d for d in DATASETS if config["datasets"][d]["source"].startswith("urls:")]


def _only(names):
    return "|".join(names) if names else "(?!)"  # (?!) matches no name


rule dataset:
    output:
        directory(f"{R}/data/{{dataset}}"),
    wildcard_constraints:
        dataset=_only([d for d in DATASETS if d not in URL_DATASETS]),
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


# The work dir keeps the fetched shards (it is no output, so Snakemake leaves it when the job
# fails): a rerun fetches only the unfinished ones. The output is written atomically.
rule download:
    output:
        directory(f"{R}/data/{{dataset}}"),
    wildcard_constraints:
        dataset=_only(URL_DATASETS),
    params:
        p=lambda w: params_json(spec=config["datasets"][w.dataset], seed=config["seed"]),
        work=lambda w: f"{R}/downloads/{w.dataset}",
    log:
        f"{R}/logs/download/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/download/{{dataset}}.tsv"
    shell:
        "{sys.executable} -m vlalign.data.download --name {wildcards.dataset} --params {params.p:q}"
        " --work {params.work:q} --out {output} > {log} 2>&1"


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
