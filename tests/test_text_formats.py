"""Stage text formats with instructions (PETAL's stacked instructions, seed 001 Table 7; seed
002's short-caption prompt): training targets and evaluation prompts share one layout, and a
format a text kind cannot take is refused at plan time."""

from __future__ import annotations

import pytest

from tests.helpers import make_tokenizer
from vlalign.config import ConfigError
from vlalign.data.text_formats import (
    IGNORE_INDEX,
    PLAIN,
    Prompt,
    TextFormat,
    caption_prompt,
    caption_target,
    conversation_ids,
    encode_text,
    qa_turns,
    vqa_prompt,
)
from vlalign.data.tokenizer import vlm_token_ids
from vlalign.data.world import generate_world
from vlalign.runs.settings import resolve

INSTRUCTIONS = ("What objects are in the picture?", "What is the relationship between them?")


@pytest.fixture(scope="module")
def world():
    return generate_world({}, domain="source", splits={"train": 8, "val": 2, "test": 2}, seed=1)


@pytest.fixture(scope="module")
def tok(world):
    return make_tokenizer(world)


def test_plain_format_is_the_historic_layout(tok) -> None:
    ids = vlm_token_ids(tok)
    body = encode_text(tok, "a red circle")
    assert caption_target(tok, "a red circle") == (
        [ids["bos"], *body, ids["eos"]], [IGNORE_INDEX, *body, ids["eos"]])
    assert caption_prompt(tok) == [ids["bos"]]
    q = encode_text(tok, "what colour is it?")
    assert vqa_prompt(tok, "<image>\nwhat colour is it?") == [ids["bos"], ids["inst"], *q,
                                                              ids["ans"]]


def test_instructions_stand_before_the_caption_and_are_never_targets(tok) -> None:
    ids = vlm_token_ids(tok)
    fmt = TextFormat(caption=Prompt(INSTRUCTIONS, "A photo of"))
    input_ids, labels = fmt.caption_ids(tok, "a red circle")
    prefix = [ids["bos"]]
    for text in (*INSTRUCTIONS, "A photo of"):
        prefix += [ids["inst"], *encode_text(tok, text)]
    prefix.append(ids["ans"])
    body = [*encode_text(tok, "a red circle"), ids["eos"]]
    assert input_ids == prefix + body
    assert labels == [IGNORE_INDEX] * len(prefix) + body
    # generation is prompted with exactly the training prefix
    assert caption_prompt(tok, fmt) == prefix
    # a task prompt alone (seed 002's short-caption prompt)
    short = TextFormat(Prompt(task="Provide a one-sentence caption for the provided image."))
    assert short.caption_prefix(tok)[:2] == [ids["bos"], ids["inst"]]
    assert short.caption_prefix(tok)[-1] == ids["ans"]
    assert short.caption_ids(tok, "x")[0] != PLAIN.caption_ids(tok, "x")[0]
    # the caption prompt leaves questions plain, and the other way round
    assert short.vqa_prompt(tok, "what?") == PLAIN.vqa_prompt(tok, "what?")


def test_qa_template_and_instructions_before_the_first_question_only(tok, world) -> None:
    ids = vlm_token_ids(tok)
    fmt = TextFormat(qa=Prompt(INSTRUCTIONS[:1], "Question: {question} Short answer:"))
    turns = qa_turns(world["train"][0]["qa"][:2])
    input_ids, labels = conversation_ids(tok, turns, fmt)
    q1 = turns[0]["value"]
    first = [ids["bos"], ids["inst"], *encode_text(tok, INSTRUCTIONS[0]), ids["inst"],
             *encode_text(tok, f"Question: {q1} Short answer:"), ids["ans"]]
    assert input_ids[: len(first)] == first
    assert input_ids.count(ids["inst"]) == 3  # the instruction once, the template per question
    assert vqa_prompt(tok, q1, fmt) == first
    answer = [*encode_text(tok, turns[1]["value"]), ids["eos"]]
    assert labels[len(first): len(first) + len(answer)] == answer
    assert set(labels[: len(first)]) == {IGNORE_INDEX}
    assert fmt.caption_prefix(tok) == caption_prompt(tok)  # captions stay plain


