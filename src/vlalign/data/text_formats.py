"""Text formats of the VLM — the single source of truth for training and evaluation.

The image is never a token in the text: its projected patch tokens are prepended as embeddings,
so every text sequence starts right after the image with one ``<bos>``.

- caption: ``<bos> caption <eos>``; loss on the caption and its ``<eos>``.
- QA / conversation: ``<bos> <inst> question <ans> answer <eos> <inst> question <ans> ...``;
  loss on each answer and its ``<eos>`` only.

Generation prompts are the prefixes up to where the model has to continue: ``[<bos>]`` for a
caption, ``[<bos>, <inst>, *question, <ans>]`` for a VQA answer.

A stage may put instructions before its targets (:class:`TextFormat`, the stage key
``prompts``: one :class:`Prompt` for captions, one for QA), e.g. PETAL's stacked instructions
(seed 001 Table 7)::

    <bos> <inst> What objects are in the picture? <inst> ... <inst> A photo of <ans> caption <eos>

or seed 002's short-caption prompt of the COCO full-shot stage
(``<bos> <inst> Provide a one-sentence caption for the provided image. <ans> caption <eos>``).
A QA prompt's ``task`` is a template of the question (``"Question: {question} Short answer:"``)
and its instructions stand before the first question only. Evaluation prompts captions and VQA
questions with the format of the run's last stage, so a model is asked as it was trained.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from vlalign.data.tokenizer import IMAGE, vlm_token_ids

IGNORE_INDEX = -100  # label of positions without loss (torch cross_entropy's ignore_index)
QUESTION_FIELD = "{question}"  # where a QA task_prompt puts the question
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


@dataclass(frozen=True)
class Prompt:
    """Instructions stacked before one task's targets, each behind ``<inst>``, then the task
    instruction ``task`` (a QA template holds ``{question}``). Empty: the plain format."""

    instructions: tuple[str, ...] = ()
    task: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Prompt:
        d = d or {}
        return cls(tuple(d.get("instructions") or ()), d.get("task"))

    @property
    def plain(self) -> bool:
        return not self.instructions and self.task is None

    def block(self, tok: PreTrainedTokenizerBase, task: str | None, first: bool) -> list[int]:
        """``[<inst> instruction]* [<inst> task] <ans>`` ([] when there is neither)."""
        ids = vlm_token_ids(tok)
        out: list[int] = []
        for text in self.instructions if first else ():
            out += [ids["inst"], *encode_text(tok, text)]
        if task is not None:
            out += [ids["inst"], *encode_text(tok, task)]
        return [*out, ids["ans"]] if out else []


@dataclass(frozen=True)
class TextFormat:
    """A stage's prompts (the module doc): ``caption`` lays out recaptions and captions,
    ``qa`` the questions of QA pairs; the default (both plain) is ``<bos> caption <eos>`` and
    ``<inst> question <ans> answer <eos>``."""

    caption: Prompt = Prompt()
    qa: Prompt = Prompt()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TextFormat:
        """From a stage's settings (its ``prompts``: ``{caption: {instructions, task}, qa:
        ...}``; absent = plain)."""
        prompts = settings.get("prompts") or {}
        return cls(Prompt.from_dict(prompts.get("caption")), Prompt.from_dict(prompts.get("qa")))

    def check(self, text_kind: str) -> None:
        """ValueError if this format cannot lay out ``text_kind``."""
        for side, prompt in (("caption", self.caption), ("qa", self.qa)):
            if any(not str(i).strip() for i in prompt.instructions):
                raise ValueError(f"prompts.{side}.instructions: an instruction is empty")
        if text_kind == "conversations" and not (self.caption.plain and self.qa.plain):
            raise ValueError(
                "prompts: a conversation brings its own questions; set prompts for text "
                "recaption, captions, qa or captions_qa"
            )
        if self.qa.task is not None and QUESTION_FIELD not in self.qa.task:
            raise ValueError(
                f"prompts.qa.task {self.qa.task!r}: a QA task prompt is a template of the "
                f"question and needs {QUESTION_FIELD}"
            )
        if self.caption.task is not None and QUESTION_FIELD in self.caption.task:
            raise ValueError(
                f"prompts.caption.task {self.caption.task!r}: a caption has no {QUESTION_FIELD}"
            )

    def caption_prefix(self, tok: PreTrainedTokenizerBase) -> list[int]:
        """Generation prompt of a caption: ``[<bos>, *instructions, <ans>]`` (plain:
        ``[<bos>]``)."""
        prompt = self.caption
        return [vlm_token_ids(tok)["bos"], *prompt.block(tok, prompt.task, first=True)]

    def question(
        self, tok: PreTrainedTokenizerBase, question: str, first: bool = True
    ) -> list[int]:
        """A question's block ``[<inst> instruction]* <inst> task(question) <ans>``
        (instructions before the ``first`` question only)."""
        q = _strip_image(question)
        task = q if self.qa.task is None else self.qa.task.replace(QUESTION_FIELD, q)
        return self.qa.block(tok, task, first)

    def caption_ids(
        self, tok: PreTrainedTokenizerBase, text: str
    ) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of ``prefix text <eos>``; the prefix (``<bos>`` and the
        instructions: the prompt at generation time) is not a target."""
        prefix = self.caption_prefix(tok)
        body = [*encode_text(tok, text), vlm_token_ids(tok)["eos"]]
        return [*prefix, *body], [IGNORE_INDEX] * len(prefix) + body

    def vqa_prompt(self, tok: PreTrainedTokenizerBase, question: str) -> list[int]:
        """Generation prompt of a VQA answer: ``[<bos>, *question block]``."""
        return [vlm_token_ids(tok)["bos"], *self.question(tok, question)]


PLAIN = TextFormat()


def caption_prompt(tok: PreTrainedTokenizerBase, fmt: TextFormat = PLAIN) -> list[int]:
    """Generation prompt of a caption: ``[<bos>]`` (plain format)."""
    return fmt.caption_prefix(tok)


def vqa_prompt(tok: PreTrainedTokenizerBase, question: str, fmt: TextFormat = PLAIN) -> list[int]:
    """Generation prompt of a VQA answer: ``[<bos>, <inst>, *question, <ans>]`` (plain)."""
    return fmt.vqa_prompt(tok, question)


def caption_target(
    tok: PreTrainedTokenizerBase, text: str, fmt: TextFormat = PLAIN
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``<bos> text <eos>`` (plain format); ``<bos>`` is not a
    target (it is the prompt at generation time)."""
    return fmt.caption_ids(tok, text)


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
    tok: PreTrainedTokenizerBase, turns: Sequence[Mapping[str, str]], fmt: TextFormat = PLAIN
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a multi-turn conversation in LLaVA format.

    ``turns`` alternate ``{"from": "human"|"user", "value": question}`` and
    ``{"from": "gpt"|"assistant", "value": answer}``, starting with a human turn and ending with
    an answer. ``<image>`` markers are removed. Labels are -100 except on answer tokens and the
    ``<eos>`` closing each answer. ``fmt`` lays out each question (:meth:`TextFormat.question`).
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
            q = fmt.question(tok, value, first=i == 0)
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
