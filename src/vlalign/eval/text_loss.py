"""Cross-entropy of the pre-trained LM on AI-generated vs. human text of the same images
(seed 002 §4.6, Fig. 5(a): the LM finds recaptions easier to predict than human captions).

Text alone, as the LM was pre-trained: ``<bos> text <eos>``, every token after ``<bos>`` scored.
Only images that have both a recaption and human captions count, so the two means describe the
same images.
"""

from __future__ import annotations

import math
from typing import Any

from datasets import Dataset
from torch import nn

from vlalign.pretrain.lm import encode_texts, token_nll

TEXT_KINDS = ("recaption", "captions")


def lm_text_loss(
    lm: nn.Module, tokenizer, ds: Dataset, *, max_length: int = 256, batch_size: int = 16
) -> dict[str, Any]:
    """Per-token cross-entropy (nats) of ``lm`` on the recaptions and on the human captions of
    the rows of ``ds`` that have both. ``{"images": n, "recaption": {"loss", "tokens",
    "texts"}, "captions": {...}}``; ``images`` is 0 (and no loss is given) when no row has
    both."""
    lm.eval()
    cols = set(ds.column_names)
    rows = []
    if {"recaption", "captions"} <= cols:
        rows = [
            (r, [c for c in caps if c and c.strip()])
            for r, caps in zip(ds["recaption"], ds["captions"])
            if r and r.strip() and caps and any(c and c.strip() for c in caps)
        ]
    out: dict[str, Any] = {"images": len(rows)}
    if not rows:
        return out
    texts = {"recaption": [r for r, _ in rows], "captions": [c for _, cs in rows for c in cs]}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for kind in TEXT_KINDS:
        seqs = encode_texts(tokenizer, texts[kind], max_length)
        total, count = token_nll(lm, seqs, pad, batch_size)
        out[kind] = {"loss": total / max(count, 1), "tokens": count, "texts": len(seqs)}
        if not math.isfinite(out[kind]["loss"]):
            raise ValueError(f"non-finite {kind} loss: {out[kind]['loss']}")
    return out
