"""undo-lightning: robust LLM unlearning with UNDO (Unlearn, Noise, Distill-on-Outputs) on PyTorch Lightning."""

from undo_lightning.data import ArithmeticSource, DocumentSource, MixtureSource, RetainForgetDataModule, TextSource
from undo_lightning.models import build_model, export_model
from undo_lightning.modules import DistillModule, PretrainModule, RelearnAttackModule, UndoModule, UnlearnModule
from undo_lightning.modules.distill import RetainGapStop
from undo_lightning.noise import shrink_and_perturb

__all__ = ["ArithmeticSource", "DistillModule", "DocumentSource", "MixtureSource", "PretrainModule",
           "RelearnAttackModule", "RetainForgetDataModule", "RetainGapStop", "TextSource", "UndoModule",
           "UnlearnModule", "build_model", "export_model", "shrink_and_perturb"]
__version__ = "0.1.0"
