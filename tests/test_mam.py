"""KLAFT's MAM (``mam``, seed 000 Eq. 2) on a tiny VLM: the hard-threshold gate, the two masks
against a hand computation (and the masks the real LM layer hands over, sdpa and eager), the
position-indexed gate, identity at attach, padding / packing invariance, cached = no-cache
generation (greedy and beams, with a K/V prefix, next to PETAL's ``dma``), save / load, removal,
gradients and config errors."""

from __future__ import annotations

import copy
import math

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
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from vlalign.methods import apply_methods, count_trainable, load_methods, save_methods
from vlalign.methods.mam import (
    MamBlock,
    MamMethod,
    layer_mask_allowed,
    modality_independent,
    threshold_gate,
)
from vlalign.methods.registry import owner
from vlalign.methods.stage import load_for_inference
from vlalign.models.generation import generate
from vlalign.models.masks import reference_mask
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

torch.set_num_threads(1)

PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7], [], [9], [11, 12, 13, 14, 15]]
OPEN, SHUT = 30.0, -30.0  # C_b values giving σ(A) == 1.0 and B == 0 exactly (float32)


def make_vlm(seed: int = 0, impl: str = "sdpa") -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(vision_config())
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config()))
    vlm = VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), lm)
    vlm.set_attn_implementation(impl)
    return vlm.eval()


def attach(vlm: VisionLanguageModel, **cfg) -> MamMethod:
    (method,) = apply_methods(vlm, [("mam", cfg)])
    assert isinstance(method, MamMethod)
    return method


