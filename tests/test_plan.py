"""The stage DAG (``vlalign.runs.plan``): content hashes, shared prefixes, ``after:``, grids,
stage seeds and frozen-feature keys, on the real default config with small overrides."""

from __future__ import annotations

from typing import Any

import pytest

import vlalign.runs.plan as plan_module
import vlalign.runs.settings as settings_module
from vlalign.config import REPO_ROOT, ConfigError, load_config
from vlalign.runs.plan import StageNode, plan, resolve_stage_settings
from vlalign.runs.settings import TRAIN_DEFAULTS, StageSettings

CONFIG = REPO_ROOT / "config" / "config.yaml"


def _plan(overrides: dict[str, Any] | None = None) -> tuple[dict[str, StageNode], dict]:
    return plan(load_config(CONFIG, overrides))


def _hashes(runs: dict, instance: str) -> list[str]:
    return list(runs[instance].stages)


def test_shared_prefix_is_one_node_and_diverges_after():
    stages, runs = _plan(
        {
            "runs": {
                "a": {"chain": ["stage0", "stage1", "stage2"]},
                "b": {"chain": ["stage0", "stage1", {"stage": "stage2", "epochs": 1}]},
            }
        }
    )
    a, b = _hashes(runs, "a_s0"), _hashes(runs, "b_s0")
    assert a[:2] == b[:2]
    assert a[2] != b[2]
    # the shared stages are the same nodes as those of the config's own 4-stage run
    assert _hashes(runs, "align4_s0")[:3] == a
    assert [stages[h].name for h in a] == ["stage0", "stage1", "stage2"]
    assert stages[a[0]].parent is None
    assert stages[a[1]].parent == a[0] and stages[a[2]].parent == a[1]
    assert stages[b[2]].settings["epochs"] == 1 and stages[a[2]].settings["epochs"] == 2
    assert stages[a[2]].chain == ["stage0", "stage1", "stage2"]
    # one node per distinct hash: nothing is planned twice
    assert len(stages) == len({h for r in runs.values() for h in r.stages})


def test_changed_setting_changes_its_hash_and_descendants_only():
    stages, runs = _plan()
    base = _hashes(runs, "align4_s0")
    base_prefix = _hashes(runs, "prefix_s0")
    new_stages, new_runs = _plan({"stages": {"stage2": {"lr": {"lm": 1.0e-4}}}})
    new = _hashes(new_runs, "align4_s0")
    assert new[:2] == base[:2]  # ancestors untouched
    assert new[2] != base[2] and new[3] != base[3]  # the stage and its child
    assert new_stages[new[2]].settings["lr"] == {"vision": 5.0e-5, "projector": 1.0e-3, "lm": 1e-4}
    # descendants through `after:` change too
    assert _hashes(new_runs, "prefix_s0")[-1] != base_prefix[-1]
    # a run that never reaches stage2 keeps every hash
    assert _hashes(new_runs, "recap_s0") == _hashes(runs, "recap_s0")


def test_train_defaults_and_data_are_part_of_the_hash():
    _, runs = _plan()
    _, longer = _plan({"train": {"max_length": 64}})
    assert not set(_hashes(runs, "align4_s0")) & set(_hashes(longer, "align4_s0"))
    _, more_data = _plan({"datasets": {"world": {"splits_sizes": {"train": 256}}}})
    assert _hashes(more_data, "align4_s0")[0] != _hashes(runs, "align4_s0")[0]


def test_checkpoint_every_is_not_part_of_the_hash():
    stages, runs = _plan()
    new_stages, new_runs = _plan(
        {"train": {"checkpoint_every": 3}, "stages": {"stage1": {"checkpoint_every": 7}}}
    )
    assert _hashes(new_runs, "align4_s0") == _hashes(runs, "align4_s0")
    h0, h1 = _hashes(new_runs, "align4_s0")[:2]
    # ... but the job still gets it
    assert new_stages[h0].settings["checkpoint_every"] == 3
    assert new_stages[h1].settings["checkpoint_every"] == 7
    assert stages[h1].settings["checkpoint_every"] == 25


