"""Paper fidelity of the shipped configs and the PT-PEFT mechanics (issue 11).

- training orders of seed 003 Table 2: X→prefix trains X, then only the prefix (X frozen);
- trainable-parameter budgets in Table 2's order (prefix < LoRA < S-/P-Adapter, the adapters
  matched), and a chain's count = the union of what it trains;
- the PT-PEFT optimiser (App. B.4) and the rates of Table 13;
- full fine-tuning keeps word embeddings and LM head frozen (App. B.5);
- seeded noise: the prefix ``noise`` variant and stage0 noise per data-parallel rank;
- the captioning table's metrics (seed 002 Table 6) and the projector's size.

Self-contained: a tiny Qwen2 LM built here, no shared test helpers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlalign.config import REPO_ROOT, ConfigError, load_config, load_yaml
from vlalign.data.text_formats import PLAIN, TextFormat
from vlalign.eval.job import LoadedStage
from vlalign.methods import apply_methods, prefix_position_ids
from vlalign.methods.registry import embedding_parameters, get_method, lm_base_parameters
from vlalign.methods.stage import PEFT_DIR, PeftSession, attach_peft
from vlalign.models.noise import corrupt_tokens, noise_seed
from vlalign.models.projector import build_projector
from vlalign.results.tables import load_specs
from vlalign.runs.plan import plan, resolve_stage_settings
from vlalign.runs.settings import resolve_methods

DEFAULT = REPO_ROOT / "config" / "config.yaml"
PAPER = REPO_ROOT / "config" / "recipes" / "paper.yaml"
ADAPTERS = ("s_adapter", "p_adapter")
# Qwen2.5-0.5B's geometry (the paper recipe's LM), built on the meta device: no download
QWEN_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2}  # fmt: skip
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


def _lm(cfg: dict, meta: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(tie_word_embeddings=True, **cfg)
    if meta:
        with torch.device("meta"):
            return Qwen2ForCausalLM(config)
    return Qwen2ForCausalLM(config)


def _default_lm() -> Qwen2ForCausalLM:
    """The default config's tiny LM (vocabulary: the trained tokenizer's size)."""
    config = load_config(DEFAULT)
    return _lm({**config["lm"]["config"], "vocab_size": config["tokenizer"]["vocab_size"]})


def _n(params) -> int:
    return sum(p.numel() for p in params)


def _stage_methods(config: dict, stage: str) -> dict[str, dict]:
    _, settings, _ = resolve_stage_settings(config, stage)
    return {m.name: dict(m.config) for m in settings.peft}


def _size(lm_factory, method: str, cfg: dict) -> int:
    (m,) = apply_methods(lm_factory(), [(method, cfg)])
    return _n(m.trainable_parameters())


# ------------------------------------------------------------------------ 1. training orders
def _loss(lm: torch.nn.Module, session: PeftSession, ids: torch.Tensor) -> torch.Tensor:
    kw = session.forward_kwargs(len(ids))
    mask = torch.ones_like(ids)
    if "past_key_values" not in kw:
        return lm(input_ids=ids, attention_mask=mask, labels=ids).loss
    p = kw["past_key_values"].get_seq_length()
    full = torch.cat([torch.ones(len(ids), p, dtype=mask.dtype), mask], dim=1)
    pos = prefix_position_ids(mask, p)
    return lm(input_ids=ids, attention_mask=full, position_ids=pos, labels=ids, **kw).loss


def _train(lm: torch.nn.Module, session: PeftSession, steps: int = 3) -> None:
    lm.train()
    groups = [{"params": ps, "lr": lr} for ps, lr in session.groups.values()]
    opt = torch.optim.AdamW(groups)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, SMALL["vocab_size"], (4, 12), generator=gen)
        opt.zero_grad()
        _loss(lm, session, ids).backward()
        opt.step()


def _state(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in named.items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def _base(lm: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The LM's own parameters (the objects: LoRA wrapping renames them) and their values."""
    return [(p, p.detach().clone()) for p in lm.parameters()]


