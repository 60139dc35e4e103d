"""Tiny local copies of the paper-recipe datasets, with their real column layouts.

Each builder writes hub-style parquet shards (``<root>/data/<split>-00000-of-00001.parquet``,
written by ``datasets`` so the ``Image`` feature metadata is there, as on the hub) and returns
the root, which works both as ``local:<root>`` and as ``hf:<root>``.
"""

from __future__ import annotations

import io
from pathlib import Path

import PIL.Image
from datasets import Dataset, Features, Image, List, Value

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_bytes(color: str, size: tuple[int, int] = (12, 8), fmt: str = "PNG",
                mode: str = "RGB") -> bytes:
    im = PIL.Image.new("RGB", size, color).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def corrupt_png() -> bytes:
    """A PNG header followed by garbage: PIL recognises the format but cannot read it."""
    return image_bytes("red")[:40] + b"\x00garbage" * 4


def _img(data: bytes, name: str) -> dict:
    return {"bytes": data, "path": name}


def write_splits(root: Path, splits: dict[str, dict[str, list]], features: Features) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, cols in splits.items():
        ds = Dataset.from_dict(cols, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


# --- lmms-lab/LLaVA-ReCap-118K / -558K and lmms-lab/LLaVA-NeXT-Data ---------------------------

LLAVA_FEATURES = Features({
    "id": Value("string"),
    "image": Image(),
    "conversations": List({"from": Value("string"), "value": Value("string")}),
    "data_source": Value("string"),
})


def llava_rows() -> dict[str, list]:
    def recap(q: str, a: str) -> list[dict]:
        return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]

    return {
        "id": ["000000000009", "000000000025", "next_001", "000000000030"],
        "image": [
            _img(image_bytes("red", (12, 8)), "9.png"),
            _img(image_bytes("green", (10, 10), fmt="JPEG", mode="L"), "25.jpg"),  # grey JPEG
            _img(image_bytes("blue", (6, 9), mode="RGBA"), "n1.png"),  # RGBA PNG
            _img(image_bytes("white", (16, 4), fmt="JPEG"), "30.jpg"),
        ],
        "conversations": [
            recap("Describe the image in detail.", "A red square fills the whole frame."),
            recap("What do you see happening in this image?", "A green field, nothing else."),
            [{"from": "human", "value": "<image>\nWhat colour is it?"},
             {"from": "gpt", "value": "Blue."},
             {"from": "human", "value": "Is it bright?"},
             {"from": "gpt", "value": "Yes, fairly bright."}],
            recap("Describe the image.", "A wide white strip."),
        ],
        "data_source": ["COCO2017", "COCO2017", "sharegpt4v", "COCO2017"],
    }


def make_llava(root: Path) -> Path:
    return write_splits(root, {"train": llava_rows()}, LLAVA_FEATURES)


# --- yerevann/coco-karpathy (no image bytes; images under image_root/filepath/filename) -------

COCO_FEATURES = Features({
    "filepath": Value("string"),
    "filename": Value("string"),
    "sentences": List(Value("string")),
    "cocoid": Value("int64"),
    "split": Value("string"),
    "url": Value("string"),
})

COCO_ROWS = [  # (filepath, cocoid, karpathy split, colour, size)
    ("train2014", 101, "train", "red", (8, 8)),
    ("val2014", 102, "restval", "green", (9, 7)),
    ("val2014", 103, "val", "blue", (7, 9)),
    ("val2014", 104, "test", "yellow", (5, 6)),
    ("train2014", 105, "train", "purple", (6, 5)),
    ("val2014", 106, "test", "orange", (11, 4)),
]


def coco_name(cocoid: int, filepath: str) -> str:
    return f"COCO_{filepath}_{cocoid:012d}.jpg"


def make_coco_karpathy(root: Path, image_root: Path) -> tuple[Path, Path]:
    cols: dict[str, list] = {k: [] for k in COCO_FEATURES}
    for filepath, cocoid, split, colour, size in COCO_ROWS:
        name = coco_name(cocoid, filepath)
        (image_root / filepath).mkdir(parents=True, exist_ok=True)
        (image_root / filepath / name).write_bytes(image_bytes(colour, size, fmt="JPEG"))
        cols["filepath"].append(filepath)
        cols["filename"].append(name)
        cols["sentences"].append([f"a {colour} picture.", f"something {colour}."])
        cols["cocoid"].append(cocoid)
        cols["split"].append(split)
        cols["url"].append(f"http://images.cocodataset.org/{filepath}/{name}")
    # The hub repo ships train / validation / test shards; the split column is authoritative.
    parts = {"train": [0, 1, 4], "validation": [2], "test": [3, 5]}
    splits = {s: {k: [v[i] for i in idx] for k, v in cols.items()} for s, idx in parts.items()}
    return write_splits(root, splits, COCO_FEATURES), image_root


