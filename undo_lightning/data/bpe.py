"""Byte-level BPE tokenizers trained offline on a local corpus (for the language setting without hub access).

The paper uses Gemma-2's 256k SentencePiece vocabulary (docs/reference.md §2), which needs the hub. This trains a small
byte-level BPE with the ``tokenizers`` library instead: every byte sequence is representable, so English and Korean
round-trip exactly (no ``<unk>``, no normalisation or lowercasing), and the special tokens keep Gemma's ids so the
model presets and the data module's separator logic work unchanged.
"""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from undo_lightning.data.tokenizers import SPECIAL_TOKENS as SPECIAL_TOKEN_MAP
from undo_lightning.data.tokenizers import bos_post_processor

# Gemma's special-token ids, as the arithmetic tokenizer: pad 0, eos 1, bos 2, unk 3.
SPECIAL_TOKENS: tuple[str, ...] = tuple(SPECIAL_TOKEN_MAP.values())
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the bytes
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(_BYTE_ALPHABET)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | None = None, *,
                        min_frequency: int = 2, model_max_length: int = 1_000_000) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on ``texts``.

    The result prepends ``<bos>`` when called with the default ``add_special_tokens=True`` (as the arithmetic and
    Gemma tokenizers do), and ``decode(encode(x, add_special_tokens=False)) == x`` for any string without special-token
    text in it. Training is deterministic: the same texts in the same order give the same vocabulary and merges.

    Args:
        texts: the training corpus, one document per item (e.g. ``TextSource(...).documents("train", seed)``).
        vocab_size: total vocabulary size, including the 4 special tokens and the 256 byte tokens (so at least 260);
            the trainer stops early if the corpus has no more pairs seen ``min_frequency`` times.
        save_dir: if given, the tokenizer is written there with ``save_pretrained`` (loadable with
            ``AutoTokenizer.from_pretrained(save_dir)``).
        min_frequency: a pair must occur at least this often to be merged.
        model_max_length: the length recorded in the tokenizer config (only used for truncation warnings).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>=0, <eos>=1, <bos>=2, <unk>=3``.

    Raises:
        ValueError: if ``vocab_size`` is below 260, ``min_frequency`` < 1 or ``texts`` holds no non-empty text.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r}: expected an integer >= {MIN_VOCAB_SIZE} "
                         f"({len(SPECIAL_TOKENS)} special tokens + {len(_BYTE_ALPHABET)} byte tokens)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency}: expected >= 1")
    texts = [t for t in texts if isinstance(t, str) and t]  # materialised: the trainer may iterate more than once
    if not texts:
        raise ValueError("texts holds no non-empty strings; a tokenizer needs a corpus to learn merges from")

    # No normaliser: text is encoded byte for byte. add_prefix_space=False keeps a document's first word as written
    # (a prefix space would be decoded back and break the round trip).
    tok = Tokenizer(models.BPE(unk_token=None))  # byte-level covers every input, so <unk> is never produced
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),  # ids follow this order: 0, 1, 2, 3
                                  initial_alphabet=_BYTE_ALPHABET, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = bos_post_processor(tok.token_to_id("<bos>"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **SPECIAL_TOKEN_MAP,
        # transformers would otherwise "clean up" spaces before punctuation on decode and break the round trip.
        clean_up_tokenization_spaces=False, model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"])
    ids = [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):  # guards the Gemma-id contract against a tokenizers change
        raise RuntimeError(f"special tokens got ids {ids}, expected {list(range(len(SPECIAL_TOKENS)))}")
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        fast.save_pretrained(save_dir)
    return fast
