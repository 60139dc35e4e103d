"""PETAL's dynamic mode approximation (``dma``) on a tiny VLM: ΔW = 0 at init, the CP update
against a dense reconstruction, per-token modality routing (image positions from the position
ids, with and without a K/V prefix), cached generation = no-cache recomputation, merge, save /
load, budget, trainable counts, removal; and the image-token mask of
:mod:`vlalign.models.modality`."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import N_IMG, lm_config, vision_config
from peft_fixtures import (
    RecordingHook,
    build_peft_world,
    changed,
    peft_logits,
    probe_batch,
    saved_model,
    stage_settings,
    train,
)
from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel
from transformers.cache_utils import DynamicCache

from vlalign.methods import apply_methods, count_trainable, load_methods, save_methods
from vlalign.methods.dma import DmaLinear, DmaMethod
from vlalign.methods.registry import get_method, owner
from vlalign.methods.stage import load_for_inference
from vlalign.models.generation import generate
from vlalign.models.modality import image_end, image_token_mask, image_tokens, set_image_end
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

torch.set_num_threads(1)

LM_CFG = lm_config()  # width 64, 4 heads, 2 KV heads: q/o are 64x64, k/v 32x64
N_LAYERS = LM_CFG.num_hidden_layers
PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7], [], [9], [11, 12, 13, 14, 15]]
GROUPS = {"64x64": 2 * N_LAYERS, "32x64": 2 * N_LAYERS}  # shape key -> J (q+o, k+v)


def make_vlm(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(vision_config())
    lm = Qwen2ForCausalLM(copy.deepcopy(LM_CFG))
    with torch.no_grad():  # HF initialises q/k/v biases to 0: make "Γ leaves b unscaled" visible
        for name, param in lm.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(std=0.1)
    return VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), lm).eval()


def attach(vlm: VisionLanguageModel, **cfg) -> DmaMethod:
    (method,) = apply_methods(vlm, [("dma", cfg)])
    assert isinstance(method, DmaMethod)
    return method


def randomise(method: DmaMethod, seed: int = 1, same_lambda: bool = False) -> None:
    """Non-zero V, λ^image != λ^text (unless ``same_lambda``), Γ != 1: every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in method.groups().values():
            f.V.copy_(0.3 * torch.randn(f.V.shape, generator=g))
            f.lambda_text.copy_(1 + 0.5 * torch.randn(f.lambda_text.shape, generator=g))
            if same_lambda:
                f.lambda_image.copy_(f.lambda_text)
            else:
                f.lambda_image.copy_(1 + 2 * torch.randn(f.lambda_image.shape, generator=g))
            if f.gamma is not None:
                f.gamma.copy_(1 + 0.2 * torch.randn(f.gamma.shape, generator=g))


@pytest.fixture(scope="module")
def feats():
    pixels = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return make_vlm().encode_images(pixels)


def text_batch(n: int, seed: int = 0, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0  # a right-padded row
    return ids, mask


@torch.no_grad()
def logits(vlm, feats, ids, mask, **kw) -> torch.Tensor:
    return vlm(input_ids=ids, attention_mask=mask, image_features=feats, **kw).logits


def kv_prefix(batch_size: int, p: int = 3) -> DynamicCache:
    g = torch.Generator().manual_seed(7)
    shape = (1, 2, p, 16)  # (batch, KV heads, positions, head dim)
    kv = [
        (torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(N_LAYERS)
    ]
    return DynamicCache(
        [(k.repeat(batch_size, 1, 1, 1), v.repeat(batch_size, 1, 1, 1)) for k, v in kv]
    )


# ------------------------------------------------------------------------------ modality
def test_image_token_mask_from_position_ids():
    lm = nn.Linear(2, 2)
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 5, 5]])
    assert image_end(lm) is None and image_token_mask(lm, pos) is None
    set_image_end(lm, 4)
    assert torch.equal(image_token_mask(lm, pos), pos < 4)
    assert image_token_mask(lm, None) is None  # no explicit positions: every token is text
    with image_tokens(lm, 2):
        assert image_end(lm) == 2
    assert image_end(lm) == 4  # the previous value is back
    set_image_end(lm, None)
    assert image_token_mask(lm, pos) is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="image end"):
            set_image_end(lm, bad)


