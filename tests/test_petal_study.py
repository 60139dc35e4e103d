"""PETAL's study (seed 001) as the configs declare it: the default DAG's ablation cells (V1-V4,
LoRA R = 64, head tuning) differ from full PETAL in exactly the method they remove, the few-shot
cells train on their sample counts, every cell is scored on captions and VQA behind the Table 7
prompts, and the paper recipe trains as the paper does."""

from __future__ import annotations

import pytest

from vlalign.config import REPO_ROOT, load_config, load_yaml
from vlalign.data.text_formats import TextFormat
from vlalign.results.tables import load_specs
from vlalign.runs.plan import plan

DEFAULT = REPO_ROOT / "config" / "config.yaml"
PAPER = REPO_ROOT / "config" / "recipes" / "paper.yaml"
EXTRA = REPO_ROOT / "config" / "recipes" / "petal_extra.yaml"
PETAL = {"dma", "instruction_moe", "info_bottleneck"}


@pytest.fixture(scope="module")
def default_plan():
    return plan(load_config(DEFAULT))


def _last(stages, runs, run: str):
    return stages[runs[run].stages[-1]].settings


def test_ablation_cells_remove_exactly_their_method(default_plan) -> None:
    stages, runs = default_plan
    methods = {r: _last(stages, runs, f"{r}_s0")["peft"]
               for r in ("petal", "petal_no_moe", "petal_no_ib", "petal_no_moe_ib",
                         "petal_no_gamma", "petal_lora64", "petal_head")}
    assert set(methods["petal"]) == PETAL
    assert set(methods["petal_no_moe"]) == PETAL - {"instruction_moe"}
    assert set(methods["petal_no_ib"]) == PETAL - {"info_bottleneck"}
    assert set(methods["petal_no_moe_ib"]) == {"dma"}
    assert set(methods["petal_no_gamma"]) == PETAL
    assert methods["petal"]["dma"]["gamma"] and not methods["petal_no_gamma"]["dma"]["gamma"]
    assert methods["petal"]["dma"]["rank"] == 64
    lora = methods["petal_lora64"]["lora"]
    assert set(methods["petal_lora64"]) == {"lora"} and lora["r"] == 64
    assert set(lora["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(methods["petal_head"]) == {"full"}
    assert methods["petal_head"]["full"]["layers"] == [-1]
    # everything else is the same stage: data, prompts, schedule (the comparison is fair)
    base = {k: v for k, v in _last(stages, runs, "petal_s0").items() if k != "peft"}
    for run in methods:
        other = _last(stages, runs, f"{run}_s0")
        assert {k: v for k, v in other.items() if k != "peft"} == base, run
        # every cell starts from the same aligned model, and has two seeds
        assert runs[f"{run}_s0"].stages[:-1] == runs["align4_s0"].stages
        assert f"{run}_s1" in runs and runs[f"{run}_s1"].stages[-1] != runs[f"{run}_s0"].stages[-1]


def test_cells_train_captions_and_qa_behind_the_table7_prompts(default_plan) -> None:
    stages, runs = default_plan
    settings = _last(stages, runs, "petal_s0")
    assert settings["text"] == "captions_qa" and settings["dataset"] == "world_target"
    fmt = TextFormat.from_settings(settings)
    assert fmt.caption.instructions[0] == "What objects are in the picture?"
    assert fmt.caption.task == "A photo of"
    assert fmt.qa.task == "Question: {question} Short answer:"
    assert "What color are the objects in the picture?" in fmt.qa.instructions
    # the paper's optimiser: AdamW wd 0.02, warm-up then cosine (36 steps: make run's budget)
    assert settings["optimizer"]["weight_decay"] == 0.02 and settings["schedule"] == "cosine"
    assert settings["warmup_ratio"] > 0 and settings["max_steps"] == 36
    cells = [r for r, n in runs.items() if n.spec.get("study") == "petal"]
    assert len(cells) == 7 * 2 + 2 * 2
    for run in cells:
        assert runs[run].spec["eval"]["task"] == "both", run  # CIDEr and VQA of one model


def test_few_shot_cells_draw_their_sample_counts(default_plan) -> None:
    stages, runs = default_plan
    few = {r: _last(stages, runs, r) for r in runs if r.startswith("petal_few_shot-")}
    assert sorted(s["max_train_samples"] for s in few.values()) == [50, 50, 150, 150]
    assert {s["max_steps"] for s in few.values()} == {36}  # the same steps for both sizes
    assert len({runs[r].stages[-1] for r in few}) == 4  # each (count, seed) its own stage
    # the overlay adds LoRA's few-shot cells and 4 seeds
    stages_x, runs_x = plan(load_config(DEFAULT, load_yaml(EXTRA)))
    assert {f"lora_few_shot-max_train_samples{n}_s{s}" for n in (50, 150) for s in range(4)} <= set(
        runs_x)
    assert "petal_no_ib_s3" in runs_x


def test_study_tables_are_declared_and_pt_peft_tables_leave_the_study_out() -> None:
    specs = {s.name: s for s in load_specs(REPO_ROOT / "config" / "tables")}
    for name in ("petal_ablation", "petal_few_shot"):
        assert "'$.run.study') = 'petal'" in specs[name].query, name
        assert "VQA_acc" in specs[name].query and "ROUGE1_F" in specs[name].query
    assert specs["petal_ablation"].baseline == ("petal",)
    for name in ("peft_methods", "ablation_order"):
        assert "'$.run.study') IS NULL" in specs[name].query, name


def test_paper_recipe_trains_petal_as_the_paper() -> None:
    stages, runs = plan(load_config(PAPER))
    for run, dataset, text in (("petal_flickr30k_s0", "flickr30k", "captions"),
                               ("petal_textcaps_s0", "textcaps", "captions"),
                               ("petal_aokvqa_s0", "aokvqa", "qa"),
                               ("petal_textvqa_s0", "textvqa", "qa")):
        s = _last(stages, runs, run)
        assert (s["dataset"], s["text"]) == (dataset, text), run
        assert set(s["peft"]) == PETAL and s["peft"]["dma"]["rank"] == 64
        assert s["optimizer"]["weight_decay"] == 0.02 and s["schedule"] == "cosine"
        assert s["warmup_steps"] == 1000 and s["epochs"] == 5 and s["batch_size"] == 32
        assert runs[run].stages[:-1] == runs["align4_s0"].stages
    assert runs["petal_aokvqa_s0"].eval_datasets == ["aokvqa", "okvqa"]
    few = [r for r in runs if r.startswith("petal_few_shot-")]
    assert len(few) == 2 * 4
