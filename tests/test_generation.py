"""Cached generation (image block prefilled under the stage mask) against the no-cache ground
truth; beams; batch == per-sample; inference inputs (a K/V prefix cache) of PEFT methods."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import lm_config, vision_config
from transformers import Qwen2ForCausalLM, SiglipVisionModel
from transformers.cache_utils import DynamicCache

from vlalign.models.generation import generate
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

torch.set_num_threads(1)

VISION_CFG = vision_config()
LM_CFG = lm_config()
PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7], [], [9], [11, 12, 13, 14, 15]]  # different lengths, one empty
MAX_NEW = 8


def make_vlm(impl: str = "sdpa") -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = SiglipVisionModel(copy.deepcopy(VISION_CFG))
    lm = Qwen2ForCausalLM(copy.deepcopy(LM_CFG))
    vlm = VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), lm)
    vlm.set_attn_implementation(impl)
    return vlm.eval()


def prefix_inputs(p: int = 3):
    """``B → {"past_key_values": a fresh cache of p random K/V positions}``, the inference inputs
    a prefix-tuned model's session supplies."""
    g = torch.Generator().manual_seed(1)
    kv = [
        (torch.randn(1, 2, p, 16, generator=g), torch.randn(1, 2, p, 16, generator=g))
        for _ in range(LM_CFG.num_hidden_layers)
    ]

    def fn(batch: int) -> dict[str, DynamicCache]:
        return {"past_key_values": DynamicCache(
            [
                (k.expand(batch, -1, -1, -1).clone(), v.expand(batch, -1, -1, -1).clone())
                for k, v in kv
            ]
        )}

    return fn


@pytest.fixture(scope="module")
def models():
    return {impl: make_vlm(impl) for impl in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def feats(models):
    pixels = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return models["sdpa"].encode_images(pixels)


def gen(model, feats, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", MAX_NEW)
    return generate(
        model, None, prompts, image_features=feats, eos_token_id=EOS, pad_token_id=PAD, **kw
    )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["causal", "prefix"])
@pytest.mark.parametrize("with_prefix", [False, True], ids=["no_kv_prefix", "kv_prefix"])
def test_cached_greedy_equals_recomputation(models, feats, impl, mode, with_prefix):
    model = models[impl]
    fn = prefix_inputs() if with_prefix else None
    cached = gen(model, feats, mask_mode=mode, inputs=fn)
    truth = gen(model, feats, mask_mode=mode, inputs=fn, use_cache=False)
    assert cached == truth
    assert len(cached) == len(PROMPTS)
    assert all(len(row) <= MAX_NEW and EOS not in row for row in cached)


def test_generation_depends_on_mode_and_prefix(models, feats):
    # guards the equality tests above against a model too weak to tell masks apart
    m = models["sdpa"]
    causal = gen(m, feats, mask_mode="causal", use_cache=False)
    prefix = gen(m, feats, mask_mode="prefix", use_cache=False)
    with_kv = gen(m, feats, mask_mode="prefix", inputs=prefix_inputs(), use_cache=False)
    assert causal != prefix
    assert prefix != with_kv


def test_bidirectional_cached_generation_is_prefix(models, feats):
    m = models["sdpa"]
    assert gen(m, feats, mask_mode="bidirectional") == gen(m, feats, mask_mode="prefix")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_equals_per_sample(models, feats, num_beams):
    m = models["sdpa"]
    batch = gen(m, feats, mask_mode="prefix", num_beams=num_beams)
    single = [
        gen(m, feats[i : i + 1], [p], mask_mode="prefix", num_beams=num_beams)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert batch == single


def test_beam_search_runs(models, feats):
    m = models["sdpa"]
    beams = gen(m, feats, mask_mode="prefix", num_beams=3, inputs=prefix_inputs())
    assert len(beams) == len(PROMPTS)
    assert all(isinstance(t, int) and 0 <= t < 64 for row in beams for t in row)
    assert all(0 < len(row) <= MAX_NEW for row in beams if EOS not in row)


def test_eos_cuts_output(models, feats):
    m = models["sdpa"]
    free = generate(
        m,
        None,
        PROMPTS,
        image_features=feats,
        max_new_tokens=MAX_NEW,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    assert all(len(row) == MAX_NEW for row in free)
    stop = free[0][2]  # make row 0's third generated token the eos
    cut = generate(
        m,
        None,
        PROMPTS,
        image_features=feats,
        max_new_tokens=MAX_NEW,
        eos_token_id=stop,
        pad_token_id=PAD,
    )
    assert cut[0] == free[0][: free[0].index(stop)]


def test_pixel_values_and_errors(models):
    m = models["sdpa"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = generate(m, pixels, [[3], [4, 5]], max_new_tokens=3, eos_token_id=None)
    assert [len(r) for r in out] == [3, 3]
    with pytest.raises(ValueError, match="2 images"):
        generate(m, pixels, [[3]], max_new_tokens=3)
    with pytest.raises(ValueError, match="greedy"):
        generate(m, pixels, [[3], [4]], num_beams=2, use_cache=False)
    with pytest.raises(ValueError, match="prompt_ids is required"):
        generate(m, pixels)


def test_inputs_other_than_a_cache_are_refused(models, feats):
    # generation hands only past_key_values to the model: another input must not be dropped
    with pytest.raises(ValueError, match=r"\['gate'\].*only past_key_values"):
        gen(models["sdpa"], feats, inputs=lambda b: {"gate": 1.0})
    # no cache (e.g. a removed prefix) is the plain model
    plain = gen(models["sdpa"], feats, mask_mode="prefix")
    assert gen(models["sdpa"], feats, mask_mode="prefix", inputs=lambda b: {}) == plain
