"""undo-lightning: robust LLM unlearning with UNDO (Unlearn, Noise, Distill-on-Outputs) on PyTorch Lightning."""

from undo_lightning.data import ArithmeticSource, DocumentSource, RetainForgetDataModule
from undo_lightning.models import build_model, export_model
from undo_lightning.modules import PretrainModule, UndoModule

__all__ = ["ArithmeticSource", "DocumentSource", "PretrainModule", "RetainForgetDataModule", "UndoModule",
           "build_model", "export_model"]
__version__ = "0.1.0"
