"""The LoRA relearning attack: only adapter weights train, the merged export is a plain transformers model."""

import json

import pytest
import torch
from conftest import small_datamodule, tiny_trainer
from transformers import AutoModelForCausalLM

from undo_lightning.models import build_model, export_model
from undo_lightning.modules.lora import LoraSettings, check_targets
from undo_lightning.modules.relearn import RelearnAttackModule


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory, tokenizer):
    return export_model(build_model("gemma2-micro", tokenizer, seed=3), tokenizer,
                        str(tmp_path_factory.mktemp("stage") / "unlearn_maxent" / "hf"))


def _fit(folder, tokenizer, root, lora, steps=3, module=None):
    module = module or RelearnAttackModule(model=folder, lora=lora, optimizer={"lr": 1e-2}, export=True)
    tiny_trainer(root, max_steps=steps, val_check_interval=steps, enable_checkpointing=False).fit(
        module, datamodule=small_datamodule(tokenizer, docs=200, prompts=2))
    return module


def test_lora_attack_trains_only_adapters_and_exports_merged(tokenizer, micro_folder, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(micro_folder).state_dict()
    lora = {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    module = RelearnAttackModule(model=micro_folder, lora=lora, optimizer={"lr": 1e-2}, export=True)
    module.configure_model()  # what fit does first; the export merges the adapters away afterwards
    names = {id(p): n for n, p in module.model.named_parameters()}
    _fit(micro_folder, tokenizer, tmp_path, lora, module=module)

    # the optimizer held exactly the adapter matrices of the targeted layers (2 per layer and target)
    trainable = {names[id(p)] for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    layers = module.model.config.num_hidden_layers
    assert len(trainable) == layers * 2 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)

    # the merged export loads with plain transformers (no peft key left) and equals W + (alpha/r) B A per target
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    state = exported.state_dict()
    assert set(state) == set(original)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["lora"]["rank"] == 2 and metrics["trainable_parameters"] == sum(
        p.numel() for group in module.trainer.optimizers[0].param_groups for p in group["params"])
    changed = {k for k in original if not torch.equal(original[k], state[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # an adapter's delta has rank <= 2: the merged change of one projection is a rank-2 matrix
    key = next(k for k in sorted(changed))
    assert torch.linalg.matrix_rank(state[key] - original[key], atol=1e-6) <= 2


def test_lora_adapter_export_holds_only_the_adapter(tokenizer, micro_folder, tmp_path):
    _fit(micro_folder, tokenizer, tmp_path, {"rank": 2, "merge": False}, steps=2)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"


def test_lora_settings_refused_before_training(tokenizer, micro_folder):
    model = build_model("gemma2-micro", tokenizer, seed=0)
    with pytest.raises(ValueError, match=r"\['qkv'\] match no Linear layer of Gemma2ForCausalLM.*'q_proj'"):
        check_targets(model, LoraSettings(target_modules=["q_proj", "qkv"]))
    check_targets(model, LoraSettings(target_modules=["down_proj"]))  # a real name passes
    for bad, match in [({"rank": 0}, "lora.rank=0"), ({"alpha": -1}, "lora.alpha=-1"),
                       ({"dropout": 1.0}, "lora.dropout=1.0"), ({"target_modules": []}, "lora.target_modules=\\[\\]"),
                       ({"target_modules": "all"}, "lora.target_modules='all'"), ({"ranks": 4}, r"unknown key\(s\)")]:
        with pytest.raises(ValueError, match=match):
            RelearnAttackModule(model=micro_folder, lora=bad)
