"""``vlalign`` command line: one small subcommand per Snakemake rule family.

Rules pass exactly the config they depend on as a JSON ``--params`` blob, so Snakemake's
params-change trigger reruns a rule when (and only when) its part of the config changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("vlalign")


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


# ---------------------------------------------------------------------------------- data
def cmd_dataset(args: argparse.Namespace) -> None:
    from vlalign.data.sources import load_source, save_dataset

    p = args.params
    dsd = load_source(args.name, p["spec"], world_cfg=p.get("world"), seed=p.get("seed", 0))
    save_dataset(dsd, args.out)
    log.info("dataset %s: %s", args.name, {k: len(v) for k, v in dsd.items()})


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from datasets import load_from_disk

    from vlalign.data.tokenizer import add_vlm_tokens, corpus_texts, save_tokenizer, train_tokenizer

    p = args.params
    if p["tokenizer"]["source"] == "train":
        texts = (t for path in args.data for t in corpus_texts(load_from_disk(path)))
        tok = train_tokenizer(texts, p["tokenizer"]["vocab_size"])
    else:
        from transformers import AutoTokenizer

        from vlalign.config import parse_source

        _, ident, rev = parse_source(p["lm_source"])
        tok = add_vlm_tokens(
            AutoTokenizer.from_pretrained(ident, **({"revision": rev} if rev else {}))
        )
    save_tokenizer(tok, args.out)
    log.info("tokenizer: %d tokens -> %s", len(tok), args.out)


# ---------------------------------------------------------------------------------- backbones
def cmd_backbone(args: argparse.Namespace) -> None:
    from vlalign.models import backbones as bb
    from vlalign.pretrain.lm import pretrain_lm
    from vlalign.pretrain.vision import pretrain_vision

    p = args.params
    spec = p[args.kind]
    if spec["source"] != "tiny":
        bb.fetch_pretrained(args.kind, spec["source"], args.out)
        return
    from datasets import load_from_disk

    seed = p["seed"]
    if args.kind == "vision":
        from datasets import DatasetDict, concatenate_datasets

        parts = [load_from_disk(d) for d in args.data]
        data = DatasetDict(
            {s: concatenate_datasets([p[s] for p in parts]) for s in ("train", "val")}
        )
        model = bb.build_tiny_vision(spec["config"], seed=seed)
        processor = bb.make_image_processor(model.config.image_size)
        world = p["world"]  # resolved by validate_config: every key has its value
        metrics = pretrain_vision(
            model,
            processor,
            data,
            spec["pretrain"],
            grid=world["grid"],
            max_objects=world["max_objects"],
            seed=seed,
        )
        bb.save_backbone(model, args.out, metrics, extra=[processor])
    else:
        from vlalign.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        model = bb.build_tiny_lm(spec["config"], tok, seed=seed)
        metrics = pretrain_lm(
            model, tok, [load_from_disk(d) for d in args.data], spec["pretrain"], seed=seed
        )
        bb.save_backbone(model, args.out, metrics, extra=[tok])
    log.info(
        "%s backbone -> %s: %s",
        args.kind,
        args.out,
        {k: v for k, v in metrics.items() if k != "vocab"},
    )


# ---------------------------------------------------------------------------------- training
def cmd_features(args: argparse.Namespace) -> None:
    from vlalign.train.features import build_feature_cache

    p = args.params["features"]
    index = build_feature_cache(args.vision, args.data, args.out, p["batch_size"], p["dtype"])
    log.info("features -> %s: %s", args.out, {k: v["shape"] for k, v in index["splits"].items()})


def gpus_to_use() -> int:
    """GPUs this job may use: SLURM / CUDA_VISIBLE_DEVICES already restrict what torch sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cmd_train(args: argparse.Namespace) -> None:
    import os

    n_gpus = gpus_to_use()
    if args.launch == "auto" and n_gpus > 1 and "LOCAL_RANK" not in os.environ:
        # Re-exec under accelerate with one process per granted GPU (single node).
        argv = [
            "accelerate",
            "launch",
            "--num_processes",
            str(n_gpus),
            "--multi_gpu",
            "-m",
            "vlalign",
            *sys.argv[1:],
        ]
        log.info("launching on %d GPUs: %s", n_gpus, " ".join(argv))
        os.execvp(argv[0], argv)

    from vlalign.runs.settings import StageSettings
    from vlalign.train.loop import StagePaths, train_stage

    p = args.params
    # the plan's resolved settings, checked again (a hand-written --params gets the same checks)
    settings = StageSettings.from_dict(p["settings"], where=f"stage {p['name']}")
    paths = StagePaths(
        out=Path(args.out),
        checkpoint_dir=Path(args.checkpoint_dir),
        tokenizer=Path(args.tokenizer),
        vision=Path(args.vision),
        lm=Path(args.lm),
        data=Path(args.data),
        parent=Path(args.parent) if args.parent else None,
        features=Path(args.features) if args.features else None,
        trackers=Path(args.trackers_dir) if args.trackers_dir else None,
    )
    from vlalign.methods.stage import peft_hook  # parent PEFT methods are re-attached, if any

    train_stage(
        settings,
        paths,
        name=p["name"],
        stage_hash=p["hash"],
        seed=p["seed"],
        model_cfg=p.get("model"),  # None: the schema's model: defaults
        peft_hook=peft_hook,
    )


