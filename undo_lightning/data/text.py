"""Text corpora as document sources: local files (JSONL, JSON, TXT, Parquet), folders of them, or Hugging Face datasets.

The paper's language setting is English (retain) vs Korean (forget) web text (docs/reference.md §3.2); any corpus with
one text field per record works. ``TextSource`` reads a corpus once, skips empty documents, applies the caps, and splits
it document-by-document into a seeded train/val split. Documents are returned whole: ``RetainForgetDataModule`` packs
long documents across blocks instead of truncating them (the reference drops all past ``T``, docs/reference.md §4).
``MixtureSource`` mixes several sources with per-document weights.

Errors in the input (missing file, missing field, non-string text, unreachable hub id) are raised as ``ValueError``
naming the file, line and field, not as a deep ``datasets`` stack trace.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

from undo_lightning.data.sources import DocumentSource, EvalItem
from undo_lightning.io import (
    check_choice,
    corpus_files,
    is_local_path,
    load_hub_dataset,
    preview,
    read_records,
    read_text_file,
    record_field,
)

#: what one document of a ``.txt`` file is
TxtUnit = Literal["paragraph", "line"]
# One document per paragraph: paragraphs are separated by a line that is empty or holds only whitespace.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n\s*")


# ---------------------------------------------------------------------------------------------------- TextSource
@dataclass
class TextSource(DocumentSource):
    """Plain-text documents from local files or a Hugging Face dataset, with a seeded document-level train/val split.

    Formats (chosen by the file suffix):

    * ``.jsonl`` — one JSON object per line, the document is ``record[text_field]``;
    * ``.json`` — a JSON list of such objects (or JSON lines in a ``.json`` file);
    * ``.parquet`` — the column ``text_field``;
    * ``.txt`` — by default **one document per paragraph**: documents are separated by a blank (or
      whitespace-only) line and the lines of a paragraph stay together with their newlines, so multi-line
      documents survive; ``txt_unit="line"`` makes every line a document instead;
    * a folder — every file above below it, recursively, in sorted path order;
    * anything else — a Hugging Face dataset id loaded with ``datasets.load_dataset(path, name, split=split)``.

    Empty and whitespace-only documents are skipped (each would otherwise add a bare separator token to the packed
    stream, the reference's wikitext quirk, docs/reference.md §11.1). Documents are never truncated.

    Args:
        path: a local file or folder (see above), or a hub dataset id such as ``"HuggingFaceFW/fineweb-2"``.
        name: the hub dataset's configuration name (e.g. ``"kor_Hang"``); hub only.
        split: the hub dataset's split to read (``"train"``); the train/val split below is made from it.
        text_field: the record field (JSON key, Parquet column, dataset column) that holds the document text.
        streaming: stream the hub dataset instead of downloading it whole; needs ``max_documents`` or
            ``max_chars`` so reading stops. Hub only.
        max_documents: read at most this many (non-empty) documents, the first ones in corpus order, before the
            split. ``None`` reads them all.
        max_chars: stop reading once the documents read so far hold this many characters in total; the document
            that crosses the budget is kept whole, so the corpus may exceed it by less than one document. A
            character budget needs no tokenizer (sources are tokenizer-free); as a guide, English BPE text has
            about 4 characters per token and Korean about 1.5. ``None`` = no budget.
        val_fraction: share of the documents held out for validation (at least one document when > 0).
        val_documents: exact number of validation documents; overrides ``val_fraction`` when set.
        split_seed: seed of the train/val split; ``None`` uses the ``seed`` passed to ``documents`` (a fixed value
            keeps the same validation documents across training seeds).
        txt_unit: what one document of a ``.txt`` file is: ``"paragraph"`` (blank-line separated) or ``"line"``.
    """

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_documents: int | None = None
    max_chars: int | None = None
    val_fraction: float = 0.05
    val_documents: int | None = None
    split_seed: int | None = None
    txt_unit: TxtUnit = "paragraph"
    _corpus: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path={self.path!r}: expected a file, a folder or a Hugging Face dataset id")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field={self.text_field!r}: expected a non-empty field name")
        for name in ("max_documents", "max_chars"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive integer or None")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise ValueError(f"val_fraction={self.val_fraction!r}: expected a value in [0, 1)")
        if self.val_documents is not None and (not isinstance(self.val_documents, int) or self.val_documents < 0):
            raise ValueError(f"val_documents={self.val_documents!r}: expected an integer >= 0 or None")
        check_choice("txt_unit", self.txt_unit, TxtUnit)
        local = is_local_path(self.path)
        if local and (self.name is not None or self.streaming):
            raise ValueError(f"name={self.name!r}, streaming={self.streaming}: these apply to hub datasets only, but "
                             f"path={self.path!r} is a local path")
        if self.streaming and self.max_documents is None and self.max_chars is None:
            raise ValueError(f"streaming=True with path={self.path!r} would read the whole dataset; set "
                             "max_documents or max_chars")

    # ---------------------------------------------------------------------------------------------- reading
    def corpus(self) -> list[str]:
        """All documents after the caps, in corpus order (read once, then cached).

        Raises:
            ValueError: for a missing file, a missing text field, a non-string text, an unreachable hub id or a
                corpus without non-empty documents.
        """
        if self._corpus is None:
            docs: list[str] = []
            chars = 0
            for text, where in self._texts():
                if not isinstance(text, str):
                    raise ValueError(f"{where}: field {self.text_field!r} holds {type(text).__name__} "
                                     f"{preview(text)}, expected a string")
                if not text.strip():
                    continue
                docs.append(text)
                chars += len(text)
                if (self.max_documents is not None and len(docs) >= self.max_documents) or (
                        self.max_chars is not None and chars >= self.max_chars):
                    break
            if not docs:
                raise ValueError(f"path={self.path!r}: the corpus holds no non-empty documents "
                                 f"(text_field={self.text_field!r})")
            self._corpus = docs
        return self._corpus

    def _texts(self) -> Iterator[tuple[Any, str]]:
        """Yields ``(text, location)`` in corpus order; the generator is closed as soon as a cap is reached."""
        if not is_local_path(self.path):
            yield from self._hub_texts()
            return
        for file in corpus_files(self.path):
            if file.lower().endswith(".txt"):
                text = read_text_file(file)
                if self.txt_unit == "line":
                    for line_no, line in enumerate(text.split("\n"), 1):
                        yield line.strip(), f"{file}:{line_no}"
                else:
                    for i, paragraph in enumerate(_PARAGRAPH_BREAK.split(text)):
                        yield paragraph.strip(), f"{file}: paragraph {i}"
            else:
                for record, where in read_records(file, columns=[self.text_field]):
                    yield record_field(record, self.text_field, where), where

    def _hub_texts(self) -> Iterator[tuple[Any, str]]:
        ds = load_hub_dataset(self.path, self.name, self.split, self.streaming)
        label = f"{self.path} (name={self.name!r}, split={self.split!r})"
        columns = getattr(ds, "column_names", None)  # None for some streamed datasets: checked per record instead
        if columns is not None and self.text_field not in columns:
            raise ValueError(f"{label}: no field {self.text_field!r}; the dataset has fields {sorted(columns)}")
        for i, record in enumerate(ds):
            where = f"{label} record {i}"
            yield record_field(record, self.text_field, where), where

    # -------------------------------------------------------------------------------------------- splitting
    def num_val_documents(self, n: int) -> int:
        """How many of ``n`` documents go to validation (``val_documents``, else ``val_fraction`` rounded, >= 1)."""
        if self.val_documents is not None:
            n_val = self.val_documents
        else:
            n_val = max(1, round(self.val_fraction * n)) if self.val_fraction > 0 else 0
        if n_val >= n:
            raise ValueError(f"path={self.path!r}: holding out {n_val} validation document(s) of the {n} read leaves "
                             "no training documents; add documents or lower val_fraction/val_documents")
        return n_val

    def documents(self, split: str, seed: int) -> list[str]:
        """The documents of ``split``.

        Args:
            split: ``"train"`` or ``"val"``.
            seed: seed of the train/val split (unless ``split_seed`` is set).

        Returns:
            The split's documents in corpus order. The two splits are disjoint, together hold the whole (capped)
            corpus, and are identical for the same seed.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        docs = self.corpus()
        n_val = self.num_val_documents(len(docs))
        rng = random.Random(f"text-split-{self.split_seed if self.split_seed is not None else seed}")
        val = set(rng.sample(range(len(docs)), n_val))
        return [d for i, d in enumerate(docs) if (i in val) == (split == "val")]


# -------------------------------------------------------------------------------------------------- MixtureSource
@dataclass
class MixtureSource(DocumentSource):
    """Several sources mixed document by document with given weights (e.g. English web text + QA pairs).

    How many documents result, per split: ``N = train_documents`` (or ``val_documents``) when set; by default the
    largest mixture in which no document repeats, ``N = min_i floor(len_i / p_i)`` over the sources with ``p_i > 0``
    (``len_i`` = documents source ``i`` returns for the split, ``p_i`` = normalised weight) — the analogue of the
    reference's ``interleave_datasets(..., stopping_strategy="first_exhausted")``. Source ``i`` then contributes
    exactly ``round(p_i * N)`` documents (largest-remainder rounding, so the counts sum to ``N``), drawn from a
    seeded shuffle of its documents and reshuffled and cycled if more are needed than it has. The combined list is
    shuffled with the same seed. Weights count documents, not tokens.

    Args:
        sources: the component sources.
        weights: one non-negative weight per source (normalised to sum 1); ``None`` weighs them equally.
        train_documents: documents in the training split (``None``: the no-repeat default above).
        val_documents: documents in the validation split (``None``: the no-repeat default above).
    """

    sources: Sequence[DocumentSource]
    weights: Sequence[float] | None = None
    train_documents: int | None = None
    val_documents: int | None = None

    def __post_init__(self) -> None:
        self.sources = tuple(self.sources)
        if not self.sources or not all(isinstance(s, DocumentSource) for s in self.sources):
            raise ValueError(f"sources={list(self.sources)!r}: expected a non-empty list of DocumentSource objects")
        if self.weights is None:
            self.weights = (1.0,) * len(self.sources)
        self.weights = tuple(float(w) for w in self.weights)
        if len(self.weights) != len(self.sources):
            raise ValueError(f"weights={list(self.weights)}: expected one weight per source ({len(self.sources)})")
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights={list(self.weights)}: expected finite weights >= 0 with a positive sum")
        for name in ("train_documents", "val_documents"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive integer or None")

    @property
    def probabilities(self) -> tuple[float, ...]:
        """The weights normalised to sum to 1."""
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    def documents(self, split: str, seed: int) -> list[str]:
        """The mixed documents of ``split`` (``"train"`` or ``"val"``), deterministic for ``seed``."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        probs = self.probabilities
        active = [i for i, p in enumerate(probs) if p > 0]
        pools = {i: self.sources[i].documents(split, seed) for i in active}
        for i, pool in pools.items():
            if not pool:
                raise ValueError(f"sources[{i}] ({self.sources[i]!r}) has no {split} documents but weight "
                                 f"{self.weights[i]}; give it documents or weight 0")
        n = self.train_documents if split == "train" else self.val_documents
        if n is None:
            # Small epsilon: floor(3 / 0.3) must be 10, not 9 from 9.999999.
            n = min(math.floor(len(pools[i]) / probs[i] + 1e-9) for i in active)
        quotas = _largest_remainder({i: probs[i] for i in active}, n)
        rng = random.Random(f"mixture-{seed}-{split}")
        out: list[str] = []
        for i in active:
            pool, need = pools[i], quotas[i]
            while need > 0:  # a fresh shuffle per pass, so repeats (only when N asks for them) are spread out
                order = rng.sample(range(len(pool)), len(pool))
                out += [pool[j] for j in order[:need]]
                need -= min(need, len(pool))
        rng.shuffle(out)
        return out

    def eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        """The components' answer-scored sets; a name used by two sources gets a ``source{i}_`` prefix."""
        return _merged(source.eval_sets(seed, n_per_set) for source in self.sources)

    def trained_eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        """The components' trained-material sets; a name used by two sources gets a ``source{i}_`` prefix."""
        return _merged(source.trained_eval_sets(seed, n_per_set) for source in self.sources)

    def eval_groups(self) -> dict[str, str]:
        """The components' set groups, under the set names :meth:`eval_sets` gives."""
        return _merged(source.eval_groups() for source in self.sources)


def _merged(parts) -> dict:
    """One dict of every component's named entries; a name used by an earlier component gets a ``source{i}_``
    prefix."""
    out: dict = {}
    for i, part in enumerate(parts):
        for name, value in part.items():
            out[name if name not in out else f"source{i}_{name}"] = value
    return out


def _largest_remainder(probs: dict[int, float], n: int) -> dict[int, int]:
    """Integer counts proportional to ``probs`` that sum exactly to ``n`` (ties go to the lower index)."""
    raw = {i: p * n for i, p in probs.items()}
    counts = {i: math.floor(r) for i, r in raw.items()}
    for i in sorted(raw, key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts.values())]:
        counts[i] += 1
    return counts
