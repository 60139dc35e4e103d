"""Batched generation for :class:`~vlalign.models.vlm.VisionLanguageModel` (greedy and beam).

Cached path (``use_cache=True``; the "D2" recipe of the transformers-5 notes):

1. ``cache = inputs(B)["past_key_values"]`` (the P positions of the PEFT methods' inference
   inputs, e.g. a prefix: ``PeftSession.inference``) or an empty ``DynamicCache``.
2. Prefill the image block into the cache under the run's mask (image tokens attend to each other
   bidirectionally under ``prefix``), position ids ``P..P+N-1``.
3. Drop the last image position from the cache again and hand it to ``lm.generate`` as the first
   uncached token. Its query sees every image token under every mode, so its recomputed K/V
   equal the prefilled ones; this makes empty prompts work (the first text token is predicted
   from the last image position, as in training) without a pad ever being the last position.
4. ``lm.generate(inputs_embeds=[placeholders (P+N-1) | left pads | last image | prompt],
   attention_mask=2D, past_key_values=cache)``: generate skips the cached positions and derives
   position ids from ``cumsum(attention_mask)`` (= the training positions). For beams the
   cache is expanded first (``batch_repeat_interleave``), generate does not do it.

No-cache path (``use_cache=False``, greedy only): the ground truth. Every step re-runs
:meth:`VisionLanguageModel.forward` on ``[image | prompt + generated so far]`` (right-padded,
exactly the training layout, positions and mask) and takes the argmax at each row's last real
position.

``bidirectional`` (stage0) cannot be reproduced by a KV cache: already cached positions would
have to see later tokens. The cached path therefore treats the image as the bidirectional
block, i.e. generates exactly like ``prefix``; the no-cache path recomputes with the true
all-to-all mask, so the two legitimately differ for that mode only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache

from vlalign.models.masks import build_attention_mask, check_mode
from vlalign.models.modality import image_end, set_image_end
from vlalign.models.vlm import VisionLanguageModel, position_ids_from_mask

# ``B → inputs of one forward over B rows`` (``PeftSession.inference(variant, seed)``); today
# the optional ``past_key_values``: a fresh cache of P positions, which the forward mutates
InputsFn = Callable[[int], Mapping[str, Any]]


def inference_cache(inputs: InputsFn | None, batch: int) -> Cache | None:
    """The ``past_key_values`` of ``inputs(batch)`` (None without inputs or cache). Generation
    and the scoring forwards hand only a cache to the model: another key is an error, not
    silently dropped."""
    if inputs is None:
        return None
    kwargs = dict(inputs(batch))
    cache = kwargs.pop("past_key_values", None)
    if kwargs:
        raise ValueError(
            f"inference inputs {sorted(kwargs)}: generation and scoring pass only "
            "past_key_values to the model"
        )
    return cache


def _cut(tokens: Sequence[int], eos_token_id: int | None) -> list[int]:
    """Generated ids up to (excluding) the first eos."""
    tokens = [int(t) for t in tokens]
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id)]
    return tokens


def _check_prompts(prompt_ids: Sequence[Sequence[int]] | None, batch: int) -> list[list[int]]:
    if prompt_ids is None:
        raise ValueError("prompt_ids is required (use [[]] * batch for no prompt)")
    prompts = [list(map(int, p)) for p in prompt_ids]
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for {batch} images")
    return prompts


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    pixel_values: torch.Tensor | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    *,
    image_features: torch.Tensor | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    inputs: InputsFn | None = None,
    mask_mode: str | None = None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Generate continuations of ``prompt_ids[i]`` (may be empty) after image ``i``.

    Returns one list of new token ids per image: the prompt is not included, generation stops
    at the first ``eos_token_id`` and the eos itself is not included. ``inputs(B)`` gives the
    PEFT methods' inputs of each forward (:data:`InputsFn`; a *fresh* cache every call).
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(
            f"need num_beams >= 1 and max_new_tokens >= 1, got {num_beams}, {max_new_tokens}"
        )
    if not use_cache and num_beams != 1:
        raise ValueError("use_cache=False is the greedy ground-truth loop; use num_beams=1")
    mode = check_mode(mask_mode or model.mask_mode)
    if image_features is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values or image_features")
        image_features = model.encode_images(pixel_values)
    elif pixel_values is not None:
        raise ValueError("pass exactly one of pixel_values or image_features")
    prompts = _check_prompts(prompt_ids, image_features.shape[0])

    was_training = model.training
    end = image_end(model.lm)  # the cached path records the image span: put it back after
    model.eval()
    try:
        run = _generate_cached if use_cache else _generate_nocache
        out = run(
            model,
            image_features,
            prompts,
            mode,
            num_beams,
            max_new_tokens,
            eos_token_id,
            pad_token_id,
            inputs,
            length_penalty,
        )
    finally:
        model.train(was_training)
        set_image_end(model.lm, end)
    return [_cut(row, eos_token_id) for row in out]


def _generate_cached(
    model: VisionLanguageModel,
    image_features: torch.Tensor,
    prompts: list[list[int]],
    mode: str,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    inputs: InputsFn | None,
    length_penalty: float,
) -> list[list[int]]:
    lm = model.lm
    img = model.embed_images(image_features=image_features)  # (B, N, H)
    batch, n_img, hidden = img.shape
    device = img.device

    cache = inference_cache(inputs, batch)
    if cache is None:
        cache = DynamicCache(config=lm.config)
    p = cache.get_seq_length()
    # positions < P + N are the image tokens of the prefill and of every generate step (the
    # re-fed last image token sits at P + N - 1, prompt and new tokens at >= P + N)
    set_image_end(lm, p + n_img)
    # 1) prefill the image block under the run's mask (bidirectional → image-as-block = prefix)
    prefill_mode = "prefix" if mode == "bidirectional" else mode
    ones = torch.ones(batch, n_img, dtype=torch.long, device=device)
    mask = build_attention_mask(
        lm.config, img, ones, ones.bool(), prefill_mode, cache if p else None
    )
    lm(
        inputs_embeds=img,
        attention_mask=mask,
        position_ids=position_ids_from_mask(ones, p),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.crop(-1)  # the last image token is re-fed as the first uncached input (module doc)

    # 2) [placeholders | left pads | last image | prompt]: the last image token sits right before
    #    each row's prompt, after that row's pads, so a real token is always the last position.
    width = max(len(q) for q in prompts)
    rows_emb, rows_mask = [], []
    for i, q in enumerate(prompts):
        n_pad = width - len(q)
        toks = torch.tensor([pad_token_id] * n_pad + q, dtype=torch.long, device=device)
        text = model.embed_text(toks)
        rows_emb.append(torch.cat([text[:n_pad], img[i, -1:], text[n_pad:]]))
        rows_mask.append(torch.tensor([0] * n_pad + [1] * (len(q) + 1), device=device))
    inputs_embeds = torch.cat(
        [img.new_zeros(batch, p + n_img - 1, hidden), torch.stack(rows_emb)], 1
    )
    attention_mask = torch.cat([ones.new_ones(batch, p + n_img - 1), torch.stack(rows_mask)], 1)

    if num_beams > 1:
        cache.batch_repeat_interleave(num_beams)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        num_return_sequences=1,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
    )
    out = lm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=cache,
        generation_config=gen_config,
    )
    return out.tolist()


def _generate_nocache(
    model: VisionLanguageModel,
    image_features: torch.Tensor,
    prompts: list[list[int]],
    mode: str,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    inputs: InputsFn | None,
    length_penalty: float,
) -> list[list[int]]:
    batch = len(prompts)
    device = next(model.lm.parameters()).device
    lengths = torch.tensor([len(q) for q in prompts], dtype=torch.long, device=device)
    width = int(lengths.max()) + max_new_tokens + 1  # +1: a column to read the next logit from
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, q in enumerate(prompts):
        if q:
            ids[i, : len(q)] = torch.tensor(q, device=device)
            mask[i, : len(q)] = 1
    rows = torch.arange(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(max_new_tokens):
        cur = int(lengths.max()) + 1
        out = model(
            input_ids=ids[:, :cur],
            attention_mask=mask[:, :cur],
            image_features=image_features,
            mask_mode=mode,
            past_key_values=inference_cache(inputs, batch),
        )
        # label_logits[:, t] predicts text token t: read it at each row's next free slot
        nxt = out.label_logits[rows, lengths].argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            tok = int(nxt[i])
            new[i].append(tok)
            ids[i, lengths[i]] = tok
            mask[i, lengths[i]] = 1
            lengths[i] += 1
            if eos_token_id is not None and tok == eos_token_id:
                done[i] = True
        if bool(done.all()):
            break
    return new
