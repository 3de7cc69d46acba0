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
from undo_lightning.losses import auto_chunk_size, token_nll

_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?\.?$")
#: float32 logits (``rows x T x V``) per chunk of the CE in :func:`lm_nll`
_CE_CHUNK_BYTES = 512 * 2**20


@torch.no_grad()
def lm_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and number of scored tokens of a batch, run in row chunks of bounded logit size.

    A batch of ``B`` blocks would hold ``[B, T, V]`` logits (plus float32 copies inside the CE) at once; with a 256k
    vocabulary that is gigabytes per row. Rows are scored a few at a time so that one chunk's logits stay under
    ``_CE_CHUNK_BYTES`` whatever the batch size.

    Args:
        input_ids, attention_mask, labels: ``[B, T]`` (``labels`` ``-100`` = ignored).

    Returns:
        ``(nll_sum, n_tokens)`` as in :func:`undo_lightning.losses.token_nll`.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = auto_chunk_size(input_ids.shape[1] * vocab, _CE_CHUNK_BYTES)
    nll = torch.zeros((), device=input_ids.device)
    n = torch.zeros((), dtype=torch.long, device=input_ids.device)
    for start in range(0, input_ids.shape[0], rows):
        chunk = slice(start, start + rows)
        logits = model(input_ids=input_ids[chunk], attention_mask=attention_mask[chunk], use_cache=False).logits
        chunk_nll, chunk_n = token_nll(logits, labels[chunk])
        nll, n = nll + chunk_nll, n + chunk_n
    return nll, n


def parse_answer(text: str, special_tokens: list[str]) -> str | None:
    """First whitespace- or special-token-delimited piece of a continuation (docs/reference.md §9.2); None if empty."""
    for special in special_tokens:
        text = text.replace(special, " ")
    pieces = text.split()
    return pieces[0] if pieces else None


def answer_matches(piece: str | None, answer: str) -> bool:
    """Numeric exact match (``"17"``, ``"17.0"`` and ``"17."`` all equal 17, as the reference scores them); text
    answers match exactly."""
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
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                         use_cache=True)
    model.train(was_training)
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=False)


def answer_correct(model, tokenizer, batch: dict, one_pass: bool | None = None) -> list[bool]:
    """Exact match of each prompt's greedy answer against ``batch["answers"]``.

    The greedy continuation has one token more than the longest answer of the batch, so a model that keeps writing
    digits (``"400"`` for ``"40"``) is wrong. With a tokenizer whose decoding is token concatenation (the arithmetic
    tokenizer, :func:`decodes_by_concatenation`) the result comes from one teacher-forced forward pass
    (:func:`one_pass_answers`) and is the greedy-``generate`` result by construction; rows it cannot decide, and
    every row with another tokenizer, are decoded with batched ``generate``.

    Args:
        batch: ``input_ids`` / ``attention_mask`` ``[B, T]`` left-padded prompts and ``answers`` (``B`` strings).
        one_pass: force (``True``) or forbid (``False``) the one-pass path; ``None``: use it where it is exact.

    Returns:
        ``B`` booleans.
    """
    answers = batch["answers"]
    answer_ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    budget = max(len(ids) for ids in answer_ids) + 1
    specials = [t for t in tokenizer.all_special_tokens if t]
    if one_pass is None:
        one_pass = decodes_by_concatenation(tokenizer)
    result: list[bool | None] = [None] * len(answers)
    if one_pass:
        result = one_pass_answers(model, tokenizer, batch["input_ids"], batch["attention_mask"], answer_ids, answers,
                                  budget)
    rows = [i for i, r in enumerate(result) if r is None]
    if rows:  # undecided rows (or no one-pass path): decode them
        index = torch.tensor(rows, device=batch["input_ids"].device)
        texts = greedy_answers(model, tokenizer, batch["input_ids"][index], batch["attention_mask"][index], budget)
        for i, text in zip(rows, texts):
            result[i] = answer_matches(parse_answer(text, specials), answers[i])
    return result