@torch.no_grad()
def randomise(method: MamMethod, seed: int = 1) -> None:
    """Non-zero output projections and a gate spread around μ (some pairs shut, some open)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in method.module.named_parameters():
        if name == "gate_bias":
            p.copy_(2.0 * torch.randn(p.shape, generator=g))
        elif name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def force_gate(method: MamMethod, value: float) -> None:
    method.module.gate_proj.weight.zero_()
    method.module.gate_bias.fill_(value)


@pytest.fixture(scope="module")
def feats():
    return torch.randn(len(PROMPTS), N_IMG, 64, generator=torch.Generator().manual_seed(0))


def text_batch(n: int, seed: int = 0, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -2:] = 0  # a right-padded row
    mask[2, -4:] = 0
    return ids, mask


@torch.no_grad()
def logits(vlm, feats, ids, mask, **kw) -> torch.Tensor:
    return vlm(input_ids=ids, attention_mask=mask, image_features=feats, **kw).logits


def gen(vlm, feats, use_cache=True, prompts=PROMPTS, **kw) -> list[list[int]]:
    return generate(vlm, None, prompts, image_features=feats[: len(prompts)], max_new_tokens=8,
                    eos_token_id=EOS, pad_token_id=PAD, use_cache=use_cache, **kw)  # fmt: skip


# ------------------------------------------------------------------------------ the gate
def test_threshold_gate_is_exactly_zero_at_or_below_mu():
    a = torch.tensor([-3.0, -0.1, 0.0, 0.1, 2.0])  # σ: 0.047, 0.475, 0.5, 0.525, 0.881
    b = threshold_gate(a, 0.5)
    assert torch.equal(b[:3], torch.zeros(3))  # σ(0) = 0.5 is not > μ
    assert torch.equal(b[3:], torch.sigmoid(a[3:]))
    assert torch.equal(threshold_gate(a, 0.0), torch.sigmoid(a))  # μ = 0: a plain σ gate
    assert torch.equal(threshold_gate(a, 0.9)[-1:], torch.zeros(1))


def tiny_block(gate_per_head: bool = False, seed: int = 0) -> MamBlock:
    torch.manual_seed(seed)
    block = MamBlock(8, 2, 16, max_len=12, mu=0.5, gate_per_head=gate_per_head, gate_init=0.9)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.5)
    return block.double()


def hand_probs(block, x, allowed, pos_q, pos_k, gate_fn):
    """Eq. 2 before ``·V`` written out row by row: ``B ⊙ softmax_Mc + (1−B) ⊙ softmax_Ms``."""
    q = block.query(x).view(x.shape[0], -1, 2, 4).transpose(1, 2)
    k = block.key(x).view(x.shape[0], -1, 2, 4).transpose(1, 2)
    out = torch.zeros(x.shape[0], 2, x.shape[1], x.shape[1], dtype=x.dtype)
    for b in range(x.shape[0]):
        for h in range(2):
            for i in range(x.shape[1]):
                rows = []
                for keep in allowed:  # M_c then M_s
                    cols = [j for j in range(x.shape[1]) if keep[b, 0, i, j]]
                    s = torch.stack([q[b, h, i] @ k[b, h, j] / 2.0 for j in cols])  # √d = 2
                    p = torch.zeros(x.shape[1], dtype=x.dtype)
                    p[cols] = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                    rows.append(p)
                g = torch.stack([gate_fn(b, h, i, j) for j in range(x.shape[1])])
                out[b, h, i] = g * rows[0] + (1 - g) * rows[1]
    return out


@pytest.mark.parametrize("gate_per_head", [False, True])
@torch.no_grad()
def test_dual_mask_attention_by_hand(gate_per_head):
    """3 image + 3 text tokens at shifted positions (one right pad): the block's probabilities
    equal the hand-written Eq. 2 with the gate indexed by position ids; with B = 0 text rows put
    no mass on image keys, with B = 1 they do (M_c: prefix)."""
    block = tiny_block(gate_per_head)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    pos = torch.tensor([[2, 3, 4, 5, 6, 6]])  # a K/V prefix of 2, right pad repeats the last
    mask2d = torch.tensor([[1, 1, 1, 1, 1, 0]])
    is_img = pos < 5
    allowed_c = reference_mask(mask2d, is_img, "prefix")
    allowed_s = modality_independent(allowed_c, is_img, is_img)
    # M_s by the table: image↔image, text→text causal, no text→image; pads masked in both
    assert not allowed_s[0, 0, 3:, :3].any() and allowed_c[0, 0, 3:, :3].all()
    assert torch.equal(allowed_s[0, 0, :3, :3], allowed_c[0, 0, :3, :3])
    assert not allowed_s[..., 5].any() and not allowed_c[..., 5].any()
    xn = block.attn_norm(x)
    k = block._heads(block.key(xn))
    wb = block.gate_proj.weight.view(block.gates, 12, 8)  # rows of W_bᵀ per gate and column

    def gate_fn(b, h, i, j):
        gi = h if gate_per_head else 0
        a = xn[b, i] @ wb[gi, pos[b, j]] + block.gate_bias[gi, pos[b, i], pos[b, j]]
        s = torch.sigmoid(a)
        return s if s > 0.5 else torch.zeros((), dtype=s.dtype)

    got = block.attention_probs(xn, k, allowed_c, allowed_s, pos, pos)
    want = hand_probs(block, xn, (allowed_c, allowed_s), pos, pos, gate_fn)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    gate = block.gate(xn, pos, pos)
    assert (gate == 0).any() and (gate > 0.5).any()  # the spread gate has both kinds
    for value, text_to_image in ((SHUT, 0.0), (OPEN, None)):
        block.gate_proj.weight.zero_()
        block.gate_bias.fill_(value)
        got = block.attention_probs(xn, k, allowed_c, allowed_s, pos, pos)
        ref = allowed_s if value == SHUT else allowed_c
        torch.testing.assert_close(
            got, hand_probs(block, xn, (ref, ref), pos, pos, lambda *_: torch.ones(())),
            rtol=1e-9, atol=1e-12,
        )  # fmt: skip
        mass = got[0, :, 3:5, :3].sum()
        assert float(mass) == 0.0 if text_to_image == 0.0 else float(mass) > 0.05


def test_layer_masks_become_the_same_allowed_matrix():
    """sdpa's bool mask, eager's additive mask and sdpa's None (is_causal) give one matrix;
    leading K/V-prefix columns are dropped."""
    allowed = reference_mask(torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 4).bool(), "causal")
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cpu = torch.device("cpu")
    for mask in (allowed, additive, None):
        assert torch.equal(layer_mask_allowed(mask, 2, 4, 4, cpu), allowed)
    with_prefix = torch.cat([torch.ones(2, 1, 4, 3, dtype=torch.bool), allowed], -1)
    assert torch.equal(layer_mask_allowed(with_prefix, 2, 4, 4, cpu), allowed)
    assert layer_mask_allowed(None, 1, 1, 5, cpu).all()  # one cached-decoding query sees all
    with pytest.raises(TypeError, match="sdpa and eager"):
        layer_mask_allowed(torch.ones(2, 4), 2, 4, 4, cpu)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["prefix", "causal"])
def test_the_real_layer_mask_reaches_the_block(feats, impl, mode):
    """In the VLM (right-padded batch), B = 0: text queries put no mass on image keys and
    B = 1: they do; image queries never see text; pads are never attended."""
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm(impl=impl)
    method = attach(vlm)
    randomise(method)
    seen = []
    original = method.module.attention_probs

    def record(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    method.module.attention_probs = record
    for value in (SHUT, OPEN):
        force_gate(method, value)
        logits(vlm, feats, ids, mask, mask_mode=mode)
    shut, open_ = seen
    assert float(shut[:, :, N_IMG:, :N_IMG].sum()) == 0.0
    assert float(open_[:, :, N_IMG:, :N_IMG].min(-1).values.min()) > 0  # every text row reads
    for probs in (shut, open_):
        assert float(probs[:, :, :N_IMG, N_IMG:].abs().sum()) == 0.0  # image never sees text
        pads = torch.cat([torch.ones(4, N_IMG, dtype=torch.long), mask], 1) == 0
        assert float(probs.permute(0, 3, 1, 2)[pads].abs().sum()) == 0.0  # nor anyone a pad
        real = torch.cat([torch.ones(4, N_IMG, dtype=torch.long), mask], 1).bool()
        torch.testing.assert_close(
            probs.sum(-1).permute(0, 2, 1)[real], torch.ones(int(real.sum()), 4)
        )
    assert method.extra_metrics() == {"gate_mean": 1.0, "gate_open": 1.0}


# ------------------------------------------------------------------------------ in the model
def test_identity_at_attach_and_trainable_count(feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    ref = logits(vlm, feats, ids, mask)
    method = attach(vlm)
    assert torch.equal(logits(vlm, feats, ids, mask), ref)  # zero out / down: identity
    n = sum(p.numel() for p in method.module.parameters())
    d, ffn, n_len = 64, 128, 512
    assert n == 4 * (d * d + d) + d * n_len + n_len * n_len + (d * ffn + ffn + ffn * d + d) + 2 * d
    assert count_trainable(vlm, method.module)[0] == n == method.count_trainable(vlm)[0]
    assert all(owner(p) == "mam" for p in method.module.parameters())
    per_head = attach(make_vlm(), gate_per_head=True, max_len=64, num_heads=2, ffn_dim=32)
    assert per_head.module.gate_bias.shape == (2, 64, 64) and per_head.module.num_heads == 2
    assert (
        per_head.module.gate_proj.weight.shape == (2 * 64, 64)
        and per_head.module.up.out_features == 32
    )


def test_gradients_reach_the_block_only_and_a_shut_gate_gets_none(feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    method = attach(vlm)
    vlm.train()
    vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats).loss.backward()
    grads = {n: p.grad for n, p in method.module.named_parameters()}
    assert grads["out.weight"].abs().sum() > 0 and grads["down.weight"].abs().sum() > 0
    assert all(p.grad is None for n, p in vlm.named_parameters() if owner(p) is None)
    randomise(method)
    for value in (OPEN, SHUT):
        force_gate(method, value)
        method.module.zero_grad()
        vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats).loss.backward()
        grads = {n: p.grad for n, p in method.module.named_parameters()}
        for name in ("query.weight", "key.weight", "value.weight", "up.weight"):
            assert grads[name].abs().sum() > 0, name
        gate_grad = grads["gate_bias"].abs().sum() + grads["gate_proj.weight"].abs().sum()
        # σ'(30) underflows to 0 as well: both extremes are flat; in between the gate learns
        assert float(gate_grad) == 0.0
    randomise(method)
    method.module.zero_grad()
    vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats).loss.backward()
    assert method.module.gate_bias.grad.abs().sum() > 0
    assert method.module.gate_proj.weight.grad.abs().sum() > 0


def test_padding_and_batch_mates_do_not_change_a_row(feats):
    """A row alone, padded to a longer batch-mate's width and next to other rows gives the same
    logits at its real positions (the gate is indexed by position, not by column)."""
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    randomise(attach(vlm))
    batch = logits(vlm, feats, ids, mask)
    for i in (0, 2):
        n = int(mask[i].sum())
        alone = logits(vlm, feats[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(batch[i : i + 1, :n], alone, atol=2e-5, rtol=1e-5)
    # left padding: generation's batch (left-padded prompts) equals per-sample generation
    rows = gen(vlm, feats)
    assert rows == [gen(vlm, feats[i : i + 1], prompts=[p])[0] for i, p in enumerate(PROMPTS)]


def test_packed_rows_equal_padded_rows(feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    randomise(attach(vlm))
    vlm.train()  # what train.packing runs; no dropout in the tiny models
    padded = vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats)
    packed = vlm(input_ids=ids, attention_mask=mask, labels=ids, image_features=feats, packing=True)
    real = mask.bool()
    torch.testing.assert_close(packed.logits[real], padded.logits[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ generation
def beam_nocache(vlm, feats, prompt: list[int], num_beams: int = 2, steps: int = 8) -> list[int]:
    """Beam search with the full sequence recomputed (no cache) at every step: per beam the
    sum of log-probabilities, top ``num_beams`` of all continuations (no eos: HF's rule)."""
    beams = [(0.0, list(prompt))]
    for _ in range(steps):
        ids = torch.tensor([b[1] for b in beams], dtype=torch.long).reshape(len(beams), -1)
        width = ids.shape[1]
        padded = torch.cat([ids, torch.zeros(len(beams), 1, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(len(beams), 1, dtype=torch.long)], 1)
        out = vlm(
            input_ids=padded, attention_mask=mask, image_features=feats.expand(len(beams), -1, -1)
        )
        logp = torch.log_softmax(out.label_logits[:, width].float(), -1)
        cand = [(s + float(logp[i, t]), seq + [t]) for i, (s, seq) in enumerate(beams)
                for t in range(logp.shape[-1])]  # fmt: skip
        beams = sorted(cand, key=lambda c: -c[0])[:num_beams]
    return beams[0][1][len(prompt) :]


@pytest.mark.parametrize("mode", ["prefix", "causal"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cached_generation_equals_nocache(feats, mode, impl):
    vlm = make_vlm(impl=impl)
    base = gen(vlm, feats, mask_mode=mode)
    method = attach(vlm)
    randomise(method)
    cached = gen(vlm, feats, mask_mode=mode)
    assert cached == gen(vlm, feats, use_cache=False, mask_mode=mode)
    assert cached != base  # MAM changes what is generated: the equality is not the LM's alone


@torch.no_grad()
def test_beam_search_with_mam_equals_a_recomputed_beam_search(feats):
    vlm = make_vlm()
    randomise(attach(vlm))
    beams = generate(vlm, None, PROMPTS, image_features=feats, max_new_tokens=8,
                     eos_token_id=None, pad_token_id=PAD, num_beams=2)  # fmt: skip
    want = [beam_nocache(vlm, feats[i : i + 1], p) for i, p in enumerate(PROMPTS)]
    assert beams == want
    greedy = gen(vlm, feats)
    assert beams != greedy  # the beams are a different search, not the greedy path again


def test_composes_with_a_prefix_and_with_dma(feats):
    """``prefix`` (P = 4 K/V positions before the image) + ``dma`` + ``mam``: cached generation
    equals recomputation, and MAM changes the output under the prefix too."""
    vlm = make_vlm()
    prefix, dma, mam = apply_methods(
        vlm, [("prefix", {"num_prefix": 4}), ("dma", {"rank": 4}), ("mam", {})]
    )
    with torch.no_grad():
        for f in dma.module.values():
            f.V.normal_(std=0.3)
    inputs = prefix.inference_state
    before = gen(vlm, feats, inputs=inputs)
    randomise(mam)
    cached = gen(vlm, feats, inputs=inputs)
    assert cached == gen(vlm, feats, use_cache=False, inputs=inputs)
    assert cached != before
    ids, mask = text_batch(len(PROMPTS))
    out = logits(vlm, feats, ids, mask, past_key_values=prefix.cache_fn(len(PROMPTS)))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("other", [("lora", {"r": 2}), ("dma", {"rank": 2})], ids=["lora", "dma"])
def test_name_based_methods_attached_later_leave_the_block_alone(feats, other):
    """LoRA and DMA target linears by name (``q_proj`` …): MAM's own projections are named
    otherwise, so neither wraps them, and cached generation still equals recomputation."""
    vlm = make_vlm()
    mam, _ = apply_methods(vlm, [("mam", {}), other])
    randomise(mam)
    linears = {n: type(m) for n, m in mam.module.named_modules() if n and "norm" not in n}
    assert linears == {n: torch.nn.Linear for n in ("query", "key", "value", "out", "gate_proj",
                                                     "up", "down")}  # fmt: skip
    assert gen(vlm, feats) == gen(vlm, feats, use_cache=False)


# ------------------------------------------------------------------------------ life cycle
def test_save_load_reproduces_logits(tmp_path, feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    method = attach(vlm, gate_per_head=True, max_len=64)
    randomise(method)
    want = logits(vlm, feats, ids, mask)
    save_methods([method], tmp_path / "peft")
    fresh = make_vlm()
    (loaded,) = load_methods(fresh, tmp_path / "peft")
    assert (
        isinstance(loaded, MamMethod)
        and loaded.cfg["gate_per_head"]
        and loaded.cfg["max_len"] == 64
    )
    assert torch.equal(logits(fresh, feats, ids, mask), want)


def test_remove_restores_the_base_lm(feats):
    ids, mask = text_batch(len(PROMPTS))
    vlm = make_vlm()
    ref = logits(vlm, feats, ids, mask)
    keys = set(vlm.lm.state_dict())
    method = attach(vlm)
    randomise(method)
    assert not torch.allclose(logits(vlm, feats, ids, mask), ref)
    method.remove()
    assert not method.applied and not hasattr(vlm.lm, "mam") and not vlm.lm._forward_pre_hooks
    assert not vlm.lm.model.layers[-1]._forward_hooks and set(vlm.lm.state_dict()) == keys
    assert torch.equal(logits(vlm, feats, ids, mask), ref)
    attach(vlm)  # attaches again


def test_gradient_checkpointing_recomputes_with_the_same_modalities(feats):
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


def test_config_and_input_errors(feats):
    for cfg, msg in (
        ({"mu": 1.0}, r"mu must be in \[0, 1\)"),
        ({"gate_init": 0.4}, r"gate_init must be in \(mu, 1\).*stuck"),
        ({"mu": 0.95}, r"gate_init must be in \(mu, 1\)"),
        ({"max_len": 0}, "max_len must be an integer >= 1"),
        ({"num_heads": 3}, "not divisible by num_heads 3"),
        ({"gate_per_head": "yes"}, "gate_per_head must be true or false"),
        ({"lambda": 0.1}, r"unknown config keys \['lambda'\]"),
    ):
        with pytest.raises(ValueError, match=msg):
            attach(make_vlm(), **cfg)
    vlm = make_vlm()
    attach(vlm, max_len=20)
    with pytest.raises(ValueError, match="apply mam only once"):
        attach(vlm)
    ids, mask = text_batch(len(PROMPTS))  # 16 image + 6 text positions > max_len 20
    with pytest.raises(ValueError, match="position id 21 is outside max_len 20"):
        logits(vlm, feats, ids, mask)
    assert MamMethod.resolve_config({})["mu"] == 0.5
    assert math.isclose(torch.sigmoid(torch.tensor(math.log(9.0))).item(), 0.9, rel_tol=1e-6)


# ------------------------------------------------------------------------------ in a stage
def test_mam_stage_trains_on_packed_rows_saves_and_reloads(tmp_path):
    """The real ``train_stage`` + ``peft_hook`` with ``train.packing``: only MAM trains (every
    tensor of the block moves, the base does not), the saved base model is the clean one, and
    the reloaded stage gives the in-memory logits."""
    world = build_peft_world(tmp_path)
    stage1 = stage_settings("world", "recaption", {"projector": 1e-2}, max_steps=1)
    base, _ = train(world, "stage1", stage1)
    probe = probe_batch(world)
    hook = RecordingHook(probe)
    peft = {"mam": {"lr": 5e-2, "max_len": 80, "mu": 0.5}}
    settings = stage_settings(peft=peft, packing=True)
    stage_dir, res = train(world, "ft_mam", settings, base, hook)
    n_mam = sum(t.numel() for t in hook.at_attach.methods["mam"].values())
    assert res["peft"] == ["mam"] and res["trainable_params"] == n_mam
    moved = changed(hook.at_attach.methods["mam"], hook.at_save.methods["mam"])
    assert moved == set(hook.at_attach.methods["mam"])  # all of q/k/v/o, gate, norms, FFN
    assert not changed(hook.at_attach.base, hook.at_save.base)
    assert not changed(saved_model(base), saved_model(stage_dir))
    model = VisionLanguageModel.from_pretrained(stage_dir / "model")
    session = load_for_inference(model, stage_dir)
    assert torch.equal(peft_logits(model, session, probe), hook.logits)
