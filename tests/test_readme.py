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
    config = load_config(None)  # configs/arithmetic/quick.yaml
    demo = RetainForgetDataModule.from_config(config["data"])
    for trainer, module, dm in fitted:
        batch_size = config["relearn"]["batch_size"] if type(module).__name__ == "RelearnAttackModule" else \
            demo.batch_size
        assert (dm.retain, dm.forget, dm.block_size, dm.batch_size) == (demo.retain, demo.forget, demo.block_size,
                                                                        batch_size)
    assert fitted[2][2].mixture == config["distill"]["data"]["mixture"]
    attack = fitted[-1][0]
    assert attack.max_steps // attack.val_check_interval >= 4  # the attack curve has more than its two ends