@pytest.mark.parametrize("p", [0, 3], ids=["no_kv_prefix", "kv_prefix"])
def test_vlm_forward_marks_exactly_the_image_tokens(feats, p):
    """Inside the LM forward of a VLM forward, the mask is True on the N image columns only
    (right pads included as text); outside it, no end is recorded."""
    vlm = make_vlm()
    method = attach(vlm)
    ids, mask = text_batch(len(PROMPTS))
    seen = []
    hook = vlm.lm.register_forward_hook(lambda *_: seen.append(method._state.image_mask.clone()))
    kw = {"past_key_values": kv_prefix(len(PROMPTS), p)} if p else {}
    logits(vlm, feats, ids, mask, **kw)
    hook.remove()
    (got,) = seen
    want = torch.zeros(len(PROMPTS), N_IMG + ids.shape[1], dtype=torch.bool)
    want[:, :N_IMG] = True
    assert torch.equal(got, want)
    assert image_end(vlm.lm) is None
    vlm.lm(input_ids=ids, attention_mask=mask, position_ids=torch.arange(6).expand(4, -1))
    assert method._state.image_mask is None  # a text-only LM call: every token is text


# ------------------------------------------------------------------------------ the update
def test_zero_init_leaves_the_model_unchanged(feats):
    vlm = make_vlm()
    ids, mask = text_batch(len(PROMPTS))
    ref = logits(vlm, feats, ids, mask)
    method = attach(vlm)
    for key, f in method.groups().items():
        assert f.V.abs().sum() == 0 and f.U.abs().sum() > 0 and f.P.abs().sum() > 0, key
        assert torch.equal(f.lambda_image, torch.ones(64))
        assert torch.equal(f.lambda_text, torch.ones(64))
        assert torch.equal(f.gamma, torch.ones(GROUPS[key]))
        assert f.P.shape == (GROUPS[key], 64)
    torch.testing.assert_close(logits(vlm, feats, ids, mask), ref, atol=1e-6, rtol=0)


def dense_delta(f, j: int, lam: torch.Tensor) -> torch.Tensor:
    """``Σ_r λ_r P_jr u_r v_rᵀ`` summed outer product by outer product."""
    out = torch.zeros(f.U.shape[0], f.V.shape[0])
    for r in range(f.U.shape[1]):
        out += lam[r] * f.P[j, r] * torch.outer(f.U[:, r], f.V[:, r])
    return out


@torch.no_grad()
def test_cp_update_matches_a_dense_reconstruction():
    vlm = make_vlm()
    method = attach(vlm, rank=8)
    randomise(method)
    names = method.adapted_modules()
    assert len(names) == 4 * N_LAYERS and all("vision" not in n for n in names)
    g = torch.Generator().manual_seed(3)
    for f in method.groups().values():
        # the CP tensor of Eq. 2 (d_out x d_in x J), rank-one terms u_r ∘ v_r ∘ p_r
        for m, lam in (("image", f.lambda_image), ("text", f.lambda_text)):
            cp = torch.einsum("r,ar,br,jr->abj", lam, f.U, f.V, f.P)
            for j in range(f.P.shape[0]):
                torch.testing.assert_close(f.delta_weight(j, m), cp[..., j], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cp[..., j], dense_delta(f, j, lam), atol=1e-5, rtol=1e-5)
    for name in names:
        layer = vlm.lm.get_submodule(name)
        assert isinstance(layer, DmaLinear)
        f, j = layer.factors, layer.index
        x = torch.randn(2, 5, layer.in_features, generator=g)
        is_img = torch.rand(2, 5, generator=g) < 0.5
        w0, b = layer.base_layer.weight, layer.base_layer.bias
        method._state.image_mask = is_img
        y = layer(x)
        for bi in range(2):
            for t in range(5):
                lam = f.lambda_image if is_img[bi, t] else f.lambda_text
                w = f.gamma[j] * w0 + dense_delta(f, j, lam)
                want = x[bi, t] @ w.T + (0 if b is None else b)
                torch.testing.assert_close(y[bi, t], want, atol=1e-5, rtol=1e-5)
        method._state.image_mask = None  # no mask: λ^text everywhere
        w = f.gamma[j] * w0 + dense_delta(f, j, f.lambda_text)
        want = x @ w.T + (0 if b is None else b)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="does not fit"):
            method._state.image_mask = torch.zeros(3, 4, dtype=torch.bool)
            layer(x)
        method._state.image_mask = None


