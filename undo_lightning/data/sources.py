"""The interface every retain/forget data source implements."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalItem:
    """An evaluation prompt with its known answer (scored by exact match of the greedy continuation)."""

    prompt: str
    answer: str


class DocumentSource:
    """A source of documents for one side (retain or forget) of an experiment.

    Subclasses return plain-text documents per split; ``RetainForgetDataModule`` tokenizes and packs them. Sources
    that can be scored by exact-match answers (the arithmetic generator) also return evaluation prompt sets.
    """

    def documents(self, split: str, seed: int) -> list[str]:
        """Returns the documents of ``split`` (``"train"`` or ``"val"``), deterministically for ``seed``."""
        raise NotImplementedError

    def eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        """Returns named sets of answer-scored prompts (empty for sources without known answers)."""
        return {}

    def trained_eval_sets(self, seed: int, n_per_set: int) -> dict[str, list[EvalItem]]:
        """Answer-scored sets drawn from what the training documents contain, for a source whose :meth:`eval_sets`
        hold part of its material out of training (arithmetic's ``eval_fact_fraction``); empty by default.

        Every stage scores them beside the held-out sets, as ``val/<set>_trained_acc`` and their per-side mean
        ``val/<side>_trained_acc`` (e.g. ``val/forget_trained_acc``), outside ``val/<side>_acc``: one attack run then
        shows how fast the attacker relearns the facts it trains on *and* the facts it never sees.
        """
        return {}

    def eval_groups(self) -> dict[str, str]:
        """Answer-scored set name -> group (e.g. the problem form). Every stage logs each group's mean accuracy per
        side as ``val/<side>_<group>_acc`` (e.g. ``val/forget_word_problem_acc``); empty by default."""
        return {}