# ---------------------------------------------------------------------------------- evaluation
def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate a run's last stage (:mod:`vlalign.eval.job`); write its run.json."""
    from vlalign.eval.job import EvalJob, evaluate_job, load_stage, run_started
    from vlalign.runs.record import write_run_record

    p = args.params
    job = EvalJob.from_params(
        p, data=args.data, tokenizer=args.tokenizer, vision=args.vision, out_dir=args.out_dir,
        references=args.references,
    )
    evaluate_job(job, load_stage(args.stage))
    write_run_record(job.out_dir, p, run_started(p))
    log.info("evaluated %s -> %s", p["run"], job.out_dir)


def cmd_recaption_shard(args: argparse.Namespace) -> None:
    """Caption one shard of a dataset's rows (:func:`vlalign.data.recaption.run_shard`)."""
    from vlalign.data import recaption as rc

    p = args.params
    for key in ("captioner", "num_beams", "max_new_tokens", "batch_size", "shards"):
        if key not in p:
            raise ValueError(f"recaption-shard --params: missing key {key!r}")
    cap = rc.parse_captioner(p["captioner"], "recaption-shard --params.captioner")
    gen = {"num_beams": p["num_beams"], "max_new_tokens": p["max_new_tokens"]}

    def load() -> rc.CaptionFn:
        if cap.scheme == "run":
            if not (args.stage and args.tokenizer and args.vision):
                raise ValueError("a run: captioner needs --stage, --tokenizer and --vision")
            return rc.run_captioner(args.stage, args.tokenizer, args.vision,
                                    text_settings=p.get("text_settings") or {}, **gen)
        return rc.hf_captioner(cap.ident, revision=cap.revision, prompt=p["prompt"],
                               dtype=p.get("dtype", "auto"), **gen)

    n = rc.run_shard(args.data, args.parts_dir, shards=p["shards"], shard=args.shard,
                     batch_size=p["batch_size"], load_captioner=load, done=args.done)
    log.info("recaption shard %d: %d batches captioned -> %s", args.shard, n, args.parts_dir)


def cmd_recaption_merge(args: argparse.Namespace) -> None:
    """The recaptioned dataset from its shards (:func:`vlalign.data.recaption.merge`)."""
    from vlalign.data.recaption import merge

    q = merge(args.data, args.parts_dir, args.out, info=args.params)
    log.info("recaptioned dataset -> %s (%d quality records)", args.out, len(q["records"]))


def cmd_references(args: argparse.Namespace) -> None:
    """The split's reference captions, PTB-tokenized once for every run evaluated on it."""
    from vlalign.eval.references import References
    from vlalign.eval.runner import caption_references

    References.build(caption_references(args.data, args.split)).save(args.out)
    log.info("references %s/%s -> %s", args.data, args.split, args.out)


