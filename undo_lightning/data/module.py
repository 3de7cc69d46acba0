"""``RetainForgetDataModule``: one data module for every stage (docs/reference.md §3.3).

A stage states what it trains on through its ``train_data`` attribute and the data module serves it:

* ``"mixture"`` — retain and forget documents mixed with ``mixture`` probabilities (pretraining, distillation);
* ``"paired"`` — a dict ``{"forget": batch, "retain": batch}`` each step (unlearning);
* ``"forget"`` / ``"retain"`` — one split only (relearning attack).

Every training batch carries ``batch["split"]`` naming where it came from, so a stage can verify its data by
construction. Validation loaders give token CE on held-out retain/forget blocks, for sources with known answers
left-padded evaluation prompts scored by greedy exact match, and for the optional multiple-choice sets (WMDP, MMLU)
lm-eval-format questions scored by log-likelihood (``val/<name>_mcq_acc``).

Tokenizer ``"bpe"``: a byte-level BPE (:func:`undo_lightning.data.bpe.train_bpe_tokenizer`) trained offline, at first
use,
on the retain and forget TRAIN documents of the split made with seed 0. Training is deterministic and independent of the
data module's ``seed``, so every stage of an experiment, and every seed of a relearning sweep, rebuilds the identical
tokenizer from the same data settings; each exported ``hf/`` folder ships it. A stage that continues from a model folder
therefore gets the tokenizer that model was trained with; if a later stage changes the corpora or caps, the rebuilt
vocabulary would differ and loading the model fails with a "ships a tokenizer whose vocabulary differs" error: set
``tokenizer`` to that model's ``hf/`` folder instead (the safe choice for any stage that starts from a trained model).
"""

from __future__ import annotations

import math
import random
from enum import Enum
from functools import partial
from typing import Any, Callable, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from undo_lightning.data.arithmetic import ArithmeticSource
from undo_lightning.data.bpe import MIN_VOCAB_SIZE, train_bpe_tokenizer
from undo_lightning.data.mcq import MCQPrompt, MCQSpec, check_set_name
from undo_lightning.data.sources import DocumentSource, EvalItem
from undo_lightning.data.tokenizers import load_tokenizer
from undo_lightning.io import init_kwargs

SPLITS = ("retain", "forget")


class BatchKind(str, Enum):
    """What a validation batch holds (``batch["kind"]``), i.e. how a stage scores it."""

    LM = "lm"  # packed text blocks: token CE
    ANSWER = "answer"  # left-padded prompts with known answers: greedy exact match
    MCQ = "mcq"  # multiple-choice questions: log-likelihood of the answer letters
    EMPTY = "empty"  # this rank's share of an evaluation set ran out (DDP padding): nothing to score
TRAIN_DATA_KINDS = ("mixture", "paired", "forget", "retain")
#: seed of the train split the ``"bpe"`` tokenizer is trained on (fixed, so every data seed gets the same tokenizer)
BPE_SPLIT_SEED = 0
_TOKENIZE_CHUNK = 4096  # documents per tokenizer call: bounds the peak of Python int lists


def pack_documents(docs, block_size: int, separator_id: int) -> torch.Tensor:
    """Concatenates documents, each preceded by ``separator_id``, and cuts the stream into full blocks.

    Long documents continue into the next block rather than being truncated away (the reference drops remainders,
    docs/reference.md §4); the incomplete tail block is dropped.

    Args:
        docs: token ids per document (lists or 1-D integer arrays, without special tokens).
        block_size: tokens per block ``T``.
        separator_id: token placed before every document (``<bos>`` by default, as the reference does).

    Returns:
        ``[num_blocks, block_size]`` int64 tensor.
    """
    total = sum(len(doc) + 1 for doc in docs)
    stream = np.empty(total, dtype=np.int64)  # filled in place: no Python-int list of the whole corpus
    pos = 0
    for doc in docs:
        stream[pos] = separator_id
        stream[pos + 1:pos + 1 + len(doc)] = doc
        pos += len(doc) + 1
    n = total // block_size
    return torch.from_numpy(stream[: n * block_size].reshape(n, block_size))


