"""Data: sources (arithmetic generator, text files / hub datasets) and the shared ``RetainForgetDataModule``."""

from undo_lightning.data.arithmetic import ArithmeticSource, Problem, make_problem
from undo_lightning.data.module import RetainForgetDataModule
from undo_lightning.data.sources import DocumentSource, EvalItem
from undo_lightning.data.text import MixtureSource, TextSource

__all__ = ["ArithmeticSource", "DocumentSource", "EvalItem", "MixtureSource", "Problem", "RetainForgetDataModule",
           "TextSource", "make_problem"]
