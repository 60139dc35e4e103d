"""The evaluation runner on a tiny world with tiny real backbones (SigLIP + Qwen2), real
pycocoevalcap (Java), real VQA accuracy and effective rank."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from helpers import LM, build_world

from vlalign.data.text_formats import (
    IGNORE_INDEX,
    PLAIN,
    Prompt,
    TextFormat,
    caption_prompt,
    caption_target,
    conversation_ids,
    decode_text,
    vqa_prompt,
)
from vlalign.data.tokenizer import vlm_token_ids
from vlalign.eval.caption_metrics import spice_missing_reason
from vlalign.eval.job import EvalJob, merge_metrics, variant_records
from vlalign.eval.runner import EvalInputError, EvalSettings, evaluate_run, reference_rank_curve
from vlalign.methods.stage import InferenceVariant
from vlalign.models.backbones import make_image_processor
from vlalign.models.vlm import VisionLanguageModel

COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
ROUGE_SCORE = ("ROUGE1_F", "ROUGE1_R", "ROUGEL_F", "ROUGEL_R")  # rouge-score's (seed 001)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    w = build_world(tmp_path_factory.mktemp("eval_world"), {"train": 8, "val": 4, "test": 8})
    vlm = VisionLanguageModel.from_parts(w.vision, w.lm, mask_mode="prefix")
    vlm.save_pretrained(w.root / "model")
    return {"root": w.root, "data": w.data["world"], "tok": w.tokenizer,
            "vision": w.vision, "lm": w.lm, "model": w.root / "model",
            "dsd": w.datasets["world"], "tokenizer": w.tok}


SETTINGS = {f.name for f in dataclasses.fields(EvalSettings)}


def _eval(world, out: Path, model_dir: Path | None = None, **kw) -> dict:
    """evaluate_run with small settings; ``kw``: EvalSettings fields or evaluate_run's own."""
    settings = {"num_beams": 1, "max_new_tokens": 20, "batch_size": 8, "rank_samples": 6,
                **{k: v for k, v in kw.items() if k in SETTINGS}}
    args = {"run": "r0", "stage": "stage1", "dataset": "world",
            **{k: v for k, v in kw.items() if k not in SETTINGS}}
    return evaluate_run(model_dir or world["model"], world["data"], world["tok"],
                        world["vision"], out, settings=EvalSettings(**settings), **args)


# ------------------------------------------------------------------------------- prompts
def test_prompt_formats_agree_with_training_targets(world):
    tok = world["tokenizer"]
    ids = vlm_token_ids(tok)
    inp, labels = caption_target(tok, "A red circle.")
    assert inp[0] == ids["bos"] and inp[-1] == ids["eos"] and caption_prompt(tok) == inp[:1]
    assert labels[0] == IGNORE_INDEX and labels[1:] == inp[1:]
    assert decode_text(tok, inp) == "A red circle."

    turns = [{"from": "human", "value": "<image>\nWhat color is it?"},
             {"from": "gpt", "value": "red"},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]
    inp, labels = conversation_ids(tok, turns)
    assert len(inp) == len(labels) and ids["image"] not in inp
    prompt = vqa_prompt(tok, "What color is it?")
    assert inp[: len(prompt)] == prompt  # the eval prompt is the training prefix
    supervised = [t for t, lab in zip(inp, labels) if lab != IGNORE_INDEX]
    assert decode_text(tok, supervised) == "red2"
    assert supervised.count(ids["eos"]) == 2 and ids["ans"] not in supervised
    with pytest.raises(ValueError, match="no answer"):
        conversation_ids(tok, turns[:3])
    with pytest.raises(ValueError, match="unknown role"):
        conversation_ids(tok, [{"from": "system", "value": "x"}])


# ------------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def untrained(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval_untrained")
    return out, _eval(world, out, task="both", text_kind="recaption",
                      extra_records=[{"metric": "trainable_params", "value": 123}])


