"""PEFT methods for PT-PEFT on a tiny Qwen2 LM: prefix encoder (GQA K/V, frozen prefixes,
cached generation, inference variants), LoRA, S-/P-Adapter, full FT, registry, composition,
trainable counts, save/load round trips and removal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import lm_config, vision_config
from transformers import Qwen2ForCausalLM

from vlalign.methods import (
    PEFT_METHODS,
    FrozenPrefix,
    PrefixEncoder,
    apply_methods,
    bottleneck_for_budget,
    count_trainable,
    forward_kwargs,
    get_method,
    load_methods,
    merge_inputs,
    prefix_position_ids,
    prefix_variant,
    save_methods,
)
from vlalign.methods.registry import PeftMethod, owner
from vlalign.methods.stage import PeftSession

torch.set_num_threads(1)

LM_CFG = lm_config()
HEAD_DIM = 64 // 4
P = 4


def make_lm(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(copy.deepcopy(LM_CFG)).eval()


def batch(seed: int = 0, b: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0  # one right-padded row
    return ids, mask


def run(lm, methods, ids, mask) -> torch.Tensor:
    """LM logits with every method's forward inputs (prefix: P mask columns, positions from P)."""
    kw = forward_kwargs(methods, ids.shape[0])
    p = kw["past_key_values"].get_seq_length() if "past_key_values" in kw else 0
    full_mask = torch.cat([mask.new_ones(mask.shape[0], p), mask], 1)
    out = lm(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=prefix_position_ids(mask, p),
        **kw,
    )
    return out.logits


