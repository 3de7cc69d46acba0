"""Shared validation metrics: token CE on retain/forget text, exact-match accuracy of greedy answers, and
multiple-choice (WMDP / MMLU) accuracy by log-likelihood.

Every stage logs the same names (DESIGN §4, §6): ``val/retain_ce``, ``val/forget_ce``, ``val/<set>_acc`` for each
answer-scored set (e.g. ``val/mul_word_problem_acc``), ``val/<set>_mcq_acc`` for each multiple-choice set (e.g.
``val/wmdp_cyber_mcq_acc``), and the per-side means ``val/retain_acc``, ``val/forget_acc``.

Multiple-choice sets are described by :class:`MCQSpec` (a local file or a hub id, k-shot, limit, side) and scored with
the lm-evaluation-harness prompt format and batched log-likelihoods of :mod:`undo_lightning.mcq` (spec §8.3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from undo_lightning.data.text import is_local_path
from undo_lightning.losses import token_nll
from undo_lightning.mcq import LETTERS, MCQRecord, build_prompt, load_mcq, loglikelihoods, select_fewshot

_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?\.?$")
#: logits elements (``rows x T x V``) per chunk of the CE in :func:`lm_nll`: 2^27 = 512 MiB in float32
_CE_CHUNK_ELEMENTS = 1 << 27
SIDES = ("retain", "forget")


@torch.no_grad()
def lm_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and number of scored tokens of a batch, run in row chunks of bounded logit size.

    A batch of ``B`` blocks would hold ``[B, T, V]`` logits (plus float32 copies inside the CE) at once; with a 256k
    vocabulary that is gigabytes per row. Rows are scored a few at a time so that one chunk's logits stay under
    ``_CE_CHUNK_ELEMENTS`` whatever the batch size.

    Args:
        input_ids, attention_mask, labels: ``[B, T]`` (``labels`` ``-100`` = ignored).

    Returns:
        ``(nll_sum, n_tokens)`` as in :func:`undo_lightning.losses.token_nll`.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, _CE_CHUNK_ELEMENTS // (input_ids.shape[1] * vocab))
    nll = torch.zeros((), device=input_ids.device)
    n = torch.zeros((), dtype=torch.long, device=input_ids.device)
    for start in range(0, input_ids.shape[0], rows):
        chunk = slice(start, start + rows)
        logits = model(input_ids=input_ids[chunk], attention_mask=attention_mask[chunk], use_cache=False).logits
        chunk_nll, chunk_n = token_nll(logits, labels[chunk])
        nll, n = nll + chunk_nll, n + chunk_n
    return nll, n


def parse_answer(text: str, special_tokens: list[str]) -> str | None:
    """The first whitespace- or special-token-delimited piece of a continuation (spec §8.2), or None if empty."""
    for special in special_tokens:
        text = text.replace(special, " ")
    pieces = text.split()
    return pieces[0] if pieces else None


def answer_matches(piece: str | None, answer: str) -> bool:
    """Numeric exact match (``"17"``, ``"17.0"`` and ``"17."`` all equal 17, as the reference scores them)."""
    if piece is None or not _NUMBER.match(piece):
        return piece == answer
    return abs(float(piece.rstrip(".")) - float(answer)) < 1e-6


@torch.no_grad()
def greedy_answers(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   max_new_tokens: int) -> list[str]:
    """Greedy continuations of a left-padded batch, decoded with special tokens kept.

    Uses ``generate`` on the whole batch (left padding, KV cache) instead of one prompt at a time.

    Args:
        input_ids: ``[B, T]`` left-padded prompts.
        attention_mask: ``[B, T]``.
        max_new_tokens: tokens to generate per prompt.

    Returns:
        ``B`` decoded continuations.
    """
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                         use_cache=True)
    model.train(was_training)
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=False)


def answer_correct(model, tokenizer, batch: dict) -> list[bool]:
    """Exact match of each prompt's greedy answer against ``batch["answers"]``.

    Generates one token more than the longest answer, so a model that keeps writing digits (``"400"`` for ``"40"``)
    is wrong.
    """
    n_answer = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in batch["answers"])
    texts = greedy_answers(model, tokenizer, batch["input_ids"], batch["attention_mask"], n_answer + 1)
    specials = [t for t in tokenizer.all_special_tokens if t]
    return [answer_matches(parse_answer(t, specials), a) for t, a in zip(texts, batch["answers"])]


class ValidationMetrics:
    """Accumulates CE and accuracy sums over one validation pass; reduction across ranks is one all-reduce.

    ``val/retain_acc`` / ``val/forget_acc`` are the unweighted means over a side's answer-scored sets (arithmetic);
    a side without answer-scored sets takes the mean over its multiple-choice sets instead (WMDP -> forget,
    MMLU -> retain), so the accuracy a stop rule or report reads is always one kind of metric.

    Args:
        eval_set_split: answer-scored set name -> ``"retain"`` or ``"forget"``.
        mcq_set_split: multiple-choice set name -> ``"retain"`` or ``"forget"``.

    Both fix the metric keys, which must be the same on every rank.
    """

    def __init__(self, eval_set_split: dict[str, str], mcq_set_split: dict[str, str] | None = None) -> None:
        self.set_split = dict(sorted(eval_set_split.items()))
        self.mcq_split = dict(sorted((mcq_set_split or {}).items()))
        self.keys = (["ce/retain", "ce/forget"] + [f"acc/{name}" for name in self.set_split]
                     + [f"mcq/{name}" for name in self.mcq_split])
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.sums = torch.zeros(len(self.keys), 2, dtype=torch.float64)  # (sum, count) per key

    def reset(self) -> None:
        self.sums.zero_()

    def update_lm(self, split: str, nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> None:
        row = self.index[f"ce/{split}"]
        self.sums[row, 0] += float(nll_sum)
        self.sums[row, 1] += float(n_tokens)

    def _update(self, kind: str, sets: list[str], correct: list[bool]) -> None:
        for name, ok in zip(sets, correct):
            row = self.index[f"{kind}/{name}"]
            self.sums[row, 0] += float(ok)
            self.sums[row, 1] += 1.0

    def update_answers(self, sets: list[str], correct: list[bool]) -> None:
        self._update("acc", sets, correct)

    def update_mcq(self, sets: list[str], correct: list[bool]) -> None:
        self._update("mcq", sets, correct)

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Metric values; ``reduce_sum`` sums the accumulator across ranks (identity on one process)."""
        sums = reduce_sum(self.sums.clone()) if reduce_sum is not None else self.sums
        sums = sums.double().cpu()
        out: dict[str, float] = {}
        for key, (total, count) in zip(self.keys, sums.tolist()):
            if count == 0:
                continue
            kind, name = key.split("/", 1)
            suffix = {"ce": "ce", "acc": "acc", "mcq": "mcq_acc"}[kind]
            out[f"val/{name}_{suffix}"] = total / count
        for split in SIDES:
            accs = [out[f"val/{n}_acc"] for n, s in self.set_split.items() if s == split and f"val/{n}_acc" in out]
            if not accs:
                accs = [out[f"val/{n}_mcq_acc"] for n, s in self.mcq_split.items()
                        if s == split and f"val/{n}_mcq_acc" in out]
            if accs:  # unweighted mean over sets, as the reference averages its per-set accuracies
                out[f"val/{split}_acc"] = sum(accs) / len(accs)
        return out


