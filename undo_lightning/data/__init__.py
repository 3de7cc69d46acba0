"""Data: document sources (arithmetic generator, text files / hub datasets, mixtures), multiple-choice records,
tokenizers, and the ``RetainForgetDataModule`` every stage shares."""

from undo_lightning.data.arithmetic import ArithmeticSource, Problem, make_problem
from undo_lightning.data.mcq import MCQRecord, MCQSpec
from undo_lightning.data.module import RetainForgetDataModule
from undo_lightning.data.sources import DocumentSource, EvalItem
from undo_lightning.data.text import MixtureSource, TextSource

__all__ = ["ArithmeticSource", "DocumentSource", "EvalItem", "MCQRecord", "MCQSpec", "MixtureSource", "Problem",
           "RetainForgetDataModule", "TextSource", "make_problem"]
