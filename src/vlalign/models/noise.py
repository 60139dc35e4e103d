"""Stage0 input-token corruption (seed 002 §3.4, Algorithm 1 ``add_noise_to_input``).

What the paper does: with fully bidirectional attention a text position can see the very token it
must predict, so the model could learn the identity. Algorithm 1 therefore applies
``text ← add_noise_to_input(text)`` before the text embedding; the prose says it "masks 20 % of
the input tokens" and the loss is cross-entropy against the clean ``label_text``. The paper gives
no further detail (no mask token, selection rule or treatment of special tokens).

What we do (:func:`corrupt_tokens`): BERT-style random replacement, chosen because a frozen
decoder LM has no ``[MASK]`` embedding.

* Eligible positions in a row: ``attention_mask == 1`` and token id not in ``protected_ids``
  (e.g. BOS/EOS/pad/image-marker ids). Padding and protected ids are never touched.
* Per row exactly ``k = floor(fraction · n_eligible + 0.5)`` positions are corrupted (round half
  up), chosen uniformly without replacement among the eligible positions.
* Each chosen token is replaced by a token drawn uniformly from
  ``{0..vocab_size-1} \\ protected_ids \\ {original token}``, so every chosen position really
  changes and no special token is ever introduced.
* Everything is drawn from ``generator`` (CPU), so a seeded generator gives identical results;
  the training loop seeds it per micro-batch and process (:func:`noise_seed`).
* Only the *input* ids are corrupted; the caller keeps the clean ids as targets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# far above seed·7919 + step·131 of any stage: no two (process, step) pairs share a seed
_PROCESS_STRIDE = 1_000_000_007


def noise_seed(seed: int, step: int, micro: int, process_index: int = 0) -> int:
    """Seed of the stage0 noise of one micro-batch, a pure function of (stage seed, optimizer
    step, micro-batch, process) so resumption is exact. Each data-parallel rank
    (``accelerator.process_index``) draws its own noise; rank 0 keeps the single-process
    value."""
    return seed * 7_919 + step * 131 + micro + process_index * _PROCESS_STRIDE


def num_corrupted(n_eligible: torch.Tensor, fraction: float) -> torch.Tensor:
    """``floor(fraction · n + 0.5)`` per row (round half up; Python's round() would be banker's)."""
    return torch.floor(n_eligible.to(torch.float64) * fraction + 0.5).long()


def corrupt_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    fraction: float,
    vocab_size: int,
    generator: torch.Generator | None = None,
    protected_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Return a copy of ``input_ids`` (B, L) with ``fraction`` of each row's eligible tokens
    replaced by random vocabulary tokens (rule in the module docstring)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noise fraction must be in [0, 1], got {fraction}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if fraction == 0.0 or input_ids.numel() == 0:
        return input_ids.clone()

    protected = torch.tensor(sorted(set(int(i) for i in protected_ids)), dtype=torch.long)
    device = input_ids.device
    ids = input_ids.detach().cpu()
    eligible = attention_mask.detach().cpu().bool() & ~torch.isin(ids, protected)
    allowed = torch.arange(vocab_size, dtype=torch.long)
    allowed = allowed[~torch.isin(allowed, protected)]
    if allowed.numel() < 2:
        raise ValueError(
            f"vocab_size={vocab_size} with {protected.numel()} protected ids leaves fewer than "
            "2 replacement tokens"
        )
    bad = eligible & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        row, col = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"input_ids[{row}, {col}] = {int(ids[row, col])} is outside the vocabulary "
            f"[0, {vocab_size})"
        )

    # Choose k eligible positions per row: random scores, ineligible ones pushed past the end.
    k = num_corrupted(eligible.sum(1), fraction)
    scores = torch.rand(ids.shape, generator=generator)
    scores = scores.masked_fill(~eligible, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    chosen = eligible & (ranks < k[:, None])

    # Replacement uniform over allowed \ {original}: shift the original's index in `allowed`
    # by a random non-zero offset modulo |allowed|.
    n_allowed = allowed.numel()
    offsets = torch.randint(1, n_allowed, ids.shape, generator=generator)
    pos = torch.searchsorted(allowed, ids.clamp(0, vocab_size - 1))
    replacement = allowed[(pos + offsets) % n_allowed]
    return torch.where(chosen, replacement, ids).to(device)
