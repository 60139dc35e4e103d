"""Recaptioning as a rule of the DAG (issue 15, vlalign.data.recaption): config errors, content
keys, shard resume, a Hugging Face image-text-to-text captioner (a tiny LLaVA built here), and a
`run:` captioner of the DAG through the real Snakemake CLI, with its quality rows in DuckDB."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from vlalign.config import ConfigError, load_config
from vlalign.data import recaption as rc
from vlalign.data.sources import load_source, save_dataset

CONFIG = Path(__file__).parent / "configs" / "tiny_recaption.yaml"
TIMEOUT = 600


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_config(CONFIG)


def _hf(**kw) -> dict:
    return {"dataset": "world", "captioner": "hf:org/model@abc123", "prompt": "Describe.", **kw}


def _resolve(cfg: dict, entry: dict) -> list[rc.RecaptionSpec]:
    c = copy.deepcopy(cfg)
    c["recaptions"] = {"x": entry}
    return rc.resolve_recaptions(c)


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_hf(captioner="ftp:model"), "recaptions.x.captioner: unknown captioner 'ftp:model'"),
        (_hf(captioner="hf:org/model"), "needs a revision"),
        ({"dataset": "world", "captioner": "run:nope"}, "recaptions.x.captioner: unknown run"),
        ({"dataset": "world", "captioner": "run:cap_s7"}, "has no seed 7"),
        ({"dataset": "world", "captioner": "run:cap", "prompt": "hi"}, "recaptions.x.prompt"),
        (_hf(shards=0), "recaptions.x.shards: must be an integer >= 1, got 0"),
        (_hf(batch_size=True), "recaptions.x.batch_size"),
        (_hf(dataset="coco"), "recaptions.x.dataset: unknown dataset 'coco'"),
        (_hf(temperature=0.7), "unknown keys ['temperature']"),
        (_hf(prompt=None), "recaptions.x.prompt: an hf: captioner needs a prompt"),
    ],
)
def test_bad_entries_name_the_key(cfg: dict, entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _resolve(cfg, entry)


def test_a_hand_written_recaption_source_is_refused(cfg: dict) -> None:
    c = copy.deepcopy(cfg)
    c["datasets"]["fake"] = {"source": "recaption:nothing"}
    with pytest.raises(ConfigError, match="datasets.fake"):
        rc.expand_recaptions(c)


def test_a_captioner_trained_on_its_own_recaptions_is_a_cycle(cfg: dict) -> None:
    c = copy.deepcopy(cfg)
    c["recaptions"]["gen"]["captioner"] = "run:gen"
    with pytest.raises(ConfigError, match="no fixed point"):
        rc.expand_recaptions(c)


# ------------------------------------------------------------------------------- keys


def _key(cfg: dict, change=None) -> str:
    c = copy.deepcopy(cfg)
    if change:
        change(c)
    rc.expand_recaptions(c)
    return c["datasets"]["world+recap-gen"]["recaption_key"]


def test_content_key(cfg: dict) -> None:
    base = _key(cfg)
    # the schema's dataset defaults, the domain of its images
    assert cfg["datasets"]["world+recap-gen"] == {
        "source": "recaption:gen", "recaption_key": base, "domain": "source",
        "on_error": "raise", "recaption": "auto"}

    def entry(**kw):
        return lambda c: c["recaptions"]["gen"].update(kw)

    # how the work is cut, and what the captioner is not: the same key
    assert _key(cfg, entry(shards=5, batch_size=3)) == base
    assert _key(cfg, lambda c: c["eval"].update(num_beams=4)) == base
    # what is generated: a new key
    assert _key(cfg, entry(num_beams=2)) != base
    assert _key(cfg, entry(max_new_tokens=20)) != base
    # the captioner run's last stage trained otherwise (its hash) is another captioner
    assert _key(cfg, lambda c: c["stages"]["ft_lora"]["peft"]["lora"].update(r=8)) != base
    # an hf: captioner: its prompt and revision are in the key
    hf = {"dataset": "world", "captioner": "hf:o/m@r1", "prompt": "Describe."}
    k_hf = _key(cfg, lambda c: c["recaptions"].update(gen=hf))
    assert _key(cfg, lambda c: c["recaptions"].update(gen={**hf, "prompt": "Caption."})) != k_hf
    assert _key(cfg, lambda c: c["recaptions"].update(gen={**hf, "captioner": "hf:o/m@r2"})) != k_hf


def test_a_stage_on_recaptioned_data_hashes_the_key(cfg: dict) -> None:
    from vlalign.runs.plan import plan

    _, runs = plan(cfg)
    c = copy.deepcopy(cfg)
    c["recaptions"]["gen"]["num_beams"] = 2
    rc.expand_recaptions(c)
    _, runs2 = plan(c)
    assert runs2["gen_s0"].stages != runs["gen_s0"].stages  # trained on other text
    assert runs2["align_s0"].stages == runs["align_s0"].stages  # untouched


# ------------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    world = {"image_size": 32, "grid": 3, "max_objects": 3, "captions_per_image": 5,
             "qa_per_image": 2, "conversation_turns": 2}
    from vlalign.data.world import resolve_scene_config

    dsd = load_source("world", {"source": "synthetic",
                                "splits_sizes": {"train": 14, "val": 3, "test": 4}},
                      world_cfg=resolve_scene_config(world), seed=0)
    out = tmp_path_factory.mktemp("rc") / "world"
    save_dataset(dsd, out)
    return out


class Counting:
    """A captioner of the image's content (its mean pixel per channel), counting its calls;
    ``fail_after`` calls it raises, as a killed job stops."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, images) -> list[str]:
        import numpy as np

        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return [" ".join(f"{v:.1f}" for v in np.asarray(im).reshape(-1, 3).mean(0))
                for im in images]


