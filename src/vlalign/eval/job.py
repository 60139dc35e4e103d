"""One run's evaluation in steps, each callable (and testable) alone: load the run's last stage
once (:func:`load_stage`: model + PEFT session), evaluate one dataset under one inference
variant (:func:`evaluate_dataset`), relabel a variant's records (:func:`variant_records`),
merge records (:func:`merge_metrics`), and the whole job (:func:`evaluate_job`), which writes
the run's ``metrics.json``. The CLI only turns its arguments into an :class:`EvalJob`.

Layout under ``job.out_dir`` (docs/outputs.md): the first dataset's ``predictions.jsonl`` and
``rank_curve.json`` at the top, each further dataset's in ``<dataset>/``, each inference variant
in ``variant-<variant>/``; one ``metrics.json`` with every record.

No method is named here: the variants and inference inputs come from the stage's
:class:`~vlalign.methods.stage.PeftSession`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlalign.data.text_formats import PLAIN, TextFormat
from vlalign.eval.caption_metrics import CaptionScorer
from vlalign.eval.references import References
from vlalign.eval.runner import EvalSettings, PathLike, evaluate_run, rank_curve_of_model
from vlalign.io_utils import write_json_atomic
from vlalign.methods.stage import (
    NORMAL,
    InferenceInputs,
    InferenceVariant,
    PeftSession,
    load_for_inference,
)
from vlalign.models.backbones import default_device
from vlalign.models.vlm import VisionLanguageModel

STAGE_RECORD_KEYS = ("trainable_params", "trainable_pct", "heldout_loss")
# the stage.json keys a PEFT stage's trainable records come from
CHAIN_RECORD_KEYS = {
    "trainable_params": "chain_trainable_params",
    "trainable_pct": "chain_trainable_pct",
}
# variants are compared on captions; a curve of 2 samples is no rank row (records dropped)
VARIANT_RANK_SAMPLES = 2


@dataclass
class LoadedStage:
    """A trained stage loaded for inference: its model and PEFT session (None: no methods)."""

    dir: Path
    model: VisionLanguageModel
    session: PeftSession | None

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        """The stage's ``stage.json``."""
        path = self.dir / "stage.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (not a trained stage directory)")
        return json.loads(path.read_text())

    def inputs(self, variant: str = NORMAL, seed: int = 0) -> InferenceInputs | None:
        """Inference inputs of the stage's methods under ``variant`` (None: no methods)."""
        if self.session is None:
            if variant != NORMAL:
                raise ValueError(f"{self.dir}: no PEFT methods, no inference variant {variant!r}")
            return None
        return self.session.inference(variant, seed)

    def variants(self) -> list[InferenceVariant]:
        return self.session.variants() if self.session is not None else []

    def records(self) -> list[dict[str, Any]]:
        """The stage's own records: trainable parameters (count, %; for a PEFT stage the union
        over its chain), held-out loss, and the methods' extra metrics."""
        info = self.info
        # a PEFT stage reports what its chain fine-tunes in all (seed 003 Table 2's column:
        # LoRA→prefix counts LoRA + prefix though its last stage trains the prefix only)
        chain = self.session is not None
        keys = [CHAIN_RECORD_KEYS.get(k, k) if chain else k for k in STAGE_RECORD_KEYS]
        missing = [k for k in keys if k not in info]
        if missing:
            raise ValueError(f"{self.dir / 'stage.json'}: missing keys {missing}")
        # a value of None (no val rows: no held-out loss) is no record: missing, never 0
        out = [
            {"metric": k, "value": info[s]}
            for k, s in zip(STAGE_RECORD_KEYS, keys)
            if info[s] is not None
        ]
        if self.session is not None:
            out += [{"metric": k, "value": v} for k, v in self.session.extra_metrics().items()]
        return out


def load_stage(stage_dir: PathLike, device: torch.device | str | None = None) -> LoadedStage:
    """The stage's saved model on ``device`` (default: the GPU if any) with its PEFT methods
    re-attached, all frozen: one load for every dataset and variant of a run."""
    stage_dir = Path(stage_dir)
    model = VisionLanguageModel.from_pretrained(stage_dir / "model")
    model.to(device or default_device())
    return LoadedStage(stage_dir, model, load_for_inference(model, stage_dir))


@dataclass(frozen=True)
class EvalJob:
    """What the ``evaluate`` rule asks for: a run, its datasets (the first is the run's own:
    its outputs at the top of ``out_dir``, variants evaluated on it), where to write, how."""

    run: str
    seed: int  # the run's: seeds a random inference variant
    datasets: tuple[tuple[str, Path], ...]  # (name, data dir)
    tokenizer: Path
    vision: Path  # the image processor's directory
    out_dir: Path
    settings: EvalSettings
    text_kind: str | None = None  # the last stage's text: grounding_gap is measured on it
    text_max_length: int = 256
    text_format: TextFormat = PLAIN  # the last stage's instructions: prompts carry them
    # each dataset's tokenized references (the references rule), or none: tokenized per call
    references: tuple[Path, ...] = ()

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        *,
        data: Sequence[PathLike],
        tokenizer: PathLike,
        vision: PathLike,
        out_dir: PathLike,
        references: Sequence[PathLike] = (),
    ) -> EvalJob:
        """From the rule's ``--params`` (``run``, ``seed``, ``datasets``, ``eval``, ``config``)
        and paths (one data directory per dataset)."""
        for key in ("run", "seed", "datasets", "eval"):
            if key not in params:
                raise ValueError(f"evaluate --params: missing key {key!r}")
        names = list(params["datasets"])
        if len(data) != len(names) or not names:
            raise ValueError(f"--data has {len(data)} paths for datasets {names}")
        if references and len(references) != len(names):
            raise ValueError(f"--references has {len(references)} files for datasets {names}")
        last = (params.get("config", {}).get("stages") or [{}])[-1]
        return cls(
            run=params["run"],
            seed=int(params["seed"]),
            datasets=tuple((n, Path(d)) for n, d in zip(names, data)),
            tokenizer=Path(tokenizer),
            vision=Path(vision),
            out_dir=Path(out_dir),
            settings=EvalSettings.from_params(params["eval"]),
            text_kind=last["text"],
            text_max_length=last["max_length"],
            text_format=TextFormat.from_settings(last),
            references=tuple(Path(r) for r in references),
        )


