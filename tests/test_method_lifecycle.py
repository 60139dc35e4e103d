"""A PEFT method is one class plus a registry entry: two toy methods registered here go through
the whole life cycle — attach → training step (LM loss + auxiliary loss) → save → strip →
load_for_inference → generate / evaluate → remove — without a line changed outside their class.

- ``toy_topic_head``: a head on the LM's last hidden states (added to the LM as a child module,
  so removing it matters) trained with an auxiliary loss, plus a diagnostic metric: the shape
  of KLAFT's topic head and auxiliary losses.
- ``toy_memory``: learned key/value slots every attention layer attends to, an input the
  forward needs at generation as in training, with an inference variant ``off``: the shape of
  a method that changes attention or needs inputs at generation (PETAL's experts).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import lm_config, vision_config
from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel
from transformers.cache_utils import DynamicCache

from vlalign.methods.prefix import kv_geometry
from vlalign.methods.registry import (
    PEFT_METHODS,
    PeftMethod,
    get_method,
    owner,
    register,
    text_config,
)
from vlalign.methods.stage import InferenceVariant, attach_peft, load_for_inference
from vlalign.models.generation import generate
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

torch.set_num_threads(1)

HEAD_ATTR = "toy_topic_head"


def topic_of(input_ids: torch.Tensor, n_topics: int) -> torch.Tensor:
    """The toy auxiliary target: a function of each row's first token after ``<bos>``."""
    return input_ids[:, 1] % n_topics


@register("toy_topic_head")
class TopicHead(PeftMethod):
    """A linear classifier on the mean last-layer hidden state of the text positions."""

    defaults = {"n_topics": 3, "weight": 0.5}

    def _attach(self, lm: nn.Module, cfg: dict) -> nn.Module:
        ref = next(lm.parameters())
        head = nn.Linear(text_config(lm).hidden_size, cfg["n_topics"])
        lm.add_module(HEAD_ATTR, head.to(device=ref.device, dtype=ref.dtype))
        self.last_loss: float | None = None
        return head

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        return {f"head.{n}": p for n, p in self.module.named_parameters()}

    def forward_kwargs(self, batch_size: int) -> dict:
        return {"output_hidden_states": True}  # the head reads them

    def extra_loss(self, outputs, batch) -> torch.Tensor:
        text = outputs.hidden_states[:, outputs.num_image_tokens:]
        mask = batch["attention_mask"].to(text.dtype)[..., None]
        pooled = (text * mask).sum(1) / mask.sum(1)
        loss = F.cross_entropy(self.module(pooled), topic_of(batch["input_ids"],
                                                             self.cfg["n_topics"]))
        self.last_loss = float(loss.detach())
        return self.cfg["weight"] * loss

    def extra_metrics(self) -> dict[str, float]:
        return {"weight_norm": self.module.weight.detach().norm().item()}

    def _detach(self) -> None:
        delattr(self.lm, HEAD_ATTR)


class _Memory(nn.Module):
    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__()
        self.kv = nn.Parameter(kv)  # (layers, 2, kv_heads, M, head_dim)


@register("toy_memory")
class KVMemory(PeftMethod):
    """``num_memory`` learned key/value slots in every layer, fed as ``past_key_values``."""

    defaults = {"num_memory": 2, "init_std": 0.5}
    variants = ("off",)

    def _attach(self, lm: nn.Module, cfg: dict) -> nn.Module:
        layers, kv_heads, head_dim = kv_geometry(lm.config)
        g = torch.Generator().manual_seed(7)
        kv = cfg["init_std"] * torch.randn(layers, 2, kv_heads, cfg["num_memory"], head_dim,
                                           generator=g)
        return _Memory(kv).to(next(lm.parameters()).device)

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        return {"memory.kv": self.module.kv}

    def _cache(self, batch_size: int) -> DynamicCache:
        kv = self.module.kv.to(next(self.lm.parameters()).dtype)
        kv = kv.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)
        return DynamicCache([(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])])

    def forward_kwargs(self, batch_size: int) -> dict:
        return {"past_key_values": self._cache(batch_size)}

    def inference_state(self, batch_size, variant="normal", generator=None) -> dict:
        return {} if variant == "off" else {"past_key_values": self._cache(batch_size)}


@pytest.fixture(scope="module", autouse=True)
def _unregister_at_the_end():
    yield
    for name in ("toy_topic_head", "toy_memory"):
        PEFT_METHODS.pop(name, None)


TOY = {"toy_topic_head": {"lr": 5e-2, "n_topics": 3}, "toy_memory": {"lr": 5e-2}}


def tiny_vlm() -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = SiglipVisionModel(vision_config())
    lm = Qwen2ForCausalLM(copy.deepcopy(lm_config()))
    return VisionLanguageModel(vision, build_projector("mlp2x_gelu", 64, 64), lm)


def toy_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
            "image_features": torch.randn(4, 16, 64, generator=g)}


def gen(model, feats, **kw) -> list[list[int]]:
    return generate(model, prompt_ids=[[5], [6, 7], [], [9]], image_features=feats,
                    max_new_tokens=6, eos_token_id=None, **kw)


def test_resolve_config_contract_holds_for_a_plugged_in_method():
    assert get_method("toy_memory") is KVMemory
    assert get_method("toy_memory").resolve_config({"num_memory": 4})["init_std"] == 0.5
    with pytest.raises(ValueError, match=r"'toy_memory': unknown config keys \['slots'\]"):
        get_method("toy_memory").resolve_config({"slots": 4})


