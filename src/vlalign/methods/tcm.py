"""KLAFT's topic-mixture head (TCM, seed 000 §3.2, Eq. 3–6 and Eq. 10) as a PEFT method ``tcm``.

The paper: a prior over topics ``P(z | x_<t) = softmax(LayerNorm(h_t) W_TZ)`` (Eq. 4), a token
distribution per topic ``P(x | x_<t, z) = softmax(LMH(h'_z))`` (Eq. 5) with ``h'_0 = h`` (the
residual topic) and for ``z > 0`` a shift of ``h`` by a topic vector ``g_z``; the LM is trained
on the mixture ``L_TCM = −Σ_t log Σ_z P(x_t | x_<t, z) P(z | x_<t)`` (Eq. 3) and the topic
vectors are pulled towards the hidden states by ``L_TTM = Σ_t ||h_t − h̃_t||²`` (Eq. 6). The
share of generated tokens whose topic is not the residual one is ``r_TCM`` (Eq. 10).

Resolutions (docs/klaft/tcm.md; /work/shared/notes/klaft-petal-reading.md), each a **choice**:

- *K* (choice): ``num_topics`` counts the non-residual topics; the prior is over K + 1 topics
  (``W_TZ ∈ R^{d×(K+1)}``, Eq. 3 sums z = 1..K but Eq. 5 uses z = 0). ``num_topics: 0`` is TCM
  off: nothing is attached and the logits are the plain head's, bit for bit.
- *h* (choice): ``h_t`` is the input of the LM head (the LM's final, post-norm hidden state).
- *Shift* (Eq. 5, ``shift``): ``add`` (default) ``(1−ω) h + ω g_z``; ``mul`` ``h ⊙ g_z``;
  ``affine`` ``h W_z + b_z``; ω = ``omega`` (default 0.2) is used by ``add`` only.
- *Where the mixture lives* (choice): a forward hook on the LM's output head
  (``get_output_embeddings()``) replaces its output by the log-mixture
  ``log Σ_z P(z)·softmax(LMH(h'_z))`` (float32, normalised log-probabilities). Every caller of
  the head — ``VisionLanguageModel.forward`` (its ``logits_to_keep`` and packed paths), HF
  ``generate`` (greedy, beam, cached), the no-cache loop, the held-out scoring — gets the
  mixture, so the VLM's cross-entropy on it *is* L_TCM and generation decodes from it. A hook
  rather than a replaced module keeps the head object, its tied weight and its parameter
  names untouched; :meth:`remove` takes the hook out (the plain head again, exactly).
- *Memory* (choice): no ``(B, T, K+1, V)`` tensor. The forward runs topic by topic with a
  running logsumexp; in training a custom autograd function (:class:`_TopicMixture`) saves only
  h, the log-prior, the output and the (already resident) parameters, and recomputes each
  topic's log-softmax in backward: with upstream g and the posterior
  ``w_z = exp(log π_z + log p_z − out)``, ``∂L/∂log p_z = g ⊙ w_z`` and
  ``∂L/∂log π_z = Σ_v g_v w_{z,v}``.
- *TTM* (Eq. 6; choice): the expectation under the prior over z > 0 of ``||h − h'_z||²``:
  ``ω² Σ_{z>0} P(z) ||h − g_z||²`` for ``add``, the same expectation of ``||h − h'_z||²`` for
  ``mul`` and ``affine``; token dropout ``ttm_token_dropout`` (p = 0.1) on which tokens enter;
  mean over the supervised text positions (labels ≠ −100 and attention mask 1) that the head
  saw; weighted by ``lambda_ttm`` (0.1, Eq. 9). The hook stashes h and the prior of the last
  training-mode forward; :meth:`TopicMixtureMethod.extra_loss` reads the positions from the
  batch's ``labels`` / ``attention_mask`` and returns ``{"ttm": λ·L_TTM}`` (log column
  ``tcm.ttm``). The dropout mask is drawn from torch's global RNG (seeded and checkpointed by
  the trainer). The prior weights the expectation but is not trained by it
  (``ttm_trains_prior: false``, choice): the residual topic has no TTM term, so through the
  prior L_TTM is lowest with all mass on z = 0, and on the default DAG it pushed the prior
  there within 36 steps (mass 0.96 on z = 0, r_TCM 0; docs/klaft.md). L_TTM trains the topic
  vectors (and, through h, what is upstream of the head); L_TCM trains the prior.
- *r_TCM* (Eq. 10; choice): after generation, one teacher-forced forward over
  ``[image | prompt | generated caption]`` (deterministic; the cached generation computes the
  same hidden states up to float rounding) records the prior at each position that generated a
  token; the topic of the token is its argmax; r_TCM = the mean over captions of the fraction
  of generated tokens (eos excluded; empty captions skipped) with topic ≠ 0. Recorded by the
  generic :meth:`PeftMethod.generation_stats` hook (metric ``r_TCM`` for captions, ``r_TCM_vqa``
  for VQA answers; the topics of every generated token go into ``predictions.jsonl`` as
  ``tcm.topics``). K = 0 records nothing.
- *Init* (choice): LayerNorm weight 1 / bias 0; ``W_TZ ~ N(0, 0.02²)`` (no bias, Eq. 4), so the
  prior starts near uniform with random argmaxes: r_TCM at step 0 is ≈ K/(K+1), not 0.
  ``add``: ``g_z ~ N(0, 0.02²)``; ``mul``: ``g_z = 1 + N(0, 0.02²)``; ``affine``: ``W_z = I``,
  ``b_z ~ N(0, 0.02²)``. At init each topic is close to the plain head (``add``: a temperature
  ``1−ω``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.registry import GeneratedBatch, GenerationStats, PeftMethod, register

SHIFTS = ("add", "mul", "affine")
INIT_STD = 0.02


class TopicHead(nn.Module):
    """The prior ``LayerNorm + W_TZ`` (Eq. 4) and the topic shifts of Eq. 5 for ``num_topics``
    = K non-residual topics over hidden width ``dim``."""

    def __init__(self, dim: int, num_topics: int, shift: str = "add", omega: float = 0.2):
        super().__init__()
        check_topic_config(num_topics, shift, omega)
        if num_topics < 1:
            raise ValueError("TopicHead needs num_topics >= 1 (0 means TCM off: no head)")
        self.num_topics, self.shift, self.omega = int(num_topics), shift, float(omega)
        self.norm = nn.LayerNorm(dim)
        self.prior = nn.Linear(dim, num_topics + 1, bias=False)  # W_TZ
        nn.init.normal_(self.prior.weight, std=INIT_STD)
        if shift == "affine":
            self.topic_weight = nn.Parameter(torch.eye(dim).repeat(num_topics, 1, 1))
            self.topic_bias = nn.Parameter(torch.randn(num_topics, dim) * INIT_STD)
        else:
            init = 1.0 if shift == "mul" else 0.0
            self.topic_vectors = nn.Parameter(init + torch.randn(num_topics, dim) * INIT_STD)

    def shift_tensors(self) -> tuple[torch.Tensor, ...]:
        if self.shift == "affine":
            return (self.topic_weight, self.topic_bias)
        return (self.topic_vectors,)

    def log_prior(self, h: torch.Tensor) -> torch.Tensor:
        """``log P(z | x_<t)`` ``(..., K+1)`` in float32 (Eq. 4)."""
        w, b = self.norm.weight.float(), self.norm.bias.float()
        normed = F.layer_norm(h.float(), (h.shape[-1],), w, b, self.norm.eps)
        return torch.log_softmax(normed @ self.prior.weight.float().t(), dim=-1)

    def shifted(self, h: torch.Tensor, z: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``h'_z`` (Eq. 5) from the shift ``tensors`` (those of :meth:`shift_tensors`)."""
        return shift_hidden(h, z, self.shift, self.omega, tensors)

    def ttm_distance(self, h: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """``Σ_{z>0} P(z) ||h − h'_z||²`` per row of ``h`` ``(M, d)`` (float32, Eq. 6 under the
        prior; for ``add`` this is ``ω² Σ_{z>0} P(z) ||h − g_z||²``)."""
        tensors = self.shift_tensors()
        hf = h.float()
        dist = torch.stack(
            [
                (hf - shift_hidden(hf, z, self.shift, self.omega, [t.float() for t in tensors]))
                .square()
                .sum(-1)
                for z in range(1, self.num_topics + 1)
            ],
            dim=-1,
        )  # (M, K)
        return (log_prior[..., 1:].exp() * dist).sum(-1)


def check_topic_config(num_topics: Any, shift: Any, omega: Any) -> None:
    """ValueError naming the key for a K < 0, an unknown shift or ω outside [0, 1]."""
    if isinstance(num_topics, bool) or not isinstance(num_topics, int) or num_topics < 0:
        raise ValueError(
            f"tcm: num_topics must be an integer >= 0 (0: TCM off), got {num_topics!r}"
        )
    if shift not in SHIFTS:
        raise ValueError(f"tcm: shift {shift!r} is not one of {list(SHIFTS)}")
    if isinstance(omega, bool) or not isinstance(omega, int | float) or not 0 <= omega <= 1:
        raise ValueError(f"tcm: omega must be a number in [0, 1], got {omega!r}")


def shift_hidden(
    h: torch.Tensor, z: int, shift: str, omega: float, tensors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``h'_z``: ``h`` for the residual topic z = 0, else the shift of Eq. 5 (topic ``z − 1``
    of ``tensors``)."""
    if z == 0:
        return h
    if shift == "add":
        return (1 - omega) * h + omega * tensors[0][z - 1].to(h.dtype)
    if shift == "mul":
        return h * tensors[0][z - 1].to(h.dtype)
    weight, bias = tensors
    return h @ weight[z - 1].to(h.dtype) + bias[z - 1].to(h.dtype)


class _Spec:
    """What the autograd function needs besides tensors: the topic head (the LM head is a
    ``Linear``: its weight and optional bias are tensors of the function)."""

    def __init__(self, topics: TopicHead):
        self.topics = topics
        self.n_shift = len(topics.shift_tensors())

    def logp(self, h, z, shift_tensors, head_tensors) -> torch.Tensor:
        """``log softmax(LMH(h'_z))`` (float32). ``F.linear``, not the head module: calling
        the module would run this method's own hook on it again."""
        hz = self.topics.shifted(h, z, shift_tensors)
        return torch.log_softmax(F.linear(hz, *head_tensors).float(), dim=-1)


def mixture_no_grad(
    spec: _Spec,
    h: torch.Tensor,
    log_prior: torch.Tensor,
    shift_tensors: Sequence[torch.Tensor],
    head_tensors: Sequence[torch.Tensor],
    first_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log Σ_z P(z) softmax(LMH(h'_z))`` ``(..., V)`` float32, one topic at a time (running
    logsumexp; never a ``(..., K+1, V)`` tensor). ``first_logits``: the head's output on h
    (topic 0), if already computed."""
    with torch.no_grad():
        out = None
        for z in range(spec.topics.num_topics + 1):
            if z == 0 and first_logits is not None:
                logp = torch.log_softmax(first_logits.float(), dim=-1)
            else:
                logp = spec.logp(h, z, shift_tensors, head_tensors)
            term = logp.add_(log_prior[..., z : z + 1])
            out = term if out is None else torch.logaddexp(out, term, out=out)
        assert out is not None
        return out


class _TopicMixture(torch.autograd.Function):
    """The log-mixture with a recomputing backward (module doc, *Memory*)."""

    @staticmethod
    def forward(ctx, spec: _Spec, h, log_prior, *tensors):
        shift_t, head_t = tensors[: spec.n_shift], tensors[spec.n_shift :]
        out = mixture_no_grad(spec, h, log_prior, shift_t, head_t)
        ctx.spec = spec
        # backward recomputes under the forward's autocast state (the same logp, so Σ_z w_z = 1)
        dev = h.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(h, log_prior, out, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        spec: _Spec = ctx.spec
        h, log_prior, out, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]  # h, log_prior, *tensors
        flags = [needs[0], *needs[2:]]
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip([h, *tensors], flags)]
        wanted = [t for t in leaves if t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        d_log_prior = torch.empty_like(log_prior) if needs[1] else None
        grad_out = grad_out.float()
        for z in range(spec.topics.num_topics + 1):
            shift_t, head_t = leaves[1 : 1 + spec.n_shift], leaves[1 + spec.n_shift :]
            dev, enabled, dtype = ctx.amp
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                logp = spec.logp(leaves[0], z, shift_t, head_t)
            with torch.no_grad():
                gw = (logp.detach() + log_prior[..., z : z + 1] - out).exp_().mul_(grad_out)
                if d_log_prior is not None:
                    d_log_prior[..., z] = gw.sum(-1)
            if wanted and logp.requires_grad:
                parts = torch.autograd.grad(logp, wanted, gw, allow_unused=True)
                it = iter(parts)
                for i, t in enumerate(leaves):
                    if t.requires_grad:
                        g = next(it)
                        if g is not None:
                            grads[i] = g if grads[i] is None else grads[i] + g
            del logp, gw
        return (None, grads[0], d_log_prior, *grads[1:])


def topic_mixture(
    topics: TopicHead, head: nn.Linear, h: torch.Tensor, first_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-mixture (..., V) float32, log-prior (..., K+1))`` of the LM ``head`` on hidden
    states ``h`` (Eq. 3–5). With grad enabled, the recomputing autograd function."""
    params = [head.weight] if head.bias is None else [head.weight, head.bias]
    spec = _Spec(topics)
    log_prior = topics.log_prior(h)
    tensors = (*topics.shift_tensors(), *params)
    if torch.is_grad_enabled() and (
        h.requires_grad or log_prior.requires_grad or any(t.requires_grad for t in tensors)
    ):
        return _TopicMixture.apply(spec, h, log_prior, *tensors), log_prior
    shift_t, head_t = tensors[: spec.n_shift], tensors[spec.n_shift :]
    return mixture_no_grad(spec, h, log_prior, shift_t, head_t, first_logits), log_prior


@register("tcm")
class TopicMixtureMethod(PeftMethod):
    """KLAFT's topic-mixture head (seed 000 Eq. 3–6, 10; module doc): a :class:`TopicHead`
    registered on the model (``model.tcm``, it follows ``.to()`` / ``.train()``) and a forward
    hook on the LM's output head returning the log-mixture. ``num_topics: 0`` attaches nothing.
    """

    defaults = {
        "num_topics": 10,  # K non-residual topics (0: TCM off), seed 000 Table 4
        "omega": 0.2,  # ω of the add shift (Eq. 5)
        "shift": "add",  # add | mul | affine (Eq. 5)
        "lambda_ttm": 0.1,  # λ_TTM (Eq. 9)
        "ttm_token_dropout": 0.1,  # token-level dropout of L_TTM (choice)
        # whether L_TTM's gradient reaches the prior it is weighted by (module doc, *TTM*)
        "ttm_trains_prior": False,
    }

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        out = super().resolve_config(cfg)
        check_topic_config(out["num_topics"], out["shift"], out["omega"])
        for key in ("lambda_ttm", "ttm_token_dropout"):
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"tcm: {key} must be a number >= 0, got {v!r}")
        if not isinstance(out["ttm_trains_prior"], bool):
            raise ValueError(
                f"tcm: ttm_trains_prior must be true or false, got {out['ttm_trains_prior']!r}"
            )
        if out["ttm_token_dropout"] >= 1:
            raise ValueError(
                f"tcm: ttm_token_dropout must be < 1 (1 drops every token), got "
                f"{out['ttm_token_dropout']!r}"
            )
        return out

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        model = self.model
        assert model is not None
        self._handle: RemovableHandle | None = None
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None
        self._record = False  # set while generation_stats' forward records the prior
        self._recorded: torch.Tensor | None = None
        if hasattr(model, self.name):
            raise ValueError(f"this model already holds a {self.name!r} module; apply it once")
        k = int(cfg["num_topics"])
        if k == 0:  # TCM off: the plain head, nothing to train
            return nn.Module()
        head = lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"PEFT method {self.name!r}: the output head of {type(lm).__name__} is "
                f"{type(head).__name__}, not a Linear (the topic mixture recomputes it as one)"
            )
        ref = head.weight
        topics = TopicHead(head.in_features, k, cfg["shift"], float(cfg["omega"]))
        topics = topics.to(device=ref.device, dtype=ref.dtype).train(model.training)
        model.add_module(self.name, topics)
        self._handle = head.register_forward_hook(self._hook(topics))
        return topics

    def _hook(self, topics: TopicHead):
        def hook(module, args, output):
            h = args[0]
            out, log_prior = topic_mixture(topics, module, h, first_logits=output)
            # for L_TTM in extra_loss; only while TCM trains (a frozen TCM has no extra loss, and
            # the stash would keep this forward's graph alive into the next one)
            if topics.training and topics.prior.weight.requires_grad:
                self._stash = (h, log_prior)
            if self._record:
                self._recorded = log_prior.detach()
            return out

        return hook

    @property
    def topics(self) -> TopicHead | None:
        return self.module if isinstance(self.module, TopicHead) else None

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def extra_loss(self, outputs: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """``{"ttm": λ_TTM · L_TTM}`` of the last training forward (Eq. 6, module doc), on the
        supervised text positions of ``batch`` that enter after token dropout; None if K = 0."""
        topics = self.topics
        if topics is None:
            return None
        stash, self._stash = self._stash, None
        if stash is None:
            raise RuntimeError(
                f"PEFT method {self.name!r}: extra_loss without a training-mode forward before it"
            )
        h, log_prior = stash
        labels, mask = batch["labels"], batch.get("attention_mask")
        b, t = labels.shape
        if h.shape[:2] != (b, t + 1):  # the VLM keeps the last image position + T text
            raise RuntimeError(
                f"PEFT method {self.name!r}: the head saw hidden states {tuple(h.shape[:2])}, "
                f"this batch needs ({b}, {t + 1})"
            )
        # position t of h predicts text token t (label_logits); the last column has no target
        sup = labels.to(h.device) != -100
        if mask is not None:
            sup &= mask.to(h.device) != 0
        p = float(self.cfg["ttm_token_dropout"])
        if p > 0:
            sup &= torch.rand(sup.shape, device=h.device) >= p
        if not bool(sup.any()):
            return {"ttm": h.sum() * 0.0}
        log_prior = log_prior[:, :t][sup]
        if not self.cfg["ttm_trains_prior"]:
            log_prior = log_prior.detach()
        dist = topics.ttm_distance(h[:, :t][sup], log_prior)
        return {"ttm": float(self.cfg["lambda_ttm"]) * dist.mean()}

    # -- evaluation ---------------------------------------------------------------------
    def token_topics(self, model: nn.Module, batch: GeneratedBatch) -> list[list[int]]:
        """The topic (argmax of the prior, Eq. 10) of every generated token of ``batch``, from
        one teacher-forced forward over ``[image | prompt | generated]`` (module doc)."""
        from vlalign.models.generation import inference_cache

        rows = [list(p) + list(g) for p, g in zip(batch.prompts, batch.generated)]
        width = max(1, max(len(r) for r in rows))
        device = batch.image_features.device
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[i, : len(r)] = 1
        mode = batch.mask_mode or getattr(model, "mask_mode", "prefix")
        # cached generation treats a bidirectional image+text block as prefix (generation doc)
        mode = "prefix" if mode == "bidirectional" else mode
        was_training = model.training
        model.eval()
        self._record, self._recorded = True, None
        try:
            with torch.no_grad():
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    image_features=batch.image_features,
                    mask_mode=mode,
                    past_key_values=inference_cache(batch.inputs, len(rows)),
                )
            prior = self._recorded
        finally:
            self._record, self._recorded = False, None
            model.train(was_training)
        assert prior is not None and prior.shape[1] == width + 1
        topic = prior.argmax(-1).tolist()  # (B, T+1): position j predicts text token j
        return [
            topic[i][len(p) : len(p) + len(g)]
            for i, (p, g) in enumerate(zip(batch.prompts, batch.generated))
        ]

    def generation_stats(self, model: nn.Module, batch: GeneratedBatch) -> GenerationStats | None:
        """r_TCM (Eq. 10) per generated row (``r_TCM`` for captions, ``r_TCM_vqa`` for VQA;
        None for an empty generation) and each token's topic (``topics``); None if K = 0."""
        if self.topics is None:
            return None
        topics = self.token_topics(model, batch)
        share = [sum(t != 0 for t in row) / len(row) if row else None for row in topics]
        name = "r_TCM" if batch.task == "caption" else f"r_TCM_{batch.task}"
        return GenerationStats(metrics={name: share}, details={"topics": topics})

    def _detach(self) -> None:
        """Hook and module out: the plain LM head again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._stash = self._recorded = None
        if self.topics is not None and getattr(self.model, self.name, None) is self.module:
            delattr(self.model, self.name)
