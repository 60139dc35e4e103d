"""Evaluate one trained stage: generate on a split, score it, measure the representation rank.

Writes into ``out_dir`` (docs/outputs.md), each file atomically, ``metrics.json`` last:

- ``predictions.jsonl``: one line per image (``task: "caption"``: ``image_id``, ``prediction``,
  ``references``) and/or one line per question (``task: "vqa"``: also ``question`` and
  ``answers``; ``references`` repeats the answers so every line has the same core keys);
- ``rank_curve.json``: effective-rank curve (seed 003 §2.3) of the last-layer hidden states at the
  image positions and the first ``rank_text_tokens`` text positions of the sample's reference
  captions (:func:`rank_text_ids`), one fixed-shape (N + T)×d matrix per sample,
  ``rank_samples`` samples; the curve of the T text rows alone under ``text``;
- ``metrics.json``: pycocoevalcap caption metrics, ``VQA_acc``, ``effective_rank_0.9``
  (image + text positions), ``effective_rank_text_0.9`` (text positions) and the
  caller's ``extra_records``; metrics that could not be computed (SPICE without its jars) are
  listed under ``missing``, never recorded as 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from vlalign.data.text_formats import (
    PLAIN,
    TextFormat,
    caption_prompt,
    decode_text,
    encode_text,
    vqa_prompt,
)
from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.eval.caption_metrics import CaptionScorer
from vlalign.eval.effective_rank import rank_curve_record
from vlalign.eval.grounding import caption_grounding, gap_scores, objects_of
from vlalign.eval.references import References
from vlalign.eval.resampling import DEFAULT_RESAMPLES, ResampleScheme, grouped_mean_resamples
from vlalign.eval.text_loss import lm_text_loss
from vlalign.eval.vqa import vqa_accuracy, vqa_score
from vlalign.io_utils import atomic_path, write_json_atomic
from vlalign.methods.registry import GeneratedBatch, GenerationStats
from vlalign.models.backbones import load_image_processor, load_lm
from vlalign.models.generation import InputsFn, generate, inference_cache
from vlalign.models.vlm import VLM_CONFIG_NAME, VisionLanguageModel

METRICS_SCHEMA_VERSION = 1
# "none": no generation, only the loss-based metrics (grounding_gap, effective rank): for an
# ablation arm that is compared on those alone
TASKS = ("caption", "vqa", "both", "none")
REFERENCE_LM_RUN = "_reference_lm"
RANK_THRESHOLD = 0.9
RANK_METRIC = f"effective_rank_{RANK_THRESHOLD}"
RANK_TEXT_METRIC = f"effective_rank_text_{RANK_THRESHOLD}"
DEFAULT_RANK_TEXT_TOKENS = 32  # text positions per rank sample (eval.rank_text_tokens)
MODEL_DIR_PARTS = (VLM_CONFIG_NAME, "lm", "vision", "projector")

PathLike = str | os.PathLike


class EvalInputError(ValueError):
    """An input of the evaluation (model dir, dataset, split, rows) is unusable."""


@dataclass(frozen=True)
class EvalSettings:
    """How a run is evaluated: the params' ``eval`` block (:meth:`from_params`; the defaults
    are those of a block that omits a key) plus ``mask_mode``, an override of the model's
    mask. ``variants`` (config key ``prefix_variants``): the inference variants to evaluate
    besides ``normal`` where the run's PEFT methods offer them (seed 003 Table 5)."""

    split: str = "test"
    task: str = "caption"
    num_beams: int = 5
    max_new_tokens: int = 32
    batch_size: int = 16
    spice: str = "auto"
    meteor: bool = True
    rouge_score: bool = True
    rank_samples: int = 64
    rank_text_tokens: int = DEFAULT_RANK_TEXT_TOKENS
    variants: tuple[str, ...] = ("normal",)
    resamples: int = DEFAULT_RESAMPLES
    resample_seed: int = 0
    mask_mode: str | None = None

    # config key -> field, where they differ (the config keeps its historical name)
    PARAM_KEYS: ClassVar[dict[str, str]] = {"prefix_variants": "variants"}

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"eval.task must be one of {TASKS}, got {self.task!r}")
        for key in ("batch_size", "num_beams", "max_new_tokens", "rank_samples",
                    "rank_text_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.resamples < 0:
            raise ValueError(f"eval.resamples must be >= 0, got {self.resamples}")

    def resample_scheme(self, dataset: str, n_images: int) -> ResampleScheme | None:
        """The image resamples of ``dataset``'s split: the same for every run evaluated on it."""
        if self.resamples == 0:
            return None
        key = f"{dataset}/{self.split}/{self.resample_seed}"
        return ResampleScheme(key, n_images, self.resamples)

    @classmethod
    def from_params(cls, block: Mapping[str, Any], source: str = "eval") -> EvalSettings:
        """From an ``eval`` block; an unknown key → ValueError naming it (``source.key``)."""
        names = {f.name for f in fields(cls)} - {"mask_mode"}
        kwargs: dict[str, Any] = {}
        for key, value in block.items():
            name = cls.PARAM_KEYS.get(key, key)
            if name not in names:
                config_key = {v: k for k, v in cls.PARAM_KEYS.items()}
                known = sorted(config_key.get(n, n) for n in names)
                raise ValueError(f"{source}.{key}: unknown evaluation setting; known: {known}")
            kwargs[name] = tuple(value) if name == "variants" else value
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def check_model_dir(model_dir: PathLike) -> Path:
    """Fail with the missing entries if ``model_dir`` is not a saved VisionLanguageModel."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model dir {model_dir} does not exist")
    absent = [p for p in MODEL_DIR_PARTS if not (model_dir / p).exists()]
    if absent:
        raise FileNotFoundError(
            f"model dir {model_dir} is not a saved VisionLanguageModel: missing {absent} "
            f"(expected {list(MODEL_DIR_PARTS)})"
        )
    return model_dir


def load_split(data_dir: PathLike, split: str) -> Dataset:
    """One non-empty split of a DatasetDict saved with ``save_to_disk``."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"dataset dir {data_dir} does not exist")
    index = data_dir / "dataset_dict.json"
    if not index.is_file():
        raise EvalInputError(
            f"{data_dir}: not a DatasetDict saved with save_to_disk (no dataset_dict.json)"
        )
    splits = json.loads(index.read_text()).get("splits", [])
    if split not in splits:
        raise EvalInputError(f"{data_dir}: no split {split!r} (has {splits})")
    # datasets writes an empty split with no data files and then cannot reload it (IndexError)
    state = data_dir / split / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files", True):
        raise EvalInputError(f"{data_dir}: split {split!r} is empty")
    ds = Dataset.load_from_disk(str(data_dir / split))
    if len(ds) == 0:
        raise EvalInputError(f"{data_dir}: split {split!r} is empty")
    ids = list(ds["image_id"])
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvalInputError(f"{data_dir}: split {split!r} has duplicate image_id {dup!r}")
    return ds


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _pixels(processor, images: Sequence) -> torch.Tensor:
    return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
        "pixel_values"
    ]


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _check_vocab(model_vocab: int, tok, where: str) -> None:
    if len(tok) > model_vocab:
        raise EvalInputError(
            f"tokenizer has {len(tok)} tokens but the LM in {where} embeds only {model_vocab}: "
            "wrong tokenizer for this model"
        )


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def _caption_rows(ds: Dataset, data_dir: PathLike, split: str) -> tuple[list[str], list[list]]:
    rows = ds.select_columns(["image_id", "captions"])
    ids, refs = list(rows["image_id"]), list(rows["captions"])
    for image_id, caps in zip(ids, refs):
        if not caps or not any(c.strip() for c in caps):
            raise EvalInputError(
                f"{data_dir}: split {split!r}: image {image_id!r} has no reference captions"
            )
    return ids, refs