def test_outputs_and_metric_contract(world, untrained):
    out, metrics = untrained
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"schema_version", "run", "records", "missing"}
    names = {r["metric"] for r in metrics["records"]}
    assert set(COCO_METRICS) <= names and {"VQA_acc", "effective_rank_0.9"} <= names
    assert set(ROUGE_SCORE) <= names
    resampled = {r["metric"] for r in metrics["records"] if "resamples" in r}
    assert resampled == set(COCO_METRICS) | set(ROUGE_SCORE) | {"VQA_acc"}
    assert "trainable_params" in names
    assert {"grounding_gap", "grounding_loss_own", "distinct_ratio"} <= names
    for rec in metrics["records"]:
        assert {"run", "stage", "dataset", "split", "metric", "value", "decoding"} <= set(rec)
        assert rec["decoding"] == {"num_beams": 1, "max_new_tokens": 20, "task": "both"}
        assert rec["split"] == "test" and rec["run"] == "r0"
    values = {r["metric"]: r["value"] for r in metrics["records"]}
    assert 0.0 <= values["VQA_acc"] <= 1.0
    # grounding metrics an untrained model's captions give nothing to score for are missing
    grounding = {"attr_acc_colour", "attr_acc_shape", "attr_acc_count", "attr_acc_size",
                 "attr_acc_position", "CHAIR_i", "CHAIR_s"}
    missing = [m["metric"] for m in metrics["missing"]]
    assert not set(missing) & names and set(missing) - {"SPICE"} <= grounding
    if spice_missing_reason() is not None:
        assert "SPICE" not in names and "SPICE" in missing

    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    test = world["dsd"]["test"]
    caps = [x for x in lines if x["task"] == "caption"]
    assert [x["image_id"] for x in caps] == list(test["image_id"])
    assert all(isinstance(x["prediction"], str) and x["references"] for x in caps)
    vqa = [x for x in lines if x["task"] == "vqa"]
    assert len(vqa) == sum(len(q) for q in test["qa"])
    assert all({"question", "answers", "prediction", "references"} <= set(x) for x in vqa)

    curve = json.loads((out / "rank_curve.json").read_text())
    cum = curve["cumulative"]
    assert curve["run"] == "r0" and curve["k"] == list(range(1, len(cum) + 1))
    assert all(b >= a - 1e-12 for a, b in zip(cum, cum[1:])) and cum[-1] == pytest.approx(1.0)
    assert 0.0 < curve["effective_rank"] <= 1.0
    assert values["effective_rank_0.9"] == curve["effective_rank"]


def test_reference_lm_curve(world, tmp_path):
    curve = reference_rank_curve(world["lm"], world["data"], world["tok"],
                                 tmp_path / "ref" / "rank_curve.json", rank_samples=6)
    on_disk = json.loads((tmp_path / "ref" / "rank_curve.json").read_text())
    assert on_disk == curve and curve["run"] == "_reference_lm"
    assert curve["cumulative"][-1] == pytest.approx(1.0)
    assert 1 <= len(curve["k"]) <= LM["hidden_size"]  # components = min(tokens, hidden)
    assert 0.0 < curve["effective_rank"] <= 1.0


