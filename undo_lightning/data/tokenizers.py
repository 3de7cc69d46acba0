"""Tokenizers as Hugging Face ``PreTrainedTokenizerFast`` objects: every exported folder loads with ``AutoTokenizer``.

* ``"arithmetic"`` builds the offline arithmetic tokenizer: single digits, operators, punctuation and the
  word-problem vocabulary, with a SentencePiece-style ``▁`` marking a preceding space, so decoding is exact.
* Anything else is a local folder or a hub id passed to ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from undo_lightning.data.arithmetic import vocabulary_words
from undo_lightning.io import is_local_path

#: The special tokens of every tokenizer built here, in id order: Gemma's ids (pad 0, eos 1, bos 2, unk 3), so the
#: tiny presets mirror the paper's models.
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
_SPACE = "▁"
# A word (optionally with its leading space), a single digit (digits are always split, as in Gemma's tokenizer),
# or one other symbol. Every piece is one vocabulary entry.
_PIECE = r"▁?[A-Za-z']+|▁?[0-9]|▁?[^\sA-Za-z0-9▁]|▁"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex(_PIECE), behavior="isolated"),
    ])


def build_arithmetic_tokenizer(extra_texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Builds the offline arithmetic tokenizer.

    Args:
        extra_texts: more texts whose pieces join the vocabulary (defaults to the generator's vocabulary).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>=0, <eos>=1, <bos>=2, <unk>=3`` that prepends ``<bos>``.
    """
    pre = _pre_tokenizer()
    texts = vocabulary_words() + list(extra_texts or [])
    pieces: set[str] = {str(d) for d in range(10)} | {_SPACE + str(d) for d in range(10)} | {_SPACE}
    for text in texts:
        for variant in (text, text[:1].upper() + text[1:], " " + text):
            for piece, _ in pre.pre_tokenize_str(variant):
                pieces.add(piece)
                if piece[:1] == _SPACE and len(piece) > 1:
                    pieces.add(piece[1:])  # the same word at the start of a line has no space
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS, add_bos_token=True,
                                   model_input_names=["input_ids", "attention_mask"])
    fast._tokenizer.post_processor = bos_post_processor(fast.bos_token_id)
    return fast


def bos_post_processor(bos_id: int) -> processors.TemplateProcessing:
    """Prepends ``<bos>`` (id ``bos_id``) to every encoded text, as Gemma's tokenizer does."""
    return processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                         special_tokens=[("<bos>", bos_id)])


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Returns the tokenizer named by ``name_or_path``.

    Args:
        name_or_path: ``"arithmetic"`` (built offline), a local folder with tokenizer files, or a hub id.

    Raises:
        ValueError: if a local-looking path does not exist, or the tokenizer lacks the special tokens we need.
    """
    if name_or_path == "arithmetic":
        return build_arithmetic_tokenizer()
    if is_local_path(name_or_path) and not os.path.isdir(name_or_path):
        raise ValueError(f"tokenizer={name_or_path!r}: no such folder; expected 'arithmetic', an existing folder "
                         "with tokenizer files, or a Hugging Face hub id")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:  # offline hub id, missing files
        raise ValueError(f"tokenizer={name_or_path!r} could not be loaded ({err.__class__.__name__}). Offline, pass a "
                         "local folder that holds the tokenizer files instead of a hub id.") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer={name_or_path!r} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok
