"""Shared validation metrics: token CE on retain/forget text, exact-match accuracy of greedy answers, and
multiple-choice (WMDP / MMLU) accuracy by log-likelihood.

Every stage logs the same names (docs/reference.md §9): ``val/retain_ce``, ``val/forget_ce``, ``val/<set>_acc`` for each
answer-scored set (e.g. ``val/mul_word_problem_acc``), ``val/<set>_mcq_acc`` for each multiple-choice set (e.g.
``val/wmdp_cyber_mcq_acc``), and the per-side means ``val/retain_acc``, ``val/forget_acc``.

Multiple-choice sets are described by :class:`MCQSpec` (a local file or a hub id, k-shot, limit, side) and scored
with the lm-evaluation-harness prompt format and batched log-likelihoods of :mod:`undo_lightning.eval.mcq`
(docs/reference.md §9.3).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from undo_lightning.data.mcq import SIDES
from undo_lightning.losses import lm_hidden_states, token_nll
from undo_lightning.sharding import is_sharded

_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?\.?$")


@torch.no_grad()
def lm_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and number of scored tokens of a batch.

    The decoder runs once; the CE builds logits from its hidden states a chunk of positions at a time
    (:func:`~undo_lightning.losses.causal_lm_loss`), so a batch never holds ``[B, T, V]`` logits whatever the
    vocabulary.

    Args:
        input_ids, attention_mask, labels: ``[B, T]`` (``labels`` ``-100`` = ignored).

    Returns:
        ``(nll_sum, n_tokens)`` as in :func:`undo_lightning.losses.token_nll`.
    """
    return token_nll(lm_hidden_states(model, input_ids, attention_mask), labels)


def parse_answer(text: str, special_tokens: list[str]) -> str | None:
    """First whitespace- or special-token-delimited piece of a continuation (docs/reference.md §9.2); None if empty."""
    for special in special_tokens:
        text = text.replace(special, " ")
    pieces = text.split()
    return pieces[0] if pieces else None


def answer_matches(piece: str | None, answer: str) -> bool:
    """Numeric exact match (``"17"``, ``"17.0"`` and ``"17."`` all equal 17, as the reference scores them); a text
    answer matches only itself."""
    if piece is None or not _NUMBER.match(piece) or not _NUMBER.match(answer):
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
    # A sharded model's forwards are collectives: synced_gpus keeps every rank stepping until all ranks are done.
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                         use_cache=True, synced_gpus=is_sharded(model))
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
    MMLU -> retain), so the accuracy a stop rule or report reads is always one kind of metric. Sets of trained
    material (side ``forget_trained``, see ``DocumentSource.trained_eval_sets``) get their own mean,
    ``val/forget_trained_acc``.

    Args:
        eval_set_split: answer-scored set name -> ``"retain"`` or ``"forget"`` (or ``"<side>_trained"``).
        eval_set_group: answer-scored set name -> group (e.g. ``"equation"``); each group's unweighted mean per side
            is ``val/<side>_<group>_acc``.
        mcq_set_split: multiple-choice set name -> ``"retain"`` or ``"forget"``.

    Both fix the metric keys, which must be the same on every rank.
    """

    def __init__(self, eval_set_split: dict[str, str], mcq_set_split: dict[str, str] | None = None,
                 eval_set_group: dict[str, str] | None = None) -> None:
        self.set_split = dict(sorted(eval_set_split.items()))
        self.set_group = dict(eval_set_group or {})
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
        # the sides are retain and forget, plus "<side>_trained" when a source scores its trained material apart
        for split in list(SIDES) + sorted(set(self.set_split.values()) - set(SIDES)):
            accs = [out[f"val/{n}_acc"] for n, s in self.set_split.items() if s == split and f"val/{n}_acc" in out]
            if not accs:
                accs = [out[f"val/{n}_mcq_acc"] for n, s in self.mcq_split.items()
                        if s == split and f"val/{n}_mcq_acc" in out]
            if accs:  # unweighted mean over sets, as the reference averages its per-set accuracies
                out[f"val/{split}_acc"] = sum(accs) / len(accs)
            for group in sorted(set(self.set_group.values())):
                accs = [out[f"val/{n}_acc"] for n, s in self.set_split.items()
                        if s == split and self.set_group.get(n) == group and f"val/{n}_acc" in out]
                if accs:
                    out[f"val/{split}_{group}_acc"] = sum(accs) / len(accs)
        return out


# ------------------------------------------------------------------------------------------------ multiple choice