def caption_references(data_dir: PathLike, split: str) -> dict[str, list[str]]:
    """Image id → reference captions of a split (what its caption metrics score against)."""
    ids, refs = _caption_rows(load_split(data_dir, split), data_dir, split)
    return {str(i): list(r) for i, r in zip(ids, refs)}


def _vqa_rows(ds: Dataset, data_dir: PathLike, split: str) -> list[dict]:
    """Every (image index, question, answers) of the split."""
    items = []
    for i, (image_id, qas) in enumerate(zip(ds["image_id"], ds["qa"])):
        for j, qa in enumerate(qas):
            if not qa["answers"]:
                raise EvalInputError(
                    f"{data_dir}: split {split!r}: image {image_id!r} qa[{j}] has no answers"
                )
            items.append({"index": i, "image_id": image_id, **qa})
    if not items:
        raise EvalInputError(f"{data_dir}: split {split!r} has no qa pairs: cannot evaluate VQA")
    return items


# ``(model, batch) → per-row statistics`` of the PEFT methods
# (:meth:`vlalign.methods.stage.PeftSession.generation_stats`)
GenerationStatsFn = Callable[[nn.Module, GeneratedBatch], GenerationStats]


@dataclass
class _RowStats:
    """The methods' :class:`GenerationStats` of one task's generations, row by row."""

    metrics: dict[str, list[float | None]]
    details: dict[str, list[Any]]

    def add(self, stats: GenerationStats) -> None:
        for name, values in stats.metrics.items():
            self.metrics.setdefault(name, []).extend(values)
        for key, values in stats.details.items():
            self.details.setdefault(key, []).extend(values)

    def scores(self) -> dict[str, float]:
        """Each metric's mean over its non-None rows (no rows with a value: no metric)."""
        out = {}
        for name, values in self.metrics.items():
            vals = [float(v) for v in values if v is not None]
            if vals:
                out[name] = sum(vals) / len(vals)
        return out

    def row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.details.items()}


