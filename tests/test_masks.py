"""Stage attention masks (seed 002 §3.2): mask contents, perturbation behaviour, padding,
eager == sdpa, KV prefix. Real tiny SigLIP / Qwen2 models built from configs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import N_IMG, lm_config, vision_config
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionModel
from transformers.cache_utils import DynamicCache

from vlalign.models.masks import MASK_MODES, build_attention_mask, reference_mask
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

torch.set_num_threads(1)

VISION_CFG = vision_config()
LM_CFG = lm_config()
P = 3


def make_vlm(impl: str = "sdpa", seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(copy.deepcopy(VISION_CFG))  # deep copies: configs are not copied
    lm = Qwen2ForCausalLM(copy.deepcopy(LM_CFG))
    vlm = VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), lm)
    vlm.set_attn_implementation(impl)
    return vlm.eval()


def prefix_cache_fn(seed: int = 1):
    """A fixed random per-layer K/V prefix (what a prefix-tuning module will return)."""
    g = torch.Generator().manual_seed(seed)
    head_dim = LM_CFG.hidden_size // LM_CFG.num_attention_heads
    kv = [
        (torch.randn(1, 2, P, head_dim, generator=g), torch.randn(1, 2, P, head_dim, generator=g))
        for _ in range(LM_CFG.num_hidden_layers)
    ]

    def fn(batch: int) -> DynamicCache:
        return DynamicCache(
            [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
        )

    return fn


@pytest.fixture(scope="module")
def models():
    return {impl: make_vlm(impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, N_IMG, 64, generator=g)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # row 1 is right-padded
    ids[1, 4:] = 0
    return feats, ids, mask


def lm_config(impl: str) -> Qwen2Config:
    cfg = copy.deepcopy(LM_CFG)
    cfg._attn_implementation = impl
    return cfg


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """bool 'may attend' view of a materialised mask (bool on sdpa, additive float on eager)."""
    return mask if mask.dtype == torch.bool else mask == 0


# ------------------------------------------------------------------ mask contents
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("prefix", [0, P])
def test_mask_matches_spec_table(impl, mode, prefix):
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    is_img = torch.zeros_like(am, dtype=torch.bool)
    is_img[:, :3] = True
    x = torch.zeros(2, 8, 64)
    cache = prefix_cache_fn()(2) if prefix else None
    mask = build_attention_mask(lm_config(impl), x, am, is_img, mode, cache, materialize=True)
    assert mask.shape == (2, 1, 8, prefix + 8)
    assert mask.dtype == (torch.bool if impl == "sdpa" else torch.float32)  # never bool on eager
    ref = reference_mask(am, is_img, mode, prefix)
    assert torch.equal(allowed(mask), ref)
    if prefix:  # the P prefix columns are visible to every query
        assert allowed(mask)[..., :prefix].all()


def test_causal_fast_path_is_2d_with_prefix_columns():
    am = torch.tensor([[1, 1, 1, 0]])
    cache = prefix_cache_fn()(1)
    out = build_attention_mask(
        lm_config("sdpa"),
        torch.zeros(1, 4, 64),
        am,
        torch.tensor([[True, False, False, False]]),
        "causal",
        cache,
    )
    assert out.tolist() == [[1] * P + [1, 1, 1, 0]]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_without_padding_is_not_none(impl):
    # create_*_mask returns None on sdpa when nothing is masked, and None means *causal* there
    am = torch.ones(2, 5, dtype=torch.long)
    mask = build_attention_mask(
        lm_config(impl),
        torch.zeros(2, 5, 64),
        am,
        torch.zeros(2, 5, dtype=torch.bool),
        "bidirectional",
    )
    assert mask is not None and allowed(mask).all()


def test_bad_mode_and_shapes():
    am = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown mask mode"):
        build_attention_mask(LM_CFG, torch.zeros(1, 4, 64), am, am.bool(), "full")
    with pytest.raises(ValueError, match="must both be"):
        build_attention_mask(LM_CFG, torch.zeros(1, 4, 64), am, am[:, :3].bool(), "prefix")


# ------------------------------------------------------------------ behaviour in the model
def hidden(vlm, feats, ids, mask, mode, cache_fn=None):
    with torch.no_grad():
        out = vlm(
            ids,
            mask,
            image_features=feats,
            mask_mode=mode,
            output_hidden_states=True,
            past_key_values=cache_fn(ids.shape[0]) if cache_fn else None,
        )
    return out.hidden_states, out.logits


@pytest.mark.parametrize("cache_fn", [None, prefix_cache_fn()], ids=["no_prefix", "kv_prefix"])
def test_text_perturbation(models, batch, cache_fn):
    vlm = models["sdpa"]
    feats, ids, mask = batch
    ids2 = ids.clone()
    ids2[:, 2] = (ids2[:, 2] + 5) % 64  # change text token 2
    for mode, image_changes in (("causal", False), ("prefix", False), ("bidirectional", True)):
        h1, _ = hidden(vlm, feats, ids, mask, mode, cache_fn)
        h2, _ = hidden(vlm, feats, ids2, mask, mode, cache_fn)
        d_img = (h1[:, :N_IMG] - h2[:, :N_IMG]).abs().max().item()
        d_before = (h1[:, N_IMG : N_IMG + 2] - h2[:, N_IMG : N_IMG + 2]).abs().max().item()
        d_after = (h1[:, N_IMG + 2 :] - h2[:, N_IMG + 2 :]).abs().max().item()
        assert d_after > 1e-3, mode  # the change is visible downstream
        if image_changes:
            assert d_img > 1e-4 and d_before > 1e-4, mode  # all-to-all
        else:
            assert d_img == 0.0 and d_before == 0.0, mode  # image never sees text; text causal


def test_image_token_perturbation(models, batch):
    vlm = models["sdpa"]
    feats, ids, mask = batch
    j = 9
    feats2 = feats.clone()
    feats2[:, j] += 1.0  # changes projected image token j only
    diffs = {}
    for mode in MASK_MODES:
        h1, _ = hidden(vlm, feats, ids, mask, mode)
        h2, _ = hidden(vlm, feats2, ids, mask, mode)
        diffs[mode] = {
            "earlier_img": (h1[:, :j] - h2[:, :j]).abs().max().item(),
            "text": (h1[:, N_IMG:] - h2[:, N_IMG:]).abs().max().item(),
        }
    assert diffs["causal"]["earlier_img"] == 0.0  # image i < j ignores later image token j
    assert diffs["prefix"]["earlier_img"] > 1e-4  # image block is bidirectional
    assert diffs["bidirectional"]["earlier_img"] > 1e-4
    for mode in MASK_MODES:
        assert diffs[mode]["text"] > 1e-4, mode  # text sees the image in every mode


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("cache_fn", [None, prefix_cache_fn()], ids=["no_prefix", "kv_prefix"])
def test_padded_row_equals_unpadded_run(models, batch, impl, mode, cache_fn):
    vlm = models[impl]
    feats, ids, mask = batch
    n = int(mask[1].sum())
    h_b, l_b = hidden(vlm, feats, ids, mask, mode, cache_fn)
    h_1, l_1 = hidden(vlm, feats[1:], ids[1:, :n], mask[1:, :n], mode, cache_fn)
    torch.testing.assert_close(h_b[1:, : N_IMG + n], h_1, atol=1e-5, rtol=0)
    torch.testing.assert_close(l_b[1:, :n], l_1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("cache_fn", [None, prefix_cache_fn()], ids=["no_prefix", "kv_prefix"])
def test_eager_equals_sdpa(models, batch, mode, cache_fn):
    feats, ids, mask = batch
    h_s, l_s = hidden(models["sdpa"], feats, ids, mask, mode, cache_fn)
    h_e, l_e = hidden(models["eager"], feats, ids, mask, mode, cache_fn)
    real = torch.cat([torch.ones(2, N_IMG), mask], 1).bool()
    torch.testing.assert_close(h_s[real], h_e[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(l_s[mask.bool()], l_e[mask.bool()], atol=1e-5, rtol=0)


def test_kv_prefix_is_attended(models, batch):
    feats, ids, mask = batch
    _, l0 = hidden(models["sdpa"], feats, ids, mask, "prefix")
    _, l1 = hidden(models["sdpa"], feats, ids, mask, "prefix", prefix_cache_fn())
    assert (l0 - l1).abs().max() > 1e-3
