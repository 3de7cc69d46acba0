import pytest
from transformers import AutoTokenizer

from undo_lightning.data.arithmetic import ArithmeticSource
from undo_lightning.data.tokenizers import load_tokenizer


def test_covers_everything_the_generator_writes(tokenizer):
    src = ArithmeticSource(("add", "sub", "mul", "div"), train_documents=3000, val_documents=100)
    texts = src.documents("train", 0) + [i.prompt + " " + i.answer for v in src.eval_sets(0, 100).values() for i in v]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    for text, row in zip(texts[:500], ids):
        assert tokenizer.decode(row) == text  # exact round trip, spaces included


def test_digits_are_single_tokens_and_specials_have_gemma_ids(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer("37 + 5 = 42", add_special_tokens=False)["input_ids"]) == \
        ["▁3", "7", "▁+", "▁5", "▁=", "▁4", "2"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == \
        (0, 1, 2, 3)
    assert tokenizer("1 + 1 =")["input_ids"][0] == tokenizer.bos_token_id


def test_prompt_tokens_are_a_prefix_of_the_full_text(tokenizer):
    # exact-match scoring relies on "prompt" + " answer" tokenizing as prompt tokens followed by answer tokens
    for prompt, answer in [("37 + 5 =", "42"), ("Ava has 3 pens. Now Ava has", "9")]:
        full = tokenizer(f"{prompt} {answer}")["input_ids"]
        head = tokenizer(prompt)["input_ids"]
        assert full[: len(head)] == head


def test_saved_folder_loads_with_autotokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The fox shares 36 eggs equally among 4 friends. Each friend gets 9 eggs."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_tokenizer(str(tmp_path / "nope"))