# --- nlphuji/flickr30k (with a split column) and lmms-lab/flickr30k (without) ---------------

def flickr30k_features(with_split: bool) -> Features:
    f = {"image": Image(), "caption": List(Value("string")), "img_id": Value("string"),
         "filename": Value("string")}
    if with_split:
        f["split"] = Value("string")
    return Features(f)


def flickr30k_rows(n: int = 5, with_split: bool = True) -> dict[str, list]:
    colours = ["red", "green", "blue", "white", "black", "gray", "cyan", "pink"][:n]
    cols: dict[str, list] = {
        "image": [_img(image_bytes(c, (8 + i, 8)), f"{i}.jpg") for i, c in enumerate(colours)],
        "caption": [[f"a {c} thing.", f"the {c} one.", f"all {c}."] for c in colours],
        "img_id": [str(i) for i in range(n)],
        "filename": [f"{1000 + i}.jpg" for i in range(n)],
    }
    if with_split:
        cols["split"] = (["train", "train", "val", "test", "train", "test", "val", "train"])[:n]
    return cols


def make_flickr30k(root: Path, with_split: bool = True, n: int = 5) -> Path:
    # Both hub repos publish a single "test" split holding all images.
    return write_splits(root, {"test": flickr30k_rows(n, with_split)},
                        flickr30k_features(with_split))


# --- jxie/flickr8k ----------------------------------------------------------------------------

FLICKR8K_FEATURES = Features({"image": Image(), **{f"caption_{i}": Value("string")
                                                  for i in range(5)}})


def flickr8k_rows(colours: list[str]) -> dict[str, list]:
    cols: dict[str, list] = {"image": [_img(image_bytes(c), f"{c}.jpg") for c in colours]}
    for i in range(5):
        cols[f"caption_{i}"] = [f"caption {i} of {c}." for c in colours]
    return cols


def make_flickr8k(root: Path) -> Path:
    return write_splits(root, {"train": flickr8k_rows(["red", "green", "blue"]),
                               "validation": flickr8k_rows(["white"]),
                               "test": flickr8k_rows(["black", "gray"])}, FLICKR8K_FEATURES)


# --- flaviagiammarino/path-vqa ----------------------------------------------------------------

PATHVQA_FEATURES = Features({"image": Image(), "question": Value("string"),
                             "answer": Value("string")})


def pathvqa_rows(k: int, n: int) -> dict[str, list]:
    return {
        "image": [_img(image_bytes("pink", (10 + k, 10 + i)), f"{k}_{i}.png") for i in range(n)],
        "question": [f"is there tissue {k}.{i}?" for i in range(n)],
        "answer": ["yes" if i % 2 == 0 else "no" for i in range(n)],
    }


def make_pathvqa(root: Path) -> Path:
    return write_splits(root, {"train": pathvqa_rows(0, 3), "validation": pathvqa_rows(1, 2),
                               "test": pathvqa_rows(2, 2)}, PATHVQA_FEATURES)


# --- seed 001 (PETAL): lmms-lab/TextCaps, lmms-lab/OK-VQA, HuggingFaceM4/A-OKVQA,
# lmms-lab/textvqa (the columns of their hub cards; extra columns the presets do not read are
# there too, so that they are shown to be ignored) ------------------------------------------

TEXTCAPS_FEATURES = Features({
    "question_id": Value("string"),
    "question": Value("string"),
    "image": Image(),
    "image_id": Value("string"),
    "image_classes": List(Value("string")),
    "set_name": Value("string"),
    "image_name": Value("string"),
    "caption_id": List(Value("int64")),
    "caption_str": List(Value("string")),
    "reference_strs": List(Value("string")),
})


def textcaps_rows(split: str, colours: list[str]) -> dict[str, list]:
    n = len(colours)
    caps = [[f"a sign that says {c}.", f"the word {c} in white letters.", f"{c} text."]
            for c in colours]
    return {
        "question_id": [f"{split}_{i}" for i in range(n)],
        "question": ["Please carefully observe the image and come up with a caption."] * n,
        "image": [_img(image_bytes(c, (9 + i, 7)), f"{c}.jpg") for i, c in enumerate(colours)],
        "image_id": [f"{split}{i:04d}abcd" for i in range(n)],
        "image_classes": [["Sign", "Text"]] * n,
        "set_name": [split] * n,
        "image_name": [f"{split}{i:04d}abcd.jpg" for i in range(n)],
        "caption_id": [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(n)],
        "caption_str": caps,
        "reference_strs": caps,
    }


def make_textcaps(root: Path) -> Path:
    # the hub's test split has no captions (empty lists): a recipe maps only train and val
    test = textcaps_rows("test", ["black"])
    test["caption_str"] = test["reference_strs"] = [[]]
    return write_splits(root, {"train": textcaps_rows("train", ["red", "green", "blue"]),
                               "val": textcaps_rows("val", ["white", "gray"]),
                               "test": test}, TEXTCAPS_FEATURES)


