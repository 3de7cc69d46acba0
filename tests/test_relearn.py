import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_datamodule, tiny_trainer
from transformers import AutoModelForCausalLM

from undo_lightning.experiment.robustness import load_curves
from undo_lightning.models import build_model, export_model
from undo_lightning.modules.relearn import RelearnAttackModule, model_label


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory, tokenizer):
    """An exported gemma2-micro model: the 'trained model' under attack."""
    return export_model(build_model("gemma2-micro", tokenizer, seed=3), tokenizer,
                        str(tmp_path_factory.mktemp("stage") / "unlearn_maxent" / "hf"))


def test_forget_attack_refuses_retain_batches(tokenizer, micro_folder, tmp_path):
    """The reference's bug (docs/reference.md §13): a 'forget' attack fed retain data must stop, not train."""
    module = RelearnAttackModule(model=micro_folder, attack="forget", export=False)
    module.train_data = "retain"  # the data module now serves retain batches to a forget attack
    with pytest.raises(ValueError, match=r"FORGET data only.*split 'retain'.*expected only 'forget'"):
        tiny_trainer(tmp_path, max_steps=2).fit(module, datamodule=small_datamodule(tokenizer))
    assert not (tmp_path / "curve.json").exists()


def test_retain_only_attack_is_labelled(tokenizer, micro_folder, tmp_path):
    module = RelearnAttackModule(model=micro_folder, attack="retain")
    assert module.train_data == "retain"
    tiny_trainer(tmp_path, max_steps=2, val_check_interval=2).fit(module, datamodule=small_datamodule(tokenizer))
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["attack"] == "retain" and "2505.22310" in curve["attack_description"]
    assert "RETAIN" in curve["attack_description"] and curve["steps"] == [0, 2]
    with pytest.raises(ValueError, match="attack='both'"):
        RelearnAttackModule(model=micro_folder, attack="both")


def _independent_ce(folder, blocks: torch.Tensor) -> float:
    """Token-weighted next-token CE of the untouched exported model over packed validation blocks."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                 reduction="sum") / blocks[:, 1:].numel())


def test_step0_is_the_untouched_model_and_curve_round_trips(tokenizer, micro_folder, tmp_path):
    dm = small_datamodule(tokenizer)
    dm.setup()
    ce0 = {split: _independent_ce(micro_folder, dm._blocks[f"{split}/val"]) for split in ("retain", "forget")}

    root = tmp_path / "relearn" / "teacher" / "lr=0.003_seed=0"
    module = RelearnAttackModule(model=micro_folder, name="teacher", optimizer={"lr": 3e-3})
    # 5 steps, evaluation every 2: steps 0 (before any update), 2, 4 and the final step 5
    tiny_trainer(root, max_steps=5, val_check_interval=2, enable_checkpointing=False).fit(module, datamodule=dm)
    curve = json.loads((root / "curve.json").read_text())
    assert curve["steps"] == [0, 2, 4, 5]
    assert (curve["model"], curve["lr"], curve["seed"], curve["attack"]) == ("teacher", 0.003, 0, "forget")
    m = curve["metrics"]
    for split in ("retain", "forget"):
        assert m[f"val/{split}_ce"][0] == pytest.approx(ce0[split], rel=1e-5)
        assert abs(m[f"val/{split}_ce"][-1] - ce0[split]) > 1e-3  # and the attack did change the model
    assert m["val/forget_ce"][-1] < m["val/forget_ce"][0]  # fine-tuning on forget data lowers forget CE
    # per-form accuracies are the means of the operation sets of that form
    for i in range(4):
        assert m["val/forget_equation_acc"][i] == pytest.approx(
            (m["val/mul_equation_acc"][i] + m["val/div_equation_acc"][i]) / 2)
        assert m["val/forget_word_problem_acc"][i] == pytest.approx(
            (m["val/mul_word_problem_acc"][i] + m["val/div_word_problem_acc"][i]) / 2)
    # the format robustness.load_curves reads
    runs = load_curves(tmp_path, "teacher", "val/forget_ce")
    assert list(runs) == [(0.003, 0)]
    np.testing.assert_array_equal(runs[(0.003, 0)].steps, [0, 2, 4, 5])
    np.testing.assert_allclose(runs[(0.003, 0)].values, m["val/forget_ce"])
    assert load_curves(tmp_path, "teacher", "val/forget_ce", attack="retain") == {}
    # attacked models are not kept: no export, no checkpoint (the module adds no ModelCheckpoint of its own)
    assert not (root / "hf").exists() and not (root / "checkpoints").exists()
    assert curve["compute"]["tokens"] == 5 * dm.batch_size * dm.block_size


def test_model_label():
    assert model_label("runs/arithmetic/oracle/hf") == "oracle"
    assert model_label("runs/arithmetic/oracle/hf/") == "oracle"
    assert model_label("/models/my-model") == "my-model"


def test_mixture_attack_trains_on_the_configured_mix(tokenizer, micro_folder, tmp_path):
    """The authors' default attack: the pretraining mix, here 12.5 % forget documents (equations only, so every
    document holds exactly one operator: '*' or '/' marks a forget document)."""
    import lightning as L

    from undo_lightning import ArithmeticSource, RetainForgetDataModule

    dm = RetainForgetDataModule(
        retain=ArithmeticSource(("add", "sub"), train_documents=2000, val_documents=60, word_problem_fraction=0.0),
        forget=ArithmeticSource(("mul", "div"), train_documents=2000, val_documents=60, word_problem_fraction=0.0),
        block_size=32, batch_size=8, eval_prompts_per_set=8, mixture={"retain": 0.875, "forget": 0.125})
    dm._tokenizer = tokenizer
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch)

    module = RelearnAttackModule(model=micro_folder, attack="mixture", setting="authors_mix")
    tiny_trainer(tmp_path, max_steps=60, val_check_interval=60, callbacks=[Spy()]).fit(module, datamodule=dm)
    assert {b["split"] for b in seen} == {"mixture"} and len(seen) == 60
    ids = torch.cat([b["input_ids"] for b in seen]).flatten()
    def count(symbols):
        return int(sum((ids == tokenizer.convert_tokens_to_ids("▁" + s)).sum() for s in symbols))

    # ~2000 documents over 60 batches of 8 x 32 tokens: the forget share within a few binomial standard deviations
    assert 0.09 < count("*/") / count("*/+-") < 0.16
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert (curve["attack"], curve["train_on"]) == ("authors_mix", "mixture")
    assert "MIXTURE" in curve["attack_description"]
    with pytest.raises(ValueError, match="attack setting name 'a/b'"):
        RelearnAttackModule(model=micro_folder, attack="forget", setting="a/b")
