"""PETAL (seed 001) methods on a tiny VLM: the adaptive instruction MoE (``instruction_moe``,
Eq. 3–4: instruction spans, identity at init, the gate, cached generation, save/load, removal)
and the score-based information bottleneck (``info_bottleneck``, Eq. 5–9: the KL term, the
extra image token, z = μ in eval mode, the weighted extra loss, save/load, removal); the VLM's
``special_token_ids``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import lm_config, vision_config
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from vlalign.methods import (
    apply_methods,
    gaussian_kl,
    get_method,
    instruction_mask,
    load_methods,
    save_methods,
    score_pool,
)
from vlalign.methods.registry import owner
from vlalign.models.generation import generate
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VLM_CONFIG_NAME, VisionLanguageModel

torch.set_num_threads(1)

PAD, BOS, EOS, INST, ANS = 0, 1, 2, 62, 63  # vocabulary 64 (helpers.lm_config)
SPECIALS = {"pad": PAD, "bos": BOS, "eos": EOS, "inst": INST, "ans": ANS, "image": 61}
N_IMG = 16  # 32 px images, patch 8
# PETAL's layout: stacked instructions, then the task prompt, then <ans>
PROMPTS = [
    [BOS, INST, 5, 6, 7, INST, 8, 9, INST, 10, 11, ANS],
    [BOS, INST, 12, ANS],
    [BOS, INST, 13, 14, INST, 15, 16, 17, 18, INST, 19, ANS],
    [BOS, 20, 21],  # no instruction at all
]


def make_vlm(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(copy.deepcopy(vision_config()))
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config()))
    vlm = VisionLanguageModel(
        vision, build_projector("mlp2x_gelu", 64, 64), lm, special_token_ids=SPECIALS
    )
    return vlm.eval()


def feats(b: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn(b, N_IMG, 64, generator=torch.Generator().manual_seed(seed))


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS + a short answer and <eos>, right-padded."""
    rows = [p + [30 + i, EOS] for i, p in enumerate(PROMPTS)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def logits(vlm: VisionLanguageModel) -> torch.Tensor:
    ids, mask = text_batch()
    return vlm(input_ids=ids, attention_mask=mask, image_features=feats()).logits.clone()


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Move every parameter of ``module`` away from its initialisation (γ around 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = scale * torch.randn(p.shape, generator=g)
        p.copy_((1 + noise) if name == "gamma" else p + noise)


def gen(vlm, use_cache: bool, prompts=PROMPTS) -> list[list[int]]:
    return generate(
        vlm,
        None,
        prompts,
        image_features=feats(len(prompts)),
        max_new_tokens=6,
        eos_token_id=EOS,
        pad_token_id=PAD,
        use_cache=use_cache,
    )


# ------------------------------------------------------------------------ instruction MoE
def test_instruction_mask_hand_built():
    ids = torch.tensor([
        # several <inst> blocks, one <ans>, answer, <eos>, padding
        [BOS, INST, 5, 6, INST, 7, INST, 8, 9, ANS, 10, EOS, PAD, PAD],
        # a two-turn conversation: each question is an instruction, the answers are not
        [BOS, INST, 5, ANS, 6, EOS, INST, 7, 8, ANS, 9, EOS, PAD, PAD],
        # no markers; then a truncated row (no closing <ans>)
        [BOS, 5, 6, 7, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
        [BOS, INST, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        # an <ans> before any <inst>; an empty block <inst> <ans>
        [ANS, 5, INST, 6, ANS, 7, INST, ANS, 8, EOS, PAD, PAD, PAD, PAD],
    ])  # fmt: skip
    want = torch.zeros_like(ids, dtype=torch.bool)
    want[0, [2, 3, 5, 7, 8]] = True
    want[1, [2, 7, 8]] = True
    want[4, [3]] = True
    assert torch.equal(instruction_mask(ids, INST, ANS), want)
    # 1-D ids with left pads (the cached generation path embeds each prompt alone)
    row = torch.tensor([PAD, PAD, BOS, INST, 5, 6, INST, 7, ANS])
    assert instruction_mask(row, INST, ANS).nonzero().flatten().tolist() == [4, 5, 7]
    with pytest.raises(ValueError, match="1-D or"):
        instruction_mask(ids[None], INST, ANS)


def test_moe_identity_at_init():
    vlm = make_vlm()
    base = logits(vlm)
    (moe,) = apply_methods(vlm, [("instruction_moe", {})])
    assert torch.equal(moe.module.gamma, torch.ones(3, 64))
    assert torch.equal(moe.module.beta, torch.zeros(3, 64))
    assert torch.equal(logits(vlm), base)  # exactly the base model, whatever the gate says
    assert torch.allclose(moe.last_gates.sum(-1), torch.ones(len(PROMPTS)))


def test_moe_gate_sums_to_one_and_is_not_uniform():
    vlm = make_vlm()
    (moe,) = apply_methods(vlm, [("instruction_moe", {})])
    randomise(moe.module)
    ids, mask = text_batch()
    with torch.no_grad():
        vlm.embed_text(ids)
    g = moe.last_gates
    assert g.shape == (len(PROMPTS), 3)
    assert torch.allclose(g.sum(-1), torch.ones(len(PROMPTS)))
    assert (g > 0).all()
    has_inst = instruction_mask(ids, INST, ANS).any(-1)
    assert (g[has_inst] - 1 / 3).abs().max() > 1e-2  # not uniform once γ, β, G are random
    assert not torch.allclose(g[0], g[1])  # a gate per row


def test_moe_changes_only_instruction_positions():
    vlm = make_vlm()
    ids, _ = text_batch()
    with torch.no_grad():
        before = vlm.embed_text(ids).clone()
    (moe,) = apply_methods(vlm, [("instruction_moe", {})])
    randomise(moe.module)
    with torch.no_grad():
        after = vlm.embed_text(ids)
    inst = instruction_mask(ids, INST, ANS)
    assert inst.sum(-1).tolist() == [7, 1, 7, 0]
    assert torch.equal(after[~inst], before[~inst])
    assert (after[inst] - before[inst]).abs().amax(-1).min() > 1e-3
    assert torch.equal(after[3], before[3])  # a row without instructions is unchanged
    # Eq. 3–4 by hand for row 0: one gate, I_in = Σ g_k (γ_k ⊙ x + β_k)
    m = moe.module
    x = before[0][inst[0]]
    mean_x = x.mean(0)
    mean_y = m.gamma * mean_x + m.beta
    w, c = m.gate_out.weight, m.gate_out.bias  # G_k(u) = w_k · GELU(W u + b) + c_k
    gl = torch.stack([w[k] @ m.gate(torch.cat([mean_x, mean_y[k]])) + c[k] for k in range(3)])
    g = torch.softmax(gl, 0)
    want = sum(g[k] * (m.gamma[k] * x + m.beta[k]) for k in range(3))
    assert torch.allclose(after[0][inst[0]], want, atol=1e-6)
    # the 1-D call (cached generation) gives the row of the batched call
    with torch.no_grad():
        single = vlm.embed_text(ids[0])
    assert torch.allclose(single, after[0], atol=1e-6)


def test_moe_trains_and_its_experts_separate():
    vlm = make_vlm()
    (moe,) = apply_methods(vlm, [("instruction_moe", {})])
    params = moe.trainable_parameters()
    assert {owner(p) for p in params} == {"instruction_moe"}
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in vlm.named_parameters() if "instruction_moe" not in n)
    # K (γ, β) + gate: shared hidden layer 2d → 64, one output row per expert
    assert sum(p.numel() for p in params) == 2 * 3 * 64 + (2 * 64 * 64 + 64) + (64 * 3 + 3)
    m = moe.module
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, mask = text_batch()
    vlm.train()
    for step in range(4):
        out = vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats())
        opt.zero_grad()
        out.loss.backward()
        if step == 0:  # identical experts: the output ignores the gate, γ and β learn
            assert m.gate_out.weight.grad.abs().max() == 0
            assert m.gamma.grad.abs().sum() > 0 and m.beta.grad.abs().sum() > 0
        opt.step()
    # the experts got different gradients (the gate is expert-dependent from the start): they
    # separate, and the gate learns (a gate on (x, y_k) alone would keep them equal forever)
    assert (m.gamma - m.gamma.mean(0)).abs().max() > 1e-3
    assert (m.beta - m.beta.mean(0)).abs().max() > 1e-3
    assert m.gate_out.weight.grad.abs().max() > 0


def test_moe_token_ids_from_the_model_or_the_config():
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config())).eval()
    with pytest.raises(ValueError, match=r"no id for the <inst> token"):
        apply_methods(lm, [("instruction_moe", {})])
    assert not hasattr(lm, "instruction_moe")
    (moe,) = apply_methods(lm, [("instruction_moe", {"inst_token_id": 3, "ans_token_id": 4})])
    assert (moe.inst_id, moe.ans_id) == (3, 4)
    ids = torch.tensor([[BOS, 3, 7, 8, 4, 9]])
    randomise(moe.module)
    with torch.no_grad():
        out = lm.get_input_embeddings()(ids)
        ref = lm.get_input_embeddings().weight[ids]
    assert torch.equal(out[0, [0, 1, 4, 5]], ref[0, [0, 1, 4, 5]])
    assert not torch.allclose(out[0, 2:4], ref[0, 2:4])
    with pytest.raises(ValueError, match="share the id"):
        apply_methods(make_vlm(), [("instruction_moe", {"ans_token_id": INST})])
    vlm = make_vlm()
    (moe,) = apply_methods(vlm, [("instruction_moe", {"inst_token_id": 50})])
    assert (moe.inst_id, moe.ans_id) == (50, ANS)  # the config overrides the model's ids


@pytest.mark.parametrize(
    "methods",
    [["instruction_moe"], ["info_bottleneck"], ["instruction_moe", "info_bottleneck"]],
)
def test_cached_generation_equals_nocache(methods):
    vlm = make_vlm()
    base = gen(vlm, use_cache=False)
    applied = apply_methods(vlm, [(m, {}) for m in methods])
    for i, m in enumerate(applied):
        randomise(m.module, seed=1 + i)
    truth = gen(vlm, use_cache=False)
    assert gen(vlm, use_cache=True) == truth
    assert truth != base  # the methods change what is generated: the comparison means something
    assert not any(t in (INST, ANS) for row in truth for t in row)  # no generated spans


def test_moe_save_load_reproduces_logits(tmp_path):
    vlm = make_vlm()
    methods = apply_methods(vlm, [("instruction_moe", {"experts": 4, "gate_hidden": 8})])
    randomise(methods[0].module)
    want = logits(vlm)
    save_methods(methods, tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / "0_instruction_moe" / "peft_method.json").read_text())
    assert meta["config"]["experts"] == 4 and meta["config"]["gate_hidden"] == 8
    fresh = make_vlm()
    assert not torch.equal(logits(fresh), want)
    (loaded,) = load_methods(fresh, tmp_path / "peft")
    assert loaded.module.gamma.shape == (4, 64)
    assert torch.equal(logits(fresh), want)


