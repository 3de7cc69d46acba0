"""Data: sources (arithmetic generator, text files / hub datasets) and the shared ``RetainForgetDataModule``.

Names are imported on first use (PEP 562): ``undo_lightning.evaluation`` imports ``data.text`` while
``data.module`` imports ``evaluation``, and an eager package import here would make that a cycle.
"""

from importlib import import_module

_EXPORTS = {
    "ArithmeticSource": "undo_lightning.data.arithmetic",
    "Problem": "undo_lightning.data.arithmetic",
    "make_problem": "undo_lightning.data.arithmetic",
    "RetainForgetDataModule": "undo_lightning.data.module",
    "DocumentSource": "undo_lightning.data.sources",
    "EvalItem": "undo_lightning.data.sources",
    "MixtureSource": "undo_lightning.data.text",
    "TextSource": "undo_lightning.data.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'undo_lightning.data' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