def forget_tokens_per_block(docs, is_forget, block_size: int) -> torch.Tensor:
    """How many tokens of each block :func:`pack_documents` makes come from forget documents (a document's separator
    counts with it).

    Args:
        docs: token ids per document, as given to :func:`pack_documents`.
        is_forget: one flag per document.
        block_size: tokens per block ``T``.

    Returns:
        ``[num_blocks]`` int64 tensor.
    """
    mask = np.repeat(np.asarray(is_forget, dtype=np.int64), [len(doc) + 1 for doc in docs])
    n = len(mask) // block_size
    return torch.from_numpy(mask[: n * block_size].reshape(n, block_size).sum(axis=1))


class _Blocks(Dataset):
    """Packed blocks; with ``forget_tokens`` (mixture blocks) each item also says how many of its tokens are forget
    data, so a stage can count the tokens it saw per split."""

    def __init__(self, blocks: torch.Tensor, forget_tokens: torch.Tensor | None = None) -> None:
        self.blocks, self.forget_tokens = blocks, forget_tokens

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int):
        return self.blocks[i] if self.forget_tokens is None else (self.blocks[i], self.forget_tokens[i])


def _collate_blocks(rows: list, split: str) -> dict:
    mixed = isinstance(rows[0], tuple)
    ids = torch.stack([r[0] for r in rows] if mixed else rows)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "split": split,
             "kind": BatchKind.LM}
    if mixed:
        batch["forget_tokens"] = torch.stack([r[1] for r in rows])  # [B]: tokens of each row from forget documents
    return batch


class EvalShard(DistributedSampler):
    """Rank ``r``'s share of an evaluation set: items ``r, r + world, ...``, each item on exactly one rank.

    Lightning's own ``DistributedSampler`` pads the set with repeated items, which would then count twice in the
    metrics summed over ranks. Here the shorter ranks are padded with ``-1`` instead, which :class:`_Padded` turns
    into ``None`` and :func:`_without_pads` drops, so every rank still runs the same number of batches (DDP forwards
    must match across ranks) and every item counts once. Single process: all items in order.
    """

    def __init__(self, num_samples: int, rank_world: Callable[[], tuple[int, int]]) -> None:
        self.n, self.rank_world = num_samples, rank_world

    def __len__(self) -> int:
        return math.ceil(self.n / self.rank_world()[1])

    def __iter__(self):
        rank, world = self.rank_world()
        for i in range(len(self)):
            j = rank + i * world
            yield j if j < self.n else -1

    def set_epoch(self, epoch: int) -> None:  # evaluation order never changes
        pass