def cmd_reference_rank(args: argparse.Namespace) -> None:
    from vlalign.eval.runner import EvalSettings, reference_rank_curve

    ev = EvalSettings.from_params(args.params["eval"])
    reference_rank_curve(
        args.lm,
        args.data,
        args.tokenizer,
        args.out,
        split=ev.split,
        rank_samples=ev.rank_samples,
        batch_size=ev.batch_size,
        dataset=args.dataset,
        text_tokens=ev.rank_text_tokens,
        text_loss_out=args.text_loss_out,
    )


def cmd_rank(args: argparse.Namespace) -> None:
    """The rank curve alone of a run's last stage on one dataset (the model before PEFT on the
    dataset of the PEFT runs that continue it: ``reference: before_peft``)."""
    from vlalign.eval.job import load_stage, rank_stage
    from vlalign.eval.runner import EvalSettings

    p = args.params
    rank_stage(
        load_stage(args.stage),
        args.data,
        args.tokenizer,
        args.vision,
        args.out,
        run=p["run"],
        dataset=args.dataset,
        settings=EvalSettings.from_params(p["eval"]),
        reference=args.reference,
    )


# ---------------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> None:
    """Print every run of a config: its chain of stage hashes and what exists on disk."""
    from vlalign.config import deep_merge, load_yaml, validate_config
    from vlalign.runs.plan import plan

    merged: dict = {}  # several files merge in order, as with snakemake --configfile
    for path in args.configfile:
        merged = deep_merge(merged, load_yaml(path))
    config = validate_config(merged, source=" + ".join(args.configfile))
    stages, runs = plan(config)
    results = Path(config["results_dir"])
    for run in runs.values():
        done = (results / "runs" / run.name / "metrics.json").exists()
        print(
            f"{run.name}  [{'evaluated' if done else 'pending'}]  eval on "
            f"{', '.join(run.eval_datasets)}"
        )
        for h in run.stages:
            node = stages[h]
            state = (
                "done"
                if (results / "stages" / h / "stage.json").exists()
                else ("checkpoint" if (results / "checkpoints" / h / "state.pt").exists() else "-")
            )
            print(f"    {node.name:<24} {results}/stages/{h}  seed {node.seed}  {state}")
    print(f"{len(runs)} runs, {len(stages)} distinct stages")


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlalign", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("dataset", help="build one dataset in the normalised schema")
    s.add_argument("--name", required=True)
    s.add_argument(
        "--params", type=_json, required=True, help='{"spec":..., "world":..., "seed":...}'
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_dataset)

    s = sub.add_parser("tokenizer", help="train the BPE tokenizer (or adapt the LM's)")
    s.add_argument("--params", type=_json, required=True, help='{"tokenizer":..., "lm_source":...}')
    s.add_argument("--data", nargs="*", default=[])
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("backbone", help="pre-train a tiny backbone or fetch a pre-trained one")
    s.add_argument("kind", choices=["vision", "lm"])
    s.add_argument(
        "--params", type=_json, required=True, help='{"vision"|"lm":..., "world":..., "seed":...}'
    )
    s.add_argument("--data", nargs="*", default=[])
    s.add_argument("--tokenizer")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_backbone)

    s = sub.add_parser("features", help="cache frozen vision features of a dataset")
    s.add_argument("--params", type=_json, required=True, help='{"features": {...}}')
    s.add_argument("--vision", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("train", help="train one stage (resumes from its checkpoint dir)")
    s.add_argument(
        "--params",
        type=_json,
        required=True,
        help='{"settings":..., "name":..., "hash":..., "seed":..., "model":...}',
    )
    s.add_argument("--out", required=True)
    s.add_argument("--checkpoint-dir", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--vision", required=True, help="pre-trained vision backbone dir")
    s.add_argument("--lm", required=True, help="pre-trained LM dir")
    s.add_argument("--data", required=True)
    s.add_argument("--parent", help="parent stage dir (omit for a first stage)")
    s.add_argument("--features", help="frozen-feature cache dir")
    s.add_argument(
        "--trackers-dir",
        help="train.log_with's event files (default: <checkpoint dir>/trackers, copied into "
        "the stage dir)",
    )
    s.add_argument(
        "--launch",
        choices=["auto", "here"],
        default="auto",
        help="auto: one process per visible GPU via accelerate launch",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="evaluate a run: predictions, metrics, rank curve")
    s.add_argument(
        "--params",
        type=_json,
        required=True,
        help='{"eval":..., "run":..., "datasets":[...], "chain":..., "config":...}',
    )
    s.add_argument("--stage", required=True, help="the run's last stage dir")
    s.add_argument("--data", nargs="+", required=True, help="one dir per evaluation dataset")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--vision", required=True, help="vision backbone dir (image processor)")
    s.add_argument("--out-dir", required=True)
    s.add_argument(
        "--references",
        nargs="*",
        default=[],
        help="tokenized references, one file per --data dir (from the references command)",
    )
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("recaption-shard", help="caption one shard of a dataset (resumable)")
    s.add_argument("--params", type=_json, required=True,
                   help='{"captioner", "prompt", "num_beams", "max_new_tokens", "batch_size", '
                        '"shards", "text_settings"}')
    s.add_argument("--data", required=True, help="the input dataset dir")
    s.add_argument("--shard", type=int, required=True)
    s.add_argument("--parts-dir", required=True, help="the batches' parts (kept across a kill)")
    s.add_argument("--done", required=True, help="the marker written when the shard is done")
    s.add_argument("--stage", help="run: captioners: the run's last stage dir")
    s.add_argument("--tokenizer")
    s.add_argument("--vision", help="vision backbone dir (image processor)")
    s.set_defaults(func=cmd_recaption_shard)

    s = sub.add_parser("recaption-merge", help="merge recaption shards into the dataset")
    s.add_argument("--params", type=_json, required=True, help="the entry's info (shards, ...)")
    s.add_argument("--data", required=True, help="the input dataset dir")
    s.add_argument("--parts-dir", required=True, help="every shard's parts")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_recaption_merge)

    s = sub.add_parser("references", help="tokenize a split's reference captions once")
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_references)

    s = sub.add_parser("reference-rank", help="rank curve of the pre-trained LM alone")
    s.add_argument("--params", type=_json, required=True, help='{"eval": {...}}')
    s.add_argument("--lm", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--dataset", required=True, help="the data's dataset name")
    s.add_argument("--text-loss-out", help="also its loss on recaptions vs human captions")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_reference_rank)

    s = sub.add_parser("rank", help="rank curve alone of a run's last stage on one dataset")
    s.add_argument("--params", type=_json, required=True, help='{"eval": {...}, "run": ...}')
    s.add_argument("--stage", required=True, help="the run's last stage dir")
    s.add_argument("--data", required=True)
    s.add_argument("--dataset", required=True, help="the data's dataset name")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--vision", required=True, help="vision backbone dir (image processor)")
    s.add_argument("--reference", help="what the curve is a reference for (before_peft)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_rank)

    s = sub.add_parser("plan", help="list runs, their stage hashes and what is done")
    s.add_argument("--configfile", nargs="+", default=["config/config.yaml"])
    s.set_defaults(func=cmd_plan)

    # Listed for --help; main() hands `vlalign results ...` to vlalign.results.main.
    sub.add_parser("results", help='results DB: ingest | tables | plots | query "<SQL>"')
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["results"]:  # its own parser (vlalign.results), help included
        from vlalign.results import main as results_main

        return results_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from vlalign.train.preemption import PREEMPTED_EXIT_CODE, CheckpointLocked, Preempted

    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        log.error("%s", e)
        return 2
    except CheckpointLocked as e:  # another trainer of this stage is alive
        log.error("%s", e)
        return 1
    except Preempted as e:  # checkpointed on SIGTERM / SIGUSR1: a retry resumes from it
        log.warning("%s", e)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
