"""``PretrainModule``: next-token cross-entropy (reference and oracle models)."""

from __future__ import annotations

import torch

from undo_lightning.losses import causal_lm_loss, lm_hidden_states
from undo_lightning.modules.base import UndoModule


class PretrainModule(UndoModule):
    """Causal-LM pretraining on the data module's ``mixture`` loader.

    Train the **reference** with ``mixture: {retain: 0.5, forget: 0.5}`` and the **oracle** (the data-filtering gold
    standard) with ``mixture: {retain: 1.0}``. Arguments: see :class:`~undo_lightning.modules.base.UndoModule`.
    """

    train_data = "mixture"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = lm_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        loss = causal_lm_loss(out, batch["labels"], divisor=self.token_divisor(batch))
        self.count_tokens(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss
