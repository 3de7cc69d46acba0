"""Offline byte-level BPE: exact round trip on English and Korean, Gemma special ids, determinism, save/reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from undo_lightning.data.bpe import train_bpe_tokenizer
from undo_lightning.data.text import TextSource
from undo_lightning.data.tokenizers import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
ENGLISH = (FIXTURES / "english.txt").read_text(encoding="utf-8")
KOREAN = (FIXTURES / "korean.txt").read_text(encoding="utf-8")
CORPUS = TextSource(str(FIXTURES / "english.txt")).corpus() + TextSource(str(FIXTURES / "korean.txt")).corpus()
TRICKY = [
    "  leading spaces, trailing spaces  ",
    "Tabs\tand\r\nCRLF\nand double  spaces . , ! ?",  # "Hello ." must not be "cleaned up" to "Hello."
    "Mixed 한국어 and English: 빵은 bread! 123 + 456 = 579",
    "Unseen: Ελληνικά, 日本語, emoji 🦉, combining é",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=500)


def test_special_token_ids_and_bos(tok):
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]
    ids = tok("The river")["input_ids"]
    assert ids[0] == 2 and 2 not in ids[1:]
    assert tok("The river", add_special_tokens=False)["input_ids"] == ids[1:]
    assert 260 < len(tok) <= 500  # merges were learned, within the budget


@pytest.mark.parametrize("text", [ENGLISH, KOREAN] + TRICKY)
def test_exact_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids


def test_merges_compress_both_languages(tok):
    for text in (ENGLISH, KOREAN):
        n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n_tokens < 0.6 * len(text.encode("utf-8"))  # well below one token per byte


def test_deterministic_training(tmp_path):
    a = train_bpe_tokenizer(CORPUS, vocab_size=400, save_dir=str(tmp_path / "a"))
    b = train_bpe_tokenizer(list(CORPUS), vocab_size=400, save_dir=str(tmp_path / "b"))
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_saved_folder_reloads_with_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert [loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id, loaded.unk_token_id] == [0, 1, 2, 3]
        for text in [ENGLISH, KOREAN] + TRICKY:
            assert loaded(text)["input_ids"] == tok(text)["input_ids"]
            assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
        batch = loaded(["짧은 문장", "a longer English sentence"], padding=True)
        assert batch["input_ids"][0][-1] == 0  # pads with <pad>=0


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100: expected an integer >= 260"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty strings"):
        train_bpe_tokenizer(["", ""], vocab_size=300)
