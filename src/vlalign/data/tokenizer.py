"""The tokenizer: a byte-level BPE trained on the corpus, or a pre-trained LM's own tokenizer.

Either way the result is a ``PreTrainedTokenizerFast`` directory carrying the special tokens the
VLM needs, so downstream code calls ``AutoTokenizer.from_pretrained(path)`` in both recipes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlalign.io_utils import atomic_path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
IMAGE, INST, ANS = "<image>", "<inst>", "<ans>"
VLM_TOKENS = (IMAGE, INST, ANS)  # image placeholder, instruction and answer markers (stage3)


def corpus_texts(dsd) -> Iterator[str]:
    """Every text of a normalised DatasetDict: captions, recaptions, questions/answers, turns."""
    for split in dsd.values():
        cols = split.select_columns(["captions", "recaption", "qa", "conversations"])
        for row in cols:
            yield from row["captions"]
            if row["recaption"]:
                yield row["recaption"]
            for qa in row["qa"]:
                yield qa["question"]
                yield from qa["answers"]
            for turn in row["conversations"]:
                yield turn["value"].replace(IMAGE, "").strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE (the Qwen2/GPT-2 family's scheme): every string round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, UNK, *VLM_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=list(VLM_TOKENS),
        model_max_length=4096,
    )


def add_vlm_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a pre-trained LM's tokenizer the VLM tokens (and pad/bos/eos if it lacks them)."""
    extra = {}
    if tokenizer.pad_token is None:
        extra["pad_token"] = PAD
    if tokenizer.bos_token is None:
        extra["bos_token"] = BOS
    if tokenizer.eos_token is None:
        extra["eos_token"] = EOS
    tokenizer.add_special_tokens({**extra, "extra_special_tokens": list(VLM_TOKENS)})
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: not a tokenizer directory (no tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(path))


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    with atomic_path(path, is_dir=True) as tmp:
        tokenizer.save_pretrained(str(tmp))


def vlm_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the tokens the VLM code relies on; fails loudly if one is missing."""
    ids = {}
    for name, token in [
        ("pad", tokenizer.pad_token),
        ("bos", tokenizer.bos_token),
        ("eos", tokenizer.eos_token),
        ("image", IMAGE),
        ("inst", INST),
        ("ans", ANS),
    ]:
        tid = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ValueError(f"tokenizer lacks the special token {name!r} ({token})")
        ids[name] = tid
    return ids
