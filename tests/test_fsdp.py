"""FSDP2 (Lightning's ModelParallelStrategy) on CPU: distillation with a frozen teacher, two gloo processes.

Student and teacher are sharded as separate units (each decoder layer, then each model), the teacher never holds a
gradient or optimizer state and stays out of checkpoints, and three steps train the same student as DDP on the same
two ranks (the losses and the data are the same; only how parameters are held differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from undo_lightning.models import build_model, export_model
from undo_lightning.data.tokenizers import build_arithmetic_tokenizer

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning as L
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import small_datamodule
    from lightning.pytorch.strategies import ModelParallelStrategy
    from undo_lightning import DistillModule
    from undo_lightning.cli import close_process_group
    from undo_lightning.sharding import is_sharded

    torch.set_num_threads(1)
    kind, teacher, root = sys.argv[1:4]

    import undo_lightning.modules.base as base
    built = []  # (rank, model, empty) of every model this process builds
    real_build = base.build_model
    def recorded(name, *args, empty=False, **kwargs):
        model = real_build(name, *args, empty=empty, **kwargs)
        built.append([int(os.environ.get("LOCAL_RANK", 0)), os.path.basename(name), empty,
                      sum(p.is_meta for p in model.parameters())])
        return model
    base.build_model = recorded

    class Inspect(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            trained = {{id(p) for group in optimizer.param_groups for p in group["params"]}}
            report = {{
                "sharded": [is_sharded(module.model), is_sharded(module.teacher)],
                "teacher_grads": sum(p.grad is not None for p in module.teacher.parameters()),
                "teacher_in_optimizer": sum(id(p) in trained for p in module.teacher.parameters()),
                "teacher_requires_grad": sum(p.requires_grad for p in module.teacher.parameters()),
                "optimizer_state": len(optimizer.state),
            }}
            if trainer.global_rank == 0:
                os.makedirs(root, exist_ok=True)
                json.dump(report, open(root + "/inspect.json", "w"))

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False) if kind == "fsdp" else "ddp"
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, val_check_interval=3,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[Inspect()])
    dm = small_datamodule(docs=300, prompts=3, batch_size=4, eval_batch_size=4, block_size=24)
    module = DistillModule(teacher=teacher, student_init="teacher", alpha=0.5, beta=0.1, seed=0, kl_chunk_size=7,
                           optimizer=dict(lr=3e-3, warmup_steps=1), checkpoint_every=3)
    trainer.fit(module, datamodule=dm)
    os.makedirs(root, exist_ok=True)
    json.dump(built, open(f"{{root}}/built_rank{{trainer.global_rank}}.json", "w"))
    close_process_group()
""")


def _run(script: Path, kind: str, teacher: Path, root: Path) -> dict:
    proc = subprocess.run([sys.executable, str(script), kind, str(teacher), str(root)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fsdp_distillation_shards_a_frozen_teacher_and_trains_as_ddp_does(tmp_path):
    teacher = Path(export_model(build_model("gemma2-micro", build_arithmetic_tokenizer(), seed=3),
                                build_arithmetic_tokenizer(), str(tmp_path / "teacher")))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    fsdp = _run(script, "fsdp", teacher, tmp_path / "fsdp")
    ddp = _run(script, "ddp", teacher, tmp_path / "ddp")

    # FSDP: the teacher (and the student, its copy) read from disk on rank 0 only; rank 1 built it on the meta device
    # and received its shards by broadcast (the equality with DDP below shows the values arrived, buffers included)
    built = {rank: json.loads((tmp_path / "fsdp" / f"built_rank{rank}.json").read_text()) for rank in (0, 1)}
    assert [b[1:3] for b in built[0]] == [["teacher", False]] and built[0][0][3] == 0
    assert [b[1:3] for b in built[1]] == [["teacher", True]] and built[1][0][3] > 0
    assert [b[1:3] for b in json.loads((tmp_path / "ddp" / "built_rank1.json").read_text())] == [["teacher", False]]
    inspect = json.loads((tmp_path / "fsdp" / "inspect.json").read_text())
    assert inspect["sharded"] == [True, True]
    assert inspect["teacher_grads"] == inspect["teacher_in_optimizer"] == inspect["teacher_requires_grad"] == 0
    assert 0 < inspect["optimizer_state"] <= sum(1 for _ in load_file(str(tmp_path / "ddp" / "hf" /
                                                                          "model.safetensors")))
    assert fsdp["global_step"] == ddp["global_step"] == 3
    assert fsdp["val"]["val/retain_ce"] == pytest.approx(ddp["val"]["val/retain_ce"], rel=1e-4)

    a = load_file(str(tmp_path / "fsdp" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    checkpoints = list((tmp_path / "fsdp").rglob("*.ckpt"))
    assert checkpoints, "no checkpoint written"
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(key.startswith("model.") for key in state), sorted(state)[:5]


class _Mesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, sizes):
        self.sizes = dict(zip(self.mesh_dim_names, sizes))

    def __getitem__(self, name):
        return type("Dim", (), {"size": lambda _, n=self.sizes[name]: n})()


def _strategy(kind: str, **attributes):
    """A stand-in with the class name and settings check_strategy reads (DeepSpeed is not installed here, FSDP1
    needs a GPU, and a device mesh needs a process group)."""
    return type(kind, (), attributes)()


@pytest.mark.parametrize("kind, attributes, mesh, refused", [
    ("DeepSpeedStrategy", {"zero_stage_3": True}, None, r"DeepSpeedStrategy\(stage=3\): DistillModule holds a frozen"),
    ("DeepSpeedStrategy", {"zero_stage_3": False}, None, None),
    ("FSDPStrategy", {"kwargs": {"use_orig_params": False}}, None,
     r"FSDPStrategy\(use_orig_params=False\).*set use_orig_params=True"),
    ("FSDPStrategy", {"kwargs": {"use_orig_params": True}}, None, None),
    ("ModelParallelStrategy", {}, (1, 2), r"ModelParallelStrategy\(tensor_parallel_size=2\).*tensor_parallel_size=1"),
    ("ModelParallelStrategy", {}, (2, 1), None),
])
def test_a_strategy_the_stage_cannot_use_is_refused_before_any_model_loads(tmp_path, kind, attributes, mesh, refused):
    from undo_lightning import DistillModule, PretrainModule

    module = DistillModule(teacher=str(tmp_path / "teacher"))
    module._trainer = type("Trainer", (), {"strategy": _strategy(kind, **attributes)})()
    module._device_mesh = _Mesh(mesh) if mesh else None
    if refused is None:
        module.check_strategy()
    else:
        with pytest.raises(ValueError, match=refused):
            module.configure_model()  # the check comes first: the teacher folder does not even exist
        assert module.model is None and getattr(module, "teacher", None) is None
    # a stage without a frozen model may use DeepSpeed ZeRO-3 and FSDP1 as Lightning allows
    alone = PretrainModule()
    alone._trainer, alone._device_mesh = module._trainer, module._device_mesh
    if kind != "ModelParallelStrategy":
        alone.check_strategy()