class _Padded(Dataset):
    """``dataset[i]``, and ``None`` for the padding index ``-1`` of :class:`EvalShard`."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return None if i < 0 else self.dataset[i]


def _without_pads(rows: list, collate: Callable[[list], dict]) -> dict:
    rows = [row for row in rows if row is not None]
    return collate(rows) if rows else {"kind": BatchKind.EMPTY}  # a batch of padding only: validation skips it


class StepSampler(DistributedSampler):
    """Seeded sample order addressed by training step, so a resumed run sees exactly the batches it would have seen.

    The ``k``-th batch of rank ``r`` is the same pure function of ``(seed, k, r)`` in every run; an epoch boundary, a
    restart or a resume only changes where iteration starts (``start_batch()``). Subclassing ``DistributedSampler``
    tells Lightning the sampler already handles ranks, so it is not wrapped again under DDP.
    """

    def __init__(self, num_samples: int, batch_size: int, batches_per_epoch: int, seed: int,
                 start_batch: Callable[[], int], rank_world: Callable[[], tuple[int, int]]) -> None:
        self.n, self.batch_size, self.batches_per_epoch, self.seed = num_samples, batch_size, batches_per_epoch, seed
        self.start_batch, self.rank_world = start_batch, rank_world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self):
        rank, world = self.rank_world()
        start = self.start_batch()
        for k in range(start, start + self.batches_per_epoch):
            first = (k * world + rank) * self.batch_size
            for flat in range(first, first + self.batch_size):
                epoch, pos = divmod(flat, self.n)
                yield int(self._perm(epoch)[pos])

    def set_epoch(self, epoch: int) -> None:  # the order is addressed by step, not epoch
        pass


class RetainForgetDataModule(L.LightningDataModule):
    """Retain/forget data for every UNDO stage.

    Args:
        retain: source of retain documents (default: arithmetic addition/subtraction).
        forget: source of forget documents (default: arithmetic multiplication/division).
        tokenizer: ``"arithmetic"`` (offline), ``"bpe"`` (a byte-level BPE trained offline on the retain + forget
            training documents; see the module docstring), a local tokenizer folder (e.g. a stage's ``hf/``) or a hub
            id (``google/gemma-2-2b``).
        block_size: tokens per packed training block.
        batch_size: blocks per training batch (per device); paired batches hold this many of each split.
        eval_batch_size: sequences per validation batch.
        mixture: probabilities of ``retain``/``forget`` documents in the ``"mixture"`` loader; must sum to 1
            (``{"retain": 1.0}`` trains the oracle).
        eval_prompts_per_set: evaluation prompts per answer-scored set (e.g. ``mul_word_problem``).
        seed: seed of document generation, mixing and sample order.
        order_seed: seed of mixing and sample order only (default: ``seed``): runs that differ in it see the same
            documents and evaluation prompts in a different order — the relearning sweep's attack seeds.
        num_workers: DataLoader worker processes.
        bpe_vocab_size: vocabulary size of the ``"bpe"`` tokenizer (at least 260: 4 special + 256 byte tokens).
        mcq: multiple-choice validation sets, ``{name: MCQSpec}`` (e.g. ``wmdp_cyber`` on the forget side, ``mmlu``
            on the retain side); each logs ``val/<name>_mcq_acc`` at every validation. Use ``limit`` to keep them
            cheap.
        mcq_batch_size: questions per multiple-choice validation batch (one forward row each).
        few_shot: the forget training data is only this many documents, drawn with ``order_seed`` and repeated until
            they fill one training batch of blocks: the few-shot relearning attack (an attacker who holds a handful
            of examples). ``None`` (default): every forget training document. Only the forget split's training
            blocks change (not the mixture, not evaluation).
    """

    def __init__(
        self,
        retain: DocumentSource | None = None,
        forget: DocumentSource | None = None,
        tokenizer: str = "arithmetic",
        block_size: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 512,
        mixture: dict[str, float] | None = None,
        eval_prompts_per_set: int = 100,
        seed: int = 0,
        order_seed: int | None = None,
        num_workers: int = 0,
        bpe_vocab_size: int = 8192,
        mcq: dict[str, MCQSpec] | None = None,
        mcq_batch_size: int = 8,
        few_shot: int | None = None,
    ) -> None:
        super().__init__()
        if few_shot is not None and (isinstance(few_shot, bool) or not isinstance(few_shot, int) or few_shot < 1):
            raise ValueError(f"few_shot={few_shot!r}: expected a positive number of forget documents, or null for all")
        self.few_shot = few_shot
        self.retain = retain if retain is not None else ArithmeticSource(operations=("add", "sub"))
        self.forget = forget if forget is not None else ArithmeticSource(operations=("mul", "div"))
        self.mixture = dict(mixture) if mixture is not None else {"retain": 0.5, "forget": 0.5}
        _check_mixture(self.mixture)
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("mcq_batch_size", mcq_batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value}: expected a positive integer")
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: expected at least 2 tokens (input + next-token target)")
        if eval_prompts_per_set < 0:
            raise ValueError(f"eval_prompts_per_set={eval_prompts_per_set}: expected >= 0")
        if tokenizer == "bpe" and (isinstance(bpe_vocab_size, bool) or not isinstance(bpe_vocab_size, int)
                                   or bpe_vocab_size < MIN_VOCAB_SIZE):
            raise ValueError(f"bpe_vocab_size={bpe_vocab_size!r}: expected an integer >= {MIN_VOCAB_SIZE}")
        self.mcq = dict(mcq or {})
        for name, spec in self.mcq.items():
            check_set_name(name)
            if not isinstance(spec, MCQSpec):
                raise ValueError(f"mcq[{name!r}]={spec!r}: expected an MCQSpec (path, name, split, side, k_shot, "
                                 "fewshot, limit, subject)")
        self.bpe_vocab_size, self.mcq_batch_size = bpe_vocab_size, mcq_batch_size
        self.tokenizer_name = tokenizer
        self.block_size, self.batch_size, self.eval_batch_size = block_size, batch_size, eval_batch_size
        self.eval_prompts_per_set, self.seed, self.num_workers = eval_prompts_per_set, seed, num_workers
        self.order_seed = seed if order_seed is None else order_seed
        self._tokenizer = None
        self._docs: dict[tuple[str, str], list[np.ndarray]] = {}
        self._blocks: dict[str, torch.Tensor] = {}
        self._forget_tokens: torch.Tensor | None = None  # [N]: forget tokens per mixture block
        self.eval_sets: dict[str, list[EvalItem]] = {}
        self.eval_set_split: dict[str, str] = {}
        self.eval_set_group: dict[str, str] = {}  # set name -> group, e.g. "mul_equation" -> "equation"
        self.mcq_sets: dict[str, list[MCQPrompt]] = {}
        self.mcq_set_split: dict[str, str] = {name: spec.side for name, spec in self.mcq.items()}

    # ------------------------------------------------------------------------------------------- from config
    @classmethod
    def config_kwargs(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Checked keyword arguments from a config-style ``data:`` section (YAML form).

        Sources may be given as ``{class_path: ..., init_args: {...}}`` (instantiated the way LightningCLI does for
        stage configs) or as source objects; a ``{class_path, init_args}`` wrapper around the whole section is
        accepted too.

        Raises:
            ValueError: an unknown key or a value of the wrong type, naming it.
        """
        data = dict(config.get("init_args", config))
        return init_kwargs(cls, data, f"bad data settings {sorted(data)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> RetainForgetDataModule:
        """The data module of a config-style ``data:`` section (see :meth:`config_kwargs`), with ``overrides``."""
        return cls(**{**cls.config_kwargs(config), **overrides})

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def tokenizer(self):
        """The tokenizer every stage shares (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = self._train_bpe() if self.tokenizer_name == "bpe" else load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _train_bpe(self):
        """The ``"bpe"`` tokenizer: trained on the retain + forget training documents of the seed-0 split."""
        texts = self.retain.documents("train", BPE_SPLIT_SEED) + self.forget.documents("train", BPE_SPLIT_SEED)
        return train_bpe_tokenizer(texts, vocab_size=self.bpe_vocab_size)

    @property
    def separator_id(self) -> int:
        tok = self.tokenizer
        sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if sep is None:
            raise ValueError(f"tokenizer={self.tokenizer_name!r} has neither a bos nor an eos token to separate "
                             "documents")
        return sep

    def setup(self, stage: str | None = None) -> None:
        if self._docs:
            return
        for split, source in (("retain", self.retain), ("forget", self.forget)):
            for part in ("train", "val"):
                texts = source.documents(part, self.seed)
                if not texts:
                    raise ValueError(f"the {split} source has an empty {part} split ({source!r}); give it documents")
                self._docs[(split, part)] = self._tokenize(texts)
            groups = source.eval_groups()
            for name, items in source.eval_sets(self.seed, self.eval_prompts_per_set).items():
                if items:
                    self.eval_sets[name], self.eval_set_split[name] = items, split
                    if name in groups:
                        self.eval_set_group[name] = groups[name]
            # sets of trained material score on a side of their own (val/<side>_trained_acc), never in val/<side>_acc
            for name, items in source.trained_eval_sets(self.seed, self.eval_prompts_per_set).items():
                if items:
                    key = f"{name}_trained"
                    self.eval_sets[key], self.eval_set_split[key] = items, f"{split}_trained"
        self.check_block_size(self.eval_sets)
        for split in SPLITS:
            self._blocks[f"{split}/val"] = self._pack(self._docs[(split, "val")], f"{split} val")
        for name, spec in self.mcq.items():
            try:
                self.mcq_sets[name] = spec.prompts()
            except ValueError as err:
                raise ValueError(f"mcq[{name!r}]: {err}") from None

    def check_block_size(self, eval_sets: Mapping[str, list[EvalItem]] | None = None) -> None:
        """Refuses a ``block_size`` shorter than an answer-scored example (separator + prompt + answer): no packed
        block could then hold a problem together with its answer, and the model could never learn the task.

        Args:
            eval_sets: the answer-scored sets to measure (default: the sources' own, drawn without :meth:`setup`).

        Raises:
            ValueError: naming ``block_size``, the longest example and its length.
        """
        if eval_sets is None:
            eval_sets = {name: items for source in (self.retain, self.forget)
                         for name, items in source.eval_sets(self.seed, self.eval_prompts_per_set).items()}
        if not any(eval_sets.values()):
            return  # nothing answer-scored (e.g. language data): no tokenizer needed
        tok, need, longest = self.tokenizer, 0, None
        for items in eval_sets.values():
            for item in items:
                n = len(tok(item.prompt)["input_ids"]) + len(tok(item.answer, add_special_tokens=False)["input_ids"])
                if n > need:
                    need, longest = n, item
        if need > self.block_size:
            raise ValueError(f"block_size={self.block_size}: shorter than one answer-scored example "
                             f"({longest.prompt!r} -> {longest.answer!r} takes {need} tokens with its separator); no "
                             f"block could hold a problem and its answer together: expected block_size >= {need}")

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids per document as int32 arrays (4 bytes per token instead of ~36 in a list of Python ints)."""
        tok, out = self.tokenizer, []
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            ids = tok(texts[start:start + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
            out.extend(np.asarray(doc, dtype=np.int32) for doc in ids)
        return out

    def _pack(self, docs: list[np.ndarray], what: str) -> torch.Tensor:
        blocks = pack_documents(docs, self.block_size, self.separator_id)
        if blocks.shape[0] == 0:
            n_tokens = sum(len(d) + 1 for d in docs)
            raise ValueError(f"the {what} split has {n_tokens} tokens, fewer than one block of "
                             f"block_size={self.block_size}; add documents or lower block_size")
        return blocks

    def train_blocks(self, kind: str) -> torch.Tensor:
        """Packed training blocks for ``kind`` in ``("mixture", "retain", "forget")``: ``[N, block_size]``."""
        if kind not in self._blocks:
            self.setup()
            if kind == "mixture":
                docs, is_forget = self._mixture_docs()
                self._blocks[kind] = self._pack(docs, f"mixture {self.mixture}")
                self._forget_tokens = forget_tokens_per_block(docs, is_forget, self.block_size)
            elif kind == "forget" and self.few_shot is not None:
                self._blocks[kind] = self._pack(self._few_shot_docs(), f"few-shot ({self.few_shot} documents) forget")
            else:
                self._blocks[kind] = self._pack(self._docs[(kind, "train")], f"{kind} train")
        return self._blocks[kind]

    def _few_shot_docs(self) -> list[np.ndarray]:
        """``few_shot`` forget training documents drawn with ``order_seed``, repeated until they fill one batch."""
        pool = self._docs[("forget", "train")]
        if self.few_shot > len(pool):
            raise ValueError(f"few_shot={self.few_shot}: the forget split has only {len(pool)} training documents")
        chosen = [pool[i] for i in random.Random(self.order_seed).sample(range(len(pool)), self.few_shot)]
        tokens = sum(len(d) + 1 for d in chosen)  # +1: each document's separator
        return chosen * math.ceil(self.block_size * self.batch_size / tokens)

    def _mixture_docs(self) -> tuple[list[np.ndarray], list[bool]]:
        """Draws documents from the splits with ``mixture`` probabilities, each split's pool shuffled and cycled;
        returns them and whether each is a forget document."""
        rng = random.Random(self.order_seed)
        pools = {s: self._docs[(s, "train")] for s, p in self.mixture.items() if p > 0}
        orders = {s: rng.sample(range(len(pool)), len(pool)) for s, pool in pools.items()}
        # As many documents as the pools hold in total, so a pure retain mixture sees every retain document once.
        total = sum(len(p) for p in pools.values())
        names, weights = list(pools), [self.mixture[s] for s in pools]
        cursor = dict.fromkeys(pools, 0)
        docs, is_forget = [], []
        for split in rng.choices(names, weights=weights, k=total):
            docs.append(pools[split][orders[split][cursor[split] % len(pools[split])]])
            is_forget.append(split == "forget")
            cursor[split] += 1
        return docs, is_forget

    # ---------------------------------------------------------------------------------------------- loaders
    def _train_kind(self) -> str:
        module = self.trainer.lightning_module if self.trainer is not None else None
        kind = getattr(module, "train_data", "mixture")
        if kind not in TRAIN_DATA_KINDS:
            raise ValueError(f"{type(module).__name__}.train_data={kind!r}: expected one of {TRAIN_DATA_KINDS}")
        return kind

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _start_batch(self) -> int:
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0

    def _train_loader(self, blocks: torch.Tensor, split: str, batches_per_epoch: int) -> DataLoader:
        sampler = StepSampler(blocks.shape[0], self.batch_size, batches_per_epoch, self.order_seed + _SPLIT_SEED[split],
                              self._start_batch, self._rank_world)
        dataset = _Blocks(blocks, self._forget_tokens if split == "mixture" else None)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=partial(_collate_blocks, split=split))

    def _epoch_batches(self, *sizes: int) -> int:
        _, world = self._rank_world()
        return max(1, max(sizes) // (self.batch_size * world))

    def train_dataloader(self):
        kind = self._train_kind()
        if kind == "paired":
            forget, retain = self.train_blocks("forget"), self.train_blocks("retain")
            # Both loaders get the same epoch length so neither restarts mid-epoch (keeps resume exact).
            n = self._epoch_batches(forget.shape[0], retain.shape[0])
            return {"forget": self._train_loader(forget, "forget", n),
                    "retain": self._train_loader(retain, "retain", n)}
        blocks = self.train_blocks(kind)
        return self._train_loader(blocks, kind, self._epoch_batches(blocks.shape[0]))

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        loaders = [self._eval_loader(_Blocks(self._blocks[f"{s}/val"]), self.eval_batch_size,
                                     partial(_collate_blocks, split=s)) for s in SPLITS]
        items = [(name, item) for name, set_items in self.eval_sets.items() for item in set_items]
        if items:
            loaders.append(self._eval_loader(items, self.eval_batch_size, self._collate_prompts))
        questions = [(name, prompt) for name, prompts in self.mcq_sets.items() for prompt in prompts]
        if questions:
            loaders.append(self._eval_loader(questions, self.mcq_batch_size, _collate_mcq))
        return loaders

    def _eval_loader(self, dataset, batch_size: int, collate: Callable[[list], dict]) -> DataLoader:
        """Each evaluation item on exactly one rank (see :class:`EvalShard`)."""
        return DataLoader(_Padded(dataset), batch_size=batch_size, sampler=EvalShard(len(dataset), self._rank_world),
                          num_workers=self.num_workers, collate_fn=partial(_without_pads, collate=collate))

    def _collate_prompts(self, rows: list[tuple[str, EvalItem]]) -> dict:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the last position of every row
        try:
            enc = tok([item.prompt for _, item in rows], padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "answers": [item.answer for _, item in rows], "sets": [name for name, _ in rows],
                "kind": BatchKind.ANSWER}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "order_seed": self.order_seed, "mixture": self.mixture,
                "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state.get(key, getattr(self, key)) for key in ("seed", "order_seed", "block_size")}
        if saved != {key: getattr(self, key) for key in saved}:
            raise ValueError(f"the checkpoint was written with data {saved}, but this run has seed={self.seed}, "
                             f"order_seed={self.order_seed}, block_size={self.block_size}; resuming would change "
                             "the data order")


_SPLIT_SEED = {"mixture": 0, "retain": 101, "forget": 202}


def _collate_mcq(rows: list[tuple[str, MCQPrompt]]) -> dict:
    """Multiple-choice questions as strings; the module scores them with ``evaluation.mcq_correct``."""
    return {"contexts": [p.context for _, p in rows], "n_choices": [p.n_choices for _, p in rows],
            "answers": [p.answer for _, p in rows], "sets": [name for name, _ in rows], "kind": BatchKind.MCQ}


def _check_mixture(mixture: dict[str, float]) -> None:
    bad = [k for k in mixture if k not in SPLITS]
    if bad or any(v < 0 for v in mixture.values()):
        raise ValueError(f"mixture={mixture}: keys must be 'retain'/'forget' and probabilities >= 0")
    if not math.isclose(sum(mixture.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixture={mixture}: probabilities sum to {sum(mixture.values()):g}, expected 1")
