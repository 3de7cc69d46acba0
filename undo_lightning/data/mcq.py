"""Multiple-choice records (WMDP / MMLU format) and their prompts in the format of lm-evaluation-harness.

This is the data half of multiple-choice evaluation: loading and validating ``{question, choices, answer}`` records
from local files or the hub, choosing few-shot examples, and building the exact prompt text lm-eval's ``wmdp_*`` /
``mmlu_*`` tasks build. Scoring the prompts by log-likelihood is :mod:`undo_lightning.eval.mcq`.

Prompt: an optional description line ``"The following are multiple choice questions (with answers) about
{subject}.\\n\\n"``, then ``k`` solved examples ``"{question}\\nA. {c0}\\nB. {c1}\\n...\\nAnswer: {letter}\\n\\n"`` and
the target question ending in ``"Answer:"`` (questions are ``strip()``-ed, choices are not, as in the task YAMLs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from undo_lightning.io import is_local_path, load_hub_dataset, read_records, record_field

#: the two sides of an experiment: the capability kept and the one removed
Side = Literal["retain", "forget"]
SIDES: tuple[str, ...] = get_args(Side)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# lm-eval's descriptions of the WMDP tasks (its YAMLs), attached as the subject of hub records.
WMDP_SUBJECTS = {"wmdp-bio": "biology", "wmdp-chem": "chemistry", "wmdp-cyber": "cybersecurity"}


@dataclass(frozen=True)
class MCQRecord:
    """One multiple-choice question.

    Args:
        question: the question text.
        choices: the answer options (at least 2, at most 26), shown as ``A.``, ``B.``, ...
        answer: index of the correct choice.
        subject: optional subject for the description line (MMLU's ``"abstract_algebra"`` style is fine: underscores
            are shown as spaces).
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None



def validate_record(record: Any, where: str) -> MCQRecord:
    """Checks a raw ``{"question", "choices", "answer"[, "subject"]}`` record.

    Args:
        record: a dict (or an ``MCQRecord``, returned as is after the same checks).
        where: where the record came from, e.g. ``"wmdp.jsonl:7"``; every error message starts with it.

    Returns:
        The record as an ``MCQRecord``.

    Raises:
        ValueError: for a missing field, a non-string question/choice, fewer than 2 (or more than 26) choices, or an
            answer that is not an integer index into the choices.
    """
    if isinstance(record, MCQRecord):
        record = {"question": record.question, "choices": list(record.choices), "answer": record.answer,
                  "subject": record.subject}
    question = record_field(record, "question", where)
    choices = record_field(record, "choices", where)
    answer = record_field(record, "answer", where)
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'question' is {type(question).__name__}, expected a string")
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r}"[:300])
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{where}: {len(choices)} choice(s); a multiple-choice question needs 2 to {len(LETTERS)}")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"{where}: 'answer' is {answer!r}; expected the integer index of the correct choice")
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer index {answer} is out of range for {len(choices)} choices "
                         f"(expected 0..{len(choices) - 1})")
    subject = record.get("subject")
    return MCQRecord(question, tuple(choices), answer, subject if isinstance(subject, str) and subject else None)



def load_mcq(path: str, name: str | None = None, split: str = "test", subject: str | None = None) -> list[MCQRecord]:
    """Loads and validates multiple-choice records.

    Args:
        path: a local ``.jsonl``/``.json``/``.parquet`` file or folder, or a hub id (``"cais/wmdp"`` with
            ``name="wmdp-bio"``/``"wmdp-cyber"``, split ``"test"``; ``"cais/mmlu"`` with ``name="all"`` or a subject,
            splits ``"test"``/``"dev"``).
        name: hub configuration name.
        split: hub split.
        subject: subject given to records that have none (WMDP hub configs default to lm-eval's ``"biology"`` /
            ``"cybersecurity"`` / ``"chemistry"``).

    Returns:
        The records in file order.

    Raises:
        ValueError: naming the file and line (or record index) of an invalid record, or for an unreachable hub id.
    """
    if is_local_path(path):
        items = read_records(path)
    else:
        ds = load_hub_dataset(path, name, split)
        subject = subject or WMDP_SUBJECTS.get(name or "")
        items = ((r, f"{path} (name={name!r}, split={split!r}) record {i}") for i, r in enumerate(ds))
    records = [validate_record(r, where) for r, where in items]
    if not records:
        raise ValueError(f"path={path!r}: no multiple-choice records")
    if subject:
        records = [r if r.subject else MCQRecord(r.question, r.choices, r.answer, subject) for r in records]
    return records