# ------------------------------------------------------------------------------------------------ multiple choice
@dataclass(frozen=True)
class MCQPrompt:
    """One question ready to score: the full context ending in ``"Answer:"``, its number of choices, the gold index."""

    context: str
    n_choices: int
    answer: int


def limit_records(records: Sequence[MCQRecord], limit: int | float | None) -> list[MCQRecord]:
    """The questions an evaluation with ``limit`` scores, in their original order.

    lm-evaluation-harness applies ``--limit`` per task, and MMLU is one task per subject, so the limit applies to each
    subject separately (records without a subject form one group): an integer ``N`` keeps the first ``N`` questions of
    each subject, a fraction ``f < 1`` keeps the first ``ceil(f * n)`` of each subject's ``n``. For a set with one
    subject (WMDP) this is the plain "first N" / "first fraction".

    Raises:
        ValueError: ``limit`` is not positive.
    """
    if limit is None:
        return list(records)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"limit={limit!r}: expected a positive count, a fraction in (0, 1), or None")
    groups: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.subject, []).append(i)
    keep: set[int] = set()
    for indices in groups.values():
        n = math.ceil(limit * len(indices)) if limit < 1 else int(limit)
        keep.update(indices[:n])
    return [r for i, r in enumerate(records) if i in keep]


def mcq_prompts(records: Sequence[MCQRecord], k_shot: int = 0, fewshot: Sequence[MCQRecord] | None = None,
                subject: str | None = None) -> list[MCQPrompt]:
    """The lm-eval contexts of ``records`` (description line, ``k_shot`` solved examples, the question).

    The few-shot rule is :func:`undo_lightning.mcq.select_fewshot`'s (from ``fewshot`` when given, else from
    ``records`` without the question itself), so the prompts are exactly those :func:`~undo_lightning.mcq.mcq_accuracy`
    builds for the same arguments.
    """
    return [MCQPrompt(build_prompt(r, select_fewshot(i, records, k_shot, fewshot), subject), len(r.choices), r.answer)
            for i, r in enumerate(records)]


