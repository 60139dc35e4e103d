"""Recaptioning as a rule of the DAG (issue 15; seed 002 §4.6: AI-generated captions align
faster than human ones).

``recaptions: {<name>: {dataset, captioner, prompt, num_beams, max_new_tokens, batch_size,
shards}}`` makes the dataset ``<dataset>+recap-<name>``: the same normalised rows with the
``recaption`` column written by the captioner, usable as any stage's ``dataset:``.

Captioners (:func:`parse_captioner`):

``run:<run>[_s<seed>]``
    the last stage of a run of this DAG, with its PEFT methods (the seed defaults to the run's
    first); prompted as it was trained (its last stage's text format), so ``prompt`` must be
    unset.
``hf:<id>@<rev>`` / ``local:<dir>``
    any image-text-to-text model, loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText``
    and prompted with ``prompt`` (through the processor's chat template when it has one).

Content key (:func:`recaption_key`): the input dataset's identity, the captioner's identity
(for ``run:`` its last stage's hash, which covers its whole chain and backbones) and the prompt
and decoding settings (``num_beams``, ``max_new_tokens``). ``shards`` and ``batch_size`` only
say how the work is cut, not what is generated, so they are not in the key (a choice: greedy /
beam search of one row does not depend on its batch neighbours here, all rows of a batch having
the same prompt length; float summation order in a batched matmul may still differ by ULPs).

Jobs: ``recaption_shard`` (:func:`run_shard`) captions its share of the batches of
``batch_size`` rows (all splits, in train / val / test order), each written atomically as
``part-<start>.json`` as it goes, so a killed shard resumes at its first missing batch (and
another shard count reuses every part: the batch grid does not depend on it); then
``recaption_merge`` (:func:`merge`) writes the dataset with its quality
(``recaption_quality.json``: :func:`quality_records`).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vlalign.config import ConfigError, dataset_defaults
from vlalign.io_utils import atomic_path, stable_hash, write_json_atomic

log = logging.getLogger(__name__)

SEP = "+recap-"
SOURCE_PREFIX = "recaption:"
QUALITY_FILE = "recaption_quality.json"
INFO_FILE = "recaption.json"
DEFAULTS: dict[str, Any] = {
    "prompt": None,
    "num_beams": 1,
    "max_new_tokens": 64,
    "batch_size": 16,
    "shards": 1,
}
SEMANTIC_KEYS = ("dataset", "captioner", "prompt", "num_beams", "max_new_tokens")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_RUN_SEED = re.compile(r"^(?P<run>.+)_s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Captioner:
    """A parsed ``captioner:`` value."""

    scheme: str  # run | hf | local
    ident: str  # run name, hub id or directory
    revision: str | None = None  # hf: the revision; run: None
    seed: int | None = None  # run: the instance's seed (None: the run's first)


@dataclass(frozen=True)
class RecaptionSpec:
    """One ``recaptions:`` entry, defaults filled in and checked."""

    name: str
    dataset: str
    captioner: Captioner
    captioner_text: str
    prompt: str | None
    num_beams: int
    max_new_tokens: int
    batch_size: int
    shards: int

    @property
    def output(self) -> str:
        """The dataset it produces: ``<dataset>+recap-<name>``."""
        return output_name(self.dataset, self.name)


def output_name(dataset: str, name: str) -> str:
    return f"{dataset}{SEP}{name}"


def parse_captioner(value: Any, where: str) -> Captioner:
    """``run:<run>[_s<seed>]`` | ``hf:<id>@<rev>`` | ``local:<dir>``; errors name ``where``."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    scheme, sep, rest = value.partition(":")
    if not sep or not rest or scheme not in ("run", "hf", "local"):
        raise ConfigError(
            f"{where}: unknown captioner {value!r}; expected run:<run>, hf:<id>@<rev> or "
            "local:<dir>"
        )
    if scheme == "hf":
        ident, _, rev = rest.partition("@")
        if not ident or not rev:
            # an unpinned hub model would make the content key lie
            raise ConfigError(f"{where}: {value!r} needs a revision (hf:<id>@<rev>)")
        return Captioner("hf", ident, rev)
    if scheme == "run":
        m = _RUN_SEED.match(rest)
        return Captioner("run", m["run"], None, int(m["seed"])) if m else Captioner("run", rest)
    return Captioner("local", rest)


