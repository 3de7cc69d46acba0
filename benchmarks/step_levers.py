"""Cheaper training steps: the ecosystem's levers measured side by side on one model and the same batches.

    python benchmarks/step_levers.py [--model gemma2-tiny] [--steps 40] [--rounds 3]

For a pretraining step (forward, CE, backward, AdamW) and a distillation step (frozen teacher forward, student
forward/backward, forward KL, AdamW) it times, in one process and alternating round by round:

* ``eager``: today's step (AdamW's default per-parameter loop on CPU);
* ``foreach`` / ``fused``: AdamW with ``foreach=True`` / ``fused=True``;
* ``compile+fused``: the model under ``torch.compile`` (inductor's CPU backend) with fused AdamW; its compile time
  is paid in a warm-up and printed separately.

Prints median steps/s, the ratio to ``eager`` and the largest loss difference to ``eager`` over the run (same
initial weights and batches, so the trajectories must agree to float tolerance).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from undo_lightning import RetainForgetDataModule
from undo_lightning.losses import causal_lm_loss, forward_kl
from undo_lightning.models import build_model

VARIANTS = ("eager", "foreach", "fused", "compile+fused")


def make_step(variant: str, model, teacher=None):
    """A closure running one optimizer step on a batch and returning the loss (a float)."""
    kwargs = {"foreach": True} if variant == "foreach" else {"fused": True} if "fused" in variant else {}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, **kwargs)
    forward = torch.compile(model) if variant.startswith("compile") else model

    def step(ids: torch.Tensor) -> float:
        labels = ids.clone()
        logits = forward(input_ids=ids).logits
        if teacher is None:
            loss = causal_lm_loss(logits, labels)
        else:
            with torch.no_grad():
                target = teacher(input_ids=ids).logits
            loss = forward_kl(logits, target, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma2-tiny")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    dm = RetainForgetDataModule(block_size=64)
    dm.setup()
    blocks = torch.as_tensor(dm.train_blocks("retain"))[: args.batch_size * args.steps]
    batches = blocks.view(args.steps, args.batch_size, -1)
    base = build_model(args.model, dm.tokenizer, seed=0)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    print(f"model={args.model}, batch {tuple(batches.shape[1:])}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for kind in ("pretrain", "distill"):
        runs = {}
        for variant in VARIANTS:
            model = copy.deepcopy(base).train()
            step = make_step(variant, model, teacher if kind == "distill" else None)
            start = time.perf_counter()
            step(batches[0])  # warm-up (compilation for the compiled variant)
            runs[variant] = {"step": step, "model": model, "warmup_s": time.perf_counter() - start, "rates": [],
                             "losses": []}
        for _ in range(args.rounds):
            for variant, run in runs.items():
                start = time.perf_counter()
                losses = [run["step"](batch) for batch in batches]
                run["rates"].append(args.steps / (time.perf_counter() - start))
                run["losses"] += losses
        eager = statistics.median(runs["eager"]["rates"])
        print(f"\n{kind} step")
        for variant, run in runs.items():
            rate = statistics.median(run["rates"])
            diff = max(abs(a - b) for a, b in zip(run["losses"], runs["eager"]["losses"]))
            print(f"  {variant:14s} {rate:7.2f} steps/s  x{rate / eager:5.2f}  warm-up {run['warmup_s']:6.1f} s  "
                  f"max |loss - eager| {diff:.2e}")


if __name__ == "__main__":
    main()