def test_toy_methods_through_the_whole_life_cycle(tmp_path: Path):
    model = tiny_vlm()
    base_keys = set(model.state_dict())
    feats = toy_batch()["image_features"]
    model.eval()
    base_tokens = gen(model, feats)

    # attach: the stage's peft block, as the training hook reads it (the base frozen, as by a
    # stage with every module lr 0)
    model.requires_grad_(False)
    session = attach_peft(model, copy.deepcopy(TOY), None)
    assert [m.name for m in session.methods] == ["toy_topic_head", "toy_memory"]
    assert set(session.groups) == {"peft.toy_topic_head", "peft.toy_memory"}
    assert hasattr(model.lm, HEAD_ATTR)

    # a training step: LM loss + the head's auxiliary loss, through the session only
    model.train()
    batch = toy_batch()
    out = model(**batch, **session.forward_kwargs(4))
    assert out.hidden_states is not None  # asked for by the head's forward_kwargs
    aux = session.extra_loss(out, batch)
    head = session.method("toy_topic_head")
    assert aux is not None and aux.item() == pytest.approx(0.5 * head.last_loss)
    loss = session.total_loss(out, batch)
    assert loss.item() == pytest.approx(out.loss.item() + aux.item())
    params = [p for ps, _ in session.groups.values() for p in ps]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    loss.backward()
    for m in session.methods:  # both get gradients: the head from the loss it added
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in m.trainable_parameters()), m.name
    assert all(p.grad is None for p in model.parameters() if owner(p) is None)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    assert set(session.extra_metrics()) == {"toy_topic_head.weight_norm"}

    # save the methods, strip them, save the clean base model (what train_stage does)
    model.eval()
    with torch.no_grad():
        trained_logits = model(**batch, **session.forward_kwargs(4)).logits
    trained_tokens = gen(model, feats, inputs=session.inference())
    session.save(tmp_path / "peft")
    session.strip()
    assert not hasattr(model.lm, HEAD_ATTR) and set(model.state_dict()) == base_keys
    model.save_pretrained(tmp_path / "model")

    # load for inference: the registry re-attaches both, frozen, with their trained weights
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "model").eval()
    assert set(loaded.state_dict()) == base_keys  # the saved model carries no method
    inference = load_for_inference(loaded, tmp_path)
    assert [m.name for m in inference.methods] == ["toy_topic_head", "toy_memory"]
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        logits = loaded(**batch, **inference.forward_kwargs(4)).logits
    assert torch.equal(logits, trained_logits)

    # generate: the memory is an input of every generation forward, the session supplies it
    assert inference.variants() == [InferenceVariant("toy_memory", "off")]
    tokens = gen(loaded, feats, inputs=inference.inference())
    assert tokens == trained_tokens
    assert tokens == gen(loaded, feats, inputs=inference.inference(), use_cache=False)
    assert tokens != base_tokens  # the memory matters ...
    assert gen(loaded, feats, inputs=inference.inference("off")) == base_tokens  # ... "off"

    # remove: each method undoes its own attachment, the base model is back
    inference.strip()
    assert not hasattr(loaded.lm, HEAD_ATTR) and set(loaded.state_dict()) == base_keys
    assert all(owner(p) is None for p in loaded.parameters())
    assert gen(loaded, feats) == base_tokens


@pytest.mark.slow
def test_toy_methods_in_the_real_stage_and_evaluation(tmp_path: Path):
    """The same methods as a stage's ``peft:`` block of the real ``train_stage``, evaluated by
    the evaluate rule's job: their variant and metric reach metrics.json, no caller names
    them."""
    from peft_fixtures import build_peft_world, saved_model, saved_peft, stage_settings, train

    from vlalign.eval.job import EvalJob, evaluate_job, load_stage

    world = build_peft_world(tmp_path / "world")
    base, _ = train(world, "stage1", stage_settings("world", "recaption", {"projector": 1e-2},
                                                    max_steps=1))
    stage_dir, result = train(world, "ft_toy", stage_settings(peft=copy.deepcopy(TOY)), base)
    assert sorted(result["peft"]) == ["toy_memory", "toy_topic_head"]
    assert set(saved_peft(stage_dir)) == {"toy_memory", "toy_topic_head"}
    # the saved model is the stripped one: the head is not in it
    assert set(saved_model(stage_dir)) == set(saved_model(base))

    ev = {"task": "vqa", "num_beams": 1, "max_new_tokens": 4, "batch_size": 8, "spice": "off",
          "rank_samples": 4, "rank_text_tokens": 8, "prefix_variants": ["normal", "off"]}
    params = {"run": "toy_s0", "seed": 0, "datasets": ["world_target"], "eval": ev,
              "config": {"stages": [{"text": "captions", "max_length": 48}]}}
    job = EvalJob.from_params(params, data=[world.data["world_target"]],
                              tokenizer=world.tokenizer, vision=world.vision,
                              out_dir=tmp_path / "run")
    metrics = evaluate_job(job, load_stage(stage_dir, device="cpu"))
    stages = {r["stage"] for r in metrics["records"]}
    assert stages == {"ft_toy", "ft_toy@toy_memory_off"}
    assert "toy_topic_head.weight_norm" in {r["metric"] for r in metrics["records"]}
    off = [r for r in metrics["records"] if r["stage"] == "ft_toy@toy_memory_off"]
    assert all(r["decoding"]["toy_memory_variant"] == "off" for r in off)
    assert (tmp_path / "run" / "variant-off" / "predictions.jsonl").is_file()
