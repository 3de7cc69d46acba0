"""undo-lightning: robust LLM unlearning with UNDO (Unlearn, Noise, Distill-on-Outputs) on PyTorch Lightning."""

from undo_lightning.data import ArithmeticSource, RetainForgetDataModule

__all__ = ["ArithmeticSource", "RetainForgetDataModule"]
__version__ = "0.1.0"