# ------------------------------------------------------------------------------- bad input
def test_model_dir_without_vlm_json(world, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(world["model"], broken)
    (broken / "vlm.json").unlink()
    with pytest.raises(FileNotFoundError, match="vlm.json"):
        _eval(world, tmp_path / "out", model_dir=broken)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_empty_split_and_missing_references(world, tmp_path):
    dsd = world["dsd"]
    empty = DatasetDict({"train": dsd["train"], "val": dsd["val"],
                         "test": dsd["test"].select([])})
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(EvalInputError, match="'test' is empty"):
        evaluate_run(world["model"], tmp_path / "empty", world["tok"], world["vision"],
                     tmp_path / "o1", run="r", stage="s", dataset="d")

    bad_id = dsd["test"][3]["image_id"]
    holed = dsd["test"].map(
        lambda r: {"captions": [] if r["image_id"] == bad_id else r["captions"]})
    DatasetDict({"train": dsd["train"], "val": dsd["val"], "test": holed}).save_to_disk(
        str(tmp_path / "holed"))
    with pytest.raises(EvalInputError, match=bad_id):
        evaluate_run(world["model"], tmp_path / "holed", world["tok"], world["vision"],
                     tmp_path / "o2", run="r", stage="s", dataset="d")

    no_qa = dsd["test"].map(lambda r: {"qa": []})
    DatasetDict({"train": dsd["train"], "val": dsd["val"], "test": no_qa}).save_to_disk(
        str(tmp_path / "noqa"))
    with pytest.raises(EvalInputError, match="no qa pairs"):
        evaluate_run(world["model"], tmp_path / "noqa", world["tok"], world["vision"],
                     tmp_path / "o3", run="r", stage="s", dataset="d",
                     settings=EvalSettings(task="vqa"))


# ------------------------------------------------------------------------------- job steps
def test_eval_settings_from_the_eval_block():
    block = {"split": "val", "task": "both", "num_beams": 2, "max_new_tokens": 9,
             "batch_size": 4, "spice": "off", "rank_samples": 8, "rank_text_tokens": 16,
             "prefix_variants": ["normal", "noise"]}
    s = EvalSettings.from_params(block)
    assert (s.split, s.task, s.num_beams, s.rank_text_tokens) == ("val", "both", 2, 16)
    assert s.variants == ("normal", "noise") and s.mask_mode is None
    assert EvalSettings.from_params({}) == EvalSettings()  # omitted keys: the defaults
    with pytest.raises(ValueError, match=r"eval\.beams: unknown.*'num_beams'.*'prefix_variants'"):
        EvalSettings.from_params({"beams": 2})
    with pytest.raises(ValueError, match="eval.task must be one of"):
        EvalSettings(task="retrieval")
    with pytest.raises(ValueError, match="eval.batch_size must be >= 1, got 0"):
        EvalSettings(batch_size=0)


def test_eval_settings_read_every_key_of_the_config_schema():
    # every eval key the schema allows has a field (a new key fails here, not in a DAG run)
    from vlalign.config import load_schema, schema_defaults

    keys = set(load_schema()["properties"]["eval"]["properties"])
    config_key = {v: k for k, v in EvalSettings.PARAM_KEYS.items()}
    fields = {config_key.get(f.name, f.name) for f in dataclasses.fields(EvalSettings)}
    assert keys == fields - {"mask_mode"}
    settings = EvalSettings.from_params(schema_defaults("eval"))
    assert settings.variants == ("normal",) and settings.task == "both"


def test_eval_job_from_params_checks_its_inputs(tmp_path):
    params = {"run": "r_s0", "seed": 1, "datasets": ["a", "b"], "eval": {"task": "vqa"},
              "config": {"stages": [{"text": "qa"}, {"text": "recaption", "max_length": 99}]}}
    job = EvalJob.from_params(params, data=["da", "db"], tokenizer="t", vision="v",
                              out_dir=tmp_path)
    assert job.datasets == (("a", Path("da")), ("b", Path("db")))
    assert (job.seed, job.text_kind, job.text_max_length) == (1, "recaption", 99)
    assert job.settings == EvalSettings(task="vqa") and job.text_format == PLAIN
    # the last stage's instructions: the prompts carry them (a model is asked as trained)
    last = params["config"]["stages"][-1]
    prompts = {"caption": {"instructions": ["Which objects?"], "task": "A photo of"}}
    fmt = {**params, "config": {"stages": [{**last, "prompts": prompts}]}}
    job = EvalJob.from_params(fmt, data=["da", "db"], tokenizer="t", vision="v", out_dir=tmp_path)
    assert job.text_format == TextFormat(Prompt(("Which objects?",), "A photo of"))
    with pytest.raises(ValueError, match=r"--data has 1 paths for datasets \['a', 'b'\]"):
        EvalJob.from_params(params, data=["da"], tokenizer="t", vision="v", out_dir=tmp_path)
    with pytest.raises(ValueError, match="missing key 'seed'"):
        EvalJob.from_params({k: v for k, v in params.items() if k != "seed"}, data=["da", "db"],
                            tokenizer="t", vision="v", out_dir=tmp_path)


def test_merge_and_variant_records():
    def rec(metric, stage="ft"):
        return {"run": "r", "stage": stage, "dataset": "d", "split": "test", "metric": metric,
                "value": 1.0, "decoding": {"num_beams": 1, "task": "caption"}}

    first = {"records": [rec("CIDEr")], "missing": [{"metric": "SPICE", "reason": "jars"}]}
    more = {"records": [rec("VQA_acc")], "missing": [{"metric": "SPICE", "reason": "jars"},
                                                     {"metric": "CHAIR_i", "reason": "x"}]}
    merged = merge_metrics(first, more)
    assert [r["metric"] for r in merged["records"]] == ["CIDEr", "VQA_acc"]
    assert [m["metric"] for m in merged["missing"]] == ["SPICE", "CHAIR_i"]  # once each

    variant = InferenceVariant("prefix", "noise")
    rows = variant_records({"records": [rec("CIDEr"), rec("effective_rank_0.9")]}, variant)
    assert rows == [{**rec("CIDEr"), "stage": "ft@prefix_noise",
                     "decoding": {"num_beams": 1, "task": "caption", "prefix_variant": "noise"}}]
    # key order as written before (stage in place, the variant last in decoding)
    assert list(rows[0]) == list(rec("CIDEr")) and list(rows[0]["decoding"])[-1] == (
        "prefix_variant")


# ------------------------------------------------------------------------------- real signal
def _train_on_recaptions(world, out_dir: Path, steps: int) -> None:
    """A brief caption-stage loop: projector + LM on ``<bos> recaption <eos>``."""
    tok = world["tokenizer"]
    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_pretrained(world["model"])
    vlm.vision.requires_grad_(False)
    train = world["dsd"]["train"]
    pixels = make_image_processor(64)(
        images=[im.convert("RGB") for im in train["image"]], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        feats = vlm.encode_images(pixels)
    seqs = [caption_target(tok, r) for r in train["recaption"]]
    width = max(len(s) for s, _ in seqs)
    pad = vlm_token_ids(tok)["pad"]
    ids = torch.full((len(seqs), width), pad)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = (
            torch.tensor(s), torch.tensor(lab), 1)
    params = [p for n, p in vlm.named_parameters() if not n.startswith("vision.")]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    vlm.train()
    first = last = None
    for _ in range(steps):
        loss = vlm(input_ids=ids, attention_mask=mask, labels=labels, image_features=feats).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.5 * first, (first, last)
    vlm.save_pretrained(out_dir)


def test_trained_model_scores_higher_than_untrained(world, untrained, tmp_path):
    """Captions of a briefly trained model share n-grams with the human references (the
    recaption template: "... objects on a gray background. In the top left there is ..."), an
    untrained model's do not: the runner's scores must show it."""
    _train_on_recaptions(world, tmp_path / "trained", steps=100)
    trained = _eval(world, tmp_path / "out", model_dir=tmp_path / "trained")
    after = {r["metric"]: r["value"] for r in trained["records"]}
    before = {r["metric"]: r["value"] for r in untrained[1]["records"]}
    assert after["CIDEr"] > before["CIDEr"] + 0.03, (before, after)
    assert after["Bleu_4"] > before["Bleu_4"] + 0.05, (before, after)
    assert after["METEOR"] > before["METEOR"] + 0.05, (before, after)


def test_corpus_metrics_carry_their_image_resamples(untrained):
    _, metrics = untrained
    by_metric = {r["metric"]: r for r in metrics["records"]}
    for m in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "VQA_acc"):
        block = by_metric[m]["resamples"]
        assert block["scheme"]["key"] == "world/test/0" and block["scheme"]["count"] == 200
        assert len(block["values"]) == 200
    assert "resamples" not in by_metric["grounding_gap"]
    # VQA accuracy resampled by image: its draws spread around the full-set value (a paired
    # comparison of two seeds differing by one question is then not "significant")
    vqa = np.asarray(by_metric["VQA_acc"]["resamples"]["values"])
    full = by_metric["VQA_acc"]["value"]
    assert ((0 <= vqa) & (vqa <= 1)).all()
    assert vqa.std() > 0 if 0 < full < 1 else (vqa == full).all()  # an untrained model: all 0


def test_the_runs_text_format_lays_out_the_scored_text(world, tmp_path):
    # grounding_gap scores the run's training text in its format: instructions change it
    fmt = TextFormat(Prompt(("What objects are in the picture?",), "A photo of"))
    plain, instructed = (
        {r["metric"]: r["value"] for r in _eval(world, tmp_path / name, task="none",
                                                 text_kind="captions", text_format=f)["records"]}
        for name, f in (("plain", PLAIN), ("instructed", fmt))
    )
    assert instructed["grounding_loss_own"] != pytest.approx(plain["grounding_loss_own"])


def test_task_none_measures_the_losses_only(world, tmp_path):
    metrics = _eval(world, tmp_path, task="none", text_kind="recaption")
    names = {r["metric"] for r in metrics["records"]}
    assert {"grounding_gap", "effective_rank_0.9"} <= names
    assert not names & {"CIDEr", "VQA_acc", "distinct_ratio"}
    assert (tmp_path / "predictions.jsonl").read_text() == ""


def test_peft_generation_stats_become_metric_records_and_prediction_details(world, tmp_path):
    """KLAFT's r_TCM end to end: the ``tcm`` method's ``generation_stats`` hook, through the
    session, is averaged into a ``r_TCM`` record (as the DuckDB reader reads it) and the topic
    of every generated token lands in ``predictions.jsonl``."""
    from vlalign.methods import apply_methods
    from vlalign.methods.stage import PeftSession
    from vlalign.results.db import _read_metrics_json

    vlm = VisionLanguageModel.from_pretrained(world["model"])
    session = PeftSession(apply_methods(vlm, [("tcm", {"num_topics": 3})]), {"tcm": 1e-3})
    generated: list[list[int]] = []

    def stats(model, batch):  # the session's hook, recording what it was given
        generated.extend(list(g) for g in batch.generated)
        return session.generation_stats(model, batch)

    metrics = _eval(world, tmp_path, task="caption", meteor=False, spice="off", model=vlm,
                    inputs=session.inference(), generation_stats=stats)
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    topics = [x["tcm.topics"] for x in lines]
    assert len(generated) == len(lines) == len(world["dsd"]["test"])
    for x, t, g in zip(lines, topics, generated):  # one topic per generated token (eos cut)
        assert len(t) == len(g) and all(z in range(4) for z in t)
        assert x["prediction"] == decode_text(world["tokenizer"], g)
    shares = [sum(z != 0 for z in t) / len(t) for t in topics if t]
    assert shares
    records = [r for r in metrics["records"] if r["metric"] == "r_TCM"]
    assert len(records) == 1 and records[0]["value"] == pytest.approx(sum(shares) / len(shares))
    rows = _read_metrics_json(tmp_path / "metrics.json", "r0")[0]
    assert [r["value"] for r in rows if r["metric"] == "r_TCM"] == [records[0]["value"]]
    # K = 0: no r_TCM record at all (never a pretend 0)
    plain = VisionLanguageModel.from_pretrained(world["model"])
    off = PeftSession(apply_methods(plain, [("tcm", {"num_topics": 0})]), {"tcm": 1e-3})
    metrics = _eval(world, tmp_path / "off", task="caption", meteor=False, spice="off",
                    model=plain, generation_stats=off.generation_stats)
    assert "r_TCM" not in {r["metric"] for r in metrics["records"]}