def test_seeds_give_distinct_stages_unless_pinned():
    stages, runs = _plan(
        {
            "runs": {
                "two": {"chain": ["stage0", "stage1"], "seeds": [0, 1]},
                "pinned": {"chain": [{"stage": "stage0", "seed": 5}, "stage1"], "seeds": [0, 1]},
            }
        }
    )
    s0, s1 = _hashes(runs, "two_s0"), _hashes(runs, "two_s1")
    assert not set(s0) & set(s1)
    assert [stages[h].seed for h in s0] == [0, 0] and [stages[h].seed for h in s1] == [1, 1]
    p0, p1 = _hashes(runs, "pinned_s0"), _hashes(runs, "pinned_s1")
    assert p0[0] == p1[0] and stages[p0[0]].seed == 5
    assert "seed" not in stages[p0[0]].settings  # the seed is the node's, not a train setting
    assert p0[1] != p1[1]
    assert (stages[p0[1]].seed, stages[p1[1]].seed) == (0, 1)
    assert p0[0] not in (s0[0], s1[0])


def test_stage_level_seed_pin_in_stages_section():
    stages, runs = _plan(
        {
            "stages": {"stage0": {"seed": 9}},
            "runs": {"two": {"chain": ["stage0", "stage1"], "seeds": [0, 1]}},
        }
    )
    a, b = _hashes(runs, "two_s0"), _hashes(runs, "two_s1")
    assert a[0] == b[0] and stages[a[0]].seed == 9
    assert a[1] != b[1]


def test_after_expands_the_base_chain_with_its_first_seed():
    stages, runs = _plan(
        {
            "runs": {
                "base": {"chain": ["stage0", "stage1"], "seeds": [3, 4]},
                "child": {"after": "base", "chain": ["pt_prefix"], "seeds": [0, 1]},
                "grandchild": {"after": "child", "chain": ["ft_lora_prefix"], "seeds": [7]},
            }
        }
    )
    base3 = _hashes(runs, "base_s3")
    c0, c1 = _hashes(runs, "child_s0"), _hashes(runs, "child_s1")
    assert c0[:2] == c1[:2] == base3  # every child seed starts from base seed 3, trained once
    assert c0[2] != c1[2]
    assert [stages[h].seed for h in c0] == [3, 3, 0]
    assert stages[c0[2]].parent == base3[-1]
    g = _hashes(runs, "grandchild_s7")
    # the child's stages pin the child's first seed (0), the base's keep seed 3
    assert g[:3] == c0 and stages[g[3]].seed == 7
    # the default config's PEFT grid: every seed of a cell after align4 shares align4_s0
    assert _hashes(runs, "lora_s0")[:4] == _hashes(runs, "lora_s1")[:4]
    assert _hashes(runs, "lora_s0")[:4] == _hashes(runs, "align4_s0")


@pytest.mark.parametrize(
    ("runs", "needle"),
    [
        ({"x": {"after": "nosuchrun", "chain": ["stage0"]}}, "nosuchrun"),
        (
            {"x": {"after": "y", "chain": ["stage0"]}, "y": {"after": "x", "chain": ["stage1"]}},
            "cycle",
        ),
    ],
)
def test_bad_after(runs, needle):
    with pytest.raises(ConfigError, match=needle):
        _plan({"runs": runs})


def test_grid_cartesian_product_names_and_settings():
    stages, runs = _plan(
        {
            "grids": {
                "g": {
                    "chain": ["stage0", "stage1"],
                    "axes": {"*.epochs": [1, 2], "stage1.lr.projector": [0.001, 0.002]},
                    "seeds": [0],
                }
            }
        }
    )
    names = {r.base for r in runs.values() if r.base.startswith("g-")}
    assert names == {f"g-epochs{e}-projector{p}" for e in (1, 2) for p in (0.001, 0.002)}
    for e in (1, 2):
        for p in (0.001, 0.002):
            h0, h1 = _hashes(runs, f"g-epochs{e}-projector{p}_s0")
            # `*.` reaches every stage; `stage1.` only stage1
            assert stages[h0].settings["epochs"] == e and stages[h1].settings["epochs"] == e
            assert stages[h0].settings["lr"]["projector"] == 1.0e-3
            assert stages[h1].settings["lr"]["projector"] == p
    # cells differing only in stage1's axis share their stage0
    a = _hashes(runs, "g-epochs1-projector0.001_s0")
    b = _hashes(runs, "g-epochs1-projector0.002_s0")
    c = _hashes(runs, "g-epochs2-projector0.001_s0")
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0]
    # the config's own grid (after: align4) exists with its two cells
    assert {"prefix_len-num_prefix4_s0", "prefix_len-num_prefix16_s0"} <= set(runs)
    p4 = _hashes(runs, "prefix_len-num_prefix4_s0")
    assert p4[:4] == _hashes(runs, "align4_s0")
    assert stages[p4[4]].settings["peft"]["prefix"]["num_prefix"] == 4


