"""TextSource / MixtureSource: file formats, caps, the seeded split, mixing rules and the input errors."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from undo_lightning.data.sources import DocumentSource, EvalItem
from undo_lightning.data.text import MixtureSource, TextSource

FIXTURES = Path(__file__).parent / "fixtures"
DOCS = ["First document.\nIt has two lines.", "Second one, 둘째 문서.", "Third.", "Fourth document here."]


def write_jsonl(path: Path, records: list, blank_lines: bool = False) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)
    return path


# ------------------------------------------------------------------------------------------------------ formats
def test_jsonl_reads_text_field_and_skips_empty_documents(tmp_path):
    records = [{"text": d, "meta": i} for i, d in enumerate(DOCS)]
    records.insert(2, {"text": "   ", "meta": -1})  # whitespace-only: would be a bare separator after packing
    path = write_jsonl(tmp_path / "c.jsonl", records, blank_lines=True)
    assert TextSource(str(path)).corpus() == DOCS


def test_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"response": d} for d in DOCS])
    assert TextSource(str(path), text_field="response").corpus() == DOCS


def test_json_list_and_json_lines_named_json(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    assert TextSource(str(tmp_path / "list.json")).corpus() == DOCS
    write_jsonl(tmp_path / "lines.json", [{"text": d} for d in DOCS])  # HF to_json writes lines into .json
    assert TextSource(str(tmp_path / "lines.json")).corpus() == DOCS


def test_parquet(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", DOCS)
    assert TextSource(str(path)).corpus() == DOCS


def test_txt_paragraphs_keep_inner_newlines_and_line_mode():
    english = TextSource(str(FIXTURES / "english.txt")).corpus()
    assert len(english) == 8
    assert english[2].startswith("A good map") and "\nThe best maps" in english[2]  # two-line paragraph = 1 doc
    lines = TextSource(str(FIXTURES / "english.txt"), txt_unit="line").corpus()
    assert len(lines) == 9 and lines[3].startswith("The best maps")
    korean = TextSource(str(FIXTURES / "korean.txt")).corpus()
    assert len(korean) == 8 and korean[0].startswith("오래된 방앗간")


def test_folder_reads_every_supported_file_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": DOCS[0]}])
    (tmp_path / "b.txt").write_text(DOCS[1] + "\n\n" + DOCS[2] + "\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "c.parquet", [DOCS[3]])
    write_jsonl(tmp_path / ".hidden.jsonl", [{"text": "hidden"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert TextSource(str(tmp_path)).corpus() == DOCS


# --------------------------------------------------------------------------------------------------------- caps
def test_max_documents_and_max_chars(tmp_path):
    docs = [f"document number {i}" for i in range(50)]  # 18-19 characters each
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    assert TextSource(str(path), max_documents=7).corpus() == docs[:7]
    capped = TextSource(str(path), max_chars=100).corpus()
    # The budget is reached inside the 6th document, which is kept whole (documents are never truncated).
    assert capped == docs[:6] and sum(map(len, capped[:-1])) < 100 <= sum(map(len, capped))


# -------------------------------------------------------------------------------------------------------- split
def test_split_is_disjoint_complete_and_seeded(tmp_path):
    docs = [f"doc {i}" for i in range(40)]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    src = TextSource(str(path), val_fraction=0.25)
    train, val = src.documents("train", 0), src.documents("val", 0)
    assert len(val) == 10 and len(train) == 30
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept
    fresh = TextSource(str(path), val_fraction=0.25)
    assert fresh.documents("val", 0) == val and fresh.documents("train", 0) == train
    assert src.documents("val", 1) != val  # another seed holds out other documents
    fixed = TextSource(str(path), val_fraction=0.25, split_seed=5)
    assert fixed.documents("val", 0) == fixed.documents("val", 1)
    assert TextSource(str(path), val_documents=3).documents("val", 0).__len__() == 3
    assert len(TextSource(str(path), val_fraction=0.001).documents("val", 0)) == 1  # at least one


def test_text_sources_feed_the_data_module(tmp_path):
    from undo_lightning.data.bpe import train_bpe_tokenizer
    from undo_lightning.data.module import RetainForgetDataModule

    english, korean = TextSource(str(FIXTURES / "english.txt")), TextSource(str(FIXTURES / "korean.txt"))
    train_bpe_tokenizer(english.corpus() + korean.corpus(), vocab_size=400, save_dir=str(tmp_path / "tok"))
    dm = RetainForgetDataModule(retain=english, forget=korean, tokenizer=str(tmp_path / "tok"), block_size=16,
                                batch_size=2)
    dm.setup()
    blocks = dm.train_blocks("forget")
    assert blocks.shape[1] == 16 and blocks.shape[0] > 10
    text = dm.tokenizer.decode(blocks.flatten().tolist(), skip_special_tokens=True)
    assert "방앗간" in text or "빵은" in text  # Korean documents made it through tokenization and packing


# ------------------------------------------------------------------------------------------------------ mixture
class ListSource(DocumentSource):
    def __init__(self, prefix: str, n: int, eval_name: str | None = None) -> None:
        self.prefix, self.n, self.eval_name = prefix, n, eval_name

    def documents(self, split: str, seed: int) -> list[str]:
        return [f"{self.prefix}{split}{i}" for i in range(self.n if split == "train" else 10)]

    def eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        return {self.eval_name: [EvalItem("p", "a")]} if self.eval_name else {}


def test_mixture_default_count_is_first_exhausted_without_repeats():
    mix = MixtureSource([ListSource("a", 1000), ListSource("b", 1000)], weights=[3, 1])
    docs = mix.documents("train", 0)
    counts = Counter(d[0] for d in docs)
    assert len(docs) == 1333 and counts == {"a": 1000, "b": 333}  # N = min(1000/0.75, 1000/0.25)
    assert len(set(docs)) == len(docs)
    assert mix.documents("train", 0) == docs  # deterministic
    assert mix.documents("train", 1) != docs  # the seed changes the draw and the order
    assert docs[:20] != sorted(docs[:20])  # interleaved, not concatenated


def test_mixture_explicit_count_respects_weights_and_cycles():
    mix = MixtureSource([ListSource("a", 50), ListSource("b", 1000)], weights=[0.5, 0.5], train_documents=400,
                        val_documents=7)
    docs = mix.documents("train", 3)
    counts = Counter(d[0] for d in docs)
    assert counts == {"a": 200, "b": 200}
    a_docs = Counter(d for d in docs if d[0] == "a")
    assert set(a_docs.values()) == {4}  # 50 documents cycled 4 times, each reshuffled
    val = mix.documents("val", 3)
    assert len(val) == 7 and all("val" in d for d in val)
    assert mix.documents("train", 4) != docs


def test_mixture_zero_weight_source_is_not_read_and_eval_sets_merge():
    class Exploding(DocumentSource):
        def documents(self, split, seed):
            raise AssertionError("a weight-0 source must not be read")

    mix = MixtureSource([ListSource("a", 10, "x"), Exploding(), ListSource("c", 10, "x")], weights=[1, 0, 1])
    assert len(mix.documents("train", 0)) == 20
    assert set(mix.eval_sets(0, 1)) == {"x", "source2_x"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(sources=[]), "non-empty list"),
    (dict(sources=[ListSource("a", 1)], weights=[1, 2]), "one weight per source"),
    (dict(sources=[ListSource("a", 1)], weights=[-1]), "weights"),
    (dict(sources=[ListSource("a", 1)], train_documents=0), "train_documents=0"),
])
def test_mixture_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureSource(**kwargs)


# ------------------------------------------------------------------------------------------------------- errors
def test_missing_text_field_lists_existing_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"content": "x", "url": "u"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: no field 'text'; the record has fields \['content', 'url'\]"):
        TextSource(str(path)).corpus()
    pq_path = write_parquet(tmp_path / "c.parquet", DOCS, field="body")
    with pytest.raises(ValueError, match=r"no column 'text'; the file has columns \['body', 'id'\]"):
        TextSource(str(pq_path)).corpus()


def test_non_string_text_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"text": "fine"}, {"text": 42}])
    with pytest.raises(ValueError, match=r"c\.jsonl:3: field 'text' holds int 42, expected a string"):
        TextSource(str(path)).corpus()
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": None}])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'text' holds NoneType"):
        TextSource(str(path)).corpus()


def test_empty_corpus(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": "  \n "}])
    with pytest.raises(ValueError, match="no non-empty documents"):
        TextSource(str(path)).corpus()
    (tmp_path / "empty.txt").write_text("\n\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        TextSource(str(tmp_path / "empty.txt")).corpus()


def test_missing_file_unsupported_file_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        TextSource(str(tmp_path / "nope.jsonl")).corpus()
    with pytest.raises(ValueError, match="no such file or folder"):
        TextSource("data/missing.jsonl").corpus()  # relative path with a suffix: local, not a hub id
    (tmp_path / "c.csv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        TextSource(str(tmp_path / "c.csv")).corpus()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        TextSource(str(tmp_path / "bad.jsonl")).corpus()
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="folder without any"):
        TextSource(str(tmp_path / "d")).corpus()


def test_hub_id_offline_says_pass_a_local_path(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The libraries read HF_HUB_OFFLINE at import time, so the flag is set on their constants too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"(?s)path='someone/some-corpus-that-is-not-cached'.*pass a local path"):
        TextSource("someone/some-corpus-that-is-not-cached", name="en").corpus()
    assert time.monotonic() - start < 10


def test_argument_validation(tmp_path):
    path = str(write_jsonl(tmp_path / "c.jsonl", [{"text": "only one"}]))
    with pytest.raises(ValueError, match="leaves no training documents"):
        TextSource(path).documents("train", 0)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        TextSource(path, val_fraction=1.5)
    with pytest.raises(ValueError, match="max_documents=0"):
        TextSource(path, max_documents=0)
    with pytest.raises(ValueError, match="hub datasets only"):
        TextSource(path, streaming=True, max_documents=3)
    with pytest.raises(ValueError, match="set max_documents or max_chars"):
        TextSource("owner/corpus", streaming=True)
    with pytest.raises(ValueError, match="split='test'"):
        TextSource(path).documents("test", 0)
    assert os.path.exists(path)