def format_question(record: MCQRecord, with_answer: bool = False) -> str:
    """``"{question}\\nA. {c0}\\nB. {c1}...\\nAnswer:"`` (plus ``" {letter}"`` for a solved few-shot example)."""
    lines = [record.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(record.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + " " + LETTERS[record.answer] if with_answer else text



def description(subject: str | None) -> str:
    """lm-eval's description line for ``subject`` (``""`` when there is none)."""
    if not subject:
        return ""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"



def build_prompt(record: MCQRecord, fewshot: Sequence[MCQRecord] = (), subject: str | None = None) -> str:
    """The full context for ``record``: description line, solved examples, then the question ending in ``"Answer:"``.

    Args:
        record: the question to ask.
        fewshot: solved examples shown first, in order.
        subject: the subject for the description line; ``None`` uses ``record.subject`` (MMLU records carry one)
            and omits the line when that is empty too; ``""`` always omits it.
    """
    subject = record.subject if subject is None else subject
    shots = "".join(format_question(s, with_answer=True) + "\n\n" for s in fewshot)
    return description(subject) + shots + format_question(record)



def select_fewshot(index: int, records: Sequence[MCQRecord], k: int,
                   pool: Sequence[MCQRecord] | None = None) -> list[MCQRecord]:
    """The ``k`` solved examples for ``records[index]``, chosen deterministically.

    From ``pool`` when given (lm-eval's ``first_n`` sampler over MMLU's dev split), otherwise from ``records``
    without the question itself. Candidates with the question's subject are preferred when there are any (MMLU
    takes few-shot examples from the same subject); the first ``k`` candidates in order are taken.

    Raises:
        ValueError: if fewer than ``k`` candidates exist.
    """
    if k == 0:
        return []
    record = records[index]
    candidates = list(pool) if pool is not None else [r for i, r in enumerate(records) if i != index]
    if record.subject:
        same = [r for r in candidates if r.subject == record.subject]
        candidates = same or candidates
    if len(candidates) < k:
        raise ValueError(f"k_shot={k} but only {len(candidates)} few-shot example(s) are available for record "
                         f"{index}; pass more fewshot_records or lower k_shot")
    return candidates[:k]



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

    The few-shot rule is :func:`undo_lightning.eval.mcq.select_fewshot`'s (from ``fewshot`` when given, else from
    ``records`` without the question itself), so the prompts are exactly those
    :func:`~undo_lightning.eval.mcq.mcq_accuracy`
    builds for the same arguments.
    """
    return [MCQPrompt(build_prompt(r, select_fewshot(i, records, k_shot, fewshot), subject), len(r.choices), r.answer)
            for i, r in enumerate(records)]

_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class MCQSpec:
    """A multiple-choice evaluation set in WMDP/MMLU format (``question``, ``choices``, ``answer`` index).

    Used as a validation metric of any stage (``RetainForgetDataModule(mcq={name: MCQSpec(...)})`` logs
    ``val/<name>_mcq_acc``) and by ``undo eval``. Scoring follows lm-evaluation-harness (docs/reference.md §9.3):
    WMDP 0-shot, MMLU 5-shot with examples from its ``dev`` split.

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
    side: Side = "forget"
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