def _base_unchanged(base: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> bool:
    return all(torch.equal(p.detach(), v) for p, v in base)


@pytest.mark.parametrize("x", ["lora", "s_adapter", "p_adapter"])
def test_x_then_prefix_trains_x_then_only_the_prefix(x, tmp_path):
    """X→prefix (seed 003 Table 2's reverse order): phase 1 changes only X's parameters;
    phase 2 (a ``peft:`` block listing only the prefix) changes only the prefix's, X stays
    attached and unchanged."""
    lm1 = _lm(SMALL)
    pristine = copy.deepcopy(lm1)
    base1 = _base(lm1)
    s1 = attach_peft(lm1, {x: {"lr": 1e-2}}, None)
    (xm,) = s1.methods
    x0 = _state(xm.named_trainable_parameters())
    _train(lm1, s1)
    x1 = _state(xm.named_trainable_parameters())
    assert _changed(x0, x1) == set(x0)  # every X tensor moved (up/B start at zero)
    assert _base_unchanged(base1)  # the LM did not
    s1.save(tmp_path / PEFT_DIR)

    lm2 = pristine  # the parent stage's saved base model: the same weights
    base2 = _base(lm2)
    s2 = attach_peft(lm2, {"prefix": {"lr": 1e-2, "num_prefix": 4}}, tmp_path)
    assert [m.name for m in s2.methods] == [x, "prefix"]
    assert [m.name for m in s2.trained()] == ["prefix"]
    x_again, prefix = s2.methods
    assert not any(p.requires_grad for p in x_again.trainable_parameters())
    assert not _changed(x1, _state(x_again.named_trainable_parameters()))  # loaded as trained
    p0 = _state(prefix.named_trainable_parameters())
    _train(lm2, s2)
    assert not _changed(x1, _state(x_again.named_trainable_parameters()))  # X frozen
    assert _changed(p0, _state(prefix.named_trainable_parameters()))  # the prefix trained
    assert _base_unchanged(base2)


@pytest.mark.parametrize("path", [DEFAULT, PAPER], ids=["default", "paper"])
def test_reverse_order_runs_train_only_the_prefix_last(path):
    """Every X→prefix run of the shipped configs: the last stage trains the prefix alone, its
    parent trains X (not prefix); prefix→X runs train both in their last stage."""
    stages, runs = plan(load_config(path))
    seen = 0
    for run in runs.values():
        # alternation (Table 9) trains one method per step: test_table_5_6_9_10_runs_plan
        if len(run.stages) < 2 or run.name.startswith("alternation_"):
            continue
        last, parent = stages[run.stages[-1]], stages[run.stages[-2]]
        if not parent.resolved.peft or not last.resolved.peft:
            continue
        trained = lambda n: {m.name for m in n.resolved.peft if m.lr > 0}  # noqa: E731
        if "prefix" in trained(parent):  # prefix→X: phase B trains X and the prefix
            assert "prefix" in trained(last) and len(trained(last)) == 2, run.name
        else:  # X→prefix
            assert trained(last) == {"prefix"}, run.name
            assert {m.name for m in last.resolved.peft} == {"prefix"}, run.name
            seen += 1
    assert seen >= 1


# ------------------------------------------------------------------------ 2. budgets
def test_budget_is_validated_at_plan_time():
    ok = get_method("lora").resolve_config({"budget": "0.26%"})
    assert ok["budget"] == "0.26%" and ok["r"] is None  # sized on the LM when applied
    for block, match in [
        ({"budget": "abc"}, "budget 'abc' must be a parameter count"),
        ({"budget": 0}, "budget 0 must be"),
        ({"budget": "120%"}, "budget '120%'"),
        ({"budget": True}, "budget True"),
        ({"budget": 1000, "r": 8}, "set budget .* or r .*not both"),
    ]:
        with pytest.raises(ConfigError, match=f"stages.x.peft.lora: .*{match}"):
            resolve_methods({"lora": {"lr": 1e-3, **block}}, "stages.x")
    with pytest.raises(ConfigError, match="unknown config keys \\['budget'\\]"):
        resolve_methods({"full": {"lr": 1e-3, "budget": 10}}, "stages.x")
    with pytest.raises(ConfigError, match="needs use_mlp: true"):
        resolve_methods({"prefix": {"lr": 1e-3, "budget": 10, "use_mlp": False}}, "stages.x")


def test_budget_sizes_each_method_within_it():
    lm = _lm(SMALL)
    sized = {"lora": "r", "s_adapter": "bottleneck_size", "p_adapter": "bottleneck_size",
             "prefix": "encoder_hidden"}  # fmt: skip
    for method, key in sized.items():
        for budget in (3000, "5%"):
            (m,) = apply_methods(_lm(SMALL), [(method, {"budget": budget})])
            n = _n(m.trainable_parameters())
            cap = budget if isinstance(budget, int) else int(0.05 * lm_base_parameters(lm))
            assert n <= cap, (method, budget, n)
            bigger = {**m.cfg, key: m.cfg[key] + 1, "budget": None}
            (m2,) = apply_methods(_lm(SMALL), [(method, bigger)])
            assert _n(m2.trainable_parameters()) > cap  # the largest size that fits
    with pytest.raises(ValueError, match="LoRA budget 10 .* below one rank"):
        apply_methods(_lm(SMALL), [("lora", {"budget": 10})])


def test_default_budgets_follow_table2_order():
    """On the default config's LM: prefix < LoRA < S-/P-Adapter, the adapters within ±10 %."""
    config = load_config(DEFAULT)
    sizes = {}
    for stage in ("pt_prefix", "ft_lora", "ft_s_adapter", "ft_p_adapter"):
        ((name, cfg),) = _stage_methods(config, stage).items()
        sizes[name] = _size(_default_lm, name, cfg)
    assert sizes["prefix"] < sizes["lora"] < min(sizes[a] for a in ADAPTERS), sizes
    assert abs(sizes["s_adapter"] - sizes["p_adapter"]) <= 0.1 * sizes["s_adapter"], sizes
    # the second stages re-list the same sizes
    for stage, x in [("ft_lora_prefix", "lora"), ("ft_s_adapter_prefix", "s_adapter"),
                     ("ft_p_adapter_prefix", "p_adapter")]:  # fmt: skip
        methods = _stage_methods(config, stage)
        assert _size(_default_lm, x, methods[x]) == sizes[x]
        assert _size(_default_lm, "prefix", methods["prefix"]) == sizes["prefix"]


def test_paper_budgets_follow_table2_shares():
    """On Qwen2.5-0.5B (meta device): prefix ≈ 0.15 % < LoRA < adapters ≈ 3.1 %, matched."""
    config = load_config(PAPER)
    lm = lambda: _lm(QWEN_05B, meta=True)  # noqa: E731
    total = lm_base_parameters(lm())
    share = {}
    for stage in ("pt_prefix", "ft_lora", "ft_s_adapter", "ft_p_adapter"):
        ((name, cfg),) = _stage_methods(config, stage).items()
        share[name] = 100 * _size(lm, name, cfg) / total
    assert share["prefix"] < share["lora"] < min(share[a] for a in ADAPTERS), share
    assert share["prefix"] == pytest.approx(0.15, abs=0.01)
    assert all(share[a] == pytest.approx(3.1, abs=0.05) for a in ADAPTERS), share


@pytest.mark.parametrize("first,second", [("lora", "prefix"), ("prefix", "lora"),
                                          ("s_adapter", "prefix")])  # fmt: skip
def test_chain_count_is_the_union_of_its_methods(first, second, tmp_path):
    lm = _lm(SMALL).requires_grad_(False)  # as the trainer's LR 0 for every module
    pristine = copy.deepcopy(lm)
    s1 = attach_peft(lm, {first: {"lr": 1e-3}}, None)
    n_first = _n(s1.methods[0].trainable_parameters())
    s1.save(tmp_path / PEFT_DIR)
    s2 = attach_peft(pristine, {second: {"lr": 1e-3}}, tmp_path)
    n_second = _n(s2.method(second).trainable_parameters())
    assert s2.count_trainable(pristine)[0] == n_second  # this stage trains one method
    before = s1.chain_trained([])
    assert before == [first] and s2.chain_trained(before) == sorted({first, second})
    n, pct = s2.count_chain(pristine, before)
    assert n == n_first + n_second  # the sum of its distinct methods, each once
    total = _n(pristine.parameters()) + _n(s2.method("prefix").module.parameters())
    assert pct == pytest.approx(100 * n / total)
    # the run's trainable record is that union (stage.json keys written by the trainer)
    stage = tmp_path / "stage"
    stage.mkdir()
    info = {"trainable_params": n_second, "trainable_pct": 1.0, "heldout_loss": 2.0,
            "chain_trainable_params": n, "chain_trainable_pct": pct}  # fmt: skip
    (stage / "stage.json").write_text(json.dumps(info))
    records = {r["metric"]: r["value"] for r in LoadedStage(stage, None, s2).records()}
    assert records["trainable_params"] == n and records["trainable_pct"] == pct


# ------------------------------------------------------------------------ 3. optimiser
@pytest.mark.parametrize("path", [DEFAULT, PAPER], ids=["default", "paper"])
def test_pt_peft_stages_use_the_paper_optimiser(path):
    """seed 003 App. B.4: AdamW (0.9, 0.99), linear warm-up then linear decay to 0, for every
    PEFT stage; the second stage of prefix→X at lower rates than the prefix stage."""
    stages, runs = plan(load_config(path))
    # PETAL's stages (study petal) train as seed 001 does (tests/test_petal_study.py), KLAFT's
    # as seed 000 does (tests/test_klaft_study.py)
    own = {h for run in runs.values() if run.spec.get("study") in ("petal", "klaft")
           for h in run.stages}
    peft = [s for h, s in stages.items() if s.resolved.peft and h not in own]
    assert peft
    for s in peft:
        r = s.resolved
        assert r.optimizer.betas == (0.9, 0.99), s.name
        assert r.schedule == "linear" and r.warmup_ratio > 0, s.name
    second = 0
    for run in runs.values():
        chain = [stages[h] for h in run.stages]
        if len(chain) >= 2 and chain[-2].name == "pt_prefix" and len(chain[-1].resolved.peft) > 1:
            first_lr = chain[-2].resolved.method("prefix").lr
            assert all(m.lr < first_lr for m in chain[-1].resolved.peft), run.name
            second += 1
    assert second >= 1


def test_paper_recipe_rates_are_table13s():
    config = load_config(PAPER)
    _, pt, _ = resolve_stage_settings(config, "pt_prefix")
    _, ft, _ = resolve_stage_settings(config, "ft_lora_prefix")
    assert (pt.epochs, pt.method("prefix").lr) == (10, 1e-3)
    assert (ft.epochs, ft.method("lora").lr, ft.method("prefix").lr) == (10, 1e-5, 1e-5)


# ------------------------------------------------------------------------ 4. full FT
def test_full_fine_tuning_freezes_embeddings_and_head():
    lm = _lm(SMALL).requires_grad_(False)  # as the trainer's LR 0 for every module
    session = attach_peft(lm, {"full": {"lr": 1e-4}}, None)
    emb, head = embedding_parameters(lm)
    frozen = {id(p) for p in emb + head}
    assert frozen and not any(p.requires_grad for p in emb + head)
    others = [p for p in lm.parameters() if id(p) not in frozen]
    assert others and all(p.requires_grad for p in others)  # every other LM weight
    n, _ = session.count_trainable(lm)
    assert n == _n(others) == _n(lm.parameters()) - _n(emb)  # tied: one tensor


# ------------------------------------------------------------------------ 5. seeded noise
def test_prefix_noise_variant_is_reproducible():
    lm = _lm(SMALL)
    session = attach_peft(lm, {"prefix": {"lr": 1e-3, "num_prefix": 4}}, None)

    def keys(seed: int) -> torch.Tensor:
        return session.inference("noise", seed)(2)["past_key_values"].layers[0].keys

    torch.manual_seed(123)  # the global generator plays no part
    a = keys(3)
    torch.manual_seed(456)
    assert torch.equal(a, keys(3))  # re-evaluating gives the same noise
    assert not torch.equal(a, keys(4))


def test_stage0_noise_differs_per_process():
    seed, step, micro = 5, 7, 1
    # one process: the seed the loop used before ranks were part of it
    assert noise_seed(seed, step, micro) == seed * 7_919 + step * 131 + micro
    ranks = [noise_seed(seed, step, micro, process_index=i) for i in range(4)]
    assert len(set(ranks)) == 4
    ids = torch.randint(3, 50, (4, 20), generator=torch.Generator().manual_seed(0))

    def corrupt(rank: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(noise_seed(seed, step, micro, rank))
        return corrupt_tokens(ids, None, 0.2, 50, generator=gen, protected_ids=(0, 1, 2))

    assert torch.equal(corrupt(1), corrupt(1))  # a rank is reproducible (resumable)
    assert not torch.equal(corrupt(0), corrupt(1))  # ranks draw different noise


def test_train_step_seeds_noise_with_the_process_index(monkeypatch):
    """The training loop passes accelerate's process index (a fake rank 3 here)."""
    import vlalign.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "noise_seed", lambda *a: calls.append(a) or 0)

    class Stop(Exception):
        pass

    class FakeAcc:
        process_index, num_processes, device = 3, 4, "cpu"

        def reduce(self, t, reduction):  # four ranks holding the same batch
            return t * self.num_processes

        def no_sync(self, model):
            raise Stop

        def autocast(self):
            raise Stop

    class FakeSession:
        accelerator, model, settings = FakeAcc(), None, None
        processes, seed, pad_id, peft = 4, 11, 0, None
        steps = type("S", (), {"micro": 1, "steps_per_epoch": 1, "global_batch": 4})()
        train = [{"input_ids": [1, 2], "labels": [1, 2], "attention_mask": [1, 1]}] * 4
        order_epoch, order = 0, [0, 1, 2, 3]
        # the step's micro-batches, as vlalign.train.loader.StepBatches gives them
        batches = type("B", (), {"get": lambda self, step: type(
            "SB", (), {"micro_batches": [{"labels": torch.ones(1, 2)}]})()})()

    monkeypatch.setattr(loop, "_to", lambda b, d: b)
    with pytest.raises(Stop):
        loop.train_step(FakeSession(), 0)
    assert calls == [(11, 0, 0, 3)]


# ------------------------------------------------------------------------ 6-7. tables, projector
def test_captioning_table_has_table6_metrics():
    spec = next(s for s in load_specs(REPO_ROOT / "config" / "tables") if s.name == "captioning")
    metrics = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert spec.column_order["metric"] == metrics
    assert spec.column_order["dataset"] == ["flickr8k", "flickr30k", "coco_karpathy"]
    assert all(f"'{m}'" in spec.query for m in [*metrics, "SPICE"])  # SPICE where computed
    assert [spec.label_of(m) for m in metrics[:4]] == ["B@1", "B@2", "B@3", "B@4"]
    peft = next(s for s in load_specs(REPO_ROOT / "config" / "tables") if s.name == "peft_methods")
    assert "word embeddings and LM head" in (peft.caption or "")


def test_projector_hidden_width_is_a_config_key():
    model = load_config(PAPER)["model"]
    proj = build_projector(model["projector"], 1152, 896, **model["projector_kwargs"])
    assert _n(proj.parameters()) == 1_836_800  # what the recipe's comment states
    wide = build_projector("mlp2x_gelu", 1152, 896, hidden=8784)
    assert _n(wide.parameters()) == pytest.approx(18e6, rel=0.01)  # seed 002's 18 M
    with pytest.raises(ConfigError, match="hidden"):
        load_config(PAPER, {"model": {"projector_kwargs": {"hidden": 0}}})


def test_paper_recipe_has_table6_full_shot_pathvqa_and_single_ablation_baselines():
    config = load_config(PAPER)
    stages, runs = plan(config)

    def chain(run: str) -> list[tuple[str, str]]:
        return [(stages[h].name, stages[h].settings["mask"]) for h in runs[run].stages]

    align4 = chain("align4_s0")
    assert [n for n, _ in align4] == ["stage0", "stage1", "stage2", "stage3"]
    # mask_only differs from align4 in the mask of stages 1-3 alone
    mask_only = chain("mask_only_s0")
    assert [n for n, _ in mask_only] == [n for n, _ in align4]
    assert mask_only[0] == align4[0] and {m for _, m in mask_only[1:]} == {"causal"}
    assert {m for _, m in align4[1:]} == {"prefix"}
    # no_stage0 is align4 without its first stage, the same stages otherwise
    assert runs["no_stage0_s0"].stages[0] != runs["align4_s0"].stages[1]  # no stage0 parent
    assert chain("no_stage0_s0") == align4[1:]
    # full-shot COCO and PathVQA continue the aligned model
    assert runs["coco_full_shot_s0"].stages[:-1] == runs["align4_s0"].stages
    full_shot = stages[runs["coco_full_shot_s0"].stages[-1]].settings
    assert full_shot["dataset"] == "coco_karpathy"
    # trained and evaluated with the short-caption prompt (the last stage's format)
    short = "Provide a one-sentence caption for the provided image."
    assert full_shot["prompts"] == {"caption": {"task": short}}
    assert TextFormat.from_settings(full_shot) != PLAIN
    assert runs["pathvqa_s0"].stages[:-1] == runs["align4_s0"].stages
    assert runs["pathvqa_s0"].eval_datasets == ["pathvqa"]
    assert stages[runs["pathvqa_s0"].stages[-1]].settings["text"] == "qa"


ABLATIONS = REPO_ROOT / "config" / "recipes" / "pt_peft_ablations.yaml"


@pytest.mark.parametrize("base, overlay", [(DEFAULT, ABLATIONS), (PAPER, None)])
def test_table_5_6_9_10_runs_plan(base, overlay):
    """Seed 003 Tables 6, 9 and 10 as runs (the default's overlay, the paper recipe): the
    alternation trains one method per step; the epoch splits add up to the same total; the
    encoder ablations change the prefix of both stages and nothing else."""
    config = load_config(base, load_yaml(overlay) if overlay else None)
    stages, runs = plan(config)
    alt = runs["alternation_4_s0"]
    trained = [[m for m in stages[h].resolved.peft if m.lr > 0] for h in alt.stages[-4:]]
    assert [[m.name for m in ms] for ms in trained] == [["prefix"], ["lora"], ["prefix"],
                                                        ["lora"]]
    splits = {r: [stages[h].resolved.epochs for h in runs[r].stages[-2:]]
              for r in runs if r.startswith("epochs_")}
    assert len(splits) == 3 and len({sum(e) for e in splits.values()}) == 1
    assert len({tuple(e) for e in splits.values()}) == 3
    for run, key, value in (("prefix_no_type_embedding_s0", "use_type_embedding", False),
                            ("prefix_no_mlp_s0", "use_mlp", False)):
        for h in runs[run].stages[-2:]:
            prefix = next(m for m in stages[h].resolved.peft if m.name == "prefix")
            assert prefix.config[key] is value
    # Table 5: the parallel run is evaluated with its prefix removed and replaced by noise
    if overlay is None:
        assert {"removed", "noise"} <= set(runs["parallel_lora_s0"].spec["eval"][
            "prefix_variants"])
