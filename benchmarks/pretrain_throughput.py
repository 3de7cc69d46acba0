"""Lightning overhead: PretrainModule steps/s vs a hand-written PyTorch loop on the same model and batches.

    python benchmarks/pretrain_throughput.py [--steps 150] [--model gemma2-tiny]

Both loops run in this process, alternating, on identical data (the data module's mixture blocks), with the same
AdamW, clipping and schedule; we report the median over rounds of steps/s and the ratio Lightning / plain (goal
>= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch

from undo_lightning import PretrainModule, RetainForgetDataModule
from undo_lightning.losses import causal_lm_loss
from undo_lightning.modules.base import lr_factor


def plain_loop(model, blocks: torch.Tensor, steps: int, batch_size: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, steps, "cosine", 0.1))
    start = time.perf_counter()
    for step in range(steps):
        ids = blocks[(step * batch_size) % (len(blocks) - batch_size):][:batch_size]
        loss = causal_lm_loss(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


class _Timer(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 5:  # skip the first steps (allocation warm-up), like the plain loop's warm-up round
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        self.rate = (trainer.global_step - 5) / (time.perf_counter() - self.start)


def lightning_loop(dm, model_name: str, steps: int) -> float:
    module = PretrainModule(model=model_name, export=False,
                            optimizer={"lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 10, "schedule": "cosine"})
    timer = _Timer()
    trainer = L.Trainer(max_steps=steps + 5, limit_val_batches=0, logger=False, default_root_dir=tempfile.mkdtemp(),
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[timer], accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=dm)
    return timer.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="gemma2-tiny")
    args = parser.parse_args()
    dm = RetainForgetDataModule(batch_size=32, block_size=64)
    blocks = dm.train_blocks("mixture")
    from undo_lightning.models import build_model

    plain, light = [], []
    for _ in range(args.rounds):
        model = build_model(args.model, dm.tokenizer, seed=0)
        plain_loop(model, blocks, 5, 32)  # warm-up
        plain.append(plain_loop(model, blocks, args.steps, 32))
        light.append(lightning_loop(dm, args.model, args.steps))
    p, q = statistics.median(plain), statistics.median(light)
    print(f"model={args.model} batch=32x64 tokens, {args.steps} steps x {args.rounds} rounds, "
          f"torch threads={torch.get_num_threads()}")
    print(f"plain PyTorch loop : {p:7.2f} steps/s   (rounds: {', '.join(f'{x:.2f}' for x in plain)})")
    print(f"Lightning module   : {q:7.2f} steps/s   (rounds: {', '.join(f'{x:.2f}' for x in light)})")
    print(f"ratio Lightning / plain = {q / p:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
