"""README's Python example stays runnable and describes the CPU demo (its data, an attack curve of several points)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_builds_the_demo_stages(monkeypatch):
    import lightning as L

    from undo_lightning.data import RetainForgetDataModule
    from undo_lightning.experiment.pipeline import load_config

    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Use the modules in your own Lightning project\n\n```python\n(.*?)```", text, re.S).group(1)
    fitted = []
    monkeypatch.setattr(L.Trainer, "fit", lambda self, module, datamodule: fitted.append((self, module, datamodule)))
    exec(compile(code, "README.md", "exec"), {})
    assert [type(m).__name__ for _, m, _ in fitted] == ["PretrainModule", "UnlearnModule", "DistillModule",
                                                          "RelearnAttackModule"]
    demo = RetainForgetDataModule.from_config(load_config(None)["data"])  # configs/arithmetic/quick.yaml
    for trainer, _, dm in fitted:
        assert (dm.retain, dm.forget, dm.block_size, dm.batch_size) == (demo.retain, demo.forget, demo.block_size,
                                                                        demo.batch_size)
    attack = fitted[-1][0]
    assert attack.max_steps // attack.val_check_interval >= 4  # the attack curve has more than its two ends