def test_moe_remove_restores_the_base():
    vlm = make_vlm()
    names = {n for n, _ in vlm.named_parameters()}
    base = logits(vlm)
    (moe,) = apply_methods(vlm, [("instruction_moe", {})])
    randomise(moe.module)
    assert not torch.equal(logits(vlm), base)
    moe.remove()
    assert torch.equal(logits(vlm), base)
    assert {n for n, _ in vlm.named_parameters()} == names
    assert not vlm.lm.get_input_embeddings()._forward_hooks
    assert moe.model is None and moe.lm is None and not moe.applied
    again = get_method("instruction_moe")()  # attachable again
    again.apply(vlm)
    assert torch.equal(logits(vlm), base)


# ------------------------------------------------------------------------ information bottleneck
def test_gaussian_kl_hand_computed():
    mu = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    log_sigma = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # ½ Σ (μ² + σ² − 1 − 2 log σ): row 0 = ½(0.25 + 0) + ½(1 + 4 − 1 − 2 ln 2); row 1 = 0
    want = torch.tensor([0.125 + 0.5 * (4 - 2 * math.log(2.0)), 0.0])
    assert torch.allclose(gaussian_kl(mu, log_sigma), want)
    # one dimension against torch.distributions
    p = torch.distributions.Normal(torch.tensor(0.3), torch.tensor(0.7))
    q = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))
    ref = torch.distributions.kl_divergence(p, q)
    got = gaussian_kl(torch.tensor([0.3]), torch.tensor([math.log(0.7)]))
    assert torch.allclose(got, ref)


def test_score_pool():
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    q = h.mean(1, keepdim=True)
    alpha = torch.softmax((h * q).sum(-1) / math.sqrt(8), dim=-1)
    assert torch.allclose(score_pool(h), (alpha[..., None] * h).sum(1), atol=1e-6)
    same = torch.ones(1, 4, 3)  # equal tokens: uniform weights, Ĥ = the token
    assert torch.allclose(score_pool(same), torch.ones(1, 3))


def test_ib_appends_one_image_token():
    vlm = make_vlm()
    ids, mask = text_batch()
    with torch.no_grad():
        n_before = vlm(input_ids=ids, attention_mask=mask, image_features=feats()).num_image_tokens
    (ib,) = apply_methods(vlm, [("info_bottleneck", {})])
    with torch.no_grad():
        out = vlm(input_ids=ids, attention_mask=mask, image_features=feats())
        img = vlm.embed_images(image_features=feats())
    assert n_before == N_IMG
    assert out.num_image_tokens == N_IMG + 1
    assert out.attention_mask.shape == (len(PROMPTS), N_IMG + 1 + ids.shape[1])
    assert img.shape == (len(PROMPTS), N_IMG + 1, 64)
    assert vlm.info_bottleneck is ib.module  # a child of the VLM: follows .to() / .eval()
    # parameters: μ and log σ heads d → z_dim, decoder z_dim → d
    n = sum(p.numel() for p in ib.trainable_parameters())
    assert n == 2 * (64 * 32 + 32) + (32 * 64 + 64)


