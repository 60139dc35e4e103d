"""KLAFT (seed 000) masked region modelling (``mrm``, Eq. 7) and image–text matching (``itm``,
Eq. 8) on a tiny VLM: the losses against hand computations, the mask (its size, train mode
only, the target is the encoder feature of the masked position), gradients, the image [CLS]
in training / scoring / cached and uncached generation, composition with each other and with
``info_bottleneck`` (two projector hooks), the stage session's named terms, config errors,
save/load and removal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import lm_config, vision_config
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from vlalign.methods import apply_methods, get_method, load_methods, save_methods
from vlalign.methods.itm import last_text_positions, triplet_loss
from vlalign.methods.mrm import masked_count, mrm_loss
from vlalign.methods.registry import owner
from vlalign.methods.stage import attach_peft
from vlalign.models.generation import generate
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

torch.set_num_threads(1)

PAD, BOS, EOS = 0, 1, 2
N_IMG, D_VISION, D_LM = 16, 48, 64  # d_vision ≠ d_lm: the MRM target is in the encoder width
ROWS = [[BOS, 5, 6, 7, EOS], [BOS, 8, EOS], [BOS, 9, 10, 11, 12, EOS], [BOS, 13, 14, EOS]]
PROMPTS = [[BOS, 5], [BOS], [BOS, 9, 10], [BOS, 13]]


def make_vlm(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(copy.deepcopy(vision_config(hidden_size=D_VISION)))
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config()))
    projector = build_projector("mlp2x_gelu", D_VISION, D_LM)
    return VisionLanguageModel(vision, projector, lm).eval()


def feats(b: int = len(ROWS), seed: int = 0, n: int = N_IMG) -> torch.Tensor:
    return torch.randn(b, n, D_VISION, generator=torch.Generator().manual_seed(seed))


def text_batch(rows=ROWS) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def batch(f: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return {**text_batch(), "image_features": feats() if f is None else f}


@torch.no_grad()
def logits(vlm: VisionLanguageModel) -> torch.Tensor:
    b = batch()
    del b["labels"]
    return vlm(**b).logits.clone()


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def gen(vlm, use_cache: bool, **kw) -> list[list[int]]:
    return generate(vlm, None, PROMPTS, image_features=feats(), max_new_tokens=6,
                    eos_token_id=EOS, pad_token_id=PAD, use_cache=use_cache, **kw)


def fixed_positions(positions: torch.Tensor):
    """A ``draw_positions`` that returns ``positions`` (the injected mask of a test)."""
    def draw(b, n, k, device):
        assert (b, k) == tuple(positions.shape)
        return positions
    return draw


def train_forward(vlm, methods, f=None):
    vlm.train()
    b = batch(f)
    kw = {}
    for m in methods:
        kw.update(m.forward_kwargs(len(b["input_ids"])))
    return vlm(**b, **kw), b


# ------------------------------------------------------------------------ MRM
def test_masked_count_rule():
    assert masked_count(16, 0.15) == 2  # round(2.4)
    assert masked_count(10, 0.15) == 2  # 1.5 rounds half up
    assert masked_count(16, 0.5) == 8
    assert masked_count(4, 0.01) == 1  # at least one masked ...
    assert masked_count(2, 0.9) == 1  # ... and one visible


def test_mrm_masks_round_ratio_n_tokens_in_train_mode_only():
    vlm = make_vlm()
    base = logits(vlm)
    (mrm,) = apply_methods(vlm, [("mrm", {"mask_ratio": 0.25})])
    seen = []
    vlm.projector.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    f = feats()
    assert torch.equal(logits(vlm), base)  # eval: no masking, the base model exactly
    assert torch.equal(seen[-1], f) and mrm.last is None
    torch.manual_seed(5)
    out, b = train_forward(vlm, [mrm], f)
    masked = seen[-1]
    emb = mrm.module.mask_embedding.detach()
    is_mask = (masked == emb).all(-1)  # (B, N)
    assert is_mask.sum(-1).tolist() == [4] * len(ROWS)  # round(0.25 · 16) per image
    assert torch.equal(masked[~is_mask], f[~is_mask])  # the others untouched
    pos = mrm.last.positions
    assert pos.shape == (len(ROWS), 4)
    assert torch.equal(is_mask, torch.zeros_like(is_mask).scatter(1, pos, True))
    assert not all(torch.equal(pos[0].sort().values, r.sort().values) for r in pos[1:])
    assert torch.equal(mrm.last.targets, f.gather(1, pos[..., None].expand(-1, -1, D_VISION)))
    # positions come from torch's global RNG: the same seed, the same mask
    torch.manual_seed(5)
    train_forward(vlm, [mrm], f)
    assert torch.equal(mrm.last.positions, pos)
    assert out.hidden_states is not None  # asked for by forward_kwargs in train mode
    vlm.eval()
    assert mrm.forward_kwargs(4) == {}


def test_frozen_mrm_does_not_mask():
    vlm = make_vlm()
    (mrm,) = apply_methods(vlm, [("mrm", {})])
    seen = []
    vlm.projector.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    mrm.set_trainable(False)  # re-attached from a parent stage, not trained here
    vlm.train()
    assert mrm.forward_kwargs(4) == {}
    f = feats()
    vlm(**batch(f))
    assert torch.equal(seen[-1], f) and mrm.last is None
    mrm.set_trainable(True)
    out, _ = train_forward(vlm, [mrm], f)
    assert not torch.equal(seen[-1], f) and mrm.last is not None


def test_mrm_loss_hand_computed_and_target_is_the_masked_encoder_feature():
    vlm = make_vlm()
    (mrm,) = apply_methods(vlm, [("mrm", {"lambda": 0.5})])
    pos = torch.tensor([[0, 3], [15, 1], [7, 8], [2, 9]])
    mrm.module.draw_positions = fixed_positions(pos)
    f = feats()
    out, b = train_forward(vlm, [mrm], f)
    terms = mrm.extra_loss(out, b)
    assert set(terms) == {"mrm"}
    # by hand: the head on the hidden state at each masked image position vs the encoder feature
    rows = torch.arange(4)[:, None]
    pred = mrm.module.head(out.hidden_states[rows, pos])  # (B, 2, d_vision)
    want = 0.5 * ((pred - f[rows, pos]) ** 2).sum(-1).mean() / D_VISION
    assert torch.allclose(terms["mrm"], want, atol=1e-6)
    assert torch.allclose(mrm_loss(pred, f[rows, pos]), F.mse_loss(pred, f[rows, pos]))
    # changing the encoder feature at a masked position: the model's input is the same (the
    # mask embedding stands there), the target moves, the loss moves by the hand-computed delta
    g = f.clone()
    g[0, 3] += 1.0
    out2, b2 = train_forward(vlm, [mrm], g)
    assert torch.equal(out2.logits, out.logits) and torch.equal(out2.hidden_states,
                                                                out.hidden_states)
    got = mrm.extra_loss(out2, b2)["mrm"]
    assert not torch.allclose(got, terms["mrm"])
    assert torch.allclose(got, 0.5 * ((pred - g[rows, pos]) ** 2).sum(-1).mean() / D_VISION,
                          atol=1e-6)
    # swapping the images of rows 0 and 1: inputs and targets move with them
    sw = f[[1, 0, 2, 3]]
    out3, b3 = train_forward(vlm, [mrm], sw)
    assert not torch.allclose(mrm.extra_loss(out3, b3)["mrm"], terms["mrm"])


def test_mrm_gradients_reach_mask_embedding_and_head():
    vlm = make_vlm()
    (mrm,) = apply_methods(vlm, [("mrm", {})])
    params = mrm.trainable_parameters()
    assert {owner(p) for p in params} == {"mrm"}
    assert not any(p.requires_grad for n, p in vlm.named_parameters() if not n.startswith("mrm."))
    # e_mask (d_vision) + MLP d_lm → d_lm → d_vision
    assert sum(p.numel() for p in params) == D_VISION + (D_LM * D_LM + D_LM) + (
        D_LM * D_VISION + D_VISION)
    torch.manual_seed(0)
    out, b = train_forward(vlm, [mrm])
    (out.loss + mrm.extra_loss(out, b)["mrm"]).backward()
    assert mrm.module.mask_embedding.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mrm.module.head.parameters())


def test_mrm_single_token_and_missing_forward():
    vlm = make_vlm()
    (mrm,) = apply_methods(vlm, [("mrm", {})])
    with pytest.raises(RuntimeError, match="without a training-mode forward"):
        mrm.extra_loss(None, {})
    vlm.train()
    b = text_batch()
    out = vlm(**b, image_features=feats(n=1), **mrm.forward_kwargs(4))
    assert mrm.extra_loss(out, b) is None  # one visual token: no masking, no term
    out = vlm(**b, image_features=feats())  # without the hidden states it asked for
    with pytest.raises(RuntimeError, match="output_hidden_states=True"):
        mrm.extra_loss(out, b)


# ------------------------------------------------------------------------ ITM
def test_triplet_loss_hand_computed():
    s = 1 / math.sqrt(2)
    anchor = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # normalised inside
    positive = torch.tensor([[0.6, 0.8], [s, s], [0.0, 1.0]])
    # unit vectors: d(a_i, p_j) = sqrt(2 − 2 cos)
    d = lambda c: math.sqrt(2 - 2 * c)  # noqa: E731
    dist = [[d(0.6), d(s), d(0)], [d(0.8), d(s), d(1)], [d(-0.6), d(-s), d(0)]]
    m = 0.2
    hinge = [[max(dist[i][i] - dist[i][j] + m, 0) for j in range(3) if j != i] for i in range(3)]
    # anchor 1: both negatives violate the margin, the hardest is p_2 (distance 0 < its
    # positive's 0.765, hinge 0.965), p_0 gives 0.765 − 0.632 + 0.2; anchor 2: none violates
    assert hinge[1] == pytest.approx([d(s) - d(0.8) + m, d(s) - 0 + m])
    assert hinge[2] == [0, 0]
    hardest = sum(max(h) for h in hinge) / 3
    summed = sum(sum(h) for h in hinge) / 3
    assert triplet_loss(anchor, positive, m) == pytest.approx(hardest, abs=1e-5)
    assert triplet_loss(anchor, positive, m, "sum") == pytest.approx(summed, abs=1e-5)
    assert hardest > 0 and summed > hardest
    # well separated pairs beyond the margin: zero
    assert triplet_loss(torch.eye(3), torch.eye(3), 0.2) == 0
    with pytest.raises(ValueError, match="B >= 2"):
        triplet_loss(torch.ones(1, 2), torch.ones(1, 2), 0.2)
    with pytest.raises(ValueError, match="negatives must be one of"):
        triplet_loss(anchor, positive, m, "all")


def test_last_text_positions():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert last_text_positions(mask, 2).tolist() == [3, 5, 2]
    with pytest.raises(ValueError, match=r"rows \[0\] have no text token"):
        last_text_positions(torch.tensor([[1, 1, 0], [1, 1, 1]]), 2)


def test_itm_appends_cls_in_every_mode_and_loss_is_hand_computed():
    vlm = make_vlm()
    (itm,) = apply_methods(vlm, [("itm", {"proj_dim": 8, "margin": 0.5})])
    b = text_batch()
    with torch.no_grad():
        out = vlm(**b, image_features=feats())
        img = vlm.embed_images(image_features=feats())
    assert out.num_image_tokens == N_IMG + 1 and itm.cls_index == N_IMG
    assert torch.equal(img[:, N_IMG], itm.module.cls.detach().expand(4, -1))
    assert vlm.itm is itm.module
    with pytest.raises(RuntimeError, match="without a training-mode forward"):
        itm.extra_loss(out, b)  # eval forwards give no loss
    out, b = train_forward(vlm, [itm])
    assert out.num_image_tokens == N_IMG + 1
    terms = itm.extra_loss(out, b)
    assert set(terms) == {"itm"}
    # by hand: image [CLS] state at N, text state at N + (last real text index)
    h = out.hidden_states
    last = b["attention_mask"].sum(-1) - 1
    text = h[torch.arange(4), N_IMG + 1 + last]
    a = itm.module.image_head(h[:, N_IMG])
    p = itm.module.text_head(text)
    want = 0.1 * triplet_loss(a, p, 0.5)
    assert torch.allclose(terms["itm"], want)
    assert terms["itm"] > 0
    (out.loss + terms["itm"]).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in itm.trainable_parameters())
    # a batch of one row: no negative, no term (None, not 0)
    vlm.train()
    one = text_batch(ROWS[:1])
    out1 = vlm(**one, image_features=feats(1), **itm.forward_kwargs(1))
    assert itm.extra_loss(out1, one) is None


def test_itm_negatives_option_and_no_heads():
    vlm = make_vlm()
    (itm,) = apply_methods(vlm, [("itm", {"proj_dim": None, "negatives": "sum"})])
    assert [n for n, _ in itm.module.named_parameters()] == ["cls"]
    out, b = train_forward(vlm, [itm])
    h = out.hidden_states
    text = h[torch.arange(4), N_IMG + 1 + b["attention_mask"].sum(-1) - 1]
    want = 0.1 * triplet_loss(h[:, N_IMG], text, 0.2, "sum")
    assert torch.allclose(itm.extra_loss(out, b)["itm"], want)


@pytest.mark.parametrize("methods", [["itm"], ["mrm", "itm", "info_bottleneck"]])
def test_cached_generation_equals_nocache(methods):
    vlm = make_vlm()
    base = gen(vlm, use_cache=False)
    applied = apply_methods(vlm, [(m, {}) for m in methods])
    for i, m in enumerate(applied):
        randomise(m.module, seed=1 + i)
    truth = gen(vlm, use_cache=False)
    assert gen(vlm, use_cache=True) == truth
    assert truth != base  # the [CLS] (and z) change what is generated
    assert all(m.last is None for m in applied if m.name == "mrm")  # no masking in generation


# ------------------------------------------------------------------------ composition
@pytest.mark.parametrize("order", [["itm", "info_bottleneck"], ["info_bottleneck", "itm"]])
def test_itm_with_info_bottleneck_two_projector_hooks(order):
    vlm = make_vlm()
    methods = apply_methods(vlm, [("mrm", {}), *[(m, {}) for m in order]])
    mrm, itm = methods[0], next(m for m in methods if m.name == "itm")
    with torch.no_grad():
        img = vlm.embed_images(image_features=feats())
    assert img.shape[1] == N_IMG + 2
    want_index = N_IMG + order.index("itm")
    assert itm.cls_index == want_index
    assert torch.equal(img[:, want_index], itm.module.cls.detach().expand(4, -1))
    torch.manual_seed(0)
    out, b = train_forward(vlm, methods)
    assert out.num_image_tokens == N_IMG + 2
    terms = {m.name: m.extra_loss(out, b) for m in methods}
    assert set(terms["mrm"]) == {"mrm"} and set(terms["itm"]) == {"itm"}
    assert set(terms["info_bottleneck"]) == {"kl"}
    h = out.hidden_states
    text = h[torch.arange(4), N_IMG + 2 + b["attention_mask"].sum(-1) - 1]
    want = 0.1 * triplet_loss(itm.module.image_head(h[:, want_index]),
                              itm.module.text_head(text), 0.2)
    assert torch.allclose(terms["itm"]["itm"], want)
    assert mrm.last is None  # consumed


def test_stage_session_gives_named_terms():
    vlm = make_vlm()
    vlm.requires_grad_(False)
    peft = {"mrm": {"lr": 1e-3, "mask_ratio": 0.15, "lambda": 0.1},
            "itm": {"lr": 1e-3, "margin": 0.2, "lambda": 0.1},
            "info_bottleneck": {"lr": 1e-3}}
    session = attach_peft(vlm, peft, None)
    vlm.train()
    b = batch()
    out = vlm(**b, **session.forward_kwargs(4))
    loss = session.total_loss(out, b)
    assert set(session.last_terms) == {"mrm.mrm", "itm.itm", "info_bottleneck.kl"}
    assert loss.item() == pytest.approx(out.loss.item() + sum(session.last_terms.values()),
                                        rel=1e-5)
    loss.backward()
    for m in session.methods:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())


def test_packed_training_forward_gives_the_same_terms():
    vlm = make_vlm()
    methods = apply_methods(vlm, [("mrm", {}), ("itm", {})])
    vals = []
    for packing in (False, True):
        vlm.train()
        torch.manual_seed(3)
        b = batch()
        out = vlm(**b, packing=packing, **methods[0].forward_kwargs(4))
        vals.append([m.extra_loss(out, b)[m.name] for m in methods])
    for a, p in zip(*vals):
        assert torch.allclose(a, p, atol=1e-5)


# ------------------------------------------------------------------------ config, save, remove
@pytest.mark.parametrize(
    "name,cfg,match",
    [
        ("mrm", {"mask_ratio": 0}, "mask_ratio must be in"),
        ("mrm", {"mask_ratio": 1.5}, "mask_ratio must be in"),
        ("mrm", {"lambda": -1}, "lambda must be >= 0"),
        ("mrm", {"head_hidden": 0}, "head_hidden must be an integer >= 1"),
        ("mrm", {"ratio": 0.1}, r"unknown config keys \['ratio'\]"),
        ("itm", {"negatives": "all"}, "negatives must be one of"),
        ("itm", {"margin": "big"}, "margin must be a number"),
        ("itm", {"proj_dim": 2.5}, "proj_dim must be an integer"),
    ],
)
def test_bad_config_is_refused_naming_the_key(name, cfg, match):
    with pytest.raises(ValueError, match=match):
        get_method(name).resolve_config(cfg)


def test_defaults():
    mrm = get_method("mrm").resolve_config({})
    assert (mrm["mask_ratio"], mrm["lambda"], mrm["head_hidden"]) == (0.15, 0.1, None)
    itm = get_method("itm").resolve_config({})
    assert (itm["margin"], itm["lambda"], itm["negatives"]) == (0.2, 0.1, "hardest")


@pytest.mark.parametrize("name", ["mrm", "itm"])
def test_needs_a_vlm(name):
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config()))
    method = get_method(name)()
    with pytest.raises(ValueError, match="needs a VisionLanguageModel"):
        method.apply(lm)
    assert not method.applied


def test_save_load_reproduces_logits_and_training_loss(tmp_path):
    vlm = make_vlm()
    methods = apply_methods(vlm, [("mrm", {"head_hidden": 16}), ("itm", {"proj_dim": 8})])
    for i, m in enumerate(methods):
        randomise(m.module, seed=2 + i)
    want = logits(vlm)
    torch.manual_seed(4)
    out, b = train_forward(vlm, methods)
    want_terms = [m.extra_loss(out, b)[m.name].detach() for m in methods]
    save_methods(methods, tmp_path / "peft")
    fresh = make_vlm()
    loaded = load_methods(fresh, tmp_path / "peft")
    assert [m.name for m in loaded] == ["mrm", "itm"]
    assert loaded[0].module.head[0].out_features == 16 and loaded[1].cfg["proj_dim"] == 8
    assert torch.equal(logits(fresh), want)
    torch.manual_seed(4)
    out, b = train_forward(fresh, loaded)
    got = [m.extra_loss(out, b)[m.name] for m in loaded]
    assert all(torch.equal(g, w) for g, w in zip(got, want_terms))


def test_remove_restores_the_base():
    vlm = make_vlm()
    base = logits(vlm)
    names = {n for n, _ in vlm.named_parameters()}
    methods = apply_methods(vlm, [("mrm", {}), ("itm", {}), ("info_bottleneck", {})])
    assert not torch.equal(logits(vlm), base)
    for m in reversed(methods):
        m.remove()
    assert torch.equal(logits(vlm), base)
    assert {n for n, _ in vlm.named_parameters()} == names
    assert not vlm.projector._forward_hooks and not vlm.projector._forward_pre_hooks
    assert not hasattr(vlm, "mrm") and not hasattr(vlm, "itm")
    again = get_method("itm")()
    again.apply(vlm)
    assert logits(vlm).shape == base.shape


# ------------------------------------------------------------------------ in a real stage
@pytest.mark.slow
def test_stage_trains_logs_terms_and_reloads(tmp_path):
    """The real ``train_stage`` + ``peft_hook`` with ``{mrm, itm}``: the weighted terms are
    ``train_log.csv`` columns, both methods' weights move, the reloaded stage gives the
    in-memory logits (the image [CLS] included) and no masking at inference."""
    import csv

    from peft_fixtures import (
        RecordingHook,
        build_peft_world,
        changed,
        probe_batch,
        saved_model,
        stage_settings,
        train,
    )

    from vlalign.methods.stage import load_for_inference

    world = build_peft_world(tmp_path)
    base, _ = train(world, "stage1", stage_settings("world", "recaption", {"projector": 1e-2},
                                                    max_steps=1))
    probe = probe_batch(world)
    hook = RecordingHook(probe)
    peft = {"mrm": {"lr": 5e-2}, "itm": {"lr": 5e-2, "proj_dim": 16}}
    stage_dir, res = train(world, "ft_klaft", stage_settings(peft=peft, max_steps=2), base, hook)
    assert sorted(res["peft"]) == ["itm", "mrm"]
    with open(stage_dir / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for key in ("mrm.mrm", "itm.itm"):
        vals = [float(r[key]) for r in rows]
        assert all(math.isfinite(v) and v > 0 for v in vals), key
    for name in ("mrm", "itm"):
        assert changed(hook.at_attach.methods[name], hook.at_save.methods[name]), name
    assert not changed(hook.at_attach.base, hook.at_save.base)
    assert not changed(saved_model(base), saved_model(stage_dir))
    model = VisionLanguageModel.from_pretrained(stage_dir / "model").eval()
    session = load_for_inference(model, stage_dir)
    with torch.no_grad():
        out = model(**probe, **session.forward_kwargs(len(probe["input_ids"])))
    assert out.num_image_tokens == 16 + 1
    assert torch.equal(out.logits, hook.logits)
    assert session.method("mrm").last is None