@torch.no_grad()
def _generate_rows(
    model: VisionLanguageModel,
    processor,
    ds: Dataset,
    image_index: Sequence[int],
    prompts: Sequence[list[int]],
    tok,
    *,
    desc: str,
    batch_size: int,
    gen_kw: dict[str, Any],
    task: str = "caption",
    stats_fn: GenerationStatsFn | None = None,
) -> tuple[list[str], _RowStats]:
    """Generate for each (image_index[k], prompts[k]); images are encoded once per batch.
    ``stats_fn``: the PEFT methods' statistics of each batch of generations."""
    device = next(model.parameters()).device
    out: list[str] = []
    stats = _RowStats({}, {})
    for rows in tqdm(list(_batches(len(prompts), batch_size)), desc=desc, disable=None):
        idx = [image_index[k] for k in rows]
        unique = sorted(set(idx))
        pixels = _pixels(processor, ds.select(unique)["image"]).to(device)
        feats = model.encode_images(pixels)
        where = {u: n for n, u in enumerate(unique)}
        feats = feats[torch.tensor([where[i] for i in idx], device=device)]
        batch_prompts = [prompts[k] for k in rows]
        new = generate(model, prompt_ids=batch_prompts, image_features=feats, **gen_kw)
        out += [decode_text(tok, ids) for ids in new]
        if stats_fn is not None:
            stats.add(stats_fn(model, GeneratedBatch(
                task, feats, batch_prompts, new, gen_kw.get("inputs"), gen_kw.get("mask_mode"),
            )))
    return out, stats


def _merge_scores(scores: dict[str, float], new: Mapping[str, float], where: str) -> None:
    clash = sorted(set(scores) & set(new))
    if clash:
        raise ValueError(f"{where}: PEFT generation metrics {clash} clash with other metrics")
    scores.update(new)


# --------------------------------------------------------------------------------------------
# effective rank
# --------------------------------------------------------------------------------------------
def _rank_indices(ds: Dataset, rank_samples: int, data_dir: PathLike, split: str) -> list[int]:
    """Indices of the rank samples: evenly spread over the split (deterministic)."""
    if rank_samples < 1:
        raise ValueError(f"rank_samples must be >= 1, got {rank_samples}")
    n = len(ds)
    picked = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(rank_samples, n))})
    caps = ds.select(picked)["captions"]
    for i, c in zip(picked, caps):
        if not any(x.strip() for x in c):
            raise EvalInputError(
                f"{data_dir}: split {split!r}: image {ds[i]['image_id']!r} has no reference "
                "captions for the rank curve"
            )
    return picked


def rank_text_ids(tok, captions: Sequence[str], length: int) -> list[int]:
    """The fixed-length text of one rank sample: ``<bos>``, then the first ``length - 1`` tokens
    of the sample's reference captions joined by spaces (the captions repeated when they are
    shorter). Every sample has exactly ``length`` text positions, no ``<eos>`` and no padding,
    so the feature matrix has the same shape for every sample and every model."""
    if length < 1:
        raise ValueError(f"rank text length must be >= 1, got {length}")
    caps = [c.strip() for c in captions if c and c.strip()]
    if not caps:
        raise EvalInputError("a rank sample needs at least one non-empty reference caption")
    body: list[int] = []
    reps = 1
    while len(body) < length - 1:
        body = encode_text(tok, " ".join(caps * reps))
        reps *= 2
    return [vlm_token_ids(tok)["bos"], *body[: length - 1]]


