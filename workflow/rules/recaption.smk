# Recaptioning (issue 15; seed 002 §4.6): recaptions.<name> → dataset <dataset>+recap-<name>,
# captioned in `shards` resumable jobs, then merged. Entries, content keys and captioners:
# vlalign.data.recaption (validate_config has added each output to `datasets`).
import re

from vlalign.data.recaption import captioner_instance, resolve_recaptions

RECAPTIONS = {s.output: s for s in resolve_recaptions(config)}


def recaption_root(out):
    """The entry's directory, keyed by content: a changed captioner or prompt starts afresh."""
    spec = RECAPTIONS[out]
    return f"{R}/recaptions/{spec.name}-{config['datasets'][out]['recaption_key']}"


def parts_dir(out):
    """Its batches' parts: one grid per batch size, shared by every shard count."""
    return f"{recaption_root(out)}/bs{RECAPTIONS[out].batch_size}"


def shard_done(out, shard):
    return f"{recaption_root(out)}/of{RECAPTIONS[out].shards}/shard-{shard}.done"


def recaption_quality_inputs():
    """The recaptioned datasets: the aggregate rule ingests their recaption_quality.json."""
    return [data_dir(out) for out in RECAPTIONS]


def recaption_spec(w):
    return next(s for s in RECAPTIONS.values() if s.name == w.rname)


def recaption_output(w):
    return recaption_spec(w).output


def recaption_shard_inputs(w):
    spec = recaption_spec(w)
    inputs = {"data": data_dir(spec.dataset)}
    run = captioner_instance(config, spec)
    if run is not None:
        if run not in RUNS:
            raise ValueError(f"recaptions.{spec.name}.captioner: no run instance {run!r}")
        inputs |= {"stage": stage_dir(RUNS[run].stages[-1]), "tokenizer": f"{R}/tokenizer",
                   "vision": f"{R}/backbones/vision"}
    return inputs


def recaption_shard_params(w):
    spec = recaption_spec(w)
    run = captioner_instance(config, spec)
    text = STAGES[RUNS[run].stages[-1]].settings if run is not None else None
    return params_json(
        captioner=spec.captioner_text, prompt=spec.prompt, num_beams=spec.num_beams,
        max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, shards=spec.shards,
        text_settings=text,
    )


def recaption_captioner_args(w, input):
    return "".join(f" --{k} {input[k]}" for k in ("stage", "tokenizer", "vision")
                   if k in input.keys())


wildcard_constraints:
    rname="[A-Za-z0-9_-]+",
    rkey="[0-9a-f]{12}",
    shard="[0-9]+",
    nshards="[0-9]+",
    rdataset="|".join(re.escape(d) for d in RECAPTIONS) or "NO_RECAPTIONS",


# A killed shard resumes: its parts (bs<batch size>/part-*.json, each atomic) are not outputs,
# which Snakemake would delete; the .done marker is written last.
rule recaption_shard:
    input:
        unpack(recaption_shard_inputs),
    output:
        f"{R}/recaptions/{{rname}}-{{rkey}}/of{{nshards}}/shard-{{shard}}.done",
    params:
        p=recaption_shard_params,
        args=recaption_captioner_args,
        parts=lambda w: parts_dir(recaption_output(w)),
    log:
        f"{R}/logs/recaption_shard/{{rname}}-{{rkey}}/of{{nshards}}/{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/recaption_shard/{{rname}}-{{rkey}}/of{{nshards}}/{{shard}}.tsv"
    shell:
        "exec {VLALIGN} recaption-shard --params {params.p:q} --data {input.data}"
        " --shard {wildcards.shard} --parts-dir {params.parts} --done {output}"
        "{params.args} > {log} 2>&1"


rule recaption_merge:
    input:
        data=lambda w: data_dir(RECAPTIONS[w.rdataset].dataset),
        shards=lambda w: [shard_done(w.rdataset, i) for i in range(RECAPTIONS[w.rdataset].shards)],
    output:
        directory(f"{R}/data/{{rdataset}}"),
    params:
        # the key: a changed captioner or prompt re-merges (and the shards are new ones)
        p=lambda w: params_json(
            name=RECAPTIONS[w.rdataset].name, output=w.rdataset,
            dataset=RECAPTIONS[w.rdataset].dataset,
            captioner=RECAPTIONS[w.rdataset].captioner_text,
            prompt=RECAPTIONS[w.rdataset].prompt, num_beams=RECAPTIONS[w.rdataset].num_beams,
            max_new_tokens=RECAPTIONS[w.rdataset].max_new_tokens,
            key=config["datasets"][w.rdataset]["recaption_key"],
        ),
        parts=lambda w: parts_dir(w.rdataset),
    log:
        f"{R}/logs/recaption_merge/{{rdataset}}.log",
    benchmark:
        f"{R}/benchmarks/recaption_merge/{{rdataset}}.tsv"
    shell:
        "{VLALIGN} recaption-merge --params {params.p:q} --data {input.data}"
        " --parts-dir {params.parts} --out {output} > {log} 2>&1"


# `dataset` builds <data>/<name> of a `datasets:` entry; a recaptioned one is merged.
ruleorder: recaption_merge > dataset
