# Training: the frozen-feature cache and one job per content-hashed stage (shared prefixes of
# run chains are trained once).
from vlalign.runs.plan import plan, run_eval_settings
from vlalign.train.launch import train_command

STAGES, RUNS = plan(config)
FEATURE_DATASET = {n.feature_key: n.dataset for n in STAGES.values() if n.feature_key}


wildcard_constraints:
    hash="[0-9a-f]{12}",
    fkey="[0-9a-f]{12}",


def stage_dir(h):
    return f"{R}/stages/{h}"


rule features:
    input:
        vision=f"{R}/backbones/vision",
        data=lambda w: data_dir(FEATURE_DATASET[w.fkey]),
    output:
        directory(f"{R}/features/{{fkey}}"),
    params:
        p=lambda w: params_json(features=config["features"]),
    log:
        f"{R}/logs/features/{{fkey}}.log",
    benchmark:
        f"{R}/benchmarks/features/{{fkey}}.tsv"
    shell:
        "{VLALIGN} features --params {params.p:q} --vision {input.vision} --data {input.data}"
        " --out {output} > {log} 2>&1"


def stage_inputs(wildcards):
    node = STAGES[wildcards.hash]
    inputs = {
        "tokenizer": f"{R}/tokenizer",
        "vision": f"{R}/backbones/vision",
        "lm": f"{R}/backbones/lm",
        "data": data_dir(node.dataset),
    }
    if node.parent:
        inputs["parent"] = stage_dir(node.parent)
    if node.feature_key:
        inputs["features"] = f"{R}/features/{node.feature_key}"
    return inputs


def stage_params(wildcards):
    node = STAGES[wildcards.hash]
    return params_json(
        settings=node.settings, name=node.name, hash=node.hash, seed=node.seed,
        model=node.model,
    )


def optional_args(wildcards, input):
    args = ""
    for key in ("parent", "features"):
        if key in input.keys():
            args += f" --{key} {input[key]}"
    return args


def train_launch(wildcards, resources):
    """`vlalign train`, or `accelerate launch` with the accelerate config the profile names
    (resource `accelerate_config`, e.g. slurm/accelerate/fsdp.yaml): vlalign.train.launch."""
    config_file = str(getattr(resources, "accelerate_config", "") or "")
    return train_command(config_file) if config_file else f"{VLALIGN} train"


rule train_stage:
    input:
        unpack(stage_inputs),
    output:
        directory(f"{R}/stages/{{hash}}"),
    params:
        p=stage_params,
        args=optional_args,
        # Not an output: Snakemake deletes outputs of failed jobs, the checkpoint must survive.
        ckpt=lambda w: f"{R}/checkpoints/{w.hash}",
        launch=train_launch,
    log:
        f"{R}/logs/train_stage/{{hash}}.log",
    benchmark:
        f"{R}/benchmarks/train_stage/{{hash}}.tsv"
    # exec: the trainer replaces the job's bash, which would die of SLURM's SIGTERM (preemption,
    # --signal) and make Snakemake fail the job while the trainer still writes its checkpoint.
    shell:
        "exec {params.launch} --params {params.p:q} --out {output} --checkpoint-dir {params.ckpt}"
        " --tokenizer {input.tokenizer} --vision {input.vision} --lm {input.lm}"
        " --data {input.data}{params.args} > {log} 2>&1"
