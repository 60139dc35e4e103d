"""The one internal schema every data source is normalised to.

A dataset on disk is a ``datasets.DatasetDict`` keyed by split (train / val / test); every row
also carries its ``split``. Real loaders (``hf:`` / ``local:``) and the synthetic world produce
exactly these features, so everything downstream runs the same code on both.
"""

from __future__ import annotations

from datasets import Features, Image, List, Value

SPLITS = ("train", "val", "test")

FEATURES = Features(
    {
        "image_id": Value("string"),
        "image": Image(),
        # Short human-style captions (COCO style); may be empty for instruction-only data.
        "captions": List(Value("string")),
        # One long detailed AI-style caption ("recaption"); "" when the source has none.
        "recaption": Value("string"),
        # Question / answer pairs. ``answers`` holds every annotator answer (VQAv2 soft accuracy).
        "qa": List({"question": Value("string"), "answers": List(Value("string"))}),
        # Multi-turn instruction data, LLaVA format: from in {"human", "gpt"}.
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "split": Value("string"),
        # Source-specific extras as a JSON string (the synthetic world stores its scene here).
        "meta": Value("string"),
    }
)