def evaluate_dataset(
    job: EvalJob,
    stage: LoadedStage,
    dataset: str,
    data_dir: PathLike,
    out_dir: PathLike,
    *,
    variant: str = NORMAL,
    settings: EvalSettings | None = None,
    extra_records: Sequence[Mapping[str, Any]] = (),
    scorer: CaptionScorer | None = None,
    references: References | None = None,
) -> dict[str, Any]:
    """One dataset under one inference variant: predictions, rank curve and metrics written to
    ``out_dir``; returns the metrics (:func:`vlalign.eval.runner.evaluate_run`)."""
    return evaluate_run(
        stage.model_dir,
        data_dir,
        job.tokenizer,
        job.vision,
        out_dir,
        run=job.run,
        stage=stage.info["name"],
        dataset=dataset,
        settings=settings or job.settings,
        inputs=stage.inputs(variant, job.seed),
        extra_records=extra_records,
        model=stage.model,
        text_kind=job.text_kind,
        text_max_length=job.text_max_length,
        text_format=job.text_format,
        scorer=scorer,
        references=references,
        generation_stats=stage.session.generation_stats if stage.session is not None else None,
    )


def merge_metrics(metrics: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``more``'s records to ``metrics`` and its missing entries not listed yet."""
    metrics["records"] += more["records"]
    metrics["missing"] += [m for m in more["missing"] if m not in metrics["missing"]]
    return metrics


def variant_records(metrics: Mapping[str, Any], variant: InferenceVariant) -> list[dict]:
    """A variant's records as rows of their own (unambiguous in the tables): stage
    ``<stage>@<method>_<variant>``, ``decoding.<method>_variant``; rank records dropped."""
    key = f"{variant.method}_variant"
    return [
        {
            **rec,
            "stage": f"{rec['stage']}@{variant.label}",
            "decoding": {**rec.get("decoding", {}), key: variant.name},
        }
        for rec in metrics["records"]
        if not rec["metric"].startswith("effective_rank")
    ]


def selected_variants(settings: EvalSettings, stage: LoadedStage) -> list[InferenceVariant]:
    """The variants ``settings`` asks for that the stage's methods offer, in the asked order
    (seed 003 Table 5: a prefix-tuned run with its prefix removed / replaced by noise)."""
    offered = {v.name: v for v in stage.variants()}
    return [offered[v] for v in settings.variants if v != NORMAL and v in offered]


def evaluate_job(job: EvalJob, stage: LoadedStage) -> dict[str, Any]:
    """Every dataset (the first with the stage's own records), then every variant on the
    first dataset (captions only); writes the merged ``job.out_dir/metrics.json``. One
    METEOR JVM scores them all."""
    (first, first_dir), *others = job.datasets
    refs = {name: References.load(path) for (name, _), path in zip(job.datasets, job.references)}
    with CaptionScorer(
        job.settings.spice, meteor=job.settings.meteor, rouge_score=job.settings.rouge_score
    ) as scorer:
        metrics = evaluate_dataset(
            job, stage, first, first_dir, job.out_dir, extra_records=stage.records(),
            scorer=scorer, references=refs.get(first),
        )
        for dataset, data_dir in others:
            # its rank curve (cheap: one forward of the rank samples) is that dataset's row
            merge_metrics(metrics, evaluate_dataset(job, stage, dataset, data_dir,
                                                    job.out_dir / dataset, scorer=scorer,
                                                    references=refs.get(dataset)))
        captions = replace(job.settings, task="caption", rank_samples=VARIANT_RANK_SAMPLES)
        for variant in selected_variants(job.settings, stage):
            more = evaluate_dataset(job, stage, first, first_dir,
                                    job.out_dir / f"variant-{variant.name}",
                                    variant=variant.name, settings=captions, scorer=scorer,
                                    references=refs.get(first))
            metrics["records"] += variant_records(more, variant)
    write_json_atomic(job.out_dir / "metrics.json", metrics)
    return metrics


def run_started(params: Mapping[str, Any]) -> str | None:
    """When the run started: when its first stage did (a shared stage: when that one was
    trained); None when the chain or its ``stage.json`` is unknown."""
    chain = params.get("chain") or []
    first = Path(chain[0]["dir"]) / "stage.json" if chain else None
    return json.loads(first.read_text())["start"] if first and first.is_file() else None


def rank_stage(
    stage: LoadedStage,
    data_dir: PathLike,
    tokenizer: PathLike,
    vision: PathLike,
    out_path: PathLike,
    *,
    run: str,
    dataset: str,
    settings: EvalSettings,
    reference: str | None = None,
) -> dict[str, Any]:
    """Only the rank curve of a loaded stage on one dataset, with its methods' inputs
    (e.g. the model before PEFT on its PEFT runs' dataset: ``reference="before_peft"``)."""
    return rank_curve_of_model(
        stage.model,
        data_dir,
        tokenizer,
        vision,
        out_path,
        run=run,
        dataset=dataset,
        split=settings.split,
        rank_samples=settings.rank_samples,
        text_tokens=settings.rank_text_tokens,
        batch_size=settings.batch_size,
        reference=reference,
        inputs=stage.inputs(),
        mask_mode=settings.mask_mode,
    )