@pytest.mark.parametrize("axis", ["stage3.epochs", "epochs", "nosuchstage.lr.lm", "stage0."])
def test_grid_bad_axis(axis):
    grid = {"g": {"chain": ["stage0", "stage1"], "axes": {axis: [1, 2]}}}
    with pytest.raises(ConfigError, match="grids.g.axes"):
        _plan({"grids": grid})


def test_grid_cell_name_clash_with_a_run():
    with pytest.raises(ConfigError, match="already exists"):
        _plan(
            {
                "runs": {"g-epochs1": {"chain": ["stage0"]}},
                "grids": {"g": {"chain": ["stage0"], "axes": {"*.epochs": [1]}}},
            }
        )


def test_feature_keys():
    stages, runs = _plan(
        {
            "runs": {
                # a frozen-encoder first stage on the other dataset
                "tgt": {"chain": [{"stage": "stage1", "dataset": "world_target"}]},
                # a frozen stage after one that trained the encoder
                "back": {"chain": ["stage0", "stage2", "stage1"]},
            }
        }
    )
    a = [stages[h] for h in _hashes(runs, "align4_s0")]
    assert a[0].feature_key is not None
    assert a[0].feature_key == a[1].feature_key  # same frozen encoder, same dataset
    assert a[2].feature_key is None and a[3].feature_key is None  # lr.vision > 0
    human = [stages[h] for h in _hashes(runs, "human_s0")]
    assert human[0].hash != a[0].hash and human[0].feature_key == a[0].feature_key
    tgt = stages[_hashes(runs, "tgt_s0")[0]]
    assert tgt.feature_key is not None and tgt.feature_key != a[0].feature_key
    back = [stages[h] for h in _hashes(runs, "back_s0")]
    assert back[0].feature_key == a[0].feature_key
    assert back[1].feature_key is None
    assert back[2].settings["lr"]["vision"] == 0 and back[2].feature_key is None
    # PEFT stages after align4 froze the encoder, but the encoder was trained in stage2
    assert stages[_hashes(runs, "prefix_s0")[-1]].feature_key is None
    # a different encoder gives a different cache
    s2, r2 = _plan({"vision": {"config": {"hidden_size": 64}}})
    assert s2[_hashes(r2, "align4_s0")[0]].feature_key != a[0].feature_key


def test_backbone_pretraining_data_is_part_of_first_stage_identity():
    over = {"runs": {"tgt": {"chain": [{"stage": "stage1", "dataset": "world_target"}]}}}
    s1, r1 = _plan(over)
    # the data the default vision encoder (and LM) are pre-trained on, not world_target
    pre = load_config(REPO_ROOT / "config" / "config.yaml")["vision"]["pretrain"]["datasets"][0]
    s2, r2 = _plan({**over, "datasets": {pre: {"splits_sizes": {"train": 300}}}})
    n1, n2 = s1[_hashes(r1, "tgt_s0")[0]], s2[_hashes(r2, "tgt_s0")[0]]
    assert n1.hash != n2.hash
    assert n1.feature_key != n2.feature_key


def test_unknown_stage_is_named():
    with pytest.raises(ConfigError, match="nosuchstage"):
        _plan({"runs": {"x": {"chain": ["stage0", "nosuchstage"]}}})