@torch.no_grad()
def vlm_rank_features(
    model: VisionLanguageModel,
    processor,
    tok,
    ds: Dataset,
    indices: Sequence[int],
    *,
    text_tokens: int = DEFAULT_RANK_TEXT_TOKENS,
    batch_size: int = 16,
    mask_mode: str | None = None,
    inputs: InputsFn | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Last-layer hidden states at the image positions *and* the ``text_tokens`` text positions
    of :func:`rank_text_ids` fed after the sample's image (seed 003 §2.3 analyses image and text
    features): one ``(N + T, H)`` float32 CPU tensor per index, and N. A prefix (PEFT) lives in
    the cache and is not a row."""
    device = next(model.parameters()).device
    feats: list[torch.Tensor] = []
    n_image = 0
    for rows in tqdm(list(_batches(len(indices), batch_size)), desc="rank features",
                     disable=None):
        sub = ds.select([indices[k] for k in rows])
        ids = torch.tensor([rank_text_ids(tok, c, text_tokens) for c in sub["captions"]])
        out = model(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            pixel_values=_pixels(processor, sub["image"]).to(device),
            mask_mode=mask_mode,
            past_key_values=inference_cache(inputs, len(rows)),
            output_hidden_states=True,
        )
        n_image = out.num_image_tokens
        feats += list(out.hidden_states.float().cpu())
    return feats, n_image


@torch.no_grad()
def lm_rank_features(
    lm: torch.nn.Module,
    tok,
    captions: Sequence[Sequence[str]],
    *,
    text_tokens: int = DEFAULT_RANK_TEXT_TOKENS,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Last-layer hidden states of the same fixed-length text (:func:`rank_text_ids`) through
    the LM alone (no image): one ``(T, H)`` matrix per sample."""
    device = next(lm.parameters()).device
    feats: list[torch.Tensor] = []
    for rows in tqdm(list(_batches(len(captions), batch_size)), desc="rank features (LM)",
                     disable=None):
        ids = torch.tensor([rank_text_ids(tok, captions[k], text_tokens) for k in rows])
        out = lm(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                 output_hidden_states=True)
        feats += list(out.hidden_states[-1].float().cpu())
    return feats


def rank_record(
    run: str,
    feats: Sequence[torch.Tensor],
    n_image: int,
    *,
    dataset: str,
    split: str,
    reference: str | None = None,
) -> dict[str, Any]:
    """The ``rank_curve.json`` object: the curve of the whole ``(N + T) × H`` matrices
    (``positions``: ``image+text``, or ``text`` for a text-only model), and, for a model with an
    image block, the curve of their text rows alone under ``text``."""
    shapes = {tuple(f.shape) for f in feats}
    if len(shapes) != 1:
        raise ValueError(f"rank features must all have one shape, got {sorted(shapes)}")
    curve = rank_curve_record(run, feats, RANK_THRESHOLD)
    rows, _ = shapes.pop()
    curve.update({
        "dataset": dataset,
        "split": split,
        "samples": len(feats),
        "positions": "image+text" if n_image else "text",
        "image_tokens": n_image,
        "text_tokens": rows - n_image,
        "reference": reference,
    })
    if n_image:
        text = rank_curve_record(run, [f[n_image:] for f in feats], RANK_THRESHOLD)
        curve["text"] = {k: text[k] for k in ("k", "cumulative", "effective_rank")}
    return curve