def lm_loss(lm, methods, ids, mask) -> torch.Tensor:
    logits = run(lm, methods, ids, mask)[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_steps(lm, methods, steps: int = 15, lr: float = 1e-2) -> list[float]:
    params = [p for m in methods for p in m.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    ids, mask = batch(1)
    losses = []
    for _ in range(steps):
        loss = lm_loss(lm, methods, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------- registry
def test_registry_lists_all_methods_and_rejects_unknown():
    assert {"prefix", "lora", "s_adapter", "p_adapter", "full"} <= set(PEFT_METHODS)
    for name in PEFT_METHODS:
        assert issubclass(get_method(name), PeftMethod) and get_method(name).name == name
    with pytest.raises(ValueError, match="unknown PEFT method 'nope'.*'lora'.*'prefix'"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown config keys \\['rank'\\]"):
        get_method("lora")().apply(make_lm(), {"rank": 4})


# ------------------------------------------------------------------------------- prefix
def test_prefix_kv_shapes_gqa_and_fresh_cache():
    lm = make_lm()
    (prefix,) = apply_methods(lm, [("prefix", {"num_prefix": P})])
    cache = prefix.cache_fn(3)
    assert cache.get_seq_length() == P and len(cache.layers) == LM_CFG.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == (3, LM_CFG.num_key_value_heads, P, HEAD_DIM)
        assert layer.values.shape == layer.keys.shape
    assert not torch.equal(cache.layers[0].keys, cache.layers[0].values)
    # every call is a fresh cache: running the LM on one does not grow the next
    run(lm, [prefix], *batch())
    assert prefix.cache_fn(3).get_seq_length() == P
    # Table 10 ablations change the encoder, not the K/V geometry
    for cfg in ({"use_type_embedding": False}, {"use_mlp": False}):
        enc = PrefixEncoder.for_lm(lm, num_prefix=P, **cfg)
        assert enc.kv().shape == (2, 2, 2, P, HEAD_DIM)
        assert (enc.type_embedding is None) == (cfg.get("use_type_embedding") is False)
        assert (enc.mlp is None) == (cfg.get("use_mlp") is False)


def test_prefix_changes_output_and_only_prefix_gets_gradients():
    lm = make_lm()
    ids, mask = batch()
    with torch.no_grad():
        base = run(lm, [], ids, mask)
    (prefix,) = apply_methods(lm, [("prefix", {"num_prefix": P})])
    logits = run(lm, [prefix], ids, mask)
    assert (logits - base).abs().max() > 1e-3
    lm_loss(lm, [prefix], ids, mask).backward()
    enc = prefix.module
    names = {n for n, _ in enc.named_parameters()}
    assert {"prefix_embedding.weight", "type_embedding.weight", "mlp.0.weight"} <= names
    for n, p in enc.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
    for n, p in lm.named_parameters():
        assert not p.requires_grad and p.grad is None, n


def test_prefix_padding_uses_explicit_positions():
    """A right-padded row behind the prefix equals the same row run alone."""
    lm = make_lm()
    (prefix,) = apply_methods(lm, [("prefix", {"num_prefix": P})])
    ids, mask = batch()
    with torch.no_grad():
        padded = run(lm, [prefix], ids, mask)[0, :5]
        alone = run(lm, [prefix], ids[:1, :5], mask[:1, :5])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_frozen_prefix_equals_encoder_and_variants():
    lm = make_lm()
    (prefix,) = apply_methods(lm, [("prefix", {"num_prefix": 8})])
    train_steps(lm, [prefix], steps=3)
    ids, mask = batch()
    with torch.no_grad():
        enc_logits = run(lm, [prefix], ids, mask)
        frozen = prefix.freeze()
        assert isinstance(frozen, FrozenPrefix) and prefix.trainable_parameters()
        assert not any(p.requires_grad for p in frozen.parameters())
        assert torch.equal(run(lm, [prefix], ids, mask), enc_logits)
        assert prefix.count_trainable(lm)[0] == 0

    kv = frozen.kv()
    assert torch.equal(prefix_variant(frozen, "normal").kv(), kv)
    assert prefix_variant(frozen, "removed") is None
    noise = prefix_variant(frozen, "noise", generator=torch.Generator().manual_seed(0)).kv()
    assert noise.shape == kv.shape and not torch.allclose(noise, kv)
    for layer in range(kv.shape[0]):  # per layer, K and V: same mean/std (up to sampling)
        for j in range(2):
            ref, got = kv[layer, j], noise[layer, j]
            assert abs(got.mean() - ref.mean()) < 0.2 * ref.std()
            assert abs(got.std() / ref.std() - 1) < 0.15
    with pytest.raises(ValueError, match="unknown prefix variant"):
        prefix_variant(frozen, "zeros")
    # the method's inference inputs per variant
    assert prefix.variants == ("removed", "noise")
    assert prefix.inference_state(2, "removed") == {}
    normal = prefix.inference_state(2, "normal")["past_key_values"]
    assert torch.equal(normal.layers[1].values, prefix.cache_fn(2).layers[1].values)
    assert torch.equal(prefix_variant(frozen, "normal")(2).layers[1].values,
                       normal.layers[1].values)

    def noisy(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return prefix.inference_state(2, "noise", gen)["past_key_values"].layers[0].keys

    assert torch.equal(noisy(0), noisy(0))  # same seed: every forward sees the same noise
    assert not torch.equal(noisy(0), noisy(1))


def greedy_nocache(lm, prefix_fn, embeds, mask, steps):
    """Ground truth: re-run the whole (left-padded) sequence behind the prefix every step."""
    emb_layer = lm.get_input_embeddings()
    new = []
    for _ in range(steps):
        cache = prefix_fn(embeds.shape[0])
        full = torch.cat([mask.new_ones(mask.shape[0], P), mask], 1)
        logits = lm(
            inputs_embeds=embeds,
            attention_mask=full,
            position_ids=prefix_position_ids(mask, P),
            past_key_values=cache,
        ).logits[:, -1]
        tok = logits.argmax(-1)
        new.append(tok)
        embeds = torch.cat([embeds, emb_layer(tok)[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return torch.stack(new, 1)


@torch.no_grad()
def test_cached_generation_with_prefix_matches_recomputation():
    lm = make_lm()
    (prefix,) = apply_methods(lm, [("prefix", {"num_prefix": P})])
    torch.manual_seed(3)
    for p in prefix.module.parameters():  # a strong prefix, so it decides the tokens
        p.mul_(3)
    ids, _ = batch(2, b=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding for generation
    embeds = lm.get_input_embeddings()(ids)
    steps = 6
    truth = greedy_nocache(lm, prefix.cache_fn, embeds, mask, steps)
    gen = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = lm.generate(
        inputs_embeds=torch.cat([embeds.new_zeros(2, P, embeds.shape[-1]), embeds], 1),
        attention_mask=torch.cat([mask.new_ones(2, P), mask], 1),
        past_key_values=prefix.cache_fn(2),
        **gen,
    )
    assert torch.equal(out, truth)
    no_prefix = lm.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
    assert not torch.equal(no_prefix, truth)  # the prefix matters for the tokens

    # beams: the user cache must be expanded; a batch equals per-sample beam search
    def beam(rows):
        cache = prefix.cache_fn(len(rows))
        cache.batch_repeat_interleave(3)
        e, m = embeds[rows], mask[rows]
        if len(rows) == 1:
            keep = m[0].bool()
            e, m = e[:, keep], m[:, keep]
        return lm.generate(
            inputs_embeds=torch.cat([e.new_zeros(len(rows), P, e.shape[-1]), e], 1),
            attention_mask=torch.cat([m.new_ones(len(rows), P), m], 1),
            past_key_values=cache,
            num_beams=3,
            **gen,
        )

    both = beam([0, 1])
    assert torch.equal(both[0], beam([0])[0]) and torch.equal(both[1], beam([1])[0])


def test_prefix_refuses_gradient_checkpointing():
    lm = make_lm()
    (prefix,) = apply_methods(lm, [("prefix", {"num_prefix": P})])
    lm.train()
    assert prefix.cache_fn(2).get_seq_length() == P and prefix.module.training  # follows the LM
    lm.eval()
    prefix.cache_fn(2)
    assert not prefix.module.training
    lm.activation_checkpointing_enable()
    lm.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        prefix.cache_fn(2)


# ------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("name", ["s_adapter", "p_adapter"])
def test_adapters_zero_init_then_learn(name):
    lm = make_lm()
    base_keys = set(lm.state_dict())
    ids, mask = batch()
    with torch.no_grad():
        base = run(lm, [], ids, mask)
    (method,) = apply_methods(lm, [(name, {"bottleneck_size": 8})])
    with torch.no_grad():
        assert torch.equal(run(lm, [method], ids, mask), base)  # up = 0 → identical model
    assert base_keys <= set(lm.state_dict())  # hooks: base parameter names unchanged
    n_expected = 2 * 2 if name == "s_adapter" else 2  # layers × locations
    assert len(method.module) == n_expected
    assert {id(p) for p in method.trainable_parameters()} == {
        id(p) for p in lm.parameters() if p.requires_grad
    }
    losses = train_steps(lm, [method], steps=15)
    assert losses[-1] < losses[0] - 0.2
    with torch.no_grad():
        assert (run(lm, [method], ids, mask) - base).abs().max() > 1e-3
    method.remove()
    assert set(lm.state_dict()) == base_keys
    with torch.no_grad():
        assert torch.equal(run(lm, [], ids, mask), base)


def test_bottleneck_budget_matches_count():
    lm = make_lm()
    b = bottleneck_for_budget(lm, 20_000, ("attn", "mlp"))
    (m,) = apply_methods(lm, [("s_adapter", {"bottleneck_size": b})])
    n = sum(p.numel() for p in m.trainable_parameters())
    assert n <= 20_000 < n + 4 * (2 * 64 + 1)  # one more bottleneck unit would exceed it


# ------------------------------------------------------------------------------- LoRA
def test_lora_targets_only_qkv_and_roundtrips(tmp_path):
    lm = make_lm()
    (lora,) = apply_methods(lm, [("lora", {"r": 4, "alpha": 8})])
    adapted = lora.adapted_modules()
    assert len(adapted) == 3 * LM_CFG.num_hidden_layers
    assert all(n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj"} for n in adapted)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(lora.state_dict()) == set(trainable)
    train_steps(lm, [lora], steps=3)
    ids, mask = batch()
    with torch.no_grad():
        ref = run(lm, [lora], ids, mask)
    lora.save(tmp_path / "lora")

    fresh = make_lm()
    loaded = PeftMethod.from_pretrained(fresh, tmp_path / "lora")
    assert loaded.name == "lora" and loaded.cfg["r"] == 4
    with torch.no_grad():
        assert torch.equal(run(fresh, [loaded], ids, mask), ref)
        merged = loaded.merge_and_unload()
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        torch.testing.assert_close(run(merged, [], ids, mask), ref, atol=1e-5, rtol=1e-5)


def test_lora_rejects_missing_targets():
    with pytest.raises(ValueError, match="target_modules"):
        apply_methods(make_lm(), [("lora", {"target_modules": ["query"]})])


# ------------------------------------------------------------------------------- composition
def test_prefix_plus_lora_trains_both_and_phases_toggle():
    lm = make_lm()
    prefix, lora = apply_methods(lm, [("prefix", {"num_prefix": P}), ("lora", {"r": 4})])
    # phase A of prefix→LoRA: prefix only
    lora.set_trainable(False)
    assert not any(p.requires_grad for p in lora.trainable_parameters())
    assert all(p.requires_grad for p in prefix.trainable_parameters())
    lora.set_trainable(True)  # phase B: both
    train_steps(lm, [prefix, lora], steps=2)  # step 1 makes LoRA B non-zero, so A gets grads
    lm_loss(lm, [prefix, lora], *batch()).backward()
    for m in (prefix, lora):
        grads = [p.grad for p in m.trainable_parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), m.name
    frozen = [p for p in lm.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_full_finetuning_freezes_embeddings_and_composes():
    lm = make_lm()
    full, prefix, lora = apply_methods(lm, [("full", {}), ("prefix", {}), ("lora", {"r": 2})])
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert not emb.requires_grad and not head.requires_grad
    # later methods do not re-freeze what full FT trains (peft's inject would)
    assert lm.model.layers[0].mlp.up_proj.weight.requires_grad
    assert lm.model.norm.weight.requires_grad
    manual = sum(p.numel() for p in lm.parameters() if p.requires_grad) + sum(
        p.numel() for p in prefix.module.parameters()
    )
    total = sum(p.numel() for p in lm.parameters()) + sum(
        p.numel() for p in prefix.module.parameters()
    )
    n, pct = count_trainable(lm, prefix.module)
    assert n == manual and pct == pytest.approx(100 * manual / total)
    assert full.count_trainable(lm)[0] == manual - sum(
        p.numel() for p in prefix.module.parameters()
    )
    lm2 = make_lm()
    (f2,) = apply_methods(lm2, [("full", {"train_embeddings": True})])
    assert lm2.get_input_embeddings().weight.requires_grad
    assert not lm2.get_output_embeddings().weight.requires_grad
    assert "lm.model.embed_tokens.weight" in f2.state_dict()


def test_full_on_chosen_layers_is_head_tuning():
    # PETAL's head-tuning baseline: only the last decoder layer's weights are trained
    lm = make_lm()
    (head,) = apply_methods(lm, [("full", {"layers": [-1]})])
    last = {id(p) for p in lm.model.layers[-1].parameters()}
    trained = [p for p in lm.parameters() if p.requires_grad]
    assert trained and {id(p) for p in trained} == last
    assert not lm.model.norm.weight.requires_grad
    assert not lm.model.layers[0].mlp.up_proj.weight.requires_grad
    n_last = sum(p.numel() for p in lm.model.layers[-1].parameters())
    assert head.count_trainable(lm)[0] == n_last
    with pytest.raises(ValueError, match=r"layers \[5\] must be indices of the LM's 2 decoder"):
        apply_methods(make_lm(), [("full", {"layers": [5]})])


def test_tied_embeddings_flags_must_agree():
    cfg = copy.deepcopy(LM_CFG)
    cfg.tie_word_embeddings = True
    lm = Qwen2ForCausalLM(cfg)
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight
    with pytest.raises(ValueError, match="tied"):
        apply_methods(lm, [("full", {"train_embeddings": True})])
    (full,) = apply_methods(Qwen2ForCausalLM(copy.deepcopy(cfg)), [("full", {})])
    assert full.state_dict() and all("embed" not in k for k in full.state_dict())


@pytest.mark.parametrize("name", ["prefix", "s_adapter", "p_adapter", "lora"])
def test_trainable_count_matches_manual(name):
    lm = make_lm()
    (m,) = apply_methods(lm, [(name, {})])
    own = sum(p.numel() for p in m.trainable_parameters())
    total = sum(p.numel() for p in lm.parameters())
    if name == "prefix":
        total += own  # the encoder lives outside the LM
    n, pct = m.count_trainable(lm)
    assert n == own > 0 and pct == pytest.approx(100 * own / total)
    if name == "lora":  # 3 projections × layers × r (in + out)
        per_layer = 16 * (64 + 64) + 2 * 16 * (64 + 32)
        assert own == per_layer * LM_CFG.num_hidden_layers


@pytest.mark.parametrize("name", ["prefix", "lora", "s_adapter", "p_adapter", "full"])
def test_remove_restores_the_base_model(name):
    """Each method undoes its own attachment: same parameter names, same logits, no tags."""
    lm = make_lm()
    base_keys = set(lm.state_dict())
    ids, mask = batch()
    with torch.no_grad():
        base = run(lm, [], ids, mask)
    (m,) = apply_methods(lm, [(name, {})])
    if name != "full":  # make the method matter (LoRA B and the adapters' up start at zero)
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            assert (run(lm, [m], ids, mask) - base).abs().max() > 1e-3
    m.remove()
    assert not m.applied and set(lm.state_dict()) == base_keys
    assert all(owner(p) is None for p in lm.parameters())
    with torch.no_grad():
        assert torch.equal(run(lm, [], ids, mask), base)
    with pytest.raises(RuntimeError, match="has not been applied"):
        m.remove()


def test_merge_inputs_composes_caches_and_refuses_conflicts():
    lm = make_lm()
    a, b = apply_methods(lm, [("prefix", {"num_prefix": 2}), ("prefix", {"num_prefix": 3})])
    merged = merge_inputs([("a", a.forward_kwargs(2)), ("b", b.forward_kwargs(2)),
                           ("c", {"output_hidden_states": True}),
                           ("d", {"output_hidden_states": True, "past_key_values": None})])
    cache = merged["past_key_values"]
    assert cache.get_seq_length() == 5 and merged["output_hidden_states"] is True
    # both prefixes, one after the other, in every layer
    assert torch.equal(cache.layers[1].keys[:, :, :2], a.cache_fn(2).layers[1].keys)
    assert torch.equal(cache.layers[1].values[:, :, 2:], b.cache_fn(2).layers[1].values)
    with pytest.raises(ValueError, match="'c' and 'd'.*'output_hidden_states'"):
        merge_inputs([("c", {"output_hidden_states": True}),
                      ("d", {"output_hidden_states": False})])
    ids, mask = batch()
    assert run(lm, [a, b], ids, mask).shape == (3, 7, LM_CFG.vocab_size)  # the LM takes it


# ------------------------------------------------------------------------------- save / load
def test_saved_composition_reproduces_logits(tmp_path):
    specs = [
        ("prefix", {"num_prefix": P}),
        ("lora", {"r": 4}),
        ("s_adapter", {"bottleneck_size": 4}),
        ("p_adapter", {"bottleneck_size": 4}),
        ("full", {}),
    ]
    lm = make_lm()
    methods = apply_methods(lm, specs)
    owned = [id(p) for m in methods for p in m.trainable_parameters()]
    assert len(owned) == len(set(owned))  # full FT does not re-own LoRA/adapter parameters
    train_steps(lm, methods, steps=3, lr=1e-3)
    ids, mask = batch()
    with torch.no_grad():
        ref = run(lm, methods, ids, mask)
    save_methods(methods, tmp_path / "peft")

    fresh = make_lm()  # the base model; everything trained must come from the files
    with torch.no_grad():
        assert not torch.equal(run(fresh, [], ids, mask), run(lm, [], ids, mask))
    loaded = load_methods(fresh, tmp_path / "peft")
    assert [m.name for m in loaded] == [name for name, _ in specs]
    with torch.no_grad():
        assert torch.equal(run(fresh, loaded, ids, mask), ref)

    # a frozen prefix saves and loads as plain K/V
    methods[0].freeze()
    methods[0].save(tmp_path / "frozen")
    frozen = PeftMethod.from_pretrained(make_lm(), tmp_path / "frozen")
    assert isinstance(frozen.module, FrozenPrefix)
    assert torch.equal(frozen.module.kv(), methods[0].module.kv())


def test_prefix_save_load_and_errors(tmp_path):
    # one on-disk format for every method: the prefix encoder (an ablation) and frozen K/V
    (prefix,) = apply_methods(make_lm(), [("prefix", {"num_prefix": P,
                                                      "use_type_embedding": False})])
    prefix.save(tmp_path / "enc")
    back = PeftMethod.from_pretrained(make_lm(), tmp_path / "enc")
    assert isinstance(back.module, PrefixEncoder) and back.module.type_embedding is None
    assert torch.equal(back.module.kv(), prefix.module.kv())
    kv = prefix.module.kv().detach().clone()
    prefix.freeze()
    prefix.save(tmp_path / "frozen")
    frozen = PeftMethod.from_pretrained(make_lm(), tmp_path / "frozen").module
    assert isinstance(frozen, FrozenPrefix) and torch.equal(frozen.kv(), kv)
    with pytest.raises(FileNotFoundError, match="peft_method.json"):
        PeftMethod.from_pretrained(make_lm(), tmp_path / "missing")

    lm = make_lm()
    (ad,) = apply_methods(lm, [("s_adapter", {"bottleneck_size": 4})])
    ad.save(tmp_path / "ad")
    with pytest.raises(ValueError, match="holds method 's_adapter', not 'p_adapter'"):
        (p_ad,) = apply_methods(make_lm(), [("p_adapter", {"bottleneck_size": 4})])
        p_ad.load(tmp_path / "ad")
    (other,) = apply_methods(make_lm(), [("s_adapter", {"bottleneck_size": 8})])
    with pytest.raises(ValueError, match="shape"):
        other.load(tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="peft_method.json"):
        PeftMethod.from_pretrained(make_lm(), tmp_path / "nothing")


# ------------------------------------------------------------------------------- VLM
def _tiny_vlm():
    try:
        from transformers import SiglipVisionModel

        from vlalign.models.projector import build_projector
        from vlalign.models.vlm import VisionLanguageModel
    except ImportError as err:  # pragma: no cover - depends on another module's progress
        pytest.skip(f"vlalign.models.vlm not importable: {err}")
    torch.manual_seed(0)
    vision = SiglipVisionModel(vision_config(num_hidden_layers=1))  # one layer is enough here
    return VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), make_lm()).eval()


def test_vlm_prefix_lora_training_and_generation():
    vlm = _tiny_vlm()
    from vlalign.models.generation import generate

    prefix, lora = apply_methods(vlm, [("prefix", {"num_prefix": P}), ("lora", {"r": 4})])
    assert not any("lora" in n for n, _ in vlm.vision.named_parameters())  # SigLIP untouched
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    assert not any(p.requires_grad for p in vlm.projector.parameters())
    feats = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    ids, mask = batch(b=2, length=5)
    params = prefix.trainable_parameters() + lora.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        out = vlm(
            input_ids=ids,
            attention_mask=mask,
            labels=ids,
            image_features=feats,
            **forward_kwargs([prefix, lora], 2),
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    prompts = [[5, 6], []]
    inputs = PeftSession([prefix, lora], {}).inference()  # the composed inference inputs
    kw = dict(image_features=feats, max_new_tokens=5, inputs=inputs)
    cached = generate(vlm, prompt_ids=prompts, **kw)
    assert cached == generate(vlm, prompt_ids=prompts, use_cache=False, **kw)
    assert len(generate(vlm, prompt_ids=prompts, num_beams=3, **kw)) == 2
