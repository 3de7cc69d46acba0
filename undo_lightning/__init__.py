"""undo-lightning: robust LLM unlearning with UNDO (Unlearn, Noise, Distill-on-Outputs) on PyTorch Lightning.

The public names are imported on first use (PEP 562), so ``undo --help`` and light tools do not pay for importing
torch, Lightning and transformers.
"""

from importlib import import_module
from typing import Any

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
    "OptimizerConfig": "undo_lightning.modules",
    "UnlearnModule": "undo_lightning.modules",
    "UnlearningMethod": "undo_lightning.modules",
    "GradDiff": "undo_lightning.modules",
    "MaxEnt": "undo_lightning.modules",
    "NPO": "undo_lightning.modules",
    "SimNPO": "undo_lightning.modules",
    "RMU": "undo_lightning.modules",
    "RepNoise": "undo_lightning.modules",
    "SAM": "undo_lightning.modules",
    "RetainGapStop": "undo_lightning.callbacks",
    "MCQSpec": "undo_lightning.data",
    "shrink_and_perturb": "undo_lightning.noise",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'undo_lightning' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # cached: the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