def rank_curve_of_model(
    model: VisionLanguageModel,
    data_dir: PathLike,
    tokenizer_dir: PathLike,
    vision_dir: PathLike,
    out_path: PathLike,
    *,
    run: str,
    dataset: str,
    split: str = "test",
    rank_samples: int = 64,
    text_tokens: int = DEFAULT_RANK_TEXT_TOKENS,
    batch_size: int = 16,
    reference: str | None = None,
    inputs: InputsFn | None = None,
    mask_mode: str | None = None,
) -> dict[str, Any]:
    """Only the rank curve of a loaded model on a dataset (e.g. the model before PEFT on its
    children's dataset, ``reference="before_peft"``), written to ``out_path``; returns it."""
    ds = load_split(data_dir, split)
    idx = _rank_indices(ds, rank_samples, data_dir, split)
    tok = load_tokenizer(tokenizer_dir)
    model.eval()
    _check_vocab(model.lm.get_input_embeddings().num_embeddings, tok, run)
    feats, n_image = vlm_rank_features(
        model, load_image_processor(vision_dir), tok, ds, idx, text_tokens=text_tokens,
        batch_size=batch_size, mask_mode=mask_mode, inputs=inputs,
    )
    curve = rank_record(run, feats, n_image, dataset=dataset, split=split, reference=reference)
    write_json_atomic(out_path, curve)
    return curve


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _extra(rec: Mapping[str, Any], i: int) -> tuple[str, float]:
    if not isinstance(rec, Mapping) or "metric" not in rec or "value" not in rec:
        raise ValueError(f"extra_records[{i}] needs 'metric' and 'value' keys: {rec!r}")
    value = rec["value"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"extra_records[{i}] ({rec['metric']}): value {value!r} is not a finite number "
            "(report a metric that could not be computed as missing instead)"
        )
    return str(rec["metric"]), float(value)


def metric_records(
    base: Mapping[str, Any],
    scores: Mapping[str, float],
    decoding: Mapping[str, Any],
    resamples: Mapping[str, np.ndarray] | None = None,
    scheme: ResampleScheme | None = None,
) -> list[dict]:
    """The ``metrics.json`` records of ``scores`` (docs/outputs.md): ``base`` (run, stage,
    dataset, split), ``metric``, ``value``, ``decoding``; a metric in ``resamples`` (its score
    per image resample of ``scheme``) also carries its ``resamples`` block."""
    resamples = resamples or {}
    if resamples and scheme is None:
        raise ValueError("resampled scores need the resample scheme they were drawn with")
    records = []
    for m, v in scores.items():
        rec = {**base, "metric": m, "value": float(v), "decoding": decoding}
        if m in resamples:
            values = [float(x) for x in resamples[m]]
            rec["resamples"] = {"scheme": scheme.as_dict(), "values": values}
        records.append(rec)
    return records