def mcq_predictions(model, tokenizer, prompts: Sequence[MCQPrompt], batch_size: int = 16) -> list[int]:
    """Predicted choice per prompt: argmax of the log-likelihood of ``" A"``, ``" B"``, ... (first index on ties).

    Batched by :func:`undo_lightning.mcq.loglikelihoods` (one forward row per question when every choice letter is one
    token; only the scored positions' logits are materialised, chunked in float32).
    """
    requests = [(p.context, " " + LETTERS[j]) for p in prompts for j in range(p.n_choices)]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
    predictions, start = [], 0
    for p in prompts:
        ll = scores[start:start + p.n_choices]
        start += p.n_choices
        predictions.append(max(range(p.n_choices), key=lambda j, ll=ll: (ll[j], -j)))
    return predictions


def mcq_correct(model, tokenizer, batch: dict) -> list[bool]:
    """Whether each question of a validation batch (``contexts``, ``n_choices``, ``answers``) is answered correctly."""
    prompts = [MCQPrompt(c, n, a) for c, n, a in zip(batch["contexts"], batch["n_choices"], batch["answers"])]
    predictions = mcq_predictions(model, tokenizer, prompts, batch_size=max(1, len(prompts)))
    return [p == q.answer for p, q in zip(predictions, prompts)]


_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class MCQSpec:
    """A multiple-choice evaluation set in WMDP/MMLU format (``question``, ``choices``, ``answer`` index).

    Used as a validation metric of any stage (``RetainForgetDataModule(mcq={name: MCQSpec(...)})`` logs
    ``val/<name>_mcq_acc``) and by ``undo eval``. Scoring follows lm-evaluation-harness (spec §8.3): WMDP 0-shot,
    MMLU 5-shot with examples from its ``dev`` split.

    Args:
        path: a local ``.jsonl``/``.json``/``.parquet`` file or folder, or a hub id (``cais/wmdp``, ``cais/mmlu``).
        name: hub configuration (``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``; MMLU ``all`` or one subject).
        split: hub split to evaluate (``test`` for both).
        side: what the set measures: ``forget`` (WMDP) or ``retain`` (MMLU); its accuracy joins ``val/<side>_acc``
            when the data has no answer-scored (arithmetic) sets on that side.
        k_shot: solved examples before each question (WMDP 0, MMLU 5).
        fewshot: source of the solved examples: a split of the same hub dataset (``dev`` for MMLU) or a local file;
            ``None`` takes them from the evaluated records (never the question itself).
        limit: evaluate a subset, per subject as lm-eval does (:func:`limit_records`): an integer ``N`` = the first
            ``N`` questions of each subject, a fraction in (0, 1) = that share of each subject; ``None`` = all.
            Keeps validation during training cheap.
        subject: subject of the description line; ``None`` uses the records' own (hub WMDP sets get lm-eval's
            ``biology`` / ``cybersecurity`` / ``chemistry``; local records without one get no line), ``""`` omits it.
    """

    path: str
    name: str | None = None
    split: str = "test"
    side: Literal["retain", "forget"] = "forget"
    k_shot: int = 0
    fewshot: str | None = None
    limit: int | float | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path={self.path!r}: expected a multiple-choice file/folder or a hub dataset id")
        if self.side not in SIDES:
            raise ValueError(f"side={self.side!r}: expected 'retain' (e.g. MMLU) or 'forget' (e.g. WMDP)")
        if isinstance(self.k_shot, bool) or not isinstance(self.k_shot, int) or self.k_shot < 0:
            raise ValueError(f"k_shot={self.k_shot!r}: expected an integer >= 0")
        limit_records([], self.limit)  # validates limit
        if is_local_path(self.path) and self.name is not None:
            raise ValueError(f"name={self.name!r} applies to hub datasets only, but path={self.path!r} is local")
        if is_local_path(self.path) and self.fewshot is not None and not is_local_path(self.fewshot):
            raise ValueError(f"fewshot={self.fewshot!r} names a split of a hub dataset, but path={self.path!r} is a "
                             "local file; give the few-shot examples as a local file too")

    def records(self) -> list[MCQRecord]:
        """The evaluated questions (loaded and validated, after ``limit``)."""
        return limit_records(load_mcq(self.path, self.name, self.split, self.subject), self.limit)

    def fewshot_records(self) -> list[MCQRecord] | None:
        """The pool of solved examples (``None``: the evaluated records themselves)."""
        if self.fewshot is None or self.k_shot == 0:
            return None
        if is_local_path(self.fewshot):
            return load_mcq(self.fewshot, subject=self.subject)
        return load_mcq(self.path, self.name, self.fewshot, self.subject)

    def prompts(self) -> list[MCQPrompt]:
        """Every evaluated question as a scored prompt (see :func:`mcq_prompts`)."""
        return mcq_prompts(self.records(), self.k_shot, self.fewshot_records(), self.subject)


def check_set_name(name: str) -> None:
    """Multiple-choice set names become metric names (``val/<name>_mcq_acc``): letters, digits, ``_ . -`` only."""
    if not isinstance(name, str) or not _SET_NAME.match(name):
        raise ValueError(f"multiple-choice set name {name!r}: use letters, digits, '_', '.' or '-' (it becomes the "
                         "metric name val/<name>_mcq_acc)")
