"""One LightningModule per stage on a shared base (DESIGN §5)."""

from undo_lightning.modules.base import UndoModule
from undo_lightning.modules.pretrain import PretrainModule

__all__ = ["PretrainModule", "UndoModule"]
