# Backbones: tiny SigLIP / Qwen2 pre-trained on the world, or pre-trained checkpoints fetched by id.


def backbone_inputs(wildcards):
    spec = config[wildcards.kind]
    if spec["source"] != "tiny":
        return {}
    if wildcards.kind == "vision":
        return {"data": [data_dir(d) for d in spec["pretrain"]["datasets"]]}
    return {
        "data": [data_dir(d) for d in spec["pretrain"]["datasets"]],
        "tokenizer": f"{R}/tokenizer",
    }


def backbone_args(wildcards, input):
    args = ""
    if "data" in input.keys():
        args += " --data " + " ".join(input.data)
    if "tokenizer" in input.keys():
        args += f" --tokenizer {input.tokenizer}"
    return args


rule backbone:
    input:
        unpack(backbone_inputs),
    output:
        directory(f"{R}/backbones/{{kind}}"),
    # pre-training is on the critical path of the DAG: two intra-op threads make it 1.8x faster
    # (a profile's set-threads overrides this)
    threads: 2
    params:
        p=lambda w: params_json(
            **{w.kind: config[w.kind]}, world=config["world"], seed=config["seed"]
        ),
        args=backbone_args,
    log:
        f"{R}/logs/backbone/{{kind}}.log",
    benchmark:
        f"{R}/benchmarks/backbone/{{kind}}.tsv"
    shell:
        "{VLALIGN} backbone {wildcards.kind} --params {params.p:q}{params.args} --out {output} > {log} 2>&1"
