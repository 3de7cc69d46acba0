"""Data: sources (arithmetic generator, text files, multiple choice) and the shared ``RetainForgetDataModule``."""

from undo_lightning.data.arithmetic import ArithmeticSource, Problem, make_problem
from undo_lightning.data.module import RetainForgetDataModule
from undo_lightning.data.sources import DocumentSource, EvalItem

__all__ = ["ArithmeticSource", "DocumentSource", "EvalItem", "Problem", "RetainForgetDataModule", "make_problem"]
