"""Independent runs on a small CPU: one after another with every core, or side by side with a core each?

    python benchmarks/concurrency.py [--model gemma2-tiny] [--runs 2] [--steps 30]

The pipeline's independent runs (reference and oracle, the UNDO alphas, the attack's runs) are the same kind of work:
training steps of one small model. This times ``--runs`` identical pretraining runs (forward, CE, backward, AdamW on
the data module's blocks) three ways, in fresh processes so no run warms another's caches:

* ``sequential``: one process, ``torch`` using every core, the runs one after another (what the pipeline does);
* ``parallel``: one process per run, started together, each with ``cores / runs`` threads;
* ``oversubscribed``: one process per run, each with every core (what naive concurrency does).

Prints wall times, the ratio to ``sequential`` and each run's final loss (identical across the three: same seed and
batches; thread counts change float summation order only).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def train(model_name: str, steps: int, threads: int, batch_size: int) -> float:
    """One pretraining run in this process; returns the final loss."""
    import torch

    torch.set_num_threads(threads)
    from undo_lightning import RetainForgetDataModule
    from undo_lightning.losses import causal_lm_loss
    from undo_lightning.models import build_model

    dm = RetainForgetDataModule(block_size=64)
    dm.setup()
    blocks = torch.as_tensor(dm.train_blocks("mixture"))[: steps * batch_size].view(steps, batch_size, -1)
    model = build_model(model_name, dm.tokenizer, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    loss = torch.zeros(())
    for ids in blocks:
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _worker(args: tuple) -> float:
    return train(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma2-tiny")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    job = (args.model, args.steps)
    print(f"{args.runs} runs x {args.steps} steps of {args.model}, batch {args.batch_size} x 64, {cores} cores")
    results = {}
    for name, processes, threads in (("sequential", 1, cores), ("parallel", args.runs, max(1, cores // args.runs)),
                                     ("oversubscribed", args.runs, cores)):
        start = time.perf_counter()
        with ctx.Pool(processes) as pool:
            losses = pool.map(_worker, [(*job, threads, args.batch_size)] * args.runs)
        results[name] = (time.perf_counter() - start, losses)
    base = results["sequential"][0]
    for name, (wall, losses) in results.items():
        print(f"  {name:15s} {wall:7.1f} s   speed-up x{base / wall:4.2f}   final losses "
              + ", ".join(f"{x:.5f}" for x in losses))


if __name__ == "__main__":
    main()