def _int(block: Mapping[str, Any], key: str, where: str, minimum: int) -> int:
    v = block[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}.{key}: must be an integer >= {minimum}, got {v!r}")
    return v


def resolve_recaptions(config: Mapping[str, Any], source: str = "config") -> list[RecaptionSpec]:
    """Every ``recaptions:`` entry checked (unknown key / dataset / captioner scheme / run,
    shards < 1 ...: ConfigError naming the key)."""
    block = config.get("recaptions") or {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"{source}: recaptions must be a mapping, got {type(block).__name__}")
    base = {d for d, s in config["datasets"].items()
            if not str(s.get("source", "")).startswith(SOURCE_PREFIX)}
    out = []
    for name, entry in block.items():
        where = f"{source}: recaptions.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: a name must match {_NAME.pattern}")
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {entry!r}")
        unknown = set(entry) - {"dataset", "captioner", *DEFAULTS}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: dataset, "
                              f"captioner, {', '.join(DEFAULTS)})")
        for key in ("dataset", "captioner"):
            if key not in entry:
                raise ConfigError(f"{where}: missing key {key!r}")
        e = {**DEFAULTS, **entry}
        known = base | {output_name(s.dataset, s.name) for s in out}
        if e["dataset"] not in known:
            raise ConfigError(f"{where}.dataset: unknown dataset {e['dataset']!r} "
                              f"(known: {sorted(known)})")
        cap = parse_captioner(e["captioner"], f"{where}.captioner")
        if cap.scheme == "run":
            from vlalign.runs.plan import all_runs  # lazy: plan imports this module's users

            runs = all_runs(config)
            if cap.ident not in runs:
                raise ConfigError(f"{where}.captioner: unknown run {cap.ident!r} "
                                  f"(known: {sorted(runs)})")
            seeds = runs[cap.ident]["seeds"]
            if cap.seed is not None and cap.seed not in seeds:
                raise ConfigError(f"{where}.captioner: run {cap.ident!r} has no seed "
                                  f"{cap.seed} (seeds: {seeds})")
            if e["prompt"] is not None:
                raise ConfigError(f"{where}.prompt: a run: captioner is prompted as it was "
                                  "trained (its last stage's text format); leave prompt unset")
        elif not isinstance(e["prompt"], str) or not e["prompt"].strip():
            raise ConfigError(f"{where}.prompt: an {cap.scheme}: captioner needs a prompt "
                              f"(a non-empty string), got {e['prompt']!r}")
        out.append(RecaptionSpec(
            name=name, dataset=e["dataset"], captioner=cap, captioner_text=e["captioner"],
            prompt=e["prompt"], num_beams=_int(e, "num_beams", where, 1),
            max_new_tokens=_int(e, "max_new_tokens", where, 1),
            batch_size=_int(e, "batch_size", where, 1), shards=_int(e, "shards", where, 1),
        ))
        if output_name(e["dataset"], name) in base:
            raise ConfigError(f"{where}: its output {output_name(e['dataset'], name)!r} is "
                              "already a dataset under 'datasets'")
    return out


def captioner_instance(config: Mapping[str, Any], spec: RecaptionSpec) -> str | None:
    """``run:`` captioners: the run instance ``<run>_s<seed>`` whose last stage captions."""
    cap = spec.captioner
    if cap.scheme != "run":
        return None
    from vlalign.runs.plan import all_runs

    seed = cap.seed if cap.seed is not None else all_runs(config)[cap.ident]["seeds"][0]
    return f"{cap.ident}_s{seed}"


def recaption_key(config: Mapping[str, Any], spec: RecaptionSpec,
                  run_stage: Mapping[str, str] | None = None) -> str:
    """The content key of a recaptioned dataset (module docstring); ``run_stage``: run
    instance → its last stage hash (``run:`` captioners)."""
    from vlalign.runs.plan import data_identity

    cap = spec.captioner
    if cap.scheme == "run":
        ident: Any = {"stage": (run_stage or {}).get(captioner_instance(config, spec))}
    elif cap.scheme == "hf":
        ident = {"hf": cap.ident, "revision": cap.revision}
    else:
        ident = {"local": cap.ident}  # a choice: the directory's path, not its content
    return stable_hash({
        "data": data_identity(dict(config), spec.dataset),
        "captioner": ident,
        "prompt": spec.prompt,
        "num_beams": spec.num_beams,
        "max_new_tokens": spec.max_new_tokens,
    })