@pytest.mark.parametrize("p", [0, 3], ids=["no_kv_prefix", "kv_prefix"])
@torch.no_grad()
def test_image_positions_use_lambda_image(feats, p):
    """Layer 0's k_proj in a VLM forward: a dense per-position computation with λ^image on the
    N image columns and λ^text on the text; changing λ^image changes only the image columns of
    the layer-0 projections (their input does not depend on λ)."""
    vlm = make_vlm()
    method = attach(vlm)
    randomise(method)
    ids, mask = text_batch(len(PROMPTS))
    attn = vlm.lm.model.layers[0].self_attn
    rec: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(
            lambda mod, args, out, name=name: rec.__setitem__(name, (args[0], out))
        )

    def forward():
        kw = {"past_key_values": kv_prefix(len(PROMPTS), p)} if p else {}
        logits(vlm, feats, ids, mask, **kw)
        return {k: v[1].clone() for k, v in rec.items()}

    first = forward()
    layer = attn.k_proj
    f, j = layer.factors, layer.index
    x, y = rec["k_proj"]
    for lam, cols in ((f.lambda_image, slice(0, N_IMG)), (f.lambda_text, slice(N_IMG, None))):
        w = f.gamma[j] * layer.base_layer.weight + dense_delta(f, j, lam)
        want = x[:, cols] @ w.T + layer.base_layer.bias
        torch.testing.assert_close(y[:, cols], want, atol=1e-5, rtol=1e-5)

    for g in method.groups().values():
        g.lambda_image.mul_(-3.0)
    second = forward()
    for name in first:
        assert torch.equal(first[name][:, N_IMG:], second[name][:, N_IMG:]), name
        assert (first[name][:, :N_IMG] - second[name][:, :N_IMG]).abs().max() > 1e-3, name


@pytest.mark.parametrize("mode", ["causal", "prefix"])
@pytest.mark.parametrize("p", [0, 3], ids=["no_kv_prefix", "kv_prefix"])
def test_cached_generation_equals_recomputation(feats, mode, p):
    vlm = make_vlm()
    method = attach(vlm)
    randomise(method)
    inputs = (lambda b: {"past_key_values": kv_prefix(b, p)}) if p else None

    def gen(use_cache):
        return generate(
            vlm,
            None,
            PROMPTS,
            image_features=feats,
            max_new_tokens=8,
            eos_token_id=EOS,
            pad_token_id=PAD,
            use_cache=use_cache,
            inputs=inputs,
            mask_mode=mode,
        )

    cached = gen(True)
    assert cached == gen(False)
    assert image_end(vlm.lm) is None  # generation leaves no recorded image behind
    with torch.no_grad():  # routing matters: text λ on the image tokens generates otherwise
        for g in method.groups().values():
            g.lambda_image.copy_(g.lambda_text)
    assert gen(True) != cached


