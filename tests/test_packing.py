"""Padding-free packing (``train.packing``, vlalign.models.packing): the layout, the per-segment
mask, and a packed forward's loss and gradients against the padded forward's under every mask
and attention implementation; refused with a K/V prefix (at plan time and in the forward)."""

from __future__ import annotations

import pytest
import torch
from helpers import lm_config, stage_settings, vision_config
from transformers import DynamicCache, Qwen2ForCausalLM, SiglipVisionModel

from vlalign.config import ConfigError
from vlalign.models.masks import MASK_MODES, build_packed_attention_mask, reference_mask
from vlalign.models.packing import first_fit, pack, pack_layout, unpack
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel
from vlalign.runs.settings import NON_SEMANTIC_KEYS, StageSettings

N_IMG = 16
LENGTHS = [3, 11, 7, 1, 5, 11]  # text lengths of the micro-batch's samples (padded to 11)


def make_vlm(impl: str, mode: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = SiglipVisionModel(vision_config())
    lm = Qwen2ForCausalLM(lm_config())
    vlm = VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), lm, mask_mode=mode)
    vlm.set_attn_implementation(impl)
    return vlm.train()


def batch(lengths=LENGTHS):
    g = torch.Generator().manual_seed(3)
    width = max(lengths)
    ids = torch.randint(4, 64, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # an unsupervised token as the text formats have
    pixels = torch.randn(len(lengths), 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def test_first_fit_fills_rows_and_keeps_every_sample():
    bins = first_fit([27, 20, 23, 17, 21, 27], 27)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([27, 20, 23, 17, 21, 27][i] for i in b) <= 27 for b in bins)
    with pytest.raises(ValueError, match="exceeds"):
        first_fit([5, 30], 27)


def test_layout_round_trip():
    b = batch()
    full = torch.cat([torch.ones(len(LENGTHS), N_IMG, dtype=torch.long), b["attention_mask"]], 1)
    assert pack_layout(full, N_IMG).shape[0] == len(LENGTHS)  # rows of width N + 11: one each
    layout = pack_layout(full, N_IMG, 2 * full.shape[1])
    rows, cap = layout.shape
    assert rows < len(LENGTHS) and cap <= 2 * full.shape[1]
    x = torch.randn(*full.shape, 5)
    back = unpack(pack(x, layout), layout, *full.shape)
    real = full.bool()
    torch.testing.assert_close(back[real], x[real], rtol=0, atol=0)
    # positions restart per segment; the image block is the first N of each segment
    for r in range(rows):
        for s in layout.segment[r].unique().tolist():
            if s < 0:
                continue
            at = layout.segment[r] == s
            n = N_IMG + LENGTHS[s]
            assert layout.position_ids[r][at].tolist() == list(range(n))
            assert layout.is_image[r][at].tolist() == [True] * N_IMG + [False] * LENGTHS[s]
    real_tokens = int(full.sum())
    assert layout.padding_fraction() == pytest.approx(1 - real_tokens / (rows * cap))


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_mask_is_the_segment_mask(mode, impl):
    b = batch()
    full = torch.cat([torch.ones(len(LENGTHS), N_IMG, dtype=torch.long), b["attention_mask"]], 1)
    layout = pack_layout(full, N_IMG, 2 * full.shape[1])
    assert layout.shape[0] < len(LENGTHS)
    cfg = lm_config()
    cfg._attn_implementation = impl
    embeds = torch.zeros(*layout.shape, 64)
    mask = build_packed_attention_mask(
        cfg, embeds, layout.segment, layout.is_image, layout.position_ids, mode
    )
    allowed = mask[:, 0] == 0 if mask.dtype != torch.bool else mask[:, 0]
    # expected: per segment, the padded reference mask of that sample; nothing across
    for r in range(layout.shape[0]):
        seg = layout.segment[r]
        for s in seg.unique().tolist():
            if s < 0:
                continue
            at = (seg == s).nonzero().flatten()
            n = len(at)
            ref = reference_mask(torch.ones(1, n), layout.is_image[r, at][None], mode)[0, 0]
            got = allowed[r][at[:, None], at[None, :]]
            assert torch.equal(got, ref), (r, s)
            others = (seg != s).nonzero().flatten()
            assert not allowed[r][at[:, None], others[None, :]].any(), "attends across segments"


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_padded(mode, impl):
    vlm = make_vlm(impl, mode)
    b = batch()
    full = torch.cat([torch.ones(len(LENGTHS), N_IMG, dtype=torch.long), b["attention_mask"]], 1)
    assert pack_layout(full, N_IMG, N_IMG + 24).shape[0] < len(LENGTHS)  # rows do get packed
    results = {}
    for packing in (False, True):
        vlm.zero_grad(set_to_none=True)
        # rows of N + 24 positions: several samples per row
        out = vlm(**b, packing=24 if packing else False, output_hidden_states=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
        results[packing] = (out, grads)
    (a, ga), (p, gp) = results[False], results[True]
    torch.testing.assert_close(p.loss, a.loss, atol=1e-5, rtol=1e-5)
    text = b["attention_mask"].bool()
    torch.testing.assert_close(p.label_logits[text], a.label_logits[text], atol=1e-4, rtol=1e-4)
    real = a.attention_mask.bool()
    torch.testing.assert_close(p.hidden_states[real], a.hidden_states[real], atol=1e-4, rtol=1e-4)
    assert set(ga) == set(gp) and ga
    for name in ga:
        torch.testing.assert_close(gp[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_noise_is_drawn_on_the_padded_layout():
    vlm = make_vlm("sdpa", "prefix")
    b = batch()
    losses = []
    for packing in (False, True):
        g = torch.Generator().manual_seed(7)
        out = vlm(**b, packing=24 if packing else False, noise_fraction=0.3, generator=g)
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_packing_with_a_kv_prefix_is_refused():
    vlm = make_vlm("sdpa", "prefix")
    b = batch()
    k = torch.zeros(len(LENGTHS), 2, 3, 16)
    cache = DynamicCache([(k.clone(), k.clone()) for _ in range(2)])
    with pytest.raises(ValueError, match="K/V prefix"):
        vlm(**b, packing=True, past_key_values=cache)


def test_packing_is_not_semantic_and_refused_with_prefix_at_plan_time():
    assert {"packing", "num_workers"} <= set(NON_SEMANTIC_KEYS)
    a = StageSettings.from_dict(stage_settings(packing=True))
    b = StageSettings.from_dict(stage_settings(packing=False))
    assert a.semantic() == b.semantic()
    settings = stage_settings(packing=True, peft={"prefix": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match="K/V prefix"):
        StageSettings.from_dict(settings, "stages.pt_prefix")
    StageSettings.from_dict({**settings, "packing": False})  # fine without packing


def test_plan_refuses_packing_after_a_prefix_stage():
    from vlalign.config import REPO_ROOT, deep_merge, load_config
    from vlalign.runs.plan import plan

    config = load_config(REPO_ROOT / "config" / "config.yaml")
    prefix_stage = next(
        (n for n, s in config["stages"].items() if s.get("peft") and "prefix" in s["peft"]), None
    )
    if prefix_stage is None:
        pytest.skip("the default config has no prefix stage")
    child = {**config["stages"]["stage3"], "packing": True}
    config = deep_merge(config, {"stages": {"packed_child": child}})
    config["runs"] = {"r": {"chain": [prefix_stage, "packed_child"], "seeds": [0]}}
    config["grids"] = {}
    with pytest.raises(ConfigError, match=r"runs\.r\.packed_child.*K/V prefix"):
        plan(config)