def _stage(**kw):
    return {"dataset": "world", "text": "captions", "lr": {"projector": 1e-3}, **kw}


def test_stage_settings_carry_the_format_and_refuse_what_a_kind_cannot_take() -> None:
    prompts = {"caption": {"instructions": list(INSTRUCTIONS), "task": "A photo of"},
               "qa": {"task": "Question: {question} Short answer:"}}
    settings, _ = resolve({}, _stage(prompts=prompts))
    assert TextFormat.from_settings(settings) == TextFormat(
        Prompt(INSTRUCTIONS, "A photo of"), Prompt(task="Question: {question} Short answer:"))
    assert TextFormat.from_settings(resolve({}, _stage())[0]) == PLAIN
    with pytest.raises(ConfigError, match=r"stages\.s: .*conversation brings its own"):
        resolve({}, _stage(text="conversations", prompts={"qa": {"instructions": ["x"]}}),
                where="stages.s")
    with pytest.raises(ConfigError, match=r"needs \{question\}"):
        resolve({}, _stage(text="qa", prompts={"qa": {"task": "Short answer:"}}), where="s")
    with pytest.raises(ConfigError, match=r"a caption has no \{question\}"):
        resolve({}, _stage(prompts={"caption": {"task": "Q: {question}"}}), where="s")
    with pytest.raises(ConfigError, match=r"prompts"):
        resolve({}, _stage(prompts={"caption": {"instructions": [""]}}), where="s")
    with pytest.raises(ConfigError, match=r"prompts"):
        resolve({}, _stage(prompts={"captions": {}}), where="s")


def test_captions_qa_alternates_caption_and_qa_per_image_and_epoch(tok, world) -> None:
    from vlalign.train.data import StageExamples

    fmt = TextFormat(Prompt(task="A photo of"), Prompt(task="Question: {question} Answer:"))
    split = world["train"]
    ex = StageExamples(split, tok, "captions_qa", 256, processor=object(), text_format=fmt)
    ids = vlm_token_ids(tok)

    def kinds() -> list[str]:
        # a caption target ends with one <eos>; a QA conversation has one per answer
        return ["qa" if ex.token_ids(i)[0].count(ids["eos"]) > 1 else "caption"
                for i in range(len(ex))]

    first = kinds()
    assert first == ["caption" if i % 2 == 0 else "qa" for i in range(len(ex))]
    ex.set_epoch(1)
    assert kinds() == ["qa" if k == "caption" else "caption" for k in first]
    caption_ids, _ = ex.token_ids(1)  # epoch 1: image 1 gets a caption, in the caption format
    assert caption_ids[: len(fmt.caption_prefix(tok))] == fmt.caption_prefix(tok)
    qa_ids, _ = ex.token_ids(0)
    assert qa_ids[: len(fmt.vqa_prompt(tok, split[0]["qa"][0]["question"]))] == fmt.vqa_prompt(
        tok, split[0]["qa"][0]["question"])


def test_max_train_samples_is_exact_per_seed_and_exclusive_with_data_fraction() -> None:
    from vlalign.train.loop import data_subset

    a, b, a2 = (data_subset(192, 1.0, s, count=50) for s in (0, 1, 0))
    assert len(a) == len(set(a)) == 50 and len(b) == 50
    assert a == a2 and a != b  # a function of the seed
    assert len(data_subset(192, 1.0, 3, count=192)) == 192
    with pytest.raises(ValueError, match=r"stage ft: max_train_samples 200 exceeds the 192"):
        data_subset(192, 1.0, 0, count=200, name="stage ft")
    with pytest.raises(ConfigError, match="max_train_samples .* or data_fraction"):
        resolve({}, _stage(max_train_samples=50, data_fraction=0.5), where="stages.s")