OKVQA_FEATURES = Features({
    "question_id": Value("string"),
    "image": Image(),
    "question": Value("string"),
    "answers": List(Value("string")),
    "question_type": Value("string"),
    "answer_type": Value("string"),
})

# 10 answers per question, repeats kept (OK-VQA's 5 answers, each given twice)
OKVQA_ANSWERS = [["banana"] * 6 + ["strawberry"] * 2 + ["blueberry"] * 2,
                 ["tennis"] * 10,
                 ["rain", "rain", "storm", "storm", "rain", "rain", "weather", "weather",
                  "rain", "rain"]]


def make_okvqa(root: Path) -> Path:
    cols = {
        "question_id": ["2971475", "3576", "5574212"],
        "image": [_img(image_bytes(c), f"{c}.jpg") for c in ("yellow", "green", "gray")],
        "question": ["What fruit is typically added to the top of cereal?",
                     "What sport is played here?", "What is falling from the sky?"],
        "answers": OKVQA_ANSWERS,
        "question_type": ["eight", "seven", "nine"],
        "answer_type": ["other"] * 3,
    }
    return write_splits(root, {"val2014": cols}, OKVQA_FEATURES)  # the hub's only split


AOKVQA_FEATURES = Features({
    "image": Image(),
    "question_id": Value("string"),
    "question": Value("string"),
    "choices": List(Value("string")),
    "correct_choice_idx": Value("int8"),
    "direct_answers": List(Value("string")),
    "difficult_direct_answer": Value("bool"),
    "rationales": List(Value("string")),
})


def aokvqa_rows(k: int, n: int) -> dict[str, list]:
    return {
        "image": [_img(image_bytes("blue", (8 + k, 8 + i)), f"{k}_{i}.jpg") for i in range(n)],
        "question_id": [f"22jbM6gDxdaMaunuzgrs{k}{i}" for i in range(n)],
        "question": [f"What is in the motorcyclist's mouth {k}.{i}?" for i in range(n)],
        "choices": [["toothpick", "food", "popsicle stick", "cigarette"]] * n,
        "correct_choice_idx": [3] * n,
        "direct_answers": [["cigarette"] * 9 + ["toothpick"]] * n,
        "difficult_direct_answer": [False] * n,
        "rationales": [["He's smoking while riding."]] * n,
    }


def make_aokvqa(root: Path) -> Path:
    return write_splits(root, {"train": aokvqa_rows(0, 3), "validation": aokvqa_rows(1, 2)},
                        AOKVQA_FEATURES)


TEXTVQA_FEATURES = Features({
    "image_id": Value("string"),
    "question_id": Value("int32"),
    "question": Value("string"),
    "question_tokens": List(Value("string")),
    "image": Image(),
    "image_width": Value("int32"),
    "image_height": Value("int32"),
    "flickr_original_url": Value("string"),
    "flickr_300k_url": Value("string"),
    "answers": List(Value("string")),
    "image_classes": List(Value("string")),
    "set_name": Value("string"),
    "ocr_tokens": List(Value("string")),
})

TEXTVQA_ANSWERS = ["11:38 et", "unanswerable", "unanswerable", "live", "11:38 et",
                   "unanswerable", "live 11:39 eastern time", "live", "live", "no text in image"]


def textvqa_rows(split: str, n: int) -> dict[str, list]:
    q = [f"when is this being aired {i}?" for i in range(n)]
    return {
        "image_id": ["0054c91397f2fe05"] * n,  # several questions on one image
        "question_id": [100 * len(split) + i for i in range(n)],
        "question": q,
        "question_tokens": [x.split() for x in q],
        "image": [_img(image_bytes("cyan", (6 + i, 9)), f"{i}.jpg") for i in range(n)],
        "image_width": [6 + i for i in range(n)],
        "image_height": [9] * n,
        "flickr_original_url": ["https://farm1.staticflickr.com/x.jpg"] * n,
        "flickr_300k_url": ["https://c4.staticflickr.com/x.jpg"] * n,
        # the test split's answers are not public: 10 empty strings (facebook/textvqa's card)
        "answers": [TEXTVQA_ANSWERS if split != "test" else [""] * 10] * n,
        "image_classes": [["Television"]] * n,
        "set_name": [{"validation": "val"}.get(split, split)] * n,
        "ocr_tokens": [["live", "11:38", "et"]] * n,
    }


def make_textvqa(root: Path) -> Path:
    return write_splits(root, {"train": textvqa_rows("train", 3),
                               "validation": textvqa_rows("validation", 2),
                               "test": textvqa_rows("test", 1)}, TEXTVQA_FEATURES)
