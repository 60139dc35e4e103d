"""Data sources → the normalised schema (``vlalign.data.schema.FEATURES``).

One entry point, :func:`load_source`, turns a dataset spec from the config into a
``datasets.DatasetDict`` with the splits train / val / test, whatever the source:

``source``
    ``synthetic`` (the embedded world, :func:`vlalign.data.world.generate_world`),
    ``hf:<id>[@revision]`` (``datasets.load_dataset``; a local directory path works too) or
    ``local:<path>`` (a ``save_to_disk`` directory, a directory of parquet / arrow / json / csv
    files, or a single such file).
``format``
    A preset column layout of a paper-recipe dataset, see :data:`PRESETS`:
    ``llava`` (LLaVA-ReCap-118K / -558K, LLaVA-NeXT-Data), ``coco_karpathy``
    (yerevann/coco-karpathy, images read from ``image_root/filepath/filename``), ``flickr30k``
    (nlphuji/flickr30k, lmms-lab/flickr30k), ``flickr8k`` (jxie/flickr8k), ``pathvqa``
    (flaviagiammarino/path-vqa), ``url_captions`` (an image and one caption per row: what
    :mod:`vlalign.data.download` makes of a ``urls:<path>`` URL list), and seed 001's (PETAL)
    ``textcaps`` (lmms-lab/TextCaps),
    ``okvqa`` (lmms-lab/OK-VQA), ``aokvqa`` (HuggingFaceM4/A-OKVQA) and ``textvqa``
    (lmms-lab/textvqa). A VQA source with one row per question keeps one qa pair per row, with
    the question id as ``image_id``.
``columns``
    Overrides of the preset mapping: preset field → source column (a list of columns for
    ``captions`` means one caption per column, as in flickr8k).
``splits`` / ``split_fractions``
    How our splits are made, in this order of precedence: an explicit ``splits`` mapping
    (our split → source split name or list of names; a split left out is empty); explicit
    ``split_fractions`` (deterministic shuffle of all source rows with ``seed``); the preset's
    split *column* when the data has it (``split_column`` / ``split_values`` override it,
    ``split_column: null`` disables it; Karpathy ``restval`` → train); source splits named
    train / val|validation|dev / test; a single source split → default fractions 0.9/0.05/0.05.
``val_from_train``
    N: the val split is N rows of train drawn with ``seed`` (and leaves train); for a protocol
    that validates on train pairs and tests on the source's validation split (seed 000's COCO).
``max_rows``
    Per-split cap on source rows (smoke runs), applied before normalisation.
``on_error``
    ``raise`` (default): the first bad row raises :class:`SourceError` naming dataset, source
    split, row and column. ``skip``: bad rows are dropped, a warning with the count is logged,
    and the count is recorded per split (see *Report* below) — never a silent drop.
``recaption`` (``llava`` only)
    ``auto`` (default: a single human turn + one gpt answer is a ReCap row, the answer becomes
    ``recaption``), ``always`` (every row must be such a pair), ``never`` (instruction data).
``subset``, ``cache_dir``, ``num_proc``
    Passed to ``load_dataset`` (config name, cache directory) and ``Dataset.map``; with
    ``cache_dir`` the normalisation cache files are written there too (not next to the source).

Report: every returned split carries a JSON object in ``dsd[split].info.description`` (it
survives :func:`save_dataset` / ``load_from_disk``): ``{"vlalign": {"dataset", "source",
"format", "split", "rows", "skipped", "skipped_examples"}}``; :func:`load_report` parses it.

Images are normalised to RGB (RGB JPEG / PNG bytes are kept as they are, anything else is
re-encoded as PNG); ``image_id`` is a string (``<source split>-<row>`` where the source has no
id); ``meta`` is a JSON string with the source-specific extras plus ``source_split`` /
``source_row``.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets import Image as HFImage

from vlalign.data.schema import FEATURES, SPLITS
from vlalign.io_utils import atomic_path, stable_hash

log = logging.getLogger(__name__)

_ROW = "_vlalign_src_row"
_SRC_SPLIT = "_vlalign_src_split"
_ERR = "_vlalign_error"
_OUT_FEATURES = Features({**FEATURES, _ERR: Value("string")})
_DEFAULT_FRACTIONS = {"train": 0.9, "val": 0.05, "test": 0.05}
_STANDARD_SPLIT_NAMES = {
    "train": ("train",),
    "val": ("val", "validation", "dev"),
    "test": ("test",),
}
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
}
_N_EXAMPLES = 5  # skipped-row messages kept in the report


class SourceError(ValueError):
    """A dataset that cannot be normalised: names the dataset and, for bad rows, row and column."""


class _RowError(Exception):
    def __init__(self, column: str, message: str) -> None:
        super().__init__(column, message)
        self.column = column
        self.message = message


# ---------------------------------------------------------------------------------------------
# Presets: per format, the source columns of each field and a row normaliser.


@dataclass(frozen=True)
class Preset:
    """Column layout of one real dataset family and how one of its rows is normalised."""

    columns: dict[str, str | list[str] | None]  # preset field -> default source column(s)
    required: tuple[str, ...]  # fields whose column must exist
    normalise: Callable[[_Row, _Ctx], dict[str, Any]]
    id_field: str | None = None  # field holding the image id; None -> "<split>-<row>"
    split_column: str | None = None  # field holding a per-row split name, if any
    split_values: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Ctx:
    """Everything the (pickled, fingerprinted) map function needs."""

    name: str
    preset_name: str
    columns: dict[str, str | list[str] | None]
    image_root: str | None
    recaption: str
    split: str
    raise_errors: bool


class _Row:
    """Access to one source row by preset field, so errors can name the real column."""

    def __init__(self, row: dict[str, Any], ctx: _Ctx) -> None:
        self.row = row
        self.ctx = ctx

    def col(self, fld: str) -> str:
        c = self.ctx.columns.get(fld)
        return c if isinstance(c, str) else str(c)

    def get(self, fld: str) -> Any:
        c = self.ctx.columns.get(fld)
        if c is None or isinstance(c, list):
            return None
        return self.row.get(c)


def _text(value: Any, column: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _RowError(column, f"empty {what} ({value!r})")
    return value.strip()


def _captions(r: _Row, fld: str = "captions") -> list[str]:
    spec = r.ctx.columns[fld]
    if isinstance(spec, list):  # one caption per column (flickr8k)
        return [_text(r.row.get(c), c, "caption") for c in spec]
    value, column = r.get(fld), r.col(fld)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise _RowError(column, f"empty caption list ({value!r})")
    # Karpathy's original JSON stores sentences as {"raw", "tokens", ...} dicts.
    value = [v.get("raw") if isinstance(v, dict) else v for v in value]
    return [_text(v, f"{column}[{i}]", "caption") for i, v in enumerate(value)]


def _png(im: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _rgb_bytes(data: bytes, column: str) -> bytes:
    """Verify image bytes with PIL and return RGB JPEG/PNG bytes."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure / checksums
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated data that verify() lets through
            if im.mode == "RGB" and im.format in ("JPEG", "PNG"):
                return data
            return _png(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise _RowError(column, f"corrupt or unreadable image ({type(e).__name__}: {e})") from e


def _read_file(path: Path, column: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _RowError(column, f"image file not found: {path}") from None
    except OSError as e:
        raise _RowError(column, f"cannot read image file {path}: {e}") from e


def _image(r: _Row, fld: str = "image") -> bytes:
    value, column = r.get(fld), r.col(fld)
    if isinstance(value, dict):  # HF Image(decode=False): {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return _rgb_bytes(bytes(value), column)
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and r.ctx.image_root:
            path = Path(r.ctx.image_root) / path
        return _rgb_bytes(_read_file(path, column), column)
    if isinstance(value, PIL.Image.Image):
        return _png(value.convert("RGB"))
    raise _RowError(column, f"no image ({type(value).__name__})")


def _norm_llava(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    column, raw = r.col("conversations"), r.get("conversations")
    if not isinstance(raw, list | tuple) or not raw:
        raise _RowError(column, f"empty conversation ({raw!r})")
    conv = []
    for i, turn in enumerate(raw):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in ("human", "gpt"):
            raise _RowError(f"{column}[{i}].from", f"expected 'human' or 'gpt', got {who!r}")
        conv.append({"from": who, "value": _text(turn.get("value"), f"{column}[{i}].value",
                                                 f"{who} turn")})
    single = len(conv) == 2 and conv[0]["from"] == "human" and conv[1]["from"] == "gpt"
    if ctx.recaption == "always" and not single:
        raise _RowError(column, f"recaption: always needs one human turn + one gpt answer, "
                                f"got {[t['from'] for t in conv]}")
    recap = conv[1]["value"] if single and ctx.recaption != "never" else ""
    return {"image": _image(r), "captions": [], "recaption": recap, "qa": [],
            "conversations": conv, "meta": {"data_source": r.get("data_source")}}


def _norm_coco_karpathy(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    if not ctx.image_root:
        raise _RowError(r.col("filepath"), "coco_karpathy has no image bytes: set image_root")
    filepath = _text(r.get("filepath"), r.col("filepath"), "filepath")
    filename = _text(r.get("filename"), r.col("filename"), "filename")
    captions = _captions(r)
    path = Path(ctx.image_root) / filepath / filename
    image = _rgb_bytes(_read_file(path, r.col("filename")), r.col("filename"))
    meta = {"cocoid": r.get("image_id"), "filepath": filepath, "filename": filename,
            "url": r.get("url"), "karpathy_split": r.get("split")}
    return {"image": image, "captions": captions, "recaption": "", "qa": [],
            "conversations": [], "meta": meta}


def _norm_captioned(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    meta = {k: r.get(k) for k in ("filename", "image_name") if r.get(k) is not None}
    return {"image": _image(r), "captions": _captions(r), "recaption": "", "qa": [],
            "conversations": [], "meta": meta}


def _norm_pathvqa(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    question = _text(r.get("question"), r.col("question"), "question")
    answer = _text(r.get("answer"), r.col("answer"), "answer")
    return {"image": _image(r), "captions": [], "recaption": "",
            "qa": [{"question": question, "answers": [answer]}], "conversations": [],
            "meta": {}}


def _answers(r: _Row, fld: str = "answers") -> list[str]:
    """Every annotator answer, in order (VQAv2 soft accuracy counts repeats)."""
    value, column = r.get(fld), r.col(fld)
    if not isinstance(value, list | tuple) or not value:
        raise _RowError(column, f"empty answer list ({value!r})")
    return [_text(v, f"{column}[{i}]", "answer") for i, v in enumerate(value)]


def _extras(r: _Row, used: tuple[str, ...]) -> dict[str, Any]:
    """The preset's other fields (those the source has) for ``meta``."""
    return {f: r.get(f) for f in r.ctx.columns if f not in used and r.get(f) is not None}


_VQA_USED = ("image", "image_id", "question", "answers")


def _norm_vqa(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    """One question per row with its list of answers (OK-VQA, TextVQA)."""
    question = _text(r.get("question"), r.col("question"), "question")
    return {"image": _image(r), "captions": [], "recaption": "",
            "qa": [{"question": question, "answers": _answers(r)}], "conversations": [],
            "meta": _extras(r, _VQA_USED)}


def _norm_aokvqa(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    """A-OKVQA: the direct answers are the qa answers; the multiple-choice options, the
    correct option's index and the rationales go to ``meta``."""
    rec = _norm_vqa(r, ctx)
    column, choices = r.col("choices"), r.get("choices")
    if not isinstance(choices, list | tuple) or not choices:
        raise _RowError(column, f"empty choice list ({choices!r})")
    rec["meta"]["choices"] = [_text(c, f"{column}[{i}]", "choice") for i, c in enumerate(choices)]
    idx = r.get("correct_choice_idx")
    if idx is not None and not (isinstance(idx, int) and 0 <= idx < len(choices)):
        raise _RowError(r.col("correct_choice_idx"),
                        f"not an index into the {len(choices)} choices ({idx!r})")
    return rec


def _norm_url_caption(r: _Row, ctx: _Ctx) -> dict[str, Any]:
    """One image with one caption, as fetched from a URL list (``vlalign.data.download``):
    the URL and the other preset fields the source has go to ``meta``."""
    return {"image": _image(r), "captions": _captions(r), "recaption": "", "qa": [],
            "conversations": [], "meta": _extras(r, ("image", "captions", "image_id"))}


_SPLIT_EQ = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}

PRESETS: dict[str, Preset] = {
    "llava": Preset(
        columns={"image_id": "id", "image": "image", "conversations": "conversations",
                 "data_source": "data_source"},
        required=("image", "conversations"),
        normalise=_norm_llava,
        id_field="image_id",
    ),
    "coco_karpathy": Preset(
        columns={"image_id": "cocoid", "filepath": "filepath", "filename": "filename",
                 "captions": "sentences", "split": "split", "url": "url"},
        required=("image_id", "filepath", "filename", "captions"),
        normalise=_norm_coco_karpathy,
        id_field="image_id",
        split_column="split",
        split_values={"train": ("train", "restval"), "val": ("val",), "test": ("test",)},
    ),
    "flickr30k": Preset(
        columns={"image": "image", "captions": "caption", "image_id": "img_id",
                 "filename": "filename", "split": "split"},
        required=("image", "captions"),
        normalise=_norm_captioned,
        id_field="image_id",
        split_column="split",
        split_values=_SPLIT_EQ,
    ),
    "flickr8k": Preset(
        columns={"image": "image", "captions": [f"caption_{i}" for i in range(5)]},
        required=("image", "captions"),
        normalise=_norm_captioned,
    ),
    "pathvqa": Preset(
        columns={"image": "image", "question": "question", "answer": "answer"},
        required=("image", "question", "answer"),
        normalise=_norm_pathvqa,
    ),
    # Seed 001 (PETAL). Column defaults from the hub dataset cards (their dataset_info
    # features) and, for what a column means, the loaders that read them (lmms-eval's tasks).
    # The VQA sources have one row per question: its question id is the row's image_id.
    # lmms-lab/TextCaps: one row per image; `caption_str` (a list) holds its captions, the
    # column lmms-eval's TextCaps task scores against (`reference_strs` is not read),
    # `image_id` the OpenImages id, `image_name` the file name. Splits train / val / test; the
    # test split has no public captions.
    "textcaps": Preset(
        columns={"image": "image", "captions": "caption_str", "image_id": "image_id",
                 "image_name": "image_name"},
        required=("image", "captions"),
        normalise=_norm_captioned,
        id_field="image_id",
    ),
    # lmms-lab/OK-VQA: `question_id`, `image`, `question`, `answers` (10 per question, repeats
    # kept), `question_type`, `answer_type`; a single split `val2014` (OK-VQA's 5,046 val
    # questions; its train split is not in this repo).
    "okvqa": Preset(
        columns={"image": "image", "image_id": "question_id", "question": "question",
                 "answers": "answers", "question_type": "question_type",
                 "answer_type": "answer_type"},
        required=("image", "question", "answers"),
        normalise=_norm_vqa,
        id_field="image_id",
    ),
    # HuggingFaceM4/A-OKVQA (no feature list found on its card: the columns as code loading
    # this hub repo reads them): `image`, `question_id`, `question`, `choices` (4 options),
    # `correct_choice_idx`, `direct_answers` (10), `difficult_direct_answer`; `rationales` as
    # in A-OKVQA's own JSON (kept when present). Splits train / validation / test (test
    # answers are not public).
    "aokvqa": Preset(
        columns={"image": "image", "image_id": "question_id", "question": "question",
                 "answers": "direct_answers", "choices": "choices",
                 "correct_choice_idx": "correct_choice_idx",
                 "difficult_direct_answer": "difficult_direct_answer",
                 "rationales": "rationales"},
        required=("image", "question", "answers", "choices"),
        normalise=_norm_aokvqa,
        id_field="image_id",
    ),
    # lmms-lab/textvqa: `image_id` (OpenImages), `question_id`, `question`, `image`, `answers`
    # (10), `ocr_tokens`, ... (also `image_classes`, `set_name`, image sizes and URLs, not
    # kept); splits train / validation / test (test answers are not public).
    "textvqa": Preset(
        columns={"image": "image", "image_id": "question_id", "question": "question",
                 "answers": "answers", "openimages_id": "image_id",
                 "ocr_tokens": "ocr_tokens"},
        required=("image", "question", "answers"),
        normalise=_norm_vqa,
        id_field="image_id",
    ),
    # Image + one caption per row (Conceptual Captions, LAION-style URL lists once fetched by
    # vlalign.data.download, which writes these columns; also any local parquet of that shape).
    "url_captions": Preset(
        columns={"image": "image", "captions": "caption", "image_id": "image_id", "url": "url",
                 "sha256": "sha256"},
        required=("image", "captions"),
        normalise=_norm_url_caption,
        id_field="image_id",
    ),
}


# ---------------------------------------------------------------------------------------------
# The map function (module level so datasets can pickle and fingerprint it).


def _placeholder() -> dict[str, Any]:
    return {"image_id": "", "image": None, "captions": [], "recaption": "", "qa": [],
            "conversations": [], "meta": "{}"}


def _normalise_batch(batch: dict[str, list], ctx: _Ctx) -> dict[str, list]:
    preset = PRESETS[ctx.preset_name]
    out: dict[str, list] = {k: [] for k in _OUT_FEATURES}
    for i in range(len(batch[_ROW])):
        row = {k: v[i] for k, v in batch.items()}
        src_split, src_row = row[_SRC_SPLIT], row[_ROW]
        r = _Row(row, ctx)
        try:
            rec = preset.normalise(r, ctx)
            err = ""
        except _RowError as e:
            msg = (f"dataset '{ctx.name}' (format {ctx.preset_name}): source split "
                   f"'{src_split}' row {src_row}, column '{e.column}': {e.message}")
            if ctx.raise_errors:
                raise SourceError(msg) from None
            rec, err = _placeholder(), msg
        else:
            image_id = r.get(preset.id_field) if preset.id_field else None
            rec["image_id"] = (str(image_id) if image_id not in (None, "")
                               else f"{src_split}-{src_row}")
            rec["image"] = {"bytes": rec["image"], "path": None}
            meta = {k: v for k, v in rec["meta"].items() if v is not None}
            meta.update(source_split=src_split, source_row=src_row)
            rec["meta"] = json.dumps(meta, sort_keys=True, default=str)
        rec["split"] = ctx.split
        rec[_ERR] = err
        for k in out:
            out[k].append(rec[k])
    return out


# ---------------------------------------------------------------------------------------------
# Loading raw sources.


def _parse_hf(ident: str) -> tuple[str, str | None]:
    repo, sep, rev = ident.rpartition("@")
    return (repo, rev or None) if sep and repo else (ident, None)


def _as_dict(d: Dataset | DatasetDict, default: str = "train") -> DatasetDict:
    return d if isinstance(d, DatasetDict) else DatasetDict({default: d})


def _load_hf(name: str, ident: str, spec: dict, wanted: list[str] | None) -> DatasetDict:
    repo, rev = _parse_hf(ident)
    kw = {"name": spec.get("subset"), "revision": rev, "cache_dir": spec.get("cache_dir")}
    try:
        if wanted:
            return DatasetDict({s: load_dataset(repo, split=s, **kw) for s in wanted})
        return _as_dict(load_dataset(repo, **kw))
    except (FileNotFoundError, ValueError) as e:
        raise SourceError(f"dataset '{name}': cannot load hf:{ident}: {e}") from e


def _load_local(name: str, path_str: str, spec: dict) -> DatasetDict:
    path = Path(path_str).expanduser()
    cache_dir = spec.get("cache_dir")
    if not path.exists():
        raise SourceError(f"dataset '{name}': local source {path} does not exist")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _as_dict(load_from_disk(str(path)))
        exts = Counter(f.suffix for f in path.rglob("*") if f.suffix in _FILE_BUILDERS)
        if not exts:
            raise SourceError(f"dataset '{name}': {path} holds no save_to_disk dataset and no "
                              f"{sorted(_FILE_BUILDERS)} files")
        builders = {_FILE_BUILDERS[e] for e in exts}
        if len(builders) > 1:
            raise SourceError(f"dataset '{name}': {path} mixes data file types {sorted(exts)}")
        # data_dir lets datasets infer the splits from file names (train-*.parquet, test/...).
        return _as_dict(load_dataset(builders.pop(), data_dir=str(path), cache_dir=cache_dir))
    builder = _FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise SourceError(f"dataset '{name}': unsupported file type {path.suffix!r} ({path}); "
                          f"expected one of {sorted(_FILE_BUILDERS)}")
    return _as_dict(load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir))


# ---------------------------------------------------------------------------------------------
# Splits.


def _wanted_source_splits(spec: dict) -> dict[str, list[str]] | None:
    splits = spec.get("splits")
    if splits is None:
        return None
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise SourceError(f"`splits` must map some of {list(SPLITS)} to source split names, "
                          f"got {splits!r}")
    return {ours: [src] if isinstance(src, str) else list(src) for ours, src in splits.items()}


def _by_fractions(name: str, ds: Dataset, fractions: dict, seed: int) -> dict[str, Dataset]:
    if not isinstance(fractions, dict) or set(fractions) - set(SPLITS):
        raise SourceError(f"dataset '{name}': split_fractions must map {list(SPLITS)} to "
                          f"fractions, got {fractions!r}")
    fr = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    if min(fr.values()) < 0 or not math.isclose(sum(fr.values()), 1.0, abs_tol=1e-6):
        raise SourceError(f"dataset '{name}': split_fractions must be >= 0 and sum to 1, "
                          f"got {fractions!r}")
    order = np.random.default_rng(seed).permutation(len(ds))
    n_train = round(fr["train"] * len(ds))
    n_val = min(round(fr["val"] * len(ds)), len(ds) - n_train)
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}
    return {s: ds.select(np.sort(idx)) for s, idx in cuts.items()}


def _by_column(name: str, ds: Dataset, column: str, values: dict) -> dict[str, Dataset]:
    to_ours = {v: ours for ours, vs in values.items()
               for v in ([vs] if isinstance(vs, str) else vs)}
    idx: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, v in enumerate(ds[column]):
        if v not in to_ours:
            src = ds.select_columns([_SRC_SPLIT, _ROW])[i]
            raise SourceError(f"dataset '{name}': source split '{src[_SRC_SPLIT]}' row "
                              f"{src[_ROW]}, column '{column}': unknown split value {v!r} "
                              f"(known: {sorted(to_ours)}; set `split_values`)")
        idx[to_ours[v]].append(i)
    return {s: ds.select(idx[s]) for s in SPLITS}


def _make_splits(name: str, raw: DatasetDict, spec: dict, preset: Preset,
                 columns: dict, wanted: dict[str, list[str]] | None,
                 seed: int) -> dict[str, Dataset | None]:
    if wanted is not None:
        return {s: concatenate_datasets([raw[src] for src in wanted[s]]) if s in wanted
                else None for s in SPLITS}
    everything = concatenate_datasets([raw[s] for s in raw])
    if "split_fractions" in spec:
        return _by_fractions(name, everything, spec["split_fractions"], seed)
    split_col = spec.get("split_column", columns.get(preset.split_column or "", None))
    if split_col and split_col in everything.column_names:
        values = spec.get("split_values") or preset.split_values or _SPLIT_EQ
        return _by_column(name, everything, split_col, values)
    found = {ours: next((n for n in names if n in raw), None)
             for ours, names in _STANDARD_SPLIT_NAMES.items()}
    if all(found.values()):
        return {ours: raw[src] for ours, src in found.items()}
    if len(raw) == 1:
        log.info("dataset %s: one source split, using split_fractions %s", name,
                 _DEFAULT_FRACTIONS)
        return _by_fractions(name, everything, _DEFAULT_FRACTIONS, seed)
    raise SourceError(f"dataset '{name}': cannot map source splits {list(raw)} to "
                      f"{list(SPLITS)}; give `splits` or `split_fractions`")


def _val_from_train(name: str, parts: dict[str, Dataset | None], n: int,
                    seed: int) -> dict[str, Dataset | None]:
    """``val_from_train: n``: ``n`` train rows drawn with ``seed`` become the val split (seed
    000's COCO protocol: 5,000 random train pairs as validation, COCO val as the test set)."""
    train, val = parts.get("train"), parts.get("val")
    if val is not None and len(val) > 0:
        raise SourceError(f"dataset '{name}': val_from_train draws the val split from train, "
                          f"but the val split already has {len(val)} rows (leave it out of "
                          "`splits`)")
    if train is None or n >= len(train):
        raise SourceError(f"dataset '{name}': val_from_train is {n}, but the train split has "
                          f"{0 if train is None else len(train)} rows")
    order = np.random.default_rng(seed).permutation(len(train))
    return {**parts, "val": train.select(np.sort(order[:n])),
            "train": train.select(np.sort(order[n:]))}


# ---------------------------------------------------------------------------------------------
# Public API.


def _resolve_columns(name: str, fmt: str, preset: Preset, spec: dict) -> dict:
    overrides = spec.get("columns") or {}
    unknown = set(overrides) - set(preset.columns)
    if unknown:
        raise SourceError(f"dataset '{name}': `columns` has unknown fields {sorted(unknown)} for "
                          f"format {fmt}; known: {sorted(preset.columns)}")
    return {**preset.columns, **overrides}


def _check_columns(name: str, fmt: str, preset: Preset, columns: dict, raw: DatasetDict) -> None:
    for src_split, ds in raw.items():
        available = [c for c in ds.column_names if c not in (_ROW, _SRC_SPLIT)]
        for fld in preset.required:
            cols = columns.get(fld)
            for c in cols if isinstance(cols, list) else [cols]:
                if c is None or c not in available:
                    raise SourceError(
                        f"dataset '{name}' (format {fmt}): source split '{src_split}' is missing "
                        f"required column {c!r} (field '{fld}'); available columns: {available}")


def _empty() -> Dataset:
    return Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)


def _normalise_split(name: str, ds: Dataset | None, ctx: _Ctx,
                     spec: dict) -> tuple[Dataset, list[str]]:
    if ds is None or len(ds) == 0:
        return _empty(), []
    for c, feat in ds.features.items():
        if isinstance(feat, HFImage):  # keep the raw bytes; we verify and convert ourselves
            ds = ds.cast_column(c, HFImage(decode=False))
    kw: dict[str, Any] = {}
    if spec.get("cache_dir"):
        key = stable_hash([ds._fingerprint, name, ctx.split, repr(ctx)])
        kw["cache_file_name"] = str(Path(spec["cache_dir"]) / f"vlalign-norm-{key}.arrow")
    out = ds.map(
        functools.partial(_normalise_batch, ctx=ctx),
        batched=True,
        batch_size=64,
        remove_columns=ds.column_names,
        features=_OUT_FEATURES,
        num_proc=spec.get("num_proc"),
        load_from_cache_file=False,  # image files under image_root are not in the fingerprint
        desc=f"normalise {name}/{ctx.split}",
        **kw,
    )
    errors = [e for e in out[_ERR] if e]
    if errors:
        out = out.filter(lambda e: [not x for x in e], input_columns=_ERR, batched=True,
                         desc=f"drop bad rows {name}/{ctx.split}")
    return out.remove_columns(_ERR).select_columns(list(FEATURES)), errors


def _load_synthetic(name: str, spec: dict, world_cfg: dict | None, seed: int) -> DatasetDict:
    from vlalign.data.world import generate_world  # lazy: only the synthetic route needs it

    dsd = generate_world(world_cfg, domain=spec.get("domain", "source"),
                         splits=spec.get("splits_sizes"), seed=seed)
    if set(dsd) != set(SPLITS):
        raise SourceError(f"dataset '{name}': synthetic world gave splits {list(dsd)}, "
                          f"expected {list(SPLITS)}")
    out = {}
    for s in SPLITS:
        ds = dsd[s]
        if ds.features != FEATURES:
            raise SourceError(f"dataset '{name}': synthetic split {s} has features "
                              f"{ds.features}, expected {FEATURES}")
        if spec.get("max_rows") is not None:
            ds = ds.select(range(min(len(ds), int(spec["max_rows"]))))
        out[s] = ds
    return DatasetDict(out)


def _set_report(ds: Dataset, report: dict) -> None:
    ds.info.description = json.dumps({"vlalign": report}, sort_keys=True)


def load_report(dsd: DatasetDict) -> dict[str, dict]:
    """Per split, the report :func:`load_source` stored (rows, skipped, skipped_examples, ...)."""
    out = {}
    for s, ds in dsd.items():
        try:
            out[s] = json.loads(ds.info.description or "{}").get("vlalign", {})
        except json.JSONDecodeError:
            out[s] = {}
    return out


def load_source(name: str, spec: dict, world_cfg: dict | None = None,
                seed: int = 0) -> DatasetDict:
    """Load the dataset ``spec`` (see the module docstring) as train/val/test in ``FEATURES``.

    Raises :class:`SourceError` for a bad spec, a missing required column (naming it and the
    available ones) or, with ``on_error: raise``, the first bad row (dataset, source split, row,
    column). With ``on_error: skip`` the bad rows are dropped, a warning with the count is
    logged, and ``load_report(dsd)[split]["skipped"]`` (stored in ``dsd[split].info.description``)
    holds the count with the first few messages in ``skipped_examples``.
    """
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise SourceError(f"dataset '{name}': spec needs a `source` (synthetic | hf:<id> | "
                          f"local:<path>), got {source!r}")
    on_error = spec.get("on_error", "raise")
    if on_error not in ("raise", "skip"):
        raise SourceError(f"dataset '{name}': on_error must be 'raise' or 'skip', got {on_error!r}")

    if source == "synthetic":
        dsd = _load_synthetic(name, spec, world_cfg, seed)
        for s in SPLITS:
            _set_report(dsd[s], {"dataset": name, "source": source, "format": "synthetic",
                                 "split": s, "rows": len(dsd[s]), "skipped": 0,
                                 "skipped_examples": []})
        return dsd

    fmt = spec.get("format")
    if fmt not in PRESETS:
        raise SourceError(f"dataset '{name}': unknown format {fmt!r}; presets: {sorted(PRESETS)}")
    preset = PRESETS[fmt]
    columns = _resolve_columns(name, fmt, preset, spec)
    recaption = spec.get("recaption", "auto")
    if recaption not in ("auto", "always", "never"):
        raise SourceError(f"dataset '{name}': recaption must be auto|always|never, "
                          f"got {recaption!r}")
    wanted = _wanted_source_splits(spec)
    src_names = sorted({n for names in wanted.values() for n in names}) if wanted else None

    if source.startswith("hf:"):
        raw = _load_hf(name, source[3:], spec, src_names)
    elif source.startswith("local:"):
        raw = _load_local(name, source[6:], spec)
        if src_names and set(src_names) - set(raw):
            raise SourceError(f"dataset '{name}': `splits` names source splits "
                              f"{sorted(set(src_names) - set(raw))} not in {list(raw)}")
    elif source.startswith("urls:"):
        raise SourceError(f"dataset '{name}': source {source!r} is a URL list: its images are "
                          f"fetched by the download rule (python -m vlalign.data.download), "
                          f"not by load_source")
    else:
        raise SourceError(f"dataset '{name}': unknown source {source!r} "
                          f"(synthetic | hf:<id>[@rev] | local:<path> | urls:<path>)")
    _check_columns(name, fmt, preset, columns, raw)
    # Remember where every row came from, so errors and meta can point at the source row.
    raw = DatasetDict({
        s: ds.add_column(_ROW, np.arange(len(ds), dtype=np.int64))
             .add_column(_SRC_SPLIT, [s] * len(ds))
        for s, ds in raw.items()
    })
    parts = _make_splits(name, raw, spec, preset, columns, wanted, seed)
    if spec.get("val_from_train") is not None:
        parts = _val_from_train(name, parts, int(spec["val_from_train"]), seed)

    image_root = spec.get("image_root")
    out = {}
    for s in SPLITS:
        ds = parts.get(s)
        if ds is not None and spec.get("max_rows") is not None:
            ds = ds.select(range(min(len(ds), int(spec["max_rows"]))))
        ctx = _Ctx(name=name, preset_name=fmt, columns=columns,
                   image_root=str(image_root) if image_root else None, recaption=recaption,
                   split=s, raise_errors=on_error == "raise")
        norm, errors = _normalise_split(name, ds, ctx, spec)
        if errors:
            log.warning("dataset %s split %s: skipped %d bad rows (on_error=skip); first: %s",
                        name, s, len(errors), errors[0])
        if len(norm) == 0:
            log.warning("dataset %s: split %s is empty", name, s)
        _set_report(norm, {"dataset": name, "source": source, "format": fmt, "split": s,
                           "rows": len(norm), "skipped": len(errors),
                           "skipped_examples": errors[:_N_EXAMPLES]})
        out[s] = norm
    return DatasetDict(out)


def save_dataset(dsd: DatasetDict, path: str | Path) -> None:
    """Write ``dsd`` with ``save_to_disk`` atomically (a temp sibling, then ``os.replace``).

    Checks first that it has exactly the splits train/val/test in ``FEATURES``.
    """
    if not isinstance(dsd, DatasetDict) or set(dsd) != set(SPLITS):
        got = list(dsd) if isinstance(dsd, DatasetDict) else type(dsd).__name__
        raise SourceError(f"save_dataset({path}): expected a DatasetDict with splits "
                          f"{list(SPLITS)}, got {got}")
    for s, ds in dsd.items():
        if ds.features != FEATURES:
            raise SourceError(f"save_dataset({path}): split {s} has features {ds.features}, "
                              f"expected the schema FEATURES")
    # an empty split (e.g. TextCaps' val) saved without a shard cannot be loaded again by
    # datasets 5.2 (load_from_disk: IndexError in concat_tables): give it one empty shard
    empty = {s: 1 for s, ds in dsd.items() if len(ds) == 0}
    with atomic_path(path, is_dir=True) as tmp:
        dsd.save_to_disk(str(tmp), num_shards=empty or None)


__all__ = ["PRESETS", "Preset", "SourceError", "load_report", "load_source", "save_dataset"]