def test_ib_z_is_mu_in_eval_and_sampled_in_training():
    vlm = make_vlm()
    (ib,) = apply_methods(vlm, [("info_bottleneck", {})])
    f = feats()
    with torch.no_grad():
        a = vlm.embed_images(image_features=f)
        b = vlm.embed_images(image_features=f)
        h = vlm.projector(f)  # the hook appends the token: the first N are the projection
        mu, _ = ib.module.encode(h[:, :N_IMG])
        assert torch.equal(a, b)
        assert torch.allclose(a[:, -1], ib.module.decoder(mu), atol=1e-6)
        assert torch.equal(a[:, :N_IMG], h[:, :N_IMG])
        assert ib.last_kl is None  # eval forwards store no KL
        vlm.train()
        torch.manual_seed(3)
        s1 = vlm.embed_images(image_features=f)
        s2 = vlm.embed_images(image_features=f)
        torch.manual_seed(3)  # reparameterisation draws from torch's global RNG
        s3 = vlm.embed_images(image_features=f)
    assert not torch.allclose(s1[:, -1], s2[:, -1])
    assert torch.equal(s1, s3)
    assert torch.equal(s1[:, :N_IMG], a[:, :N_IMG])


def test_ib_extra_loss_is_eta_times_kl():
    vlm = make_vlm()
    (ib,) = apply_methods(vlm, [("info_bottleneck", {"eta": 0.5, "z_dim": 8})])
    ids, mask = text_batch()
    f = feats()
    with torch.no_grad():  # q(z|x) by hand, from the N projected image tokens
        mu, log_sigma = ib.module.encode(vlm.projector(f)[:, :N_IMG])
    want = 0.5 * gaussian_kl(mu, log_sigma).mean()
    vlm.train()
    out = vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=f)
    terms = ib.extra_loss(out, {"input_ids": ids})
    assert set(terms) == {"kl"}
    assert torch.allclose(terms["kl"], want)
    assert terms["kl"] > 0
    (out.loss + terms["kl"]).backward()  # the CE with z injected and η·KL train every head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ib.trainable_parameters())
    with pytest.raises(RuntimeError, match="without a training-mode forward"):
        ib.extra_loss(out, {"input_ids": ids})  # consumed by the call above
    vlm.eval()
    with torch.no_grad():
        vlm(input_ids=ids, attention_mask=mask, image_features=f)
    assert ib.last_kl is None
    assert get_method("info_bottleneck").resolve_config({})["eta"] == 1e-3


def test_ib_save_load_reproduces_logits(tmp_path):
    vlm = make_vlm()
    methods = apply_methods(vlm, [("info_bottleneck", {"z_dim": 16})])
    randomise(methods[0].module)
    want = logits(vlm)
    assert torch.equal(logits(vlm), want)  # eval mode: z = μ, deterministic
    save_methods(methods, tmp_path / "peft")
    fresh = make_vlm()
    (loaded,) = load_methods(fresh, tmp_path / "peft")
    assert loaded.cfg["z_dim"] == 16
    assert torch.equal(logits(fresh), want)


def test_ib_remove_restores_n_tokens():
    vlm = make_vlm()
    base = logits(vlm)
    names = {n for n, _ in vlm.named_parameters()}
    (ib,) = apply_methods(vlm, [("info_bottleneck", {})])
    assert logits(vlm).shape == base.shape  # logits are at the text positions only
    assert not torch.equal(logits(vlm), base)
    ib.remove()
    ids, mask = text_batch()
    with torch.no_grad():
        out = vlm(input_ids=ids, attention_mask=mask, image_features=feats())
    assert out.num_image_tokens == N_IMG
    assert torch.equal(out.logits, base)
    assert {n for n, _ in vlm.named_parameters()} == names
    assert not vlm.projector._forward_hooks and not hasattr(vlm, "info_bottleneck")


def test_ib_needs_a_vlm():
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config()))
    method = get_method("info_bottleneck")()
    with pytest.raises(ValueError, match="needs a VisionLanguageModel"):
        method.apply(lm)
    assert not method.applied and method.model is None


# ------------------------------------------------------------------------ special_token_ids
def test_special_token_ids_saved_and_restored(tmp_path):
    vlm = make_vlm()
    assert vlm.special_token_ids == SPECIALS
    vlm.save_pretrained(tmp_path / "m")
    meta_path = tmp_path / "m" / VLM_CONFIG_NAME
    assert json.loads(meta_path.read_text())["special_token_ids"] == SPECIALS
    assert VisionLanguageModel.from_pretrained(tmp_path / "m").special_token_ids == SPECIALS
    meta = json.loads(meta_path.read_text())
    del meta["special_token_ids"]  # a vlm.json written before the key existed
    meta_path.write_text(json.dumps(meta))
    assert VisionLanguageModel.from_pretrained(tmp_path / "m").special_token_ids == {}
