"""DDP on CPU (two gloo processes): a stage trained on 2 ranks x batch b equals one process with batch 2b.

The step sampler gives rank r of step k the r-th slice of the single-process batch k, DDP averages the two ranks'
mean losses (equal token counts: packed blocks), validation sums the metric counts over ranks, and only rank 0
writes metrics.json and the export. So weights, validation metrics and compute counters must all match.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import sys
    import lightning as L
    import torch
    sys.path.insert(0, {tests!r})
    import json
    from conftest import small_datamodule
    from undo_lightning import PretrainModule
    from undo_lightning.callbacks import final_evaluation
    from undo_lightning.cli import close_process_group

    torch.set_num_threads(1)
    devices, batch_size, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=4,
                        val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    # block size 24: 35 retain and 37 forget validation blocks, odd counts that a padding sampler would repeat
    dm = small_datamodule(docs=300, prompts=3, batch_size=batch_size, eval_batch_size=4, block_size=24)
    module = PretrainModule(model="gemma2-micro", optimizer=dict(lr=3e-3, warmup_steps=1), seed=0,
                            checkpoint_every=0)
    trainer.fit(module, datamodule=dm)  # validation at the last step: Lightning's loop writes metrics.json
    values = final_evaluation(module, dm.val_dataloader())  # the path of step-0 / teacher / end-of-training evaluations
    if trainer.global_rank == 0:
        json.dump(values, open(root + "/final_evaluation.json", "w"))
    close_process_group()  # as `undo fit` does: a gloo group left to interpreter exit can abort the process
""")


GLOO_EXIT_ABORT = "terminate called without an active exception"


def _run(script: Path, devices: int, batch_size: int, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(batch_size), str(root)], env=env,
                              capture_output=True, text=True, timeout=600)
        # Once (in about 30 runs of this test) gloo aborted at interpreter exit after a finished run, before the
        # script tore the process group down explicitly; that torch-level exit race earns one rerun (runs are
        # deterministic), any other failure fails at once.
        if proc.returncode == 0 or GLOO_EXIT_ABORT not in proc.stderr or attempt == 1:
            break
        shutil.rmtree(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_rank_ddp_equals_one_process_with_the_combined_batch(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "stage.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    ddp = _run(script, 2, 4, tmp_path / "ddp")
    single = _run(script, 1, 8, tmp_path / "single")

    assert ddp["global_step"] == single["global_step"] == 4
    assert ddp["compute"]["tokens"] == single["compute"]["tokens"] == 4 * 8 * 24  # steps x blocks x block size
    # per split too: each rank counts its own rows' forget tokens, summed over ranks
    assert ddp["compute"]["tokens_by_split"] == single["compute"]["tokens_by_split"]
    assert 0 < ddp["compute"]["tokens_by_split"]["forget"] < ddp["compute"]["tokens"]
    final = {name: json.loads((tmp_path / name / "final_evaluation.json").read_text()) for name in ("ddp", "single")}
    for ddp_val, single_val in ((ddp["val"], single["val"]), (final["ddp"], final["single"])):
        assert ddp_val.keys() == single_val.keys()
        for key, value in single_val.items():
            if key.endswith("_acc"):  # counts summed over ranks: every prompt scored exactly once
                assert ddp_val[key] == value, key
            else:  # every validation block counted once (a repeated block would move the mean CE)
                assert ddp_val[key] == pytest.approx(value, rel=1e-5), key
    a = load_file(str(tmp_path / "ddp" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not (tmp_path / "ddp" / "hf.tmp").exists()