def expand_recaptions(config: dict[str, Any], source: str = "config") -> list[RecaptionSpec]:
    """Add each recaptioned dataset to ``config["datasets"]`` as ``{source: recaption:<name>,
    recaption_key: <key>}`` (in place), so stages name it like any dataset and its key enters
    their hashes through ``data_identity``. ``run:`` keys need the plan, whose stages may read
    recaptioned data: iterated to a fixed point; a captioner trained on its own output never
    gets one (ConfigError)."""
    specs = resolve_recaptions(config, source)
    outputs = {s.output for s in specs}
    for d, spec in config["datasets"].items():
        if str(spec.get("source", "")).startswith(SOURCE_PREFIX) and d not in outputs:
            raise ConfigError(f"{source}: datasets.{d}: source {spec['source']!r} is made by "
                              "a recaptions: entry, not written by hand")
    if not specs:
        return specs
    keys: dict[str, str] = {s.name: "" for s in specs}
    # the schema's dataset defaults; the domain is its images'
    base = {s.name: {**dataset_defaults(), "domain": config["datasets"][s.dataset]["domain"],
                     "source": SOURCE_PREFIX + s.name} for s in specs}
    for _ in range(len(specs) + 2):
        for s in specs:
            config["datasets"][s.output] = {**base[s.name], "recaption_key": keys[s.name]}
        run_stage: dict[str, str] = {}
        if any(s.captioner.scheme == "run" for s in specs):
            from vlalign.runs.plan import plan

            _, runs = plan(config)
            run_stage = {name: node.stages[-1] for name, node in runs.items()}
        new = {s.name: recaption_key(config, s, run_stage) for s in specs}
        if new == keys:
            return specs
        keys = new
    raise ConfigError(f"{source}: recaptions: no fixed point of the content keys: a captioner "
                      "run is trained (directly or not) on its own recaptions")


# ---------------------------------------------------------------------------------------------
# Rows, shards and batches.


def shard_batches(n_rows: int, batch_size: int, shards: int, shard: int) -> list[int]:
    """The first rows of shard ``shard``'s batches: the rows cut into batches of
    ``batch_size`` on one grid (whatever ``shards`` is, so another shard count reuses every
    part written), the batches into ``shards`` contiguous, near-equal runs."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    n_batches = -(-n_rows // batch_size)
    first, stop = n_batches * shard // shards, n_batches * (shard + 1) // shards
    return [b * batch_size for b in range(first, stop)]


def load_rows(data_dir: str | Path):
    """The dataset's splits, and all its rows as one Dataset (train, val, test order)."""
    from datasets import concatenate_datasets, load_from_disk

    from vlalign.data.schema import SPLITS

    dsd = load_from_disk(str(data_dir))
    missing = [s for s in SPLITS if s not in dsd]
    if missing:
        raise ValueError(f"{data_dir}: not a normalised dataset (no splits {missing})")
    return dsd, concatenate_datasets([dsd[s] for s in SPLITS])


class CaptionFn(Protocol):
    def __call__(self, images: Sequence[Any]) -> list[str]: ...


def part_path(shard_dir: Path, start: int) -> Path:
    return shard_dir / f"part-{start:08d}.json"


