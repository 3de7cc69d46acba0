"""The ``optimizer`` group every stage shares: validation, stage defaults, the LR schedule, checkpoint round trip."""

import math
import os

import pytest
import torch
from conftest import small_datamodule, tiny_trainer

from undo_lightning import DistillModule, OptimizerConfig, PretrainModule, RelearnAttackModule, UnlearnModule
from undo_lightning.cli import _lightning_cli
from undo_lightning.modules.base import lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, r"optimizer.lr=0.0: expected a positive learning rate"),
    ({"lr": math.nan}, r"optimizer.lr=nan: expected a positive"),
    ({"weight_decay": -0.1}, r"optimizer.weight_decay=-0.1: expected >= 0"),
    ({"betas": (0.9, 1.0)}, r"optimizer.betas=\(0.9, 1.0\): expected two values in \[0, 1\)"),
    ({"warmup_steps": -1}, r"optimizer.warmup_steps=-1: expected >= 0"),
    ({"schedule": "linear"}, r"optimizer.schedule='linear': expected one of 'cosine', 'constant'"),
    ({"min_lr_ratio": 1.5}, r"optimizer.min_lr_ratio=1.5: expected a value in \[0, 1\]"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_each_stage_has_its_own_defaults_and_a_mapping_overrides_only_what_it_names():
    # the stages' documented defaults: pretraining/distillation cosine, the authors' constant-LR unlearning, the
    # paper's attack (constant after a 1-step warm-up)
    assert PretrainModule.default_optimizer == OptimizerConfig(lr=1e-3, schedule="cosine", min_lr_ratio=0.1)
    assert DistillModule.default_optimizer == PretrainModule.default_optimizer
    assert UnlearnModule.default_optimizer == OptimizerConfig(lr=3e-4, schedule="constant")
    assert RelearnAttackModule.default_optimizer == OptimizerConfig(lr=1e-3, warmup_steps=1, schedule="constant",
                                                                    min_lr_ratio=1.0)
    unlearn = UnlearnModule(model="gemma2-micro", optimizer={"lr": 1e-2, "betas": [0.8, 0.9]})
    assert unlearn.optimizer_config == OptimizerConfig(lr=1e-2, betas=(0.8, 0.9), schedule="constant")
    attack = RelearnAttackModule(model="gemma2-micro", optimizer={"lr": 5e-5})
    assert (attack.optimizer_config.warmup_steps, attack.optimizer_config.schedule) == (1, "constant")
    # an instance replaces the whole group
    assert UnlearnModule(optimizer=OptimizerConfig(lr=1e-2)).optimizer_config.schedule == "cosine"
    with pytest.raises(ValueError, match=r"optimizer: unknown key\(s\) \['learning_rate'\]; expected some of"):
        UnlearnModule(optimizer={"learning_rate": 1e-2})
    with pytest.raises(ValueError, match=r"optimizer=0.01: expected OptimizerConfig"):
        UnlearnModule(optimizer=0.01)


def test_cli_override_keeps_the_stage_defaults_it_does_not_name(tmp_path):
    config = os.path.join(ROOT, "configs", "arithmetic", "relearn.yaml")
    cli = _lightning_cli(["--config", config, f"--trainer.default_root_dir={tmp_path}",
                          "--model.init_args.optimizer.lr=0.0007"], run=False)
    assert cli.model.optimizer_config == OptimizerConfig(lr=7e-4, warmup_steps=1, schedule="constant",
                                                         min_lr_ratio=1.0)


def test_lr_factor_against_hand_values():
    # warm-up 4 steps: (step + 1) / 4
    assert [lr_factor(s, 4, 14, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine over the 10 steps after warm-up: 1 at its start, 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2)) = 0.55 halfway,
    # min_ratio at the end and after it (never rises again)
    assert lr_factor(4, 4, 14, "cosine", 0.1) == 1.0
    assert lr_factor(9, 4, 14, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(14, 4, 14, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(30, 4, 14, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 4, 14, "constant", 0.1) == 1.0


def test_trained_lrs_follow_the_group_and_survive_a_checkpoint(tokenizer, tmp_path):
    module = PretrainModule(model="gemma2-micro", optimizer={"lr": 2e-3, "warmup_steps": 2, "betas": (0.8, 0.95),
                                                            "weight_decay": 0.01, "min_lr_ratio": 0.5})
    trainer = tiny_trainer(tmp_path, max_steps=6, val_check_interval=6)
    trainer.fit(module, datamodule=small_datamodule(tokenizer))
    optimizer = trainer.optimizers[0]
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.8, 0.95), 0.01)
    # after 6 steps the scheduler stands at step 6 = the end of the cosine: min_lr_ratio * lr
    assert group["lr"] == pytest.approx(2e-3 * 0.5)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain values only
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == 2e-3
    # what load_from_checkpoint does with them: the saved mapping rebuilds the same group
    assert PretrainModule(**ckpt["hyper_parameters"]).optimizer_config == module.optimizer_config
