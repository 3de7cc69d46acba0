"""One LightningModule per stage on a shared base (docs/architecture.md), and the unlearning methods."""

from undo_lightning.modules.base import OptimizerConfig, UndoModule
from undo_lightning.modules.distill import DistillModule
from undo_lightning.modules.methods import NPO, RMU, SAM, GradDiff, MaxEnt, RepNoise, SimNPO, UnlearningMethod
from undo_lightning.modules.pretrain import PretrainModule
from undo_lightning.modules.relearn import RelearnAttackModule
from undo_lightning.modules.unlearn import UnlearnModule

__all__ = ["DistillModule", "GradDiff", "MaxEnt", "NPO", "OptimizerConfig", "PretrainModule", "RMU",
           "RelearnAttackModule", "RepNoise", "SAM", "SimNPO", "UndoModule", "UnlearnModule", "UnlearningMethod"]