def run_shard(
    data_dir: str | Path,
    parts_dir: str | Path,
    *,
    shards: int,
    shard: int,
    batch_size: int,
    load_captioner: Callable[[], CaptionFn],
    done: str | Path | None = None,
) -> int:
    """Caption shard ``shard``'s batches into ``parts_dir/part-<start>.json`` (atomic each),
    skipping batches already written; the captioner is loaded only if a batch is left. Writes
    ``done`` (the rule's output) last. Returns the number of batches captioned."""
    from tqdm.auto import tqdm

    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    _, rows = load_rows(data_dir)
    starts = shard_batches(len(rows), batch_size, shards, shard)
    todo = [s for s in starts if not part_path(parts_dir, s).is_file()]
    log.info("shard %d/%d: %d of %d batches left", shard, shards, len(todo), len(starts))
    caption = load_captioner() if todo else None
    for start in tqdm(todo, desc=f"recaption shard {shard}/{shards}", disable=None):
        stop = min(start + batch_size, len(rows))
        batch = rows.select(range(start, stop))
        texts = caption(list(batch["image"]))
        if len(texts) != stop - start:
            raise RuntimeError(f"captioner gave {len(texts)} captions for {stop - start} images")
        write_json_atomic(part_path(parts_dir, start), {
            "start": start, "image_ids": list(batch["image_id"]), "recaptions": list(texts)})
    if done is not None:
        write_json_atomic(done, {"shard": shard, "shards": shards, "batches": len(starts),
                                 "captioned": len(todo)})
    return len(todo)


def read_parts(parts_dir: str | Path, ids: Sequence[str]) -> list[str]:
    """Every row's generated text from the parts; a gap, or a part whose image ids are not
    the dataset's rows, is an error."""
    texts: list[str | None] = [None] * len(ids)
    for path in sorted(Path(parts_dir).glob("part-*.json")):
        part = json.loads(path.read_text())
        start, n = part["start"], len(part["image_ids"])
        if list(ids[start:start + n]) != part["image_ids"]:
            raise ValueError(f"{path}: its image ids are not the dataset's rows at {start} "
                             "(a part from another dataset?)")
        texts[start:start + n] = part["recaptions"]
    gaps = [i for i, t in enumerate(texts) if t is None]
    if gaps:
        raise ValueError(f"{parts_dir}: {len(gaps)} rows have no recaption (first: row "
                         f"{gaps[0]}); are all shards done?")
    return texts  # type: ignore[return-value]


def merge(data_dir: str | Path, parts_dir: str | Path, out: str | Path, *,
          info: Mapping[str, Any]) -> dict[str, Any]:
    """The input dataset with ``recaption`` replaced by the parts' text, its
    ``recaption.json`` (``info``) and ``recaption_quality.json``, written atomically."""
    from vlalign.data.schema import FEATURES, SPLITS

    dsd, rows = load_rows(data_dir)
    texts = read_parts(parts_dir, [str(i) for i in rows["image_id"]])
    offset = 0
    for s in SPLITS:
        n = len(dsd[s])
        ds = dsd[s].remove_columns("recaption")
        ds = ds.add_column("recaption", texts[offset:offset + n], feature=FEATURES["recaption"])
        dsd[s] = ds.select_columns(list(FEATURES)).cast(FEATURES)
        offset += n
    quality = quality_records(dsd, dataset=str(info.get("output", Path(out).name)),
                              recaption=str(info.get("name", "")))
    # an empty split saved without a shard cannot be loaded again (as save_dataset does)
    empty = {s: 1 for s in SPLITS if len(dsd[s]) == 0}
    with atomic_path(out, is_dir=True) as tmp:
        dsd.save_to_disk(str(tmp), num_shards=empty or None)
        (tmp / INFO_FILE).write_text(json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2, sort_keys=True) + "\n")
    return quality


# ---------------------------------------------------------------------------------------------
# Quality.


def _tokens(text: str) -> int:
    return len(text.split())


