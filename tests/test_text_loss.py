"""The pre-trained LM's loss on AI-generated vs human text (seed 002 Fig. 5a): computation,
database rows, table and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import make_results_tree
from torch import nn

from vlalign.eval.text_loss import lm_text_loss
from vlalign.results.db import ingest, query
from vlalign.results.plots import plot_lm_text_loss
from vlalign.results.tables import render_table, to_markdown

REPO = Path(__file__).resolve().parents[1]


class _Uniform(nn.Module):
    """Equal logits over the vocabulary: every token costs exactly log(V) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.w})()


class _Tok:
    """Characters as tokens (ids 3..), <pad>=0, <bos>=1, <eos>=2."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [[3 + ord(c) % 50 for c in t] for t in texts]})()


def test_uniform_lm_costs_log_vocab_on_both_texts():
    ds = Dataset.from_dict({"recaption": ["a long detailed text", ""],
                            "captions": [["a cat", "one cat"], ["a dog"]]})
    out = lm_text_loss(_Uniform(60), _Tok(), ds)
    assert out["images"] == 1  # the second row has no recaption: not counted
    for kind, texts, chars in (("recaption", 1, 20), ("captions", 2, 5 + 7)):
        assert out[kind]["loss"] == pytest.approx(math.log(60))
        assert out[kind]["texts"] == texts and out[kind]["tokens"] == chars + texts  # + <eos>


def test_no_recaptions_no_losses():
    ds = Dataset.from_dict({"recaption": ["", " "], "captions": [["a"], ["b"]]})
    assert lm_text_loss(_Uniform(60), _Tok(), ds) == {"images": 0}


def _write(root: Path, dataset: str, obj: dict) -> None:
    d = root / "results" / "runs" / "_reference_lm" / dataset
    d.mkdir(parents=True, exist_ok=True)
    (d / "text_loss.json").write_text(json.dumps(obj))


def test_rows_table_and_plot(tmp_path: Path):
    make_results_tree(tmp_path)
    _write(tmp_path, "world", {"dataset": "world", "split": "test", "images": 64,
                               "recaption": {"loss": 0.4, "tokens": 900, "texts": 64},
                               "captions": {"loss": 1.3, "tokens": 700, "texts": 320}})
    _write(tmp_path, "coco", {"dataset": "coco", "split": "test", "images": 0})
    db = tmp_path / "r.duckdb"
    ingest(tmp_path / "results", db)
    rows = query(db, "SELECT dataset, text, loss FROM lm_text_loss ORDER BY text")
    assert rows.to_dict("records") == [
        {"dataset": "world", "text": "captions", "loss": 1.3},
        {"dataset": "world", "text": "recaption", "loss": 0.4},
    ]
    md = to_markdown(render_table(db, REPO / "config" / "tables" / "lm_text_loss.yaml"))
    assert "| World | 0.400 | 1.300 |" in md and "coco" not in md
    assert [p.suffix for p in plot_lm_text_loss(db, tmp_path / "plots")] == [".png", ".pdf"]
