"""VisionLanguageModel: loss, feature path, stage0 noise, save/load, projectors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import N_IMG, lm_config, vision_config
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from vlalign.models.masks import build_attention_mask
from vlalign.models.noise import corrupt_tokens
from vlalign.models.projector import PROJECTORS, build_projector, load_projector, save_projector
from vlalign.models.vlm import VisionLanguageModel, position_ids_from_mask

torch.set_num_threads(1)

VISION_CFG = vision_config()
LM_CFG = lm_config()
PAD, BOS, EOS = 0, 1, 2


def make_vlm(mode: str = "prefix", kind: str = "mlp2x_gelu", seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = SiglipVisionModel(copy.deepcopy(VISION_CFG))
    lm = Qwen2ForCausalLM(copy.deepcopy(LM_CFG))
    return VisionLanguageModel(
        vision,
        build_projector(kind, 64, 64),
        lm,
        mask_mode=mode,
        protected_token_ids=(PAD, BOS, EOS),
    ).eval()


@pytest.fixture(scope="module")
def vlm():
    return make_vlm()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, 64, (3, 8), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    for row, n in ((1, 5), (2, 3)):  # right padding
        ids[row, n:] = PAD
        mask[row, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return pixels, ids, mask, labels


# ------------------------------------------------------------------ stage0 noise
def noisy_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (4, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[3, 7:] = 0
    ids[mask == 0] = PAD
    ids[:, 0] = BOS
    ids[0, 10] = EOS
    return ids, mask


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_noise_count_and_untouched_positions(fraction):
    ids, mask = noisy_batch()
    protected = (PAD, BOS, EOS)
    out = corrupt_tokens(ids, mask, fraction, 50, torch.Generator().manual_seed(0), protected)
    eligible = mask.bool() & ~torch.isin(ids, torch.tensor(protected))
    changed = out != ids
    n_eligible = eligible.sum(1).double()
    expected = torch.floor(n_eligible * fraction + 0.5).long()  # documented rule
    assert torch.equal(changed.sum(1), expected)
    assert not (changed & ~eligible).any()  # pads and protected ids never touched
    assert not torch.isin(out[changed], torch.tensor(protected)).any()  # none introduced
    assert ((out >= 0) & (out < 50)).all()
    assert ids.shape == out.shape and out.dtype == ids.dtype


def test_noise_deterministic_with_generator():
    ids, mask = noisy_batch()
    a = corrupt_tokens(ids, mask, 0.3, 50, torch.Generator().manual_seed(7), [BOS])
    b = corrupt_tokens(ids, mask, 0.3, 50, torch.Generator().manual_seed(7), [BOS])
    c = corrupt_tokens(ids, mask, 0.3, 50, torch.Generator().manual_seed(8), [BOS])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_rejects_bad_input():
    ids, mask = noisy_batch()
    with pytest.raises(ValueError, match=r"fraction"):
        corrupt_tokens(ids, mask, 1.5, 50)
    with pytest.raises(ValueError, match=r"input_ids\[0, 5\] = 60"):
        bad = ids.clone()
        bad[0, 5] = 60
        corrupt_tokens(bad, mask, 0.2, 50)


def test_stage0_forward_corrupts_inputs_not_targets(vlm, data):
    pixels, ids, mask, labels = data
    feats = vlm.encode_images(pixels)
    with torch.no_grad():
        noisy = vlm(
            ids,
            mask,
            labels,
            image_features=feats,
            mask_mode="bidirectional",
            noise_fraction=0.5,
            generator=torch.Generator().manual_seed(1),
        )
        corrupted = corrupt_tokens(
            ids, mask, 0.5, 64, torch.Generator().manual_seed(1), (PAD, BOS, EOS)
        )
        manual = vlm(corrupted, mask, labels, image_features=feats, mask_mode="bidirectional")
        clean = vlm(ids, mask, labels, image_features=feats, mask_mode="bidirectional")
    assert not torch.equal(corrupted, ids)
    torch.testing.assert_close(noisy.loss, manual.loss, atol=0, rtol=0)  # targets = clean ids
    assert abs(noisy.loss.item() - clean.loss.item()) > 1e-4


# ------------------------------------------------------------------ forward / loss
def manual_loss(vlm, feats, ids, mask, labels, mode):
    """CE written out by hand from the full LM logits over [image | text]."""
    img = vlm.projector(feats)
    emb = torch.cat([img, vlm.lm.get_input_embeddings()(ids)], 1)
    full = torch.cat([torch.ones(ids.shape[0], N_IMG, dtype=torch.long), mask], 1)
    is_img = torch.zeros_like(full, dtype=torch.bool)
    is_img[:, :N_IMG] = True
    m4 = build_attention_mask(vlm.lm.config, emb, full, is_img, mode, materialize=True)
    logits = vlm.lm(
        inputs_embeds=emb, attention_mask=m4, position_ids=position_ids_from_mask(full)
    ).logits
    terms = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if mask[b, t] and labels[b, t] != -100:
                # text token t is predicted at sequence position N + t - 1
                terms.append(-F.log_softmax(logits[b, N_IMG + t - 1], -1)[labels[b, t]])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("mode", ["causal", "prefix", "bidirectional"])
def test_loss_matches_manual_ce(vlm, data, mode):
    pixels, ids, mask, labels = data
    with torch.no_grad():
        feats = vlm.encode_images(pixels)
        out = vlm(ids, mask, labels, image_features=feats, mask_mode=mode)
        ref = manual_loss(vlm, feats, ids, mask, labels, mode)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=0)
    assert out.logits.shape == (3, 8, 64) and out.label_logits.shape == (3, 8, 64)
    torch.testing.assert_close(out.logits[:, :-1], out.label_logits[:, 1:])


def test_loss_ignores_padding_and_ignore_index(vlm, data):
    pixels, ids, mask, labels = data
    with torch.no_grad():
        base = vlm(ids, mask, labels, pixel_values=pixels).loss
        # garbage labels at padded positions are ignored (the mask wins)
        junk = labels.clone()
        junk[mask == 0] = 7
        assert vlm(ids, mask, junk, pixel_values=pixels).loss.item() == pytest.approx(
            base.item(), abs=1e-6
        )
        # labels == -100 removes a target
        partial = labels.clone()
        partial[0, 3] = -100
        assert abs(vlm(ids, mask, partial, pixel_values=pixels).loss.item() - base.item()) > 1e-6
        # batch loss = token-weighted mean of the unpadded single-sample losses
        tot, n_tok = 0.0, 0
        for b in range(3):
            n = int(mask[b].sum())
            single = vlm(
                ids[b : b + 1, :n], None, labels[b : b + 1, :n], pixel_values=pixels[b : b + 1]
            )
            tot += single.loss.item() * n
            n_tok += n
    assert base.item() == pytest.approx(tot / n_tok, abs=1e-5)


def test_image_features_path_equals_pixel_path(vlm, data):
    pixels, ids, mask, labels = data
    with torch.no_grad():
        a = vlm(ids, mask, labels, pixel_values=pixels, output_hidden_states=True)
        b = vlm(
            ids, mask, labels, image_features=vlm.encode_images(pixels), output_hidden_states=True
        )
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert a.loss.item() == b.loss.item()
    assert a.hidden_states.shape == (3, N_IMG + 8, 64)
    assert a.attention_mask.shape == (3, N_IMG + 8) and a.num_image_tokens == N_IMG
    assert a["loss"] is a.loss


def test_forward_input_errors(vlm, data):
    pixels, ids, mask, _ = data
    with pytest.raises(ValueError, match="exactly one"):
        vlm(ids, mask, pixel_values=pixels, image_features=vlm.encode_images(pixels))
    with pytest.raises(ValueError, match="exactly one"):
        vlm(ids, mask)
    with pytest.raises(ValueError, match="unknown mask mode"):
        vlm(ids, mask, pixel_values=pixels, mask_mode="full")


def test_gradients_reach_projector_only_when_backbones_frozen(data):
    model = make_vlm()
    pixels, ids, mask, labels = data
    for p in (*model.vision.parameters(), *model.lm.parameters()):
        p.requires_grad_(False)
    model(ids, mask, labels, pixel_values=pixels).loss.backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------ persistence
def test_save_load_roundtrip(tmp_path, data):
    model = make_vlm(mode="causal", kind="transformer", seed=4)
    pixels, ids, mask, labels = data
    model.save_pretrained(tmp_path / "vlm")
    assert {p.name for p in (tmp_path / "vlm").iterdir()} == {
        "vision",
        "projector",
        "lm",
        "vlm.json",
    }
    assert (tmp_path / "vlm" / "lm" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "vlm" / "vlm.json").read_text())
    assert meta["mask_mode"] == "causal" and meta["projector"]["kind"] == "transformer"
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    assert loaded.mask_mode == "causal" and loaded.protected_token_ids == (PAD, BOS, EOS)
    assert isinstance(loaded.vision, SiglipVisionModel)
    with torch.no_grad():
        a = model(ids, mask, labels, pixel_values=pixels)
        b = loaded(ids, mask, labels, pixel_values=pixels)
    assert torch.equal(a.logits, b.logits)
    eager = VisionLanguageModel.from_pretrained(
        tmp_path / "vlm", attn_implementation="eager", mask_mode="prefix"
    )
    assert eager.mask_mode == "prefix" and eager.attn_implementation == "eager"
    with torch.no_grad():
        c = eager.eval()(ids, mask, labels, pixel_values=pixels, mask_mode="causal")
    torch.testing.assert_close(a.logits[mask.bool()], c.logits[mask.bool()], atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="vlm.json"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_from_parts(tmp_path, data):
    torch.manual_seed(0)
    SiglipVisionModel(copy.deepcopy(VISION_CFG)).save_pretrained(tmp_path / "vision")
    Qwen2ForCausalLM(copy.deepcopy(LM_CFG)).save_pretrained(tmp_path / "lm")
    model = VisionLanguageModel.from_parts(
        tmp_path / "vision", tmp_path / "lm", "linear", "bidirectional", attn_implementation="eager"
    )
    assert model.mask_mode == "bidirectional" and model.attn_implementation == "eager"
    assert model.projector.projector_config == {
        "kind": "linear",
        "d_vision": 64,
        "d_lm": 64,
        "kwargs": {},
    }
    pixels, ids, mask, labels = data
    out = model(ids, mask, labels, pixel_values=pixels)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_projector_roundtrip(tmp_path, kind):
    torch.manual_seed(0)
    proj = build_projector(kind, 48, 32)
    x = torch.randn(2, 5, 48)
    save_projector(proj, tmp_path / kind)
    loaded = load_projector(tmp_path / kind)
    assert type(loaded) is type(proj) and loaded.projector_config == proj.projector_config
    with torch.no_grad():
        assert torch.equal(proj.eval()(x), loaded.eval()(x))
    assert loaded(x).shape == (2, 5, 32)


def test_projector_errors(tmp_path):
    with pytest.raises(ValueError, match=r"registered: \['linear', 'mlp2x_gelu', 'transformer'\]"):
        build_projector("qformer", 8, 8)
    with pytest.raises(FileNotFoundError, match="projector.json"):
        load_projector(tmp_path)
    with pytest.raises(ValueError, match="num_heads"):
        build_projector("transformer", 30, 8, num_heads=4)


def test_transformer_projector_mixes_tokens():
    torch.manual_seed(0)
    proj = build_projector("transformer", 16, 8, num_layers=1, num_heads=2).eval()
    mlp = build_projector("mlp2x_gelu", 16, 8).eval()
    x = torch.randn(1, 4, 16)
    x2 = x.clone()
    x2[0, 3] = torch.randn(16)  # not a constant shift: the pre-norm LayerNorm would remove it
    with torch.no_grad():
        assert (proj(x)[0, 0] - proj(x2)[0, 0]).abs().max() > 1e-4  # bidirectional over tokens
        assert torch.equal(mlp(x)[0, :3], mlp(x2)[0, :3])  # per-token