def test_unknown_dataset_is_named():
    over = {
        "stages": {"odd": {"dataset": "nosuchdata", "text": "recaption", "lr": {"projector": 1}}},
        "runs": {"x": {"chain": ["odd"]}},
    }
    with pytest.raises(ConfigError, match=r"stages\.odd\.dataset.*nosuchdata"):
        _plan(over)
    with pytest.raises(ConfigError, match="nosuchdata"):
        _plan({"runs": {"x": {"chain": [{"stage": "stage0", "dataset": "nosuchdata"}]}}})
    with pytest.raises(ConfigError, match="eval_datasets.*nosuchdata"):
        _plan({"runs": {"x": {"chain": ["stage0"], "eval_datasets": ["nosuchdata"]}}})


# ------------------------------------------------------------------------------ resolved settings
def test_every_stage_is_resolved_once_into_typed_settings():
    stages, runs = _plan()
    names = set(StageSettings.setting_names())
    assert names == set(TRAIN_DEFAULTS) | {"dataset", "text", "lr"}
    for node in stages.values():
        assert isinstance(node.resolved, StageSettings)
        assert set(node.settings) == names  # every setting has a value: no consumer defaults
        assert set(node.settings["lr"]) == {"vision", "projector", "lm"}
        assert node.settings == node.resolved.to_dict()
        assert node.settings["checkpoint_every"] == node.resolved.checkpoint_every
    s1 = stages[_hashes(runs, "align4_s0")[1]].resolved
    assert s1.optimizer.eps == TRAIN_DEFAULTS["optimizer"]["eps"]  # not in config.yaml's train:
    assert s1.optimizer.weight_decay == 0.01
    assert s1.epochs == load_config(CONFIG)["stages"]["stage1"]["epochs"]  # the stage's own key
    # the same config plans the same hashes
    again, _ = _plan()
    assert list(again) == list(stages)


def test_train_defaults_have_one_home():
    # plan re-exports the settings module's table: there is no second copy
    assert plan_module.TRAIN_DEFAULTS is settings_module.TRAIN_DEFAULTS
    cfg = load_config(CONFIG)
    cfg["train"] = {}
    name, settings, seed = resolve_stage_settings(cfg, "stage1")
    assert (name, seed) == ("stage1", None)
    for key in ("checkpoint_every", "warmup_ratio", "min_lr", "max_length", "batch_size"):
        assert getattr(settings, key) == TRAIN_DEFAULTS[key], key
    # an absent module LR is 0 (frozen), filled in once here
    over = {"stages": {"odd": {"dataset": "world", "text": "recaption", "lr": {"projector": 1}}}}
    _, s = resolve_stage_settings(load_config(CONFIG, over), "odd")[:2]
    assert dict(s.lr) == {"vision": 0, "projector": 1, "lm": 0}


def test_peft_blocks_are_resolved_by_the_method_registry():
    from vlalign.methods.registry import get_method

    stages, runs = _plan()
    node = stages[_hashes(runs, "parallel_lora_s0")[-1]]
    assert [m.name for m in node.resolved.peft] == ["lora", "prefix"]  # the block's order
    lora = node.resolved.method("lora")
    assert lora.lr == 2.0e-3
    given = {"r": 16, "alpha": 32, "dropout": 0.05}
    assert dict(lora.config) == get_method("lora").resolve_config(given)
    assert node.settings["peft"]["lora"] == {"lr": 2.0e-3, **lora.config}
    assert stages[_hashes(runs, "align4_s0")[0]].settings["peft"] is None


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        # LoRA's rank is `r`: the registry refuses `rank`
        (
            {"stages": {"ft_lora": {"peft": {"lora": {"rank": 16}}}}},
            ["stages.ft_lora.peft.lora", "'rank'", "'r'"],
        ),
        (
            {"stages": {"ft_lora": {"peft": {"nosuchmethod": {"lr": 1.0}}}}},
            ["stages.ft_lora.peft.nosuchmethod", "unknown PEFT method"],
        ),
        (
            {"stages": {"ft_lora": {"peft": {"lora": {"lr": -1}}}}},
            ["stages.ft_lora.peft.lora.lr", "-1"],
        ),
        # a run's chain override is checked like a stages: entry
        (
            {"runs": {"x": {"chain": [{"stage": "stage1", "epocs": 2}]}}},
            ["runs.x", "stages.stage1", "'epocs'"],
        ),
        (
            {"runs": {"x": {"chain": [{"stage": "stage1", "warmup_ratio": 2}]}}},
            ["runs.x", "stages.stage1.warmup_ratio", "2"],
        ),
        (
            {"runs": {"x": {"chain": [{"stage": "stage1", "lr": {"lm": "fast"}}]}}},
            ["stages.stage1.lr.lm", "'fast'"],
        ),
    ],
)
def test_bad_stage_settings_fail_at_plan_time_naming_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        _plan(overrides)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))


