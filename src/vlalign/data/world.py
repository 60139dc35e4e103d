"""The embedded synthetic image-text world.

Scenes of 1..N coloured shapes on a grid, drawn with PIL so that every attribute (shape, colour,
size, grid cell, texture) is visible in the pixels. Each scene carries short human-style captions,
one complete AI-style "recaption", VQA pairs with 10 annotator answers and a LLaVA-format
conversation, in exactly the features of :mod:`vlalign.data.schema`.

``domain="target"`` is a shifted world for domain adaptation: a different background, new
textures and partly new shapes / colour names, but the same grammar.

Everything is a pure function of (config, domain, splits, seed). Each split draws from its own
RNG stream, and splits never share a scene because every scene is assigned to exactly one split
by a stable hash of its content (scenes hashed to another split are redrawn).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vlalign.data.schema import FEATURES, SPLITS

# The one home of the world's keys and defaults (the pipeline's ``world:`` section is validated
# by resolve_scene_config; the config schema defers to it). Ranges: resolve_scene_config.
SCENE_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "grid": 3,
    "max_objects": 4,
    "captions_per_image": 5,
    "qa_per_image": 4,
    "conversation_turns": 3,
    "texture_prob": 0.3,
}
# Split sizes when a caller gives none (the pipeline always does: datasets.<name>.splits_sizes).
DEFAULT_SPLITS: dict[str, int] = {"train": 400, "val": 64, "test": 64}
DEFAULT_CONFIG: dict[str, Any] = {**SCENE_DEFAULTS, "splits": DEFAULT_SPLITS}
DOMAINS = ("source", "target")
N_ANNOTATORS = 10

# RGB of each colour name; target reuses some names and adds new ones.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (250, 120, 190),
    "brown": (130, 75, 30),
    "teal": (0, 150, 150),
}
SHAPE_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "ball", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle"],
    "star": ["star"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon", "six-sided shape"],
    "cross": ["cross", "plus sign"],
}
SIZE_SYNONYMS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}


@dataclass(frozen=True)
class _Domain:
    prefix: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    textures: tuple[str, ...]  # "plain" first: it means "no texture"
    background: str  # its name, as used in captions


_DOMAINS: dict[str, _Domain] = {
    "source": _Domain(
        prefix="src",
        shapes=("circle", "square", "triangle", "star", "diamond"),
        colours=("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
        textures=("plain", "striped", "dotted"),
        background="gray",
    ),
    "target": _Domain(
        prefix="tgt",
        shapes=("circle", "square", "triangle", "hexagon", "cross"),
        colours=("red", "green", "blue", "yellow", "pink", "brown", "teal", "white"),
        textures=("plain", "striped", "checkered", "hatched"),
        background="dark blue",
    ),
}


def _union(*lists: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for lst in lists:
        out += [x for x in lst if x not in out]
    return out


# Union vocabularies (source first), so probe label indices mean the same thing in both domains.
ATTRIBUTES: dict[str, list[str]] = {
    "shape": _union(*(d.shapes for d in _DOMAINS.values())),
    "colour": _union(*(d.colours for d in _DOMAINS.values())),
    "size": ["small", "large"],
    "texture": _union(*(d.textures for d in _DOMAINS.values())),
}
# The same, restricted to what each domain actually draws.
DOMAIN_ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    name: {
        "shape": list(d.shapes),
        "colour": list(d.colours),
        "size": ["small", "large"],
        "texture": list(d.textures),
    }
    for name, d in _DOMAINS.items()
}

_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# configuration


def _check_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"world config: {key!r} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"world config: {key!r} must be {rng}, got {value!r}")
    return int(value)


def resolve_scene_config(world_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults + ``world_cfg`` for the scene keys (no ``splits``), validated: the pipeline's
    ``world:`` section.

    Raises ValueError naming the offending key (unknown keys too: a typo must not be ignored).
    """
    world_cfg = dict(world_cfg or {})
    unknown = sorted(set(world_cfg) - set(SCENE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"world config: unknown key(s) {unknown}; allowed: {sorted(SCENE_DEFAULTS)}"
        )
    cfg = {**SCENE_DEFAULTS, **world_cfg}
    cfg["grid"] = _check_int("grid", cfg["grid"], 2, 4)
    # 8 px per cell at least: smaller shapes lose the attributes the captions name
    cfg["image_size"] = _check_int("image_size", cfg["image_size"], 8 * cfg["grid"], 1024)
    cfg["max_objects"] = _check_int("max_objects", cfg["max_objects"], 1, cfg["grid"] ** 2)
    # >= 5 human captions per image, as COCO gives (the references of the caption metrics)
    cfg["captions_per_image"] = _check_int("captions_per_image", cfg["captions_per_image"], 5, 50)
    cfg["qa_per_image"] = _check_int("qa_per_image", cfg["qa_per_image"], 1, 50)
    cfg["conversation_turns"] = _check_int("conversation_turns", cfg["conversation_turns"], 1, 50)
    tp = cfg["texture_prob"]
    if isinstance(tp, bool) or not isinstance(tp, int | float) or not 0.0 <= tp <= 1.0:
        raise ValueError(f"world config: 'texture_prob' must be a number in [0, 1], got {tp!r}")
    cfg["texture_prob"] = float(tp)
    return cfg


def resolve_config(
    world_cfg: Mapping[str, Any] | None, splits: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """:func:`resolve_scene_config` + the split sizes (``world_cfg["splits"]``, then ``splits``).

    Raises ValueError naming the offending key.
    """
    world_cfg = dict(world_cfg or {})
    given_splits = world_cfg.pop("splits", None)
    cfg = resolve_scene_config(world_cfg)
    sizes = dict(DEFAULT_SPLITS)
    for source_name, given in (("splits", given_splits), ("splits argument", splits)):
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise ValueError(f"world config: {source_name!r} must be a mapping, got {given!r}")
        for name, n in given.items():
            if name not in SPLITS:
                raise ValueError(
                    f"world config: {source_name!r} has unknown split {name!r}; "
                    f"allowed: {list(SPLITS)}"
                )
            sizes[name] = _check_int(f"splits.{name}", n, 0)
    cfg["splits"] = sizes
    return cfg


# --------------------------------------------------------------------------------------------
# scenes


def position_name(row: int, col: int, grid: int) -> str:
    """Human name of a grid cell ("top left", "center", ...)."""
    if grid == 3:
        rows, cols = ["top", "middle", "bottom"], ["left", "center", "right"]
        if (row, col) == (1, 1):
            return "center"
        return f"{rows[row]} {cols[col]}"
    if grid == 2:
        return f"{['top', 'bottom'][row]} {['left', 'right'][col]}"
    return f"row {row + 1} column {col + 1}"


def _position_variants(name: str) -> list[str]:
    """Other ways an annotator would say a position."""
    table = {
        "center": ["middle", "the center"],
        "top center": ["top", "top middle"],
        "bottom center": ["bottom", "bottom middle"],
        "middle left": ["left", "center left"],
        "middle right": ["right", "center right"],
    }
    if name in table:
        return table[name]
    if name.startswith("top ") or name.startswith("bottom "):
        return [name.replace("top", "upper").replace("bottom", "lower"), f"{name} corner"]
    return [name.replace("row", "r").replace(" column", " c")]


def _is_corner(row: int, col: int, grid: int) -> bool:
    return row in (0, grid - 1) and col in (0, grid - 1)


# --------------------------------------------------------------------------------------------
# vocabulary accessors (for parsers of the world's language, e.g. vlalign.eval.grounding)


def position_phrases(grid: int) -> dict[str, frozenset[tuple[int, int]]]:
    """Every phrase the world's text uses for a position → the grid cells it can mean.

    Cell names (:func:`position_name`), the annotators' variants (``"upper left"``, ``"middle"``)
    and ``"corner"`` (any corner: the "looks like ... in the corner" caption).
    """
    out: dict[str, set[tuple[int, int]]] = {}
    for row in range(grid):
        for col in range(grid):
            name = position_name(row, col, grid)
            for phrase in [name, *_position_variants(name)]:
                out.setdefault(phrase, set()).add((row, col))
            if _is_corner(row, col, grid):
                out.setdefault("corner", set()).add((row, col))
    return {k: frozenset(v) for k, v in out.items()}


def number_words() -> list[str]:
    """The count words of captions and answers; index = the number."""
    return list(_NUMBER_WORDS)


def background_names() -> list[str]:
    """The background names captions use ("gray", "dark blue"): never an object's colour."""
    return [d.background for d in _DOMAINS.values()]


def _sample_scene(rng: np.random.Generator, dom: _Domain, cfg: dict[str, Any]) -> list[dict]:
    g = cfg["grid"]
    n = int(rng.integers(1, cfg["max_objects"] + 1))
    cells = sorted(rng.choice(g * g, size=n, replace=False).tolist())  # row-major order
    objects = []
    for cell in cells:
        textured = rng.random() < cfg["texture_prob"]
        objects.append(
            {
                "shape": dom.shapes[int(rng.integers(len(dom.shapes)))],
                "colour": dom.colours[int(rng.integers(len(dom.colours)))],
                "size": ("small", "large")[int(rng.integers(2))],
                "row": cell // g,
                "col": cell % g,
                "texture": dom.textures[1 + int(rng.integers(len(dom.textures) - 1))]
                if textured
                else "plain",
            }
        )
    return objects


def _scene_key(objects: list[dict]) -> str:
    return "|".join(
        f"{o['row']},{o['col']},{o['shape']},{o['colour']},{o['size']},{o['texture']}"
        for o in objects
    )


def _split_of(key: str, seed: int, domain: str) -> int:
    """Which split (index into SPLITS) owns a scene: a stable hash, so splits stay disjoint."""
    digest = hashlib.sha1(f"{seed}|{domain}|{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % len(SPLITS)


# --------------------------------------------------------------------------------------------
# rendering


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Texture colour: a darker version of light colours, a lighter version of dark ones."""
    c = np.asarray(rgb, dtype=float)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    out = c * 0.35 if lum > 140 else c + (255.0 - c) * 0.6
    return tuple(int(round(v)) for v in out)  # type: ignore[return-value]


def texture_colour(colour: str) -> tuple[int, int, int]:
    """The RGB that textured objects of ``colour`` use for their stripes / dots / checks."""
    return _shade(COLOURS[colour])


_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "striped": lambda yy, xx: (yy % 4) < 2,
    "dotted": lambda yy, xx: ((yy % 4) < 2) & ((xx % 4) < 2),
    "checkered": lambda yy, xx: ((yy // 3 + xx // 3) % 2) == 0,
    "hatched": lambda yy, xx: ((xx + yy) % 4) < 2,
}


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    if kind == "hexagon":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    if kind == "cross":
        w = 0.35 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {kind!r}")


def _background(domain: str, size: int) -> np.ndarray:
    if domain == "source":
        img = np.full((size, size, 3), 128.0)
    else:  # a dark blue vertical gradient: a clearly different distribution
        t = np.linspace(0.0, 1.0, size)[:, None, None]
        top, bottom = np.array([25.0, 35.0, 90.0]), np.array([10.0, 15.0, 45.0])
        img = np.broadcast_to(top + (bottom - top) * t, (size, size, 3)).copy()
    return img


def render_scene(
    objects: list[dict], domain: str, image_size: int, grid: int, rng: np.random.Generator
) -> Image.Image:
    """Draw the scene; each object is centred (±1 px) on its cell, so the cell centre is inside."""
    img = _background(domain, image_size)
    cell = image_size / grid
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    jitter = max(1, int(0.05 * cell))
    for o in objects:
        cx = (o["col"] + 0.5) * cell + int(rng.integers(-jitter, jitter + 1))
        cy = (o["row"] + 0.5) * cell + int(rng.integers(-jitter, jitter + 1))
        r = (0.44 if o["size"] == "large" else 0.25) * cell
        mask_img = Image.new("L", (image_size, image_size), 0)
        draw = ImageDraw.Draw(mask_img)
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r), fill=255)
        mask = np.asarray(mask_img) > 0
        colour = np.asarray(COLOURS[o["colour"]], dtype=float) + rng.integers(-8, 9, size=3)
        img[mask] = colour
        if o["texture"] != "plain":
            tex = mask & _PATTERNS[o["texture"]](yy, xx)
            img[tex] = np.asarray(_shade(COLOURS[o["colour"]]), dtype=float)
    img += rng.normal(0.0, 2.0, size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# text


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng: np.random.Generator, items: list | tuple) -> Any:
    return items[int(rng.integers(len(items)))]


def _count_phrase(n: int, noun: str = "object") -> str:
    return f"{_NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def _full_np(o: dict) -> str:
    """Canonical noun phrase with every attribute: "large red striped circle"."""
    tex = "" if o["texture"] == "plain" else f" {o['texture']}"
    return f"{o['size']} {o['colour']}{tex} {o['shape']}"


def _casual_np(o: dict, rng: np.random.Generator) -> str:
    """A human-style noun phrase: synonyms, some attributes dropped."""
    words = []
    if rng.random() < 0.35:
        words.append(_pick(rng, SIZE_SYNONYMS[o["size"]]))
    if rng.random() < 0.85:
        words.append(o["colour"])
    if o["texture"] != "plain" and rng.random() < 0.5:
        words.append(o["texture"])
    words.append(_pick(rng, SHAPE_SYNONYMS[o["shape"]]))
    return " ".join(words)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pos(o: dict, grid: int) -> str:
    return position_name(o["row"], o["col"], grid)


def _in_pos(o: dict, grid: int) -> str:
    name = _pos(o, grid)
    return f"in {name}" if name.startswith("row ") else f"in the {name}"


def make_recaption(objects: list[dict], background: str, grid: int) -> str:
    """Complete AI-style caption: every object with every attribute, row-major order."""
    parts = [f"The image shows {_count_phrase(len(objects))} on a {background} background."]
    for o in objects:
        where = _in_pos(o, grid)
        parts.append(f"{where[0].upper()}{where[1:]} there is {_a(_full_np(o))}.")
    return " ".join(parts)


def _short_caption(
    objects: list[dict], background: str, grid: int, rng: np.random.Generator
) -> str:
    n = len(objects)
    picked = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
    some = [objects[i] for i in sorted(picked)]  # an incomplete caption: only some objects
    one = _pick(rng, objects)
    templates: list[Callable[[], str]] = [
        lambda: _join([_a(_casual_np(o, rng)) for o in some]),
        lambda: (
            f"{_count_phrase(n, _pick(rng, ['shape', 'object', 'thing']))} on a {background}"
            " background"
        ),
        lambda: f"there is {_a(_casual_np(one, rng))} {_in_pos(one, grid)}",
        lambda: f"{_a(_casual_np(one, rng))} {_in_pos(one, grid)}",
        lambda: f"a picture of {_join([_a(_casual_np(o, rng)) for o in some])}",
        lambda: (
            f"some shapes including {_a(_casual_np(one, rng))}"
            if n > 1
            else f"just {_a(_casual_np(one, rng))}"
        ),
        lambda: (
            f"looks like {_a(_casual_np(one, rng))} in the corner"
            if _is_corner(one["row"], one["col"], grid)
            else f"looks like {_a(_casual_np(one, rng))} and not much else"
            if n == 1
            else f"looks like {_a(_casual_np(one, rng))} with other stuff around it"
        ),
        lambda: (
            f"{_count_phrase(n, 'shape')}, one of them {_a(_casual_np(one, rng))}"
            if n > 1
            else f"a single {_casual_np(one, rng)} on {background}"
        ),
        lambda: f"simple drawing with {_join([_a(_casual_np(o, rng)) for o in some])}",
    ]
    text = _pick(rng, templates)()
    style = rng.random()
    if style < 0.4:
        text = text[0].upper() + text[1:]
    elif style < 0.5:
        text = text.upper()
    if rng.random() < 0.4:
        text += "."
    return text


def make_captions(
    objects: list[dict], background: str, grid: int, k: int, rng: np.random.Generator
) -> list[str]:
    """``k`` distinct short captions (duplicates only if the scene is too simple to vary)."""
    out: list[str] = []
    seen: set[str] = set()  # distinct beyond casing and a final period
    for _ in range(20 * k):
        c = _short_caption(objects, background, grid, rng)
        if (key := c.lower().rstrip(".")) not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == k:
            break
    while len(out) < k:
        out.append(_short_caption(objects, background, grid, rng))
    return out


def _references(o: dict, objects: list[dict], grid: int) -> list[str]:
    """Unambiguous ways to refer to ``o`` in a question."""
    refs = [f"object {_in_pos(o, grid)}"]
    if sum(p["shape"] == o["shape"] for p in objects) == 1:
        refs.append(o["shape"])
    return refs


def _annotate(
    canonical: str, variants: list[str], wrong: list[str], rng: np.random.Generator
) -> list[str]:
    """10 annotator answers: the canonical one is always the majority (>= 6)."""
    answers = [canonical] * N_ANNOTATORS
    for i in range(int(rng.binomial(4, 0.3))):
        # Mostly harmless rephrasings; an outright wrong answer now and then.
        if variants and (not wrong or rng.random() < 0.8):
            answers[N_ANNOTATORS - 1 - i] = _pick(rng, variants)
        elif wrong and rng.random() < 0.4:
            answers[N_ANNOTATORS - 1 - i] = _pick(rng, wrong)
    order = rng.permutation(N_ANNOTATORS)
    return [answers[i] for i in order]


def _absent_combo(objects: list[dict], dom: _Domain, rng: np.random.Generator) -> tuple[str, str]:
    present = {(o["colour"], o["shape"]) for o in objects}
    while True:
        combo = (_pick(rng, dom.colours), _pick(rng, dom.shapes))
        if combo not in present:
            return combo


def _qa_item(
    kind: str, objects: list[dict], dom: _Domain, grid: int, rng: np.random.Generator
) -> dict:
    o = _pick(rng, objects)
    n = len(objects)
    others = lambda vocab, right: [v for v in vocab if v != right]  # noqa: E731
    if kind == "count":
        q = _pick(rng, ["how many objects are there?", "how many shapes are in the image?"])
        return {
            "question": q,
            "answers": _annotate(str(n), [_NUMBER_WORDS[n]], [str(max(1, n - 1)), str(n + 1)], rng),
        }
    if kind == "count_colour":
        colour = _pick(rng, dom.colours)
        k = sum(p["colour"] == colour for p in objects)
        return {
            "question": f"how many {colour} objects are there?",
            "answers": _annotate(
                str(k), [_NUMBER_WORDS[k]] + (["none"] if k == 0 else []), [str(k + 1)], rng
            ),
        }
    if kind == "colour":
        ref = _pick(rng, _references(o, objects, grid))
        return {
            "question": f"what color is the {ref}?",
            "answers": _annotate(o["colour"], [], others(dom.colours, o["colour"]), rng),
        }
    if kind == "shape":
        return {
            "question": f"what shape is {_in_pos(o, grid)}?",
            "answers": _annotate(
                o["shape"], SHAPE_SYNONYMS[o["shape"]][1:], others(dom.shapes, o["shape"]), rng
            ),
        }
    if kind == "size":
        ref = _pick(rng, _references(o, objects, grid))
        return {
            "question": f"is the {ref} small or large?",
            "answers": _annotate(
                o["size"], SIZE_SYNONYMS[o["size"]][1:], others(["small", "large"], o["size"]), rng
            ),
        }
    if kind == "position":
        # Ask about an object that "colour shape" (or "size colour shape") names unambiguously.
        for words in (("colour", "shape"), ("size", "colour", "shape")):
            sig = lambda p, words=words: tuple(p[w] for w in words)  # noqa: E731
            unique = [p for p in objects if sum(sig(q) == sig(p) for q in objects) == 1]
            if unique:
                o = _pick(rng, unique)
                q = f"where is the {' '.join(sig(o))}?"
                break
        else:
            return _qa_item("count", objects, dom, grid, rng)
        name = _pos(o, grid)
        return {"question": q, "answers": _annotate(name, _position_variants(name), [], rng)}
    if kind == "yesno":
        if rng.random() < 0.5:
            colour, shape, ans = o["colour"], o["shape"], "yes"
        else:
            (colour, shape), ans = _absent_combo(objects, dom, rng), "no"
        wrong = "no" if ans == "yes" else "yes"
        variants = ["yeah", "yep"] if ans == "yes" else ["nope"]
        return {
            "question": f"is there {_a(colour)} {shape}?",
            "answers": _annotate(ans, variants, [wrong], rng),
        }
    raise ValueError(f"unknown question kind {kind!r}")


_QA_KINDS = ("colour", "shape", "position", "yesno", "size", "count_colour")


def make_qa(
    objects: list[dict], dom: _Domain, grid: int, k: int, rng: np.random.Generator
) -> list[dict]:
    """``k`` questions: always a count question, then the other kinds in a shuffled cycle."""
    kinds = ["count"]
    while len(kinds) < k:
        kinds += [_QA_KINDS[i] for i in rng.permutation(len(_QA_KINDS))]
    return [_qa_item(kind, objects, dom, grid, rng) for kind in kinds[:k]]


def _turn(
    kind: str, objects: list[dict], dom: _Domain, grid: int, rng: np.random.Generator
) -> tuple[str, str]:
    o = _pick(rng, objects)
    n = len(objects)
    if kind == "describe":
        q = _pick(rng, ["Describe the image in detail.", "What does this picture show?"])
        return q, make_recaption(objects, dom.background, grid)
    if kind == "count":
        verb = "is" if n == 1 else "are"
        return "How many objects are in the picture?", f"There {verb} {_count_phrase(n)}."
    if kind == "colour":
        ref = _pick(rng, _references(o, objects, grid))
        return f"What color is the {ref}?", f"The {ref} is {o['colour']}."
    if kind == "cell":
        g = grid
        row, col = (int(v) for v in rng.integers(0, g, size=2))
        here = [p for p in objects if (p["row"], p["col"]) == (row, col)]
        name = position_name(row, col, g)
        where = f"in {name}" if name.startswith("row ") else f"in the {name}"
        if here:
            return f"What is {where}?", f"There is {_a(_full_np(here[0]))} {where}."
        return f"What is {where}?", "Nothing, that part of the image is empty."
    if kind == "shapes":
        nouns = _join([_a(p["shape"]) for p in objects])
        return "Which shapes can you see?", f"I can see {nouns}."
    if kind == "yesno":
        if rng.random() < 0.5:
            return (
                f"Is there {_a(o['colour'])} {o['shape']} in the image?",
                f"Yes, there is {_a(_full_np(o))} {_in_pos(o, grid)}.",
            )
        colour, shape = _absent_combo(objects, dom, rng)
        return f"Is there {_a(colour)} {shape} in the image?", f"No, there is no {colour} {shape}."
    if kind == "texture":
        tex = _pick(rng, dom.textures[1:])
        hits = [p for p in objects if p["texture"] == tex]
        if not hits:
            return f"Are any of the objects {tex}?", f"No, none of the objects are {tex}."
        names = _join([f"the {p['colour']} {p['shape']}" for p in hits])
        return f"Are any of the objects {tex}?", f"Yes: {names}."
    raise ValueError(f"unknown turn kind {kind!r}")


_TURN_KINDS = ("count", "colour", "cell", "shapes", "yesno", "texture")


def make_conversation(
    objects: list[dict], dom: _Domain, grid: int, turns: int, rng: np.random.Generator
) -> list[dict]:
    """LLaVA format: alternating human/gpt turns; the first human turn starts with "<image>\\n"."""
    kinds: list[str] = ["describe"] if rng.random() < 0.5 else []
    while len(kinds) < turns:
        kinds += [_TURN_KINDS[i] for i in rng.permutation(len(_TURN_KINDS))]
    conv = []
    for i, kind in enumerate(kinds[:turns]):
        q, a = _turn(kind, objects, dom, grid, rng)
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


# --------------------------------------------------------------------------------------------
# datasets


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def _generate_split(
    cfg: dict[str, Any], domain: str, split: str, n: int, seed: int
) -> dict[str, list]:
    dom = _DOMAINS[domain]
    grid = cfg["grid"]
    scene_rng = _rng(seed, domain, split, "scene")
    text_rng = _rng(seed, domain, split, "text")  # separate: text settings don't move scenes
    owner = SPLITS.index(split)
    cols: dict[str, list] = {k: [] for k in FEATURES}
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 1000
    for i in tqdm(range(n), desc=f"world {domain}/{split}", leave=False, disable=None):
        while True:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"world config: 'splits.{split}'={n} is more distinct scenes than this world "
                    f"(grid={grid}, max_objects={cfg['max_objects']}) can provide"
                )
            objects = _sample_scene(scene_rng, dom, cfg)
            key = _scene_key(objects)
            if key not in seen and _split_of(key, seed, domain) == owner:
                seen.add(key)
                break
        image = render_scene(objects, domain, cfg["image_size"], grid, scene_rng)
        meta = {
            "domain": domain,
            "grid": grid,
            "image_size": cfg["image_size"],
            "background": dom.background,
            "objects": objects,
        }
        cols["image_id"].append(f"{dom.prefix}-{split}-{i:06d}")
        cols["image"].append(image)
        cols["captions"].append(
            make_captions(objects, dom.background, grid, cfg["captions_per_image"], text_rng)
        )
        cols["recaption"].append(make_recaption(objects, dom.background, grid))
        cols["qa"].append(make_qa(objects, dom, grid, cfg["qa_per_image"], text_rng))
        cols["conversations"].append(
            make_conversation(objects, dom, grid, cfg["conversation_turns"], text_rng)
        )
        cols["split"].append(split)
        cols["meta"].append(json.dumps(meta))
    return cols


def generate_world(
    world_cfg: Mapping[str, Any] | None,
    domain: str = "source",
    splits: Mapping[str, int] | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Generate the synthetic world as a ``DatasetDict`` (train/val/test) in ``FEATURES``.

    ``splits`` (e.g. ``{"train": 32}``) overrides ``world_cfg["splits"]`` per split.
    Deterministic in (world_cfg, domain, splits, seed).
    """
    if domain not in DOMAINS:
        raise ValueError(f"world: domain must be one of {list(DOMAINS)}, got {domain!r}")
    seed = _check_int("seed", seed, 0)
    cfg = resolve_config(world_cfg, splits)
    return DatasetDict(
        {
            split: Dataset.from_dict(
                _generate_split(cfg, domain, split, cfg["splits"][split], seed), features=FEATURES
            )
            for split in SPLITS
        }
    )


# --------------------------------------------------------------------------------------------
# probe labels


def scene_label_classes(grid: int = 3) -> dict[str, int]:
    """Number of classes of each key of :func:`scene_labels` (class 0 of cell labels = empty)."""
    out = {"count": grid * grid + 1}
    for r in range(grid):
        for c in range(grid):
            for attr in ("shape", "colour", "size", "texture"):
                out[f"r{r}c{c}_{attr}"] = len(ATTRIBUTES[attr]) + 1
    return out


def scene_labels(meta_json: str) -> dict[str, int]:
    """Integer probe targets of one scene.

    ``count``: number of objects; ``r{row}c{col}_{shape|colour|size|texture}``: 0 if the cell is
    empty, else 1 + index into ``ATTRIBUTES[attr]`` (the union vocabulary of both domains).
    """
    try:
        meta = json.loads(meta_json)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"scene_labels: meta is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("objects"), list):
        raise ValueError("scene_labels: meta has no 'objects' list")
    grid = meta.get("grid", SCENE_DEFAULTS["grid"])
    labels = {k: 0 for k in scene_label_classes(grid)}
    labels["count"] = len(meta["objects"])
    for i, o in enumerate(meta["objects"]):
        try:
            row, col = int(o["row"]), int(o["col"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"scene_labels: objects[{i}] has no valid 'row'/'col'") from e
        if not (0 <= row < grid and 0 <= col < grid):
            raise ValueError(f"scene_labels: objects[{i}] cell ({row}, {col}) outside grid {grid}")
        for attr in ("shape", "colour", "size", "texture"):
            value = o.get(attr)
            if value not in ATTRIBUTES[attr]:
                raise ValueError(
                    f"scene_labels: objects[{i}].{attr}={value!r} is not in ATTRIBUTES[{attr!r}]"
                )
            labels[f"r{row}c{col}_{attr}"] = 1 + ATTRIBUTES[attr].index(value)
    return labels
