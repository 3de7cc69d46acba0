"""undo-lightning: robust LLM unlearning with UNDO (Unlearn, Noise, Distill-on-Outputs) on PyTorch Lightning.

The public names are imported on first use (PEP 562), so ``undo --help`` and light tools do not pay for importing
torch, Lightning and transformers.
"""

from undo_lightning._lazy import lazy_getattr

_EXPORTS = {
    "ArithmeticSource": "undo_lightning.data",
    "DocumentSource": "undo_lightning.data",
    "MixtureSource": "undo_lightning.data",
    "RetainForgetDataModule": "undo_lightning.data",
    "TextSource": "undo_lightning.data",
    "build_model": "undo_lightning.models",
    "export_model": "undo_lightning.models",
    "DistillModule": "undo_lightning.modules",
    "PretrainModule": "undo_lightning.modules",
    "RelearnAttackModule": "undo_lightning.modules",
    "UndoModule": "undo_lightning.modules",
    "UnlearnModule": "undo_lightning.modules",
    "RetainGapStop": "undo_lightning.callbacks",
    "shrink_and_perturb": "undo_lightning.noise",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


__getattr__ = lazy_getattr("undo_lightning", _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