def evaluate_run(
    model_dir: PathLike,
    data_dir: PathLike,
    tokenizer_dir: PathLike,
    vision_dir: PathLike,
    out_dir: PathLike,
    *,
    run: str,
    stage: str,
    dataset: str,
    settings: EvalSettings | None = None,
    inputs: InputsFn | None = None,
    extra_records: Iterable[Mapping[str, Any]] = (),
    model: VisionLanguageModel | None = None,
    text_kind: str | None = None,
    text_max_length: int = 256,
    scorer: CaptionScorer | None = None,
    references: References | None = None,
    text_format: TextFormat = PLAIN,
    generation_stats: GenerationStatsFn | None = None,
) -> dict[str, Any]:
    """Evaluate the model saved in ``model_dir`` on ``settings.split`` of the dataset in
    ``data_dir``; ``run``, ``stage``, ``dataset`` label the records.

    Args:
        vision_dir: directory of the image processor (``load_image_processor``).
        settings: :class:`EvalSettings` (default: its defaults). ``task``: "caption"
            (references = each row's ``captions``), "vqa" (every qa pair of the split,
            ``VQA_acc``) or "both"; ``rank_samples``, ``rank_text_tokens``: the effective-rank
            samples and the text positions of each (:func:`vlm_rank_features`).
        inputs: ``B → inference inputs`` of the model's PEFT methods
            (``PeftSession.inference(variant, seed)``): generation, the grounding and the rank
            forwards all use them.
        extra_records: ``{"metric", "value"}`` dicts added as records (e.g. ``trainable_params``,
            ``heldout_loss``).
        model: an already loaded model to use instead of loading ``model_dir`` (a model with
            PEFT methods attached, which live outside the saved directory); ``model_dir`` is
            still checked.
        text_kind: the run's training text (recaption | captions | conversations | qa) and
            ``text_max_length`` its truncation: ``grounding_gap`` is measured on that text
            (missing when None); ``text_format`` its instructions, which the caption and VQA
            prompts carry too (a model is asked as it was trained). Caption predictions also
            get the attribute / CHAIR metrics of :mod:`vlalign.eval.grounding` where the rows'
            ``meta`` carries ``objects``.
        scorer: the job's :class:`CaptionScorer` (one METEOR JVM for all its calls); default:
            one for this call.
        references: the split's tokenized references (the ``references`` rule's file, loaded
            once per job); default: tokenized here.
        generation_stats: the PEFT methods' per-row statistics of each batch of captions /
            answers (``PeftSession.generation_stats``): each metric's mean over the task's rows
            is a record, each detail goes into the rows' ``predictions.jsonl`` lines.

    Returns:
        the ``metrics.json`` object (``schema_version``, ``run``, ``records``, ``missing``).
    """
    cfg = settings or EvalSettings()
    split, task, batch_size = cfg.split, cfg.task, cfg.batch_size
    model_dir = check_model_dir(model_dir)
    out_dir = Path(out_dir)
    ds = load_split(data_dir, split)
    extras = [_extra(r, i) for i, r in enumerate(extra_records)]
    tok = load_tokenizer(tokenizer_dir)
    special = vlm_token_ids(tok)
    cap_ids, cap_refs = _caption_rows(ds, data_dir, split) if task in ("caption", "both") else (
        [], [])
    vqa_items = _vqa_rows(ds, data_dir, split) if task in ("vqa", "both") else []
    rank_idx = _rank_indices(ds, cfg.rank_samples, data_dir, split)

    processor = load_image_processor(vision_dir)
    if model is None:
        model = VisionLanguageModel.from_pretrained(model_dir)
        model.to(_device())
    model.eval()
    _check_vocab(model.lm.get_input_embeddings().num_embeddings, tok, str(model_dir))

    gen_kw = {
        "num_beams": cfg.num_beams,
        "max_new_tokens": cfg.max_new_tokens,
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
        "use_cache": True,
        "inputs": inputs,
        "mask_mode": cfg.mask_mode,
    }
    decoding = {"num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens, "task": task}
    scores: dict[str, float] = {}
    missing: list[dict] = []
    lines: list[dict] = []
    resamples: dict[str, np.ndarray] = {}  # caption metric -> its score per image resample
    scheme: ResampleScheme | None = None

    if cap_ids:
        preds, cap_stats = _generate_rows(
            model, processor, ds, list(range(len(ds))),
            [caption_prompt(tok, text_format)] * len(ds), tok,
            desc=f"captions {dataset}/{split}", batch_size=batch_size, gen_kw=gen_kw,
            task="caption", stats_fn=generation_stats,
        )
        lines += [
            {"task": "caption", "image_id": i, "prediction": p, "references": list(r),
             **cap_stats.row(k)}
            for k, (i, p, r) in enumerate(zip(cap_ids, preds, cap_refs))
        ]
        with contextlib.ExitStack() as stack:
            if scorer is None:
                scorer = stack.enter_context(
                    CaptionScorer(cfg.spice, meteor=cfg.meteor, rouge_score=cfg.rouge_score)
                )
            scheme = cfg.resample_scheme(dataset, len(cap_ids))
            caps = scorer.score(
                dict(zip(cap_ids, preds)), dict(zip(cap_ids, cap_refs)),
                resample=scheme, cached=references,
            )
        scores.update(caps.scores)
        missing += caps.missing
        resamples = dict(caps.resamples)
        # grounding: pure Python on the predictions just generated
        scenes = [objects_of(m) for m in ds.select_columns(["meta"])["meta"]]
        g_scores, g_missing = caption_grounding(preds, scenes, where=f"{dataset}/{split}")
        scores.update(g_scores)
        missing += g_missing
        _merge_scores(scores, cap_stats.scores(), f"{dataset}/{split} captions")
    if vqa_items:
        answers, vqa_stats = _generate_rows(
            model, processor, ds, [q["index"] for q in vqa_items],
            [vqa_prompt(tok, q["question"], text_format) for q in vqa_items], tok,
            desc=f"vqa {dataset}/{split}", batch_size=batch_size, gen_kw=gen_kw,
            task="vqa", stats_fn=generation_stats,
        )
        lines += [
            {"task": "vqa", "image_id": q["image_id"], "question": q["question"],
             "answers": list(q["answers"]), "prediction": a, "references": list(q["answers"]),
             **vqa_stats.row(k)}
            for k, (q, a) in enumerate(zip(vqa_items, answers))
        ]
        _merge_scores(scores, vqa_stats.scores(), f"{dataset}/{split} vqa")
        scores["VQA_acc"] = vqa_score(answers, [q["answers"] for q in vqa_items])
        # resampled by image (its questions together), on the images the captions drew
        vqa_scheme = cfg.resample_scheme(dataset, len(ds))
        if vqa_scheme is not None and scheme in (None, vqa_scheme):
            scheme = vqa_scheme
            resamples["VQA_acc"] = grouped_mean_resamples(
                "VQA_acc", [q["index"] for q in vqa_items],
                [vqa_accuracy(a, q["answers"]) for q, a in zip(vqa_items, answers)],
                vqa_scheme.weights(), scores["VQA_acc"],
            )
    gap, gap_missing = gap_scores(
        model, processor, tok, ds, text_kind, where=f"{dataset}/{split}",
        max_length=text_max_length, batch_size=batch_size, mask_mode=cfg.mask_mode,
        inputs=inputs, text_format=text_format,
    )
    scores.update(gap)
    missing += gap_missing

    feats, n_image = vlm_rank_features(
        model, processor, tok, ds, rank_idx, text_tokens=cfg.rank_text_tokens,
        batch_size=batch_size, mask_mode=cfg.mask_mode, inputs=inputs,
    )
    curve = rank_record(run, feats, n_image, dataset=dataset, split=split)
    scores[RANK_METRIC] = curve["effective_rank"]
    scores[RANK_TEXT_METRIC] = curve["text"]["effective_rank"]

    base = {"run": run, "stage": stage, "dataset": dataset, "split": split}
    records = metric_records(base, scores, decoding, resamples, scheme)
    records += [{**base, "metric": m, "value": v, "decoding": decoding} for m, v in extras]
    metrics = {"schema_version": METRICS_SCHEMA_VERSION, "run": run, "records": records,
               "missing": missing}

    _write_jsonl(out_dir / "predictions.jsonl", lines)
    write_json_atomic(out_dir / "rank_curve.json", curve)
    write_json_atomic(out_dir / "metrics.json", metrics)  # last: the rule's completion marker
    return metrics


def reference_rank_curve(
    lm_dir: PathLike,
    data_dir: PathLike,
    tokenizer_dir: PathLike,
    out_path: PathLike,
    split: str = "test",
    rank_samples: int = 64,
    batch_size: int = 16,
    *,
    dataset: str | None = None,
    text_tokens: int = DEFAULT_RANK_TEXT_TOKENS,
    text_loss_out: PathLike | None = None,
) -> dict[str, Any]:
    """Rank curve of the pre-trained LM alone on the same fixed-length text of the same rank
    samples (text positions only: compare it with the runs' ``text`` curves), written to
    ``out_path`` as a ``rank_curve.json`` with run ``_reference_lm``; returns it. With
    ``text_loss_out``, also the LM's loss on the split's recaptions vs its human captions
    (:func:`vlalign.eval.text_loss.lm_text_loss`) is written there."""
    lm_dir = Path(lm_dir)
    if not (lm_dir / "config.json").is_file():
        raise FileNotFoundError(f"LM dir {lm_dir} has no config.json (not a save_pretrained dir)")
    ds = load_split(data_dir, split)
    idx = _rank_indices(ds, rank_samples, data_dir, split)
    tok = load_tokenizer(tokenizer_dir)
    lm = load_lm(lm_dir).to(_device()).eval()
    _check_vocab(lm.get_input_embeddings().num_embeddings, tok, str(lm_dir))
    captions = ds.select(idx)["captions"]
    feats = lm_rank_features(lm, tok, captions, text_tokens=text_tokens, batch_size=batch_size)
    curve = rank_record(
        REFERENCE_LM_RUN, feats, 0, dataset=dataset or Path(data_dir).name, split=split,
        reference="pretrained_lm",
    )
    if text_loss_out is not None:
        loss = lm_text_loss(lm, tok, ds, batch_size=batch_size)
        write_json_atomic(text_loss_out, {"dataset": curve["dataset"], "split": split, **loss})
    write_json_atomic(out_path, curve)
    return curve
