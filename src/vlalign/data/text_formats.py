"""Text formats of the VLM — the single source of truth for training and evaluation.

The image is never a token in the text: its projected patch tokens are prepended as embeddings,
so every text sequence starts right after the image with one ``<bos>``.

- caption: ``<bos> caption <eos>``; loss on the caption and its ``<eos>``.
- QA / conversation: ``<bos> <inst> question <ans> answer <eos> <inst> question <ans> ...``;
  loss on each answer and its ``<eos>`` only.

Generation prompts are the prefixes up to where the model has to continue: ``[<bos>]`` for a
caption, ``[<bos>, <inst>, *question, <ans>]`` for a VQA answer.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from vlalign.data.tokenizer import IMAGE, vlm_token_ids

IGNORE_INDEX = -100  # label of positions without loss (torch cross_entropy's ignore_index)
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def encode_text(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of plain text (no special tokens added). A fast tokenizer's Rust encoder is
    called directly: the same ids, without the wrapper's per-call overhead (about 40 µs of a
    47 µs call; LM pre-training encodes 200 k texts)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tok(text, add_special_tokens=False).input_ids)


def decode_text(tok: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Generated ids → text, special tokens dropped, surrounding whitespace stripped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def caption_prompt(tok: PreTrainedTokenizerBase) -> list[int]:
    """Generation prompt of a caption: ``[<bos>]``."""
    return [vlm_token_ids(tok)["bos"]]


def vqa_prompt(tok: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Generation prompt of a VQA answer: ``[<bos>, <inst>, *question, <ans>]``."""
    ids = vlm_token_ids(tok)
    return [ids["bos"], ids["inst"], *encode_text(tok, _strip_image(question)), ids["ans"]]


def caption_target(tok: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``<bos> text <eos>``; ``<bos>`` is not a target (it is the
    prompt at generation time)."""
    ids = vlm_token_ids(tok)
    body = encode_text(tok, text)
    input_ids = [ids["bos"], *body, ids["eos"]]
    labels = [IGNORE_INDEX, *body, ids["eos"]]
    return input_ids, labels


def _strip_image(text: str) -> str:
    # LLaVA data marks the image inside the first human turn; ours is prepended as embeddings
    return text.replace(IMAGE, "").strip()


def majority_answer(answers: Sequence[str]) -> str:
    return collections.Counter(answers).most_common(1)[0][0]


def qa_turns(qa: Sequence[Mapping]) -> list[dict[str, str]]:
    """QA pairs as a conversation: each question, then its majority answer (short answers)."""
    turns: list[dict[str, str]] = []
    for item in qa:
        turns += [
            {"from": "human", "value": item["question"]},
            {"from": "gpt", "value": majority_answer(item["answers"])},
        ]
    return turns


def conversation_ids(
    tok: PreTrainedTokenizerBase, turns: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a multi-turn conversation in LLaVA format.

    ``turns`` alternate ``{"from": "human"|"user", "value": question}`` and
    ``{"from": "gpt"|"assistant", "value": answer}``, starting with a human turn and ending with
    an answer. ``<image>`` markers are removed. Labels are -100 except on answer tokens and the
    ``<eos>`` closing each answer.
    """
    if len(turns) == 0:
        raise ValueError("conversation has no turns")
    ids = vlm_token_ids(tok)
    input_ids, labels = [ids["bos"]], [IGNORE_INDEX]
    expect_human = True
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i} needs 'from' and 'value' keys: {turn!r}")
        role, value = turn["from"], turn["value"]
        if role in HUMAN_ROLES:
            if not expect_human:
                raise ValueError(f"conversation turn {i}: two human turns in a row")
            q = [ids["inst"], *encode_text(tok, _strip_image(value)), ids["ans"]]
            input_ids += q
            labels += [IGNORE_INDEX] * len(q)
        elif role in ASSISTANT_ROLES:
            if expect_human:
                raise ValueError(f"conversation turn {i}: an answer without a question before it")
            a = [*encode_text(tok, value), ids["eos"]]
            input_ids += a
            labels += a
        else:
            raise ValueError(
                f"conversation turn {i}: unknown role {role!r} "
                f"(expected one of {HUMAN_ROLES + ASSISTANT_ROLES})"
            )
        expect_human = not expect_human
    if not expect_human:
        raise ValueError("conversation ends with a question that has no answer")
    return input_ids, labels