def test_peft_method_without_lr_fails_at_plan_time():
    over = {
        "stages": {
            "no_lr": {
                "dataset": "world_target",
                "text": "captions",
                "lr": {"vision": 0, "projector": 0, "lm": 0},
                "peft": {"prefix": {"num_prefix": 8}},
            }
        },
        "runs": {"x": {"after": "align4", "chain": ["no_lr"]}},
    }
    with pytest.raises(ConfigError, match=r"runs\.x: stages\.no_lr\.peft\.prefix: needs an 'lr'"):
        _plan(over)


def test_job_settings_round_trip_and_are_checked_again():
    stages, _ = _plan()
    for node in stages.values():
        assert StageSettings.from_dict(node.settings) == node.resolved
    plain = next(iter(stages.values())).settings
    with pytest.raises(ConfigError, match=r"stage x: missing setting\(s\) \['checkpoint_every'\]"):
        StageSettings.from_dict(
            {k: v for k, v in plain.items() if k != "checkpoint_every"}, "stage x"
        )
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['seed'\]"):
        StageSettings.from_dict({**plain, "seed": 3})


def test_a_null_method_block_removes_the_method():
    # an ablation's chain override drops one method of a stage that has several
    stage = {"dataset": "world", "text": "captions", "lr": {},
             "peft": {"lora": {"lr": 1e-3}, "prefix": {"lr": 1e-3}}}
    settings, _ = settings_module.resolve({}, stage, {"peft": {"prefix": None}})
    assert [m.name for m in settings.peft] == ["lora"]
    assert settings.to_dict()["peft"] == {"lora": settings.method("lora").to_dict()}
    with pytest.raises(ConfigError, match=r"s\.peft\.lora\.lr: must be a number >= 0"):
        settings_module.resolve({}, stage, {"peft": {"lora": {"lr": None}}}, where="s")


def test_a_runs_model_block_builds_its_own_first_stage_and_everything_after():
    """``runs.<name>.model`` (e.g. the MaL variant): merged onto ``model:`` for that run's stages;
    a first stage's hash holds it, so no stage is shared with a run of another projector, and a
    run continuing it (``after:``) builds as it does."""
    stages, runs = _plan()
    new_stages, new_runs = _plan({"runs": {
        "mal": {"chain": ["stage0", "stage1"], "model": {"projector": "transformer"}},
        "mal_then": {"after": "mal", "chain": ["stage2"]},
        "plain": {"chain": ["stage0", "stage1"]}}})
    default = stages[_hashes(runs, "recap_s0")[0]].model
    assert default["projector"] == "linear"
    mal, then = _hashes(new_runs, "mal_s0"), _hashes(new_runs, "mal_then_s0")
    assert not set(mal) & set(_hashes(new_runs, "plain_s0"))
    assert then[:2] == mal  # after: shares its base's stages, so it inherits the base's model
    for h in then:
        assert new_stages[h].model == {**default, "projector": "transformer"}
    # a run without a model block keeps the hashes it had: the default is no override
    assert _hashes(new_runs, "plain_s0") == _hashes(runs, "recap_s0")[:2] == \
        _hashes(new_runs, "recap_s0")[:2]
    assert all(new_stages[h].model == default for h in _hashes(new_runs, "plain_s0"))


def test_a_bad_model_block_is_named():
    where = r"\['runs'\]\['mal'\]\['model'\]"
    with pytest.raises(ConfigError, match=rf"(?s)'projektor' was unexpected.*{where}"):
        _plan({"runs": {"mal": {"chain": ["stage0"], "model": {"projektor": "mlp2x_gelu"}}}})