def quality_records(dsd, *, dataset: str, recaption: str) -> dict[str, Any]:
    """Per split, the generated recaptions' length statistics (whitespace tokens: mean,
    median) everywhere, and where the rows have them, caption metrics against the human
    ``captions`` (BLEU-4, CIDEr, ROUGE-L; METEOR off: its JVM) and the grounding metrics of
    :func:`vlalign.eval.grounding.caption_grounding` against the world's objects
    (attribute accuracy, CHAIR). A metric with nothing to score is listed in ``missing``."""
    from vlalign.eval.caption_metrics import CaptionScorer
    from vlalign.eval.grounding import caption_grounding, objects_of

    records: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for split, ds in dsd.items():
        texts = list(ds["recaption"])
        if not texts:
            continue

        def add(metric: str, value: float, split: str = split) -> None:
            records.append({"dataset": dataset, "recaption": recaption, "split": split,
                            "metric": metric, "value": float(value)})

        lengths = [_tokens(t) for t in texts]
        add("n_images", len(texts))
        add("length_mean", statistics.fmean(lengths))
        add("length_median", statistics.median(lengths))
        add("empty_frac", sum(n == 0 for n in lengths) / len(lengths))
        ids = [str(i) for i in ds["image_id"]]
        refs = {i: [c for c in caps if c.strip()] for i, caps in zip(ids, ds["captions"])}
        if all(refs.values()):
            with CaptionScorer("off", meteor=False) as scorer:
                scores = scorer.score(dict(zip(ids, texts)), refs)
            for m in ("Bleu_4", "CIDEr", "ROUGE_L"):
                if m in scores.scores:
                    add(m, scores.scores[m])
        else:
            missing.append({"split": split, "metric": "captions",
                            "reason": "rows without human captions: no caption metrics"})
        scenes = [objects_of(m) for m in ds["meta"]]
        if any(s is not None for s in scenes):
            g, g_missing = caption_grounding(texts, scenes, where=f"{dataset}/{split}")
            for m, v in g.items():
                add(m, v)
            missing += [{"split": split, **m} for m in g_missing]
    return {"dataset": dataset, "recaption": recaption, "records": records, "missing": missing}


# ---------------------------------------------------------------------------------------------
# Captioners.


def run_captioner(stage_dir: str | Path, tokenizer: str | Path, vision: str | Path, *,
                  text_settings: Mapping[str, Any], num_beams: int,
                  max_new_tokens: int) -> CaptionFn:
    """A DAG-trained stage (with its PEFT methods: :func:`vlalign.eval.job.load_stage`)
    prompted with its caption prompt in its last stage's text format."""
    import torch

    from vlalign.data.text_formats import TextFormat, caption_prompt, decode_text
    from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
    from vlalign.eval.job import load_stage
    from vlalign.models.backbones import load_image_processor
    from vlalign.models.generation import generate

    stage = load_stage(stage_dir)
    stage.model.eval()
    tok = load_tokenizer(tokenizer)
    special = vlm_token_ids(tok)
    processor = load_image_processor(vision)
    prompt = caption_prompt(tok, TextFormat.from_settings(text_settings))
    device = next(stage.model.parameters()).device

    @torch.no_grad()
    def caption(images: Sequence[Any]) -> list[str]:
        pixels = processor(images=[im.convert("RGB") for im in images],
                           return_tensors="pt")["pixel_values"].to(device)
        new = generate(stage.model, pixels, [prompt] * len(images), num_beams=num_beams,
                       max_new_tokens=max_new_tokens, eos_token_id=special["eos"],
                       pad_token_id=special["pad"], inputs=stage.inputs())
        return [decode_text(tok, ids) for ids in new]

    return caption


def hf_captioner(path_or_id: str, *, revision: str | None, prompt: str, num_beams: int,
                 max_new_tokens: int, dtype: str = "auto") -> CaptionFn:
    """An image-text-to-text model (``AutoProcessor`` + ``AutoModelForImageTextToText``),
    greedy / beam search, prompted through the processor's chat template when it has one
    (one user turn: the image, then ``prompt``), else with ``prompt`` as the text."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path_or_id, revision=revision)
    model = AutoModelForImageTextToText.from_pretrained(path_or_id, revision=revision,
                                                        dtype=dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"  # batched decoder-only generation continues from the right end
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = prompt

    @torch.no_grad()
    def caption(images: Sequence[Any]) -> list[str]:
        rgb = [im.convert("RGB") for im in images]
        inputs = processor(images=rgb, text=[text] * len(rgb), padding=True,
                           return_tensors="pt").to(device)
        out = model.generate(**inputs, do_sample=False, num_beams=num_beams,
                             max_new_tokens=max_new_tokens)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]

    return caption


__all__ = [
    "Captioner", "RecaptionSpec", "expand_recaptions", "hf_captioner", "merge", "output_name",
    "parse_captioner", "quality_records", "recaption_key", "resolve_recaptions",
    "run_captioner", "run_shard", "shard_batches",
]
