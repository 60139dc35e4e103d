"""Grounding metrics: does a generated caption describe *its* image?

Caption metrics cannot tell a model that reads the image from one that writes its language
prior (a constant caption still scores on a small world). These metrics can:

- :func:`parse_caption`: the objects a caption of the synthetic world's language mentions
  (shape + the colour / size / texture / position stated for it) and the object count it states.
- :func:`caption_grounding`: ``attr_acc_{colour,shape,count,size,position}`` (with
  ``<metric>_chance``), ``object_recall``, ``CHAIR_i``, ``CHAIR_s`` against each image's objects,
  and ``distinct_ratio``.
- :func:`grounding_gap`: held-out text loss with deranged images minus with own images (nats).

Objects come from a row's ``meta`` JSON ``objects`` list (:func:`objects_of`); the world writes
it, a real loader may write COCO-style objects there. Rows without it are not scored.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from vlalign.data.text_formats import PLAIN, TextFormat
from vlalign.data.tokenizer import vlm_token_ids
from vlalign.data.world import (
    ATTRIBUTES,
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
    background_names,
    number_words,
    position_phrases,
)
from vlalign.models.generation import InputsFn, inference_cache
from vlalign.train.data import StageExamples, collate

ATTRS = ("colour", "shape", "count", "size", "position")
ATTR_METRICS = tuple(f"attr_acc_{a}" for a in ATTRS)
OBJECT_METRICS = ("object_recall", "CHAIR_i", "CHAIR_s")
GAP_METRIC = "grounding_gap"
# Attributes a mention can state; texture constrains which object is meant but is not reported.
_MENTION_ATTRS = ("shape", "colour", "size", "texture", "position")
# The generic nouns of count phrases ("three shapes", "one thing"): never a shape mention.
_GENERIC_NOUNS = frozenset({"object", "objects", "shape", "shapes", "thing", "things"})
_NEGATIONS = frozenset({"no", "not", "without"})
_BG = "BG"  # placeholder token for a background name
_TOKEN_RE = re.compile(rf"{_BG}|[a-z0-9]+(?:-[a-z0-9]+)*")
_SENTENCE_RE = re.compile(r"[.!?;:\n]")


class GroundingInputError(ValueError):
    """The split cannot give the gap's examples (no text of the run's kind, too few images)."""


@dataclass(frozen=True)
class Mention:
    """One object a caption mentions; ``None`` = not stated. ``cells``: the grid cells the stated
    position can mean ("corner" means four)."""

    shape: str
    colour: str | None = None
    size: str | None = None
    texture: str | None = None
    cells: frozenset[tuple[int, int]] | None = None

    def stated(self) -> list[str]:
        return [a for a in _MENTION_ATTRS if self.value(a) is not None]

    def value(self, attr: str) -> Any:
        return self.cells if attr == "position" else getattr(self, attr)


@dataclass(frozen=True)
class ParsedCaption:
    mentions: tuple[Mention, ...]
    count: int | None  # the first object count the caption states


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Vocab:
    shapes: tuple[tuple[tuple[str, ...], str], ...]  # (tokens, shape), longest first
    modifiers: dict[str, tuple[str, str]]  # word → (attribute, canonical value)
    numbers: dict[str, int]


@lru_cache(maxsize=1)
def _vocab() -> _Vocab:
    shapes: dict[tuple[str, ...], str] = {}
    for shape, synonyms in SHAPE_SYNONYMS.items():
        for syn in synonyms:
            toks = tuple(syn.split())
            # plurals are not in the world's language, but a model may write "two circles"
            for last in (toks[-1], toks[-1] + "s", toks[-1] + "es"):
                shapes.setdefault((*toks[:-1], last), shape)
    modifiers = {c: ("colour", c) for c in ATTRIBUTES["colour"]}
    modifiers |= {t: ("texture", t) for t in ATTRIBUTES["texture"]}
    modifiers |= {s: ("size", size) for size, syns in SIZE_SYNONYMS.items() for s in syns}
    numbers = {w: i for i, w in enumerate(number_words())} | {str(i): i for i in range(100)}
    return _Vocab(
        shapes=tuple(sorted(shapes.items(), key=lambda kv: -len(kv[0]))),
        modifiers=modifiers,
        numbers=numbers,
    )


@lru_cache(maxsize=8)
def _positions(grid: int) -> tuple[tuple[tuple[str, ...], frozenset[tuple[int, int]]], ...]:
    phrases = {tuple(p.split()): cells for p, cells in position_phrases(grid).items()}
    return tuple(sorted(phrases.items(), key=lambda kv: -len(kv[0])))


def _tokens(text: str) -> list[list[str]]:
    """Lower-cased word tokens per sentence; background names become one ``BG`` token (so the
    "blue" of "dark blue background" is never read as an object's colour)."""
    text = text.lower()
    for bg in sorted(background_names(), key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(bg)}\b", f" {_BG} ", text)
    return [_TOKEN_RE.findall(s) for s in _SENTENCE_RE.split(text)]


def _match(tokens: list[str], i: int, phrases) -> tuple[int, Any] | None:
    for phrase, value in phrases:
        if tuple(tokens[i : i + len(phrase)]) == phrase:
            return len(phrase), value
    return None


def _parse_sentence(t: list[str], grid: int) -> tuple[list[Mention], int | None]:
    vocab = _vocab()
    used = [False] * len(t)
    # positions: "in [the] <phrase>" ("in the top left", "in row 2 column 3", "in the corner")
    places: list[tuple[int, int, frozenset]] = []
    for i, tok in enumerate(t):
        if tok != "in" or used[i]:
            continue
        for j in (i + 2, i + 1) if i + 1 < len(t) and t[i + 1] == "the" else (i + 1,):
            hit = _match(t, j, _positions(grid))
            if hit:
                places.append((i, j + hit[0], hit[1]))
                for k in range(i, j + hit[0]):
                    used[k] = True
                break
    # shapes (multi-word synonyms first), each with the modifiers right before it
    spans: list[tuple[int, int, Mention]] = []
    i = 0
    while i < len(t):
        hit = None if used[i] else _match(t, i, vocab.shapes)
        if hit is None:
            i += 1
            continue
        n, shape = hit
        attrs: dict[str, str] = {}
        k = i - 1
        while k >= 0 and not used[k] and t[k] in vocab.modifiers:
            attr, value = vocab.modifiers[t[k]]
            attrs.setdefault(attr, value)  # the word nearest the noun wins
            k -= 1
        for m in range(k + 1, i + n):
            used[m] = True
        if not (k >= 0 and t[k] in _NEGATIONS):  # "there is no red circle"
            spans.append((k + 1, i + n, Mention(shape=shape, **attrs)))
        i += n
    # each position goes to the nearest mention without one (ties: the following mention,
    # as in "In the top left there is a ...")
    for start, end, cells in places:
        free = [s for s in range(len(spans)) if spans[s][2].cells is None]
        if not free:
            continue

        def dist(s: int, start: int = start, end: int = end) -> tuple[int, int]:
            ms, me, _ = spans[s]
            return (ms - end, 0) if ms >= end else (start - me, 1)

        s = min(free, key=dist)
        ms, me, m = spans[s]
        spans[s] = (ms, me, Mention(m.shape, m.colour, m.size, m.texture, cells))
    # count: "<number> objects|shapes|things", "a single ..."
    count = None
    for i, tok in enumerate(t):
        if tok in vocab.numbers and i + 1 < len(t) and t[i + 1] in _GENERIC_NOUNS:
            count = vocab.numbers[tok]
            break
        if tok == "single" and i > 0 and t[i - 1] == "a":
            count = 1
            break
    return [m for _, _, m in spans], count


def parse_caption(text: str, grid: int = 3) -> ParsedCaption:
    """Mentioned objects and the stated object count of a caption in the world's language.

    Case and punctuation are ignored; shapes are recognised by every synonym (``"ball"``,
    ``"round shape"``, ``"plus sign"``), modifiers are the colour / size / texture words right
    before the shape noun, a position (``"in the top center"``, ``"in row 2, column 3"``) is
    attached to the nearest mention in its sentence, a mention after "no" is not a mention, and
    the count is the first ``"<number> objects|shapes|things"`` (or ``"a single"``).
    """
    mentions: list[Mention] = []
    count = None
    for sentence in _tokens(text):
        m, c = _parse_sentence(sentence, grid)
        mentions += m
        count = c if count is None else count
    return ParsedCaption(tuple(mentions), count)


# --------------------------------------------------------------------------------------------
# caption metrics
# --------------------------------------------------------------------------------------------
def objects_of(meta: str | None) -> tuple[list[dict], int] | None:
    """``(objects, grid)`` of a row's ``meta`` JSON, or None when it carries no objects."""
    try:
        obj = json.loads(meta) if meta else None
    except (TypeError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("objects"), list):
        return None
    return obj["objects"], int(obj.get("grid", 3))


def _agrees(o: Mapping[str, Any], m: Mention, attr: str) -> bool:
    if attr == "position":
        return (o.get("row"), o.get("col")) in (m.cells or ())
    return o.get(attr) == m.value(attr)


def judge(m: Mention, objects: Sequence[Mapping[str, Any]], attr: str) -> bool:
    """Is ``m``'s stated ``attr`` right? Yes iff one of the image's objects that best match
    ``m``'s *other* stated attributes (most agreements) has it; with nothing else stated, iff
    any object has it. So one wrong attribute does not make the others wrong."""
    others = [a for a in m.stated() if a != attr]
    scores = [sum(_agrees(o, m, a) for a in others) for o in objects]
    best = max(scores, default=0)
    return any(s == best and _agrees(o, m, attr) for o, s in zip(objects, scores))


def _mode(values: list) -> Any:
    # most frequent; ties broken by sort order so the guess is deterministic
    counts = collections.Counter(values)
    top = max(counts.values())
    return sorted((v for v, c in counts.items() if c == top), key=repr)[0]


def chance_levels(scenes: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """``attr_acc_<a>_chance``: the accuracy of the best image-blind guess of one attribute —
    state the attribute's most frequent value in these scenes (e.g. "a red object") for every
    image: the fraction of images with an object of that value (count: with that many objects).

    No caption written without looking at the image can beat this in expectation (the object
    that :func:`judge` compares with is always one of the image's), so it is the chance level
    to beat. A blind caption that states several attributes per object scores lower."""
    objs = [o for scene in scenes for o in scene]
    out: dict[str, float] = {}
    if not scenes or not objs:
        return out
    n = len(scenes)
    for attr in ("colour", "shape", "size"):
        v = _mode([o.get(attr) for o in objs])
        out[f"attr_acc_{attr}_chance"] = sum(any(o.get(attr) == v for o in s) for s in scenes) / n
    cell = _mode([(o.get("row"), o.get("col")) for o in objs])
    out["attr_acc_position_chance"] = (
        sum(any((o.get("row"), o.get("col")) == cell for o in s) for s in scenes) / n
    )
    k = _mode([len(s) for s in scenes])
    out["attr_acc_count_chance"] = sum(len(s) == k for s in scenes) / n
    return out


def _normalise(caption: str) -> str:
    return " ".join(caption.lower().split()).rstrip(".").strip()


def distinct_ratio(predictions: Sequence[str]) -> float:
    """Distinct captions / captions (ignoring case, spacing and a final period)."""
    return len({_normalise(p) for p in predictions}) / max(len(predictions), 1)


def caption_grounding(
    predictions: Sequence[str],
    scenes: Sequence[tuple[list[dict], int] | None],
    *,
    where: str = "",
) -> tuple[dict[str, float], list[dict]]:
    """Grounding scores of ``predictions[i]`` against ``scenes[i]`` (``objects_of`` of row i).

    Definitions (micro averages over the split; images whose scene is None are skipped):

    - ``attr_acc_<a>`` for a in colour / shape / size / position: the fraction of the stated
      (mention, attribute) pairs that :func:`judge` finds right; ``attr_acc_count``: the
      fraction of captions stating a count whose count equals the number of objects.
      ``<metric>_chance``: :func:`chance_levels` of the same scenes.
    - ``object_recall``: objects mentioned / objects, matched one-to-one per shape
      (an image with two circles and a caption with one circle: 1 of 2).
    - ``CHAIR_i`` (Rohrbach et al., 2018; an object = a shape category, colour is left to
      ``attr_acc_colour``): over captions, the mentioned shape categories absent from the image
      / the mentioned shape categories (a set per caption); ``CHAIR_s``: captions mentioning an
      absent shape / captions.
    - ``distinct_ratio``: :func:`distinct_ratio` of all predictions.

    Returns ``(scores, missing)``: a metric with nothing to score (no image has objects, no
    caption states a count or mentions an object) is listed in ``missing``, never scored 0.
    """
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} predictions for {len(scenes)} scenes")
    scores: dict[str, float] = {}
    missing: list[dict] = []
    at = f" ({where})" if where else ""
    if predictions:
        scores["distinct_ratio"] = distinct_ratio(predictions)
    pairs = [(p, s) for p, s in zip(predictions, scenes) if s is not None]
    if not pairs:
        reason = f"the dataset carries no object annotations (meta 'objects'){at}"
        names = [*ATTR_METRICS, *OBJECT_METRICS]
        return scores, [{"metric": m, "reason": reason} for m in names]

    right = collections.Counter()
    stated = collections.Counter()
    n_objects = recalled = 0
    mentioned_cats = hallucinated_cats = hallucinating = 0
    for text, (objects, grid) in pairs:
        parsed = parse_caption(text, grid)
        for m in parsed.mentions:
            for attr in m.stated():
                if attr in ATTRS:
                    stated[attr] += 1
                    right[attr] += judge(m, objects, attr)
        if parsed.count is not None:
            stated["count"] += 1
            right["count"] += parsed.count == len(objects)
        present = collections.Counter(o.get("shape") for o in objects)
        said = collections.Counter(m.shape for m in parsed.mentions)
        n_objects += len(objects)
        recalled += sum(min(c, present[s]) for s, c in said.items())
        absent = {s for s in said if s not in present}
        mentioned_cats += len(said)
        hallucinated_cats += len(absent)
        hallucinating += bool(absent)

    chance = chance_levels([objects for _, (objects, _) in pairs])
    for attr in ATTRS:
        name = f"attr_acc_{attr}"
        if stated[attr]:
            scores[name] = right[attr] / stated[attr]
            if f"{name}_chance" in chance:
                scores[f"{name}_chance"] = chance[f"{name}_chance"]
        else:
            what = "states a count" if attr == "count" else f"states a {attr}"
            missing.append({"metric": name, "reason": f"no generated caption {what}{at}"})
    if n_objects:
        scores["object_recall"] = recalled / n_objects
    if mentioned_cats:
        scores["CHAIR_i"] = hallucinated_cats / mentioned_cats
        scores["CHAIR_s"] = hallucinating / len(pairs)
    else:
        reason = f"no generated caption mentions an object{at}"
        missing += [{"metric": m, "reason": reason} for m in ("CHAIR_i", "CHAIR_s")]
    return scores, missing


# --------------------------------------------------------------------------------------------
# grounding gap
# --------------------------------------------------------------------------------------------
def derangement(n: int) -> list[int]:
    """The fixed derangement of the gap: text i is paired with image (i + 1) mod n."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 images, got {n}")
    return [(i + 1) % n for i in range(n)]


@torch.no_grad()
def grounding_gap(
    model: torch.nn.Module,
    processor,
    tok,
    ds,
    text_kind: str,
    *,
    max_length: int = 256,
    batch_size: int = 16,
    mask_mode: str | None = None,
    inputs: InputsFn | None = None,
    text_format: TextFormat = PLAIN,
) -> dict[str, float]:
    """Token-weighted mean next-token loss (nats) of the split's ``text_kind`` examples (laid
    out in the run's ``text_format``) — built
    by the training's ``StageExamples`` + ``collate`` — with each row's own image and with the
    image of :func:`derangement`; ``grounding_gap`` = shuffled − own. The model is used as given
    (its PEFT methods attached); ``inputs(B)``: the methods' inference inputs (e.g. a prefix).
    Deterministic (eval mode, fixed pairing, epoch 0 caption choice)."""
    if len(ds) < 2:
        raise GroundingInputError(f"fewer than 2 images to shuffle ({len(ds)})")
    examples = StageExamples(ds, tok, text_kind, max_length, processor=processor,
                             split_name="eval", text_format=text_format)
    n = len(examples)
    for i in range(n):  # the split must have the run's text for every row
        try:
            examples.token_ids(i)
        except ValueError as e:
            raise GroundingInputError(str(e)) from e
    perm = derangement(n)
    pad = vlm_token_ids(tok)["pad"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = {"own": 0.0, "shuffled": 0.0}
    tokens = 0
    try:
        for start in range(0, n, batch_size):
            rows = range(start, min(start + batch_size, n))
            items = [examples[i] for i in rows]
            batch = collate(items, pad)
            count = int((batch["labels"] != -100).sum())
            tokens += count
            shuffled = torch.stack([examples[perm[i]]["pixel_values"] for i in rows])
            for key, pixels in (("own", batch["pixel_values"]), ("shuffled", shuffled)):
                out = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    labels=batch["labels"].to(device),
                    pixel_values=pixels.to(device),
                    mask_mode=mask_mode,
                    past_key_values=inference_cache(inputs, len(rows)),
                )
                total[key] += float(out.loss) * count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise GroundingInputError(f"no supervised tokens in the {text_kind!r} examples")
    own, shuf = total["own"] / tokens, total["shuffled"] / tokens
    return {"grounding_gap": shuf - own, "grounding_loss_own": own,
            "grounding_loss_shuffled": shuf}


def gap_scores(
    model: torch.nn.Module,
    processor,
    tok,
    ds,
    text_kind: str | None,
    *,
    where: str = "",
    **kw: Any,
) -> tuple[dict[str, float], list[dict]]:
    """:func:`grounding_gap` as ``(scores, missing)``: missing (never 0) without a text kind,
    with fewer than 2 images, or when the split lacks that kind of text."""
    at = f" ({where})" if where else ""
    if text_kind is None:
        return {}, [{"metric": GAP_METRIC, "reason": f"the run's text kind is unknown{at}"}]
    try:
        return grounding_gap(model, processor, tok, ds, text_kind, **kw), []
    except GroundingInputError as e:  # e.g. a dataset without recaptions or conversations
        return {}, [{"metric": GAP_METRIC, "reason": f"{e}{at}"}]
