"""The reference side of the caption metrics of one dataset split, computed once.

Tokenizing the references (the PTB tokenizer, a JVM) and counting their n-grams does not depend
on the model: the ``references`` rule tokenizes each evaluated dataset split once and every run
reuses the file; within a job, the n-gram counts (BLEU's clipped counts and reference lengths,
CIDEr-D's term frequencies) are computed on first use and reused by every score of the job
(datasets, inference variants, image resamples).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pycocoevalcap.bleu.bleu_scorer import cook_refs
from pycocoevalcap.cider.cider_scorer import precook

from vlalign.io_utils import write_json_atomic

REFERENCES_VERSION = 1


def _digest(refs: Sequence[str]) -> str:
    """Of one image's raw references: a cache built from other references is refused."""
    return hashlib.sha256(json.dumps(list(refs), ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class References:
    """PTB-tokenized references (image id → tokenized reference strings), the digest of each
    image's raw references, and their n-gram counts computed on first use."""

    tokens: dict[str, list[str]]
    digests: dict[str, str]

    @classmethod
    def build(cls, raw: Mapping[str, Sequence[str]]) -> References:
        """Tokenize ``raw`` (image id → reference captions) in one PTB JVM."""
        from vlalign.eval.caption_metrics import ptb_tokenize  # the scorer imports this module

        ids = list(raw)
        flat = [r for i in ids for r in raw[i]]
        tok = ptb_tokenize(flat)
        out, pos = {}, 0
        for i in ids:
            out[str(i)] = tok[pos : pos + len(raw[i])]
            pos += len(raw[i])
        for i, refs in out.items():
            for j, ref in enumerate(refs):
                if not ref:
                    raise ValueError(
                        f"reference {j} of image id {i!r} is empty after tokenization: "
                        f"{raw[i][j]!r}"
                    )
        return cls(out, {str(i): _digest(raw[i]) for i in ids})

    def covers(self, raw: Mapping[str, Sequence[str]]) -> bool:
        """Whether every image of ``raw`` is here, built from the same raw references."""
        return all(self.digests.get(str(i)) == _digest(refs) for i, refs in raw.items())

    def save(self, path: str | Path) -> None:
        write_json_atomic(
            Path(path),
            {"version": REFERENCES_VERSION, "digests": self.digests, "tokens": self.tokens},
        )

    @classmethod
    def load(cls, path: str | Path) -> References:
        obj = json.loads(Path(path).read_text())
        if obj.get("version") != REFERENCES_VERSION:
            raise ValueError(f"{path}: references version {obj.get('version')!r}, "
                             f"this reader reads {REFERENCES_VERSION}")
        return cls({str(k): list(v) for k, v in obj["tokens"].items()},
                   {str(k): str(v) for k, v in obj["digests"].items()})

    @functools.cached_property
    def bleu(self) -> dict[str, tuple]:
        """pycocoevalcap's cooked BLEU references: (reference lengths, max n-gram counts)."""
        return {i: cook_refs(refs, n=4) for i, refs in self.tokens.items()}

    @functools.cached_property
    def cider(self) -> dict[str, list[dict]]:
        """CIDEr-D term frequencies of each reference (pycocoevalcap's ``precook``)."""
        return {i: [precook(r, 4) for r in refs] for i, refs in self.tokens.items()}