# ------------------------------------------------------------------------------ life cycle
def test_merge_folds_gamma_and_delta_when_lambdas_agree(feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    method = attach(vlm)
    randomise(method)
    before = logits(vlm, feats, ids, mask)
    with pytest.raises(ValueError, match="cannot merge"):
        method.merge_and_unload()
    assert method.applied and len(method.adapted_modules()) == 4 * N_LAYERS
    torch.testing.assert_close(logits(vlm, feats, ids, mask), before, atol=0, rtol=0)

    randomise(method, seed=2, same_lambda=True)
    ref = logits(vlm, feats, ids, mask)
    lm = method.merge_and_unload()
    assert lm is vlm.lm and not method.applied
    assert not hasattr(lm, "dma") and not lm._forward_pre_hooks
    assert all(type(m) is not DmaLinear for m in lm.modules())
    assert type(lm.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(vlm, feats, ids, mask), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, before)


def test_save_load_reproduces_logits(tmp_path, feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    method = attach(vlm, rank=16)
    randomise(method)
    ref = logits(vlm, feats, ids, mask)
    keys = set(method.state_dict())
    assert keys == {
        f"dma.{g}.{n}"
        for g in GROUPS
        for n in ("U", "V", "P", "lambda_image", "lambda_text", "gamma")
    }
    save_methods([method], tmp_path / "peft")

    other = make_vlm()  # same base weights, fresh (different) DMA init
    (loaded,) = load_methods(other, tmp_path / "peft")
    assert loaded.cfg["rank"] == 16
    torch.testing.assert_close(logits(other, feats, ids, mask), ref, atol=0, rtol=0)


def test_budget_sizes_the_rank():
    vlm = make_vlm()
    per_rank = sum(d_out + 64 + j + 2 for d_out, j in ((64, 4), (32, 4)))  # U, V, P, 2 λ
    n_gamma = sum(GROUPS.values())
    budget = 10 * per_rank + n_gamma + per_rank - 1  # just below rank 11
    method = attach(vlm, budget=budget)
    assert method.cfg["rank"] == 10 and method.cfg["budget"] == budget
    assert count_trainable(vlm)[0] == 10 * per_rank + n_gamma <= budget
    # without Γ the fixed cost goes: the same budget buys one rank more
    assert attach(make_vlm(), budget=budget, gamma=False).cfg["rank"] == 11
    share = attach(make_vlm(), budget="1%")
    n_lm = sum(p.numel() for p in make_vlm().lm.parameters())
    assert share.cfg["rank"] == (int(0.01 * n_lm) - n_gamma) // per_rank
    with pytest.raises(ValueError, match="below rank 1"):
        attach(make_vlm(), budget=per_rank)
    with pytest.raises(ValueError, match="not both"):
        get_method("dma").resolve_config({"budget": 1000, "rank": 4})


@pytest.mark.parametrize("gamma", [True, False])
def test_only_the_factors_train(gamma, feats):
    vlm = make_vlm()
    method = attach(vlm, gamma=gamma)
    randomise(method)
    expected = sum(
        64 * (d_out + 64 + j + 2) + (j if gamma else 0) for d_out, j in ((64, 4), (32, 4))
    )
    assert (
        count_trainable(vlm)[0] == expected == sum(p.numel() for p in method.trainable_parameters())
    )
    names = {n.rsplit(".", 1)[-1] for n in method.state_dict()}
    assert names == {"U", "V", "P", "lambda_image", "lambda_text"} | ({"gamma"} if gamma else set())
    for n, p in vlm.named_parameters():
        assert p.requires_grad == (owner(p) == "dma"), n
    ids, mask = text_batch(len(PROMPTS))
    vlm.train()
    out = vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats)
    out.loss.backward()
    for n, p in method.named_trainable_parameters().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    metrics = method.extra_metrics()
    assert metrics["lambda_gap"] > 0 and ("gamma_abs_dev" in metrics) == gamma


def test_gradient_checkpointing_recomputes_with_the_same_modalities(feats):
    """The recomputation in the backward pass sees the mask of the forward it recomputes."""
    ids, mask = text_batch(len(PROMPTS))
    grads = []
    for checkpointing in (False, True):
        vlm = make_vlm()
        method = attach(vlm)
        randomise(method)
        vlm.train()
        if checkpointing:
            vlm.lm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats).loss.backward()
        grads.append({n: p.grad.clone() for n, p in method.named_trainable_parameters().items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_remove_restores_the_base_lm(feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    ref = logits(vlm, feats, ids, mask)
    state = {k: v.clone() for k, v in vlm.lm.state_dict().items()}
    method = attach(vlm)
    randomise(method)
    assert not torch.allclose(logits(vlm, feats, ids, mask), ref)
    method.remove()
    assert not method.applied and not hasattr(vlm.lm, "dma") and not vlm.lm._forward_pre_hooks
    after = vlm.lm.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert all(owner(p) is None for p in vlm.parameters())
    assert torch.equal(logits(vlm, feats, ids, mask), ref)
    attach(vlm)  # attaches again


def test_config_errors():
    with pytest.raises(ValueError, match="unknown config keys \\['r'\\]"):
        attach(make_vlm(), r=4)
    with pytest.raises(ValueError, match="no linear layer named \\['nope'\\]"):
        attach(make_vlm(), target_modules=["nope"])
    with pytest.raises(ValueError, match="init_std must be > 0"):
        attach(make_vlm(), init_std=0.0)
    vlm = make_vlm()
    attach(vlm)
    with pytest.raises(ValueError, match="apply dma only once"):
        attach(vlm)
    vlm = make_vlm()
    apply_methods(vlm, [("lora", {})])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        attach(vlm)


# ------------------------------------------------------------------------------ in a stage
def test_dma_stage_trains_saves_and_reloads(tmp_path):
    """The real ``train_stage`` + ``peft_hook``: only DMA trains, the saved base model is the
    clean one, and the reloaded stage gives the in-memory logits."""
    world = build_peft_world(tmp_path)
    stage1 = stage_settings("world", "recaption", {"projector": 1e-2}, max_steps=1)
    base, _ = train(world, "stage1", stage1)
    probe = probe_batch(world)
    hook = RecordingHook(probe)
    peft = {"dma": {"lr": 5e-2, "rank": 8}}
    stage_dir, res = train(world, "ft_dma", stage_settings(peft=peft), base, hook)
    n_dma = sum(t.numel() for t in hook.at_attach.methods["dma"].values())
    assert res["peft"] == ["dma"] and res["trainable_params"] == n_dma
    changed_params = changed(hook.at_attach.methods["dma"], hook.at_save.methods["dma"])
    every = {"U", "V", "P", "lambda_image", "lambda_text", "gamma"}
    assert {k.rsplit(".", 1)[-1] for k in changed_params} == every
    assert not changed(hook.at_attach.base, hook.at_save.base)
    assert not changed(saved_model(base), saved_model(stage_dir))
    model = VisionLanguageModel.from_pretrained(stage_dir / "model")
    session = load_for_inference(model, stage_dir)
    assert torch.equal(peft_logits(model, session, probe), hook.logits)