def test_shard_batches_cover_every_row_once() -> None:
    for n, bs, shards in [(21, 4, 2), (21, 4, 3), (5, 8, 2), (64, 16, 4)]:
        starts = [s for k in range(shards) for s in rc.shard_batches(n, bs, shards, k)]
        assert starts == list(range(0, n, bs))
    with pytest.raises(ValueError, match="shard 2 out of range"):
        rc.shard_batches(10, 2, 2, 2)


def test_killed_shard_resumes_without_redoing_batches(world_dir: Path, tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    n_rows, bs = 21, 4
    mine = rc.shard_batches(n_rows, bs, 2, 0)  # batches at rows 0, 4, 8
    killed = Counting(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        rc.run_shard(world_dir, parts, shards=2, shard=0, batch_size=bs,
                     load_captioner=lambda: killed, done=tmp_path / "s0.done")
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000000.json", "part-00000004.json"]
    assert not (tmp_path / "s0.done").exists()
    resumed = Counting()
    assert rc.run_shard(world_dir, parts, shards=2, shard=0, batch_size=bs,
                        load_captioner=lambda: resumed, done=tmp_path / "s0.done") == 1
    assert resumed.calls == 1 == len(mine) - killed.calls
    assert (tmp_path / "s0.done").is_file()
    # done: nothing is loaded again
    assert rc.run_shard(world_dir, parts, shards=2, shard=0, batch_size=bs,
                        load_captioner=lambda: pytest.fail("loaded"), done=None) == 0
    with pytest.raises(ValueError, match="rows have no recaption"):
        rc.merge(world_dir, parts, tmp_path / "out", info={"name": "t"})
    # another shard count reuses the parts: shard 1 of 3 (rows 8-15) captions row 12 only
    other = Counting()
    assert rc.run_shard(world_dir, parts, shards=3, shard=1, batch_size=bs,
                        load_captioner=lambda: other) == 1
    rc.run_shard(world_dir, parts, shards=3, shard=2, batch_size=bs, load_captioner=Counting)

    q = rc.merge(world_dir, parts, tmp_path / "out", info={"name": "t", "output": "w+recap-t"})
    from datasets import load_from_disk

    before, after = load_from_disk(str(world_dir)), load_from_disk(str(tmp_path / "out"))
    whole = Counting()
    for split in ("train", "val", "test"):
        assert after[split]["recaption"] == whole(before[split]["image"])
        assert after[split]["captions"] == before[split]["captions"]  # the rest: as it was
        assert after[split]["recaption"] != before[split]["recaption"]
    assert json.loads((tmp_path / "out" / rc.INFO_FILE).read_text())["name"] == "t"
    metrics = {(r["split"], r["metric"]): r["value"] for r in q["records"]}
    assert metrics["train", "n_images"] == 14
    assert metrics["test", "length_mean"] == 3.0  # three numbers per caption
    assert metrics["test", "Bleu_4"] < 0.05  # numbers are not captions
    assert ("test", "CHAIR_i") not in metrics  # no shape mentioned: missing, never 0
    assert any(m["metric"] == "CHAIR_i" for m in q["missing"])


def test_quality_scores_the_worlds_own_recaptions(world_dir: Path) -> None:
    """The world's template recaptions name the true objects: grounding near perfect."""
    from datasets import load_from_disk

    q = rc.quality_records(load_from_disk(str(world_dir)), dataset="world", recaption="-")
    m = {(r["split"], r["metric"]): r["value"] for r in q["records"]}
    assert m["train", "attr_acc_colour"] > 0.95
    assert m["train", "CHAIR_i"] < 0.05
    assert m["train", "length_mean"] > 10
    assert m["train", "CIDEr"] > 0


# ------------------------------------------------------------------------------- hf: captioner


def _tiny_llava(root: Path) -> Path:
    """A LlavaForConditionalGeneration (CLIP tower + Llama LM) and LlavaProcessor, tiny and
    random, saved with save_pretrained (no hub download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "describe", "a", "red", "blue",
             "circle", "square", "small", "large", "left", "right", "top", "the"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16},
                                         crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=64,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=4, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a random model whose output depends strongly on the image
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(20)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    out = root / "tiny_llava"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_hf_captioner_generates_with_the_real_classes(world_dir: Path, tmp_path: Path) -> None:
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = _tiny_llava(tmp_path)
    prompt = "<image> describe the"
    caption = rc.hf_captioner(str(path), revision=None, prompt=prompt, num_beams=1,
                              max_new_tokens=6, dtype="float32")
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)  # noise: the tiny random tower tells these apart
    images = [PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
              for _ in range(6)]
    got = caption(images)

    # each image alone, straight through the classes AutoModelForImageTextToText maps to
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    direct = []
    for im in images:
        inputs = processor(images=[im.convert("RGB")], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        new = out[:, inputs["input_ids"].shape[1]:]
        direct.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    assert len(set(direct)) > 1, f"the tiny model ignores its image: {direct}"
    assert got == direct

    # through run_shard + merge: the column is the captioner's text
    parts = tmp_path / "parts"
    for k in range(2):
        rc.run_shard(world_dir, parts, shards=2, shard=k, batch_size=8, load_captioner=lambda:
                     caption)
    rc.merge(world_dir, parts, tmp_path / "out", info={"name": "llava"})
    train = load_from_disk(str(world_dir))["train"]["image"]
    assert load_from_disk(str(tmp_path / "out"))["train"]["recaption"] == caption(train)


# ------------------------------------------------------------------------------- run: (DAG)


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


@pytest.fixture(scope="module")
def dag(snakemake, cfg: dict, tmp_path_factory):
    """The tiny DAG up to the run trained on generated recaptions, then the DuckDB file."""
    results = tmp_path_factory.mktemp("rcdag") / "results"
    common = ["--configfile", str(CONFIG), "--config", f"results_dir={results}"]
    targets = [str(results / "data" / "world+recap-gen"),
               str(results / "runs" / "gen_s0" / "metrics.json")]
    proc = snakemake(["--cores", "2", *targets, *common], timeout=TIMEOUT)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{_tail(p.read_text(), 1500)}"
                         for p in sorted(results.glob("logs/**/*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{_tail(proc.stdout)}\n{logs}")
    return results, common, targets


@pytest.mark.slow
def test_run_captioner_through_snakemake(dag, cfg: dict, snakemake, tmp_path: Path) -> None:
    from datasets import load_from_disk

    from vlalign.results.db import ingest, query
    from vlalign.runs.plan import plan

    results, common, targets = dag
    key = cfg["datasets"]["world+recap-gen"]["recaption_key"]
    root = results / "recaptions" / f"gen-{key}"
    assert sorted(p.name for p in (root / "of2").iterdir()) == ["shard-0.done", "shard-1.done"]
    out = load_from_disk(str(results / "data" / "world+recap-gen"))
    base = load_from_disk(str(results / "data" / "world"))
    assert out["train"]["captions"] == base["train"]["captions"]

    # the column is the captioner run's last stage (LoRA re-attached) generating, greedy
    stages, runs = plan(cfg)
    cap_stage = results / "stages" / runs["cap_s0"].stages[-1]
    caption = rc.run_captioner(cap_stage, results / "tokenizer", results / "backbones" / "vision",
                               text_settings=stages[runs["cap_s0"].stages[-1]].settings,
                               num_beams=1, max_new_tokens=12)
    assert out["test"]["recaption"][:5] == caption(base["test"]["image"][:5])
    assert out["train"]["recaption"] != base["train"]["recaption"]  # not the templates
    # the run trained on them exists and read that dataset
    gen_stage = results / "stages" / runs["gen_s0"].stages[-1]
    assert (gen_stage / "stage.json").is_file()

    ingest(results, tmp_path / "r.duckdb")
    q = query(tmp_path / "r.duckdb", "SELECT split, metric, value FROM recaption_quality "
              "WHERE dataset = 'world+recap-gen'")
    got = {(r.split, r.metric): r.value for r in q.itertuples()}
    assert got["train", "n_images"] == 48
    assert {"length_mean", "length_median", "Bleu_4", "CIDEr"} <= {m for _, m in got}

    # a rerun is a no-op; another shard count reuses every part (no caption is generated)
    proc = snakemake(["-n", *targets, *common])
    assert "Nothing to be done" in proc.stdout, _tail(proc.stdout)
    override = tmp_path / "shards3.yaml"
    override.write_text(yaml.safe_dump({"recaptions": {"gen": {"shards": 3}}}))
    proc = snakemake(["--cores", "2", targets[0], "--configfile", str(CONFIG), str(override),
                      *common[2:]], timeout=TIMEOUT)
    assert proc.returncode == 0, _tail(proc.stdout)
    done = [json.loads(p.read_text()) for p in sorted((root / "of3").glob("*.done"))]
    assert [d["captioned"] for d in done] == [0, 0, 0]
    assert load_from_disk(str(results / "data" / "world+recap-gen"))["train"]["recaption"] == \
        out["train"]["recaption"]


def test_paper_recipe_recaptions_coco_with_llava_next() -> None:
    recipe = yaml.safe_load((Path(__file__).parents[1] / "config/recipes/paper.yaml").read_text())
    entry = next(iter(recipe["recaptions"].values()))
    cap = rc.parse_captioner(entry["captioner"], "paper")
    assert cap.scheme == "hf" and "llava-v1.6" in cap.ident and cap.revision
