"""Distill training step vs pretrain training step on the same student and batch.

    python benchmarks/distill_step.py                                  # gemma2-tiny (32 x 64) and gemma2-0.1b (8 x 64)
    python benchmarks/distill_step.py --presets gemma2-tiny --reps 50
    python benchmarks/distill_step.py --device cuda --batch-sizes 32,32

For each preset, a ``PretrainModule`` and a ``DistillModule`` hold the same student (the preset's seed-0 init); the
distill module's teacher is another init of the same architecture, loaded from a temporary HF folder. One step is
``training_step`` + ``backward`` + ``AdamW.step`` on the same batch (the data module's mixture blocks), outside the
Trainer, so only the stage's own work is compared (Lightning's overhead is the same for both and measured by
``pretrain_throughput.py``). The two steps alternate for ``--reps`` rounds after ``--warmup`` rounds, so a busy
machine slows both alike; we print each one's median ms/step and the ratio distill / pretrain. Theory: the teacher
forward adds ``2N`` to the student's ``6N`` FLOPs per token, i.e. ~1.33x (goal <= 1.45x).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from undo_lightning import DistillModule, PretrainModule, RetainForgetDataModule
from undo_lightning.models import build_model, count_parameters, export_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module, optimizer, batch: dict, device: torch.device) -> float:
    """One training step; returns its wall time in ms."""
    _sync(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    optimizer.step()
    _sync(device)
    return 1e3 * (time.perf_counter() - start)


def measure(preset: str, dm: RetainForgetDataModule, batch_size: int, reps: int, warmup: int,
            device: torch.device) -> dict:
    blocks = dm.train_blocks("mixture")[:batch_size].to(device)
    batch = {"input_ids": blocks, "labels": blocks.clone(), "attention_mask": torch.ones_like(blocks)}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(build_model(preset, dm.tokenizer, seed=1), dm.tokenizer, tmp)
        pretrain = PretrainModule(model=preset, seed=0, export=False)
        distill = DistillModule(teacher=tmp, student_init=preset, seed=0, export=False)
        for module in (pretrain, distill):
            module.tokenizer = dm.tokenizer
            module.configure_model()
            module.to(device).train()
    assert all(torch.equal(a, b) for a, b in zip(pretrain.model.state_dict().values(),
                                                 distill.model.state_dict().values())), "students differ"
    optimizers = {m: torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for m in (pretrain, distill)}
    times = {pretrain: [], distill: []}
    for rep in range(warmup + reps):
        for module in (pretrain, distill):
            ms = _step(module, optimizers[module], batch, device)
            if rep >= warmup:
                times[module].append(ms)
    p, d = statistics.median(times[pretrain]), statistics.median(times[distill])
    return {"preset": preset, "params": count_parameters(distill.model), "batch": f"{batch_size}x{dm.block_size}",
            "pretrain_ms": p, "distill_ms": d, "ratio": d / p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gemma2-tiny,gemma2-0.1b", help="comma-separated model presets")
    parser.add_argument("--batch-sizes", default="32,8", help="blocks per batch, one per preset (the last repeats)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the modules run outside a Trainer here
    presets = args.presets.split(",")
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    sizes += sizes[-1:] * (len(presets) - len(sizes))
    dm = RetainForgetDataModule(block_size=args.block_size)
    device = torch.device(args.device)
    print(f"device={device} torch threads={torch.get_num_threads()} reps={args.reps} (median, alternating)")
    print(f"{'preset':14s} {'params':>10s} {'batch':>7s} {'pretrain ms':>12s} {'distill ms':>11s} {'ratio':>6s}")
    for preset, batch_size in zip(presets, sizes):
        r = measure(preset, dm, batch_size, args.reps, args.warmup, device)
        print(f"{r['preset']:14s} {r['params']:>10,d} {r['batch']:>7s} {r['pretrain_ms']:12.2f} "
              f"{r['distill_ms']:11.2f} {r['ratio']:6.3f}")
    print("ratio = distill / pretrain step (theory 8N/6N = 1.33, goal <= 1.45)")


if __name__ == "__main__":
    main()