def decodes_by_concatenation(tokenizer) -> bool:
    """Whether decoding a token sequence is the concatenation of its tokens' texts, so the text of a prefix of a
    continuation is a prefix of the continuation's text (a word-level vocabulary with a Metaspace decoder: the
    arithmetic tokenizer). Byte-level BPE is not: a token can hold part of a UTF-8 character."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False  # the clean-up glues " ." to the piece before it: a later token could change earlier text
    return type(backend.model).__name__ == "WordLevel" and type(backend.decoder).__name__ == "Metaspace"


#: prefixes of the numbers ``answer_matches`` reads (``-?\d+(\.\d+)?\.?``)
_NUMBER_PREFIX = re.compile(r"^-?(?:\d+(?:\.(?:\d+\.?)?)?)?$")


def could_match(prefix: str, answer: str) -> bool:
    """Whether some piece that starts with ``prefix`` can still match ``answer`` (:func:`answer_matches`).

    ``False`` is exact; ``True`` may be conservative (a fractional prefix, an answer that is not an integer).
    """
    if answer.startswith(prefix):
        return True
    if not _NUMBER.match(answer) or not _NUMBER_PREFIX.match(prefix):
        return False  # only the exact text can match, or the piece can never be a number
    value = float(answer.rstrip("."))
    if "." in prefix or value != int(value):
        return True
    negative, digits = prefix.startswith("-"), prefix.lstrip("-")
    if negative != (value < 0):
        return abs(value) < 1  # -0.0000001 is within tolerance of 0
    if not digits.strip("0"):
        return True  # "", "0", "00": leading zeros, any number may follow
    core = digits.lstrip("0")
    # the integer part is |value| (e.g. 42.0000001) or |value| - 1 (41.9999999)
    return any(str(n).startswith(core) for n in (abs(int(value)), abs(int(value)) - 1) if n > 0)


@torch.no_grad()
def one_pass_answers(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answer_ids: list[list[int]], answers: list[str], budget: int) -> list[bool | None]:
    """Greedy exact match from one forward pass over ``prompt + answer`` (teacher forcing), where it is decidable.

    Greedy decoding emits the answer's tokens ``a_0 .. a_{n-1}`` iff the argmax after the prompt is ``a_0`` and the
    argmax after ``prompt + a_0 .. a_{j-1}`` is ``a_j`` for each ``j`` (the same contexts as the decoding loop; the
    verification step of assisted generation). So one pass gives the first ``k + 1`` greedy tokens, ``k`` being the
    first position where the argmax leaves the answer (``k = n`` if it never does). The row is decided when those
    tokens fix the first piece of the continuation (all ``budget`` tokens known, or a delimiter after the piece), or
    when no continuation of the piece can match (:func:`could_match`); otherwise it is ``None`` (decode it).
    Position ids follow ``generate``'s (attention-mask cumsum), so the logits are those the decoding loop computes.
    Requires :func:`decodes_by_concatenation`.

    Args:
        input_ids, attention_mask: ``[B, T]`` left-padded prompts.
        answer_ids: each row's answer tokens (``" " + answer``, no special tokens).
        answers: the answers as text.
        budget: tokens the greedy continuation has (longest answer + 1).

    Returns:
        ``B`` values: ``True`` / ``False`` where decided, else ``None``.
    """
    rows, width = input_ids.shape
    n_max = max(len(ids) for ids in answer_ids)
    tail = torch.full((rows, n_max), tokenizer.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    tail_mask = torch.zeros((rows, n_max), dtype=attention_mask.dtype, device=attention_mask.device)
    for i, ids in enumerate(answer_ids):
        tail[i, : len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        tail_mask[i, : len(ids)] = 1
    ids = torch.cat([input_ids, tail], dim=1)
    mask = torch.cat([attention_mask, tail_mask], dim=1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=n_max + 1).logits
    model.train(was_training)
    predicted = logits.argmax(-1).tolist()  # [B, n_max + 1]: the argmax after prompt + a_0 .. a_{j-1}
    specials = [t for t in tokenizer.all_special_tokens if t]
    out: list[bool | None] = []
    for row, (answer, target) in enumerate(zip(answers, answer_ids)):
        k = next((j for j, t in enumerate(target) if predicted[row][j] != t), len(target))
        known = target[:k] + [predicted[row][k]]
        text = tokenizer.decode(known, skip_special_tokens=False)
        for special in specials:
            text = text.replace(special, " ")
        piece = parse_answer(text, [])
        complete = piece is not None and len(text.lstrip()) > len(piece)  # whitespace after the first piece
        if complete or len(known) == budget:
            out.append(answer_matches(piece, answer))
        elif piece is not None and not could_match(piece, answer):
            out.append(False)
        else:
            out.append(None)  # nothing but whitespace yet, or a piece that may still grow into the answer
    return out


class ValidationMetrics:
    """Accumulates CE and accuracy sums over one validation pass; reduction across ranks is one all-reduce.

    ``val/retain_acc`` / ``val/forget_acc`` are the unweighted means over a side's answer-scored sets (arithmetic);
    a side without answer-scored sets takes the mean over its multiple-choice sets instead (WMDP -> forget,
    MMLU -> retain), so the accuracy a stop rule or report reads is always one kind of metric.

    Args:
        eval_set_split: answer-scored set name -> ``"retain"`` or ``"forget"``.
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
        for split in SIDES:
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

