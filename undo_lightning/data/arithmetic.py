"""Seeded generator of arithmetic equations and word problems (the embedded default setting).

Retain = addition/subtraction, forget = multiplication/division (docs/reference.md §3.1). Every answer is an exact
non-negative integer: subtraction swaps operands so the result is >= 0, division is generated as
``(answer * b) / b`` so it is always exact (the reference writes division answers as floats, ``17.0``; we do not).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

from undo_lightning.data.sources import DocumentSource, EvalItem
from undo_lightning.data.templates import (
    CONTAINERS,
    HELDOUT_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    SYMBOLS,
    TRAIN_TEMPLATES,
)

Operation = Literal["add", "sub", "mul", "div"]
OPERATIONS: tuple[str, ...] = ("add", "sub", "mul", "div")
FORMS: tuple[str, ...] = ("equation", "word_problem")

# Distinct seed offsets per use so train documents, validation documents and evaluation prompts never share a stream.
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "eval": 2_000_029}
_MAX_DRAWS = 10_000  # eval_fact_fraction: redraws before a side of the fact split counts as empty


@dataclass(frozen=True)
class Problem:
    """One arithmetic item: ``prompt`` + " " + ``answer`` + ``suffix`` is the full training text."""

    op: str
    form: str
    prompt: str
    answer: int
    suffix: str = ""
    operands: tuple[int, int] = (0, 0)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}{self.suffix}"


def _operands(op: str, rng: random.Random, add_sub_range: tuple[int, int], mul_div_range: tuple[int, int]):
    """Returns ``(n1, n2, answer)`` for the operation, drawn uniformly from the inclusive ranges."""
    lo, hi = add_sub_range if op in ("add", "sub") else mul_div_range
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "add":
        return a, b, a + b
    if op == "sub":
        a, b = max(a, b), min(a, b)  # reference: swap so the result is never negative
        return a, b, a - b
    if op == "mul":
        return a, b, a * b
    return a * b, b, a  # div: (a*b) / b = a, exact by construction


def make_problem(op: str, form: str, rng: random.Random, *, heldout: bool = False,
                 add_sub_range: tuple[int, int] = (1, 50), mul_div_range: tuple[int, int] = (1, 20)) -> Problem:
    """Draws one problem. ``heldout`` selects the evaluation-only word-problem templates."""
    n1, n2, answer = _operands(op, rng, add_sub_range, mul_div_range)
    if form == "equation":
        return Problem(op, form, f"{n1} {SYMBOLS[op]} {n2} =", answer, operands=(n1, n2))
    templates = (HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES)[op]
    prompt, suffix = templates[rng.randrange(len(templates))]
    name, name2 = rng.sample(NAMES, 2)
    box, boxes = CONTAINERS[rng.randrange(len(CONTAINERS))]
    fill = dict(name=name, name2=name2, n1=n1, n2=n2, obj=rng.choice(OBJECTS), box=box, boxes=boxes,
                place=rng.choice(PLACES))
    prompt = prompt.format(**fill)
    return Problem(op, form, prompt[0].upper() + prompt[1:], answer, suffix.format(**fill), (n1, n2))


@dataclass
class ArithmeticSource(DocumentSource):
    """Equations (``"37 + 5 = 42"``) and word problems for a set of operations.

    Args:
        operations: which operations this source covers (retain: ``[add, sub]``; forget: ``[mul, div]``).
        train_documents: number of training documents to generate.
        val_documents: number of validation documents (token CE) to generate.
        word_problem_fraction: share of word problems among the documents (the rest are equations).
        add_sub_range: inclusive operand range for addition/subtraction (paper: 1-50).
        mul_div_range: inclusive operand range for multiplication/division (paper: 1-20).
        eval_forms: which forms get evaluation prompt sets. Word problems use held-out templates, which a CPU-scale
            model does not generalise to; a CPU demo may evaluate equations only.
        eval_fact_fraction: hold out this share of the facts (operation + operands, e.g. ``7 * 8``) for
            evaluation: documents never contain them and evaluation prompts use only them. Which facts are held out
            is a fixed function of the fact, not of the seed. Give it to the relearning attack's forget data to
            measure whether the capability returns on facts the attacker never trains on, not only the memorised
            ones. ``None``: every fact anywhere.
    """

    operations: Sequence[Operation] = ("add", "sub")
    train_documents: int = 20_000
    val_documents: int = 400
    word_problem_fraction: float = 0.5
    add_sub_range: tuple[int, int] = (1, 50)
    mul_div_range: tuple[int, int] = (1, 20)
    eval_forms: Sequence[Literal["equation", "word_problem"]] = FORMS
    eval_fact_fraction: float | None = None

    def __post_init__(self) -> None:
        self.operations = tuple(self.operations)
        bad = [op for op in self.operations if op not in OPERATIONS]
        if not self.operations or bad:
            raise ValueError(f"operations={list(self.operations)!r}: expected a non-empty subset of {OPERATIONS}")
        for field, (lo, hi) in (("add_sub_range", self.add_sub_range), ("mul_div_range", self.mul_div_range)):
            if lo > hi or lo < 0:
                raise ValueError(f"{field}=({lo}, {hi}): expected 0 <= low <= high")
        lo, _ = self.mul_div_range
        if "div" in self.operations and lo < 1:
            raise ValueError(f"mul_div_range={tuple(self.mul_div_range)} makes division impossible (divisor 0); "
                             "use a range starting at 1 or more")
        self.eval_forms = tuple(self.eval_forms)
        if any(f not in FORMS for f in self.eval_forms):
            raise ValueError(f"eval_forms={list(self.eval_forms)!r}: expected a subset of {FORMS}")
        if not 0.0 <= self.word_problem_fraction <= 1.0:
            raise ValueError(f"word_problem_fraction={self.word_problem_fraction}: expected a value in [0, 1]")
        if self.eval_fact_fraction is not None and not 0.0 < self.eval_fact_fraction < 1.0:
            raise ValueError(f"eval_fact_fraction={self.eval_fact_fraction}: expected a share strictly between 0 and 1 "
                             "(or null: no held-out facts)")
        if self.train_documents < 1 or self.val_documents < 1:
            raise ValueError(f"train_documents={self.train_documents}, val_documents={self.val_documents}: "
                             "expected at least 1 of each (an empty split cannot be trained or validated)")

    def _problem(self, rng: random.Random, op: str | None = None, form: str | None = None, heldout: bool = False,
                 eval_fact: bool = False):
        """One problem; with ``eval_fact_fraction``, redrawn until its fact is on the side the caller asks for
        (``eval_fact``: the held-out facts; documents take the rest). ``heldout`` selects the evaluation-only
        word-problem templates."""
        for _ in range(_MAX_DRAWS):
            chosen_op = op or self.operations[rng.randrange(len(self.operations))]
            chosen_form = form or ("word_problem" if rng.random() < self.word_problem_fraction else "equation")
            problem = make_problem(chosen_op, chosen_form, rng, heldout=heldout,
                                   add_sub_range=tuple(self.add_sub_range), mul_div_range=tuple(self.mul_div_range))
            if self.eval_fact_fraction is None or self.is_eval_fact(problem) == eval_fact:
                return problem
        raise ValueError(f"eval_fact_fraction={self.eval_fact_fraction}: no {'held-out' if eval_fact else 'training'} "
                         f"{op or 'any'} fact in {_MAX_DRAWS} draws from add_sub_range={tuple(self.add_sub_range)}, "
                         f"mul_div_range={tuple(self.mul_div_range)}; widen the ranges or change the fraction")

    def is_eval_fact(self, problem: Problem) -> bool:
        """Whether ``problem``'s fact is held out for evaluation (always False without ``eval_fact_fraction``)."""
        if self.eval_fact_fraction is None:
            return False
        return random.Random(f"fact-{problem.op}-{problem.operands}").random() < self.eval_fact_fraction

    def problems(self, split: str, seed: int) -> list[Problem]:
        """The problems behind :meth:`documents` (with operands, for checking)."""
        n = self.train_documents if split == "train" else self.val_documents
        rng = random.Random(seed + _SPLIT_OFFSET[split])
        return [self._problem(rng) for _ in range(n)]

    def documents(self, split: str, seed: int) -> list[str]:
        return [p.text for p in self.problems(split, seed)]

    def eval_groups(self) -> dict[str, str]:
        """Each set's problem form: equations overlap the training pool while word problems use held-out templates
        (docs/reference.md §3.1), so per-form accuracy separates memorised answers from recovered capability."""
        return {f"{op}_{form}": form for op in self.operations for form in self.eval_forms}

    def eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        return self._eval_sets(seed, n_per_set, eval_fact=True)

    def trained_eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        """With ``eval_fact_fraction``: the same sets drawn from the facts the documents contain (the held-out
        templates still phrase the word problems), so an attack on this data reports the facts it trains on beside
        the held-out ones. Empty without it (:meth:`eval_sets` then already covers every fact)."""
        return {} if self.eval_fact_fraction is None else self._eval_sets(seed, n_per_set, eval_fact=False)

    def _eval_sets(self, seed: int, n_per_set: int, eval_fact: bool) -> dict[str, list[EvalItem]]:
        out: dict[str, list[EvalItem]] = {}
        for op in self.operations:
            for form in self.eval_forms:
                # One stream per (op, form) so adding a set never changes the others (the reference reuses one seed
                # for every op, so its add and sub prompts mirror each other; docs/reference.md §13).
                stream = f"{seed + _SPLIT_OFFSET['eval']}-{op}-{form}" + ("" if eval_fact else "-trained")
                rng = random.Random(stream)
                items = [self._problem(rng, op, form, heldout=True, eval_fact=eval_fact) for _ in range(n_per_set)]
                out[f"{op}_{form}"] = [EvalItem(p.prompt, str(p.answer)) for p in items]
        return out


def vocabulary_words() -> list[str]:
    """Every string the word-problem generator can emit apart from numbers (used to build the tokenizer vocabulary)."""
    parts: list[str] = list(NAMES) + list(OBJECTS) + list(PLACES) + [w for pair in CONTAINERS for w in pair]
    for table in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES):
        for templates in table.values():
            for prompt, suffix in templates:
                parts += [prompt, suffix]
    parts += [f"0 {s} 0 =" for s in SYMBOLS.values()]
    return parts
