"""Data: sources (arithmetic generator, text files / hub datasets) and the shared ``RetainForgetDataModule``.

Names are imported on first use (PEP 562): ``undo_lightning.evaluation`` imports ``data.text`` while
``data.module`` imports ``evaluation``, and an eager package import here would make that a cycle.
"""

from undo_lightning._lazy import lazy_getattr

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


__getattr__ = lazy_getattr("undo_lightning.data", _EXPORTS, globals())
