"""LoRA adapters for the relearning attack: an attacker who trains low-rank adapters instead of every weight.

LoRA fine-tuning attacks recover unlearned capabilities at least as well as full fine-tuning in TamperBench's
evaluations, so a robustness claim has to hold against them too. The adapters come from ``peft`` (Hugging Face's
maintained implementation: layer injection, dropout, merging), injected into the model in place: the model object the
stage holds stays the plain ``transformers`` model, so the chunked losses, the output-head check and sharding see the
architecture they know, and only the adapter weights require gradients (hence only they get optimizer state).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import torch

from undo_lightning.io import settings_from

#: peft's name for "every Linear layer but the output head"
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """A LoRA attacker: the ``lora`` group of :class:`~undo_lightning.modules.relearn.RelearnAttackModule`.

    In YAML: ``model: {init_args: {lora: {rank: 8, target_modules: [q_proj, v_proj]}}}``; keys left out keep these
    defaults.

    Args:
        rank: rank ``r`` of each adapter ``B A`` (``A``: ``[r, in]``, ``B``: ``[out, r]``).
        alpha: scaling numerator: the adapter adds ``(alpha / rank) B A x``.
        target_modules: ``"all-linear"`` (every Linear layer but the output head) or module names matched as the
            last components of a Linear layer's name (``q_proj`` matches ``model.layers.0.self_attn.q_proj``).
        dropout: dropout on the adapter's input during training.
        merge: export the attacked model with the adapters merged into the weights (a plain ``transformers`` folder);
            ``False`` exports the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, loaded on
            top of the attacked model by ``peft`` or by ``transformers`` with ``peft`` installed).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = ALL_LINEAR
    dropout: float = 0.0
    merge: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r}: expected a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r}: expected a positive number")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout!r}: expected a probability in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise ValueError(f"lora.target_modules={targets!r}: expected {ALL_LINEAR!r} or a list of module names "
                                 "(e.g. [q_proj, v_proj])")
        elif not targets or not all(isinstance(t, str) and t and "." not in t for t in targets):
            raise ValueError(f"lora.target_modules={targets!r}: expected {ALL_LINEAR!r} or a non-empty list of module "
                             "names without dots (e.g. [q_proj, v_proj])")
        else:
            object.__setattr__(self, "target_modules", list(targets))

    @classmethod
    def of(cls, value: LoraSettings | Mapping | None) -> LoraSettings | None:
        """``value`` as settings: an instance as it is, a mapping (a config, a checkpoint's ``hparams``) over the
        defaults, ``None`` as ``None`` (no LoRA: full fine-tuning)."""
        return None if value is None else settings_from(cls, value, "lora")


def linear_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the model's Linear layers, the output head excluded (it is never adapted)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def check_targets(model: torch.nn.Module, settings: LoraSettings) -> None:
    """Refuses target module names that match no Linear layer of ``model`` (peft would only say which set failed).

    Raises:
        ValueError: naming each unmatched target and the layer names that exist.
    """
    if settings.target_modules == ALL_LINEAR:
        return
    names = linear_names(model)
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        last = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"lora.target_modules: {missing} match no Linear layer of {type(model).__name__}; its Linear "
                         f"layers are named {last} (or use {ALL_LINEAR!r})")


class LoraAdapters:
    """The adapters of one attacked model: injected by :meth:`inject`, merged or exported alone by :meth:`exported`.

    Not an ``nn.Module``: the ``peft`` wrapper it keeps holds the same parameters as the stage's model, and registering
    it would save every tensor twice in checkpoints.

    Args:
        settings: the adapters.
    """

    def __init__(self, settings: LoraSettings) -> None:
        self.settings = settings
        self._peft = None

    def inject(self, model: torch.nn.Module) -> torch.nn.Module:
        """Injects the adapters into ``model`` in place and freezes every other weight.

        Args:
            model: a ``transformers`` causal LM.

        Returns:
            ``model`` (now holding the adapter layers; only their weights require gradients).
        """
        from peft import LoraConfig, get_peft_model

        check_targets(model, self.settings)
        s = self.settings
        config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                            target_modules=s.target_modules)
        with warnings.catch_warnings():
            # peft reads transformers' renamed gradient-checkpointing flag; a third-party deprecation, not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self._peft = get_peft_model(model, config)
        return model

    def exported(self):
        """What to ``save_pretrained`` once training is over: with ``merge``, the model with the adapters merged into
        its weights (in place; a plain ``transformers`` model), else the ``peft`` model (saves the adapter alone)."""
        if self._peft is None:
            raise RuntimeError("LoraAdapters.exported() before inject()")
        return self._peft.merge_and_unload() if self.settings.merge else self._peft
