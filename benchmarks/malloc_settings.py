"""glibc allocator settings for small CPU models: a stage's wall time under each setting, side by side.

    python benchmarks/malloc_settings.py [--steps 100] [--rounds 3]

Each setting runs the same short pretraining stage (gemma2-tiny, 32 x 64-token blocks, validation with greedy
answers every 50 steps) in a fresh interpreter, rounds alternating, and the median wall time is compared with glibc's
defaults:

* ``default``  — no setting;
* ``env``      — ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` in the environment before the interpreter starts
  (what ``undo`` did by re-executing itself);
* ``mallopt``  — :func:`undo_lightning.cli.tune_allocator` called in-process at start-up (what ``undo`` does now).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

STAGE = """
import sys, tempfile, time
setting = sys.argv[1]
if setting == "mallopt":
    from undo_lightning.cli import tune_allocator
    assert tune_allocator()
import lightning as L
from undo_lightning import PretrainModule, RetainForgetDataModule
dm = RetainForgetDataModule(batch_size=32, block_size=64, eval_prompts_per_set=50)
dm.setup()
dm.train_blocks("mixture")
module = PretrainModule(model="gemma2-tiny", lr=2e-3, warmup_steps=10, export=False)
trainer = L.Trainer(max_steps=int(sys.argv[2]), val_check_interval=50, check_val_every_n_epoch=None, logger=False,
                    default_root_dir=tempfile.mkdtemp(), enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
start = time.perf_counter()
trainer.fit(module, datamodule=dm)
print(time.perf_counter() - start)
"""
ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def run(setting: str, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    if setting == "env":
        env.update(ENV)
    out = subprocess.run([sys.executable, "-c", STAGE, setting, str(steps)], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = ("default", "env", "mallopt")
    times: dict[str, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            times[setting].append(run(setting, args.steps))
    base = statistics.median(times["default"])
    print(f"pretraining stage, gemma2-tiny, {args.steps} steps (validation every 50), {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    for setting in settings:
        t = statistics.median(times[setting])
        print(f"{setting:8s}: {t:7.2f} s median   ({', '.join(f'{x:.2f}' for x in times[setting])})   "
              f"time / default = {t / base:.2f}")


if __name__ == "__main__":
    main()
