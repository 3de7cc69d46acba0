"""One run on one GPU: training-step speed, MFU and memory per stage, then the CPU demo's pipeline on the GPU.

    python benchmarks/gpu_check.py                      # gemma2-0.1b and a gemma-2-2b-shaped model, then the demo
    python benchmarks/gpu_check.py --models gemma2-0.1b --no-pipeline
    python benchmarks/gpu_check.py --device cpu --models gemma2-micro --seq 64 --vocab 512 --max-batch 4 --no-pipeline

Models are built from their configurations with random weights (no download): the ``gemma2-*`` presets and
``gemma-2-2b`` (its published shape), all with a ``--vocab`` vocabulary (256 000, Gemma-2's). Each stage's training
step is the stages' own computation: fp32 weights, ``bf16`` autocast (``bf16-mixed``), losses from hidden states,
AdamW step:

* ``pretrain`` (and ``relearn``, the same step): next-token cross-entropy;
* ``unlearn``: MaxEnt on a forget micro-batch + cross-entropy on a retain micro-batch (both count as tokens);
* ``distill``: a frozen teacher's forward (no grad) + the student's forward-KL step.

Per stage it prints tokens/s at ``--batch`` sequences of ``--seq`` tokens (median of ``--steps`` steps after two
warm-up steps), MFU = achieved FLOP/s over the device's bf16 dense peak (FLOPs per token: ``6 N`` for a trained
model, ``2 N`` for a frozen forward; attention's ``T``-dependent FLOPs are not counted, so MFU is a lower bound),
peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's RSS high-water mark) and the largest
micro-batch that fits (doubling from 1 up to ``--max-batch``). Then it runs ``undo pipeline -c
configs/arithmetic/quick.yaml`` in a fresh folder and prints its wall time (or how far it got within
``--pipeline-timeout`` seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from undo_lightning.losses import causal_lm_loss, forward_kl, lm_hidden_states, maxent_loss
from undo_lightning.models import _GEMMA2_COMMON, PRESETS, count_parameters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_estimate import GEMMA_2_2B  # noqa: E402  (a sibling script; benchmarks/ is not a package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: bf16 dense peak TFLOP/s by device-name fragment (vendor datasheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}
STAGES = ("pretrain", "unlearn", "distill")


def build(name: str, vocab: int, device: str, seed: int) -> Gemma2ForCausalLM:
    sizes = GEMMA_2_2B if name == "gemma-2-2b" else PRESETS[name]
    config = Gemma2Config(vocab_size=vocab, **{**_GEMMA2_COMMON, **sizes})
    config._attn_implementation = "eager"  # as the stages: Gemma-2's attention soft-capping needs it
    torch.manual_seed(seed)
    with torch.device(device):
        return Gemma2ForCausalLM(config)


def batch(vocab: int, size: int, seq: int, device: str, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (size, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Stage:
    """One stage's training step on fresh models; ``step(b)`` runs it on micro-batch ``b`` (returns tokens)."""

    def __init__(self, stage: str, name: str, vocab: int, device: str) -> None:
        self.stage, self.device, self.vocab = stage, device, vocab
        self.model = build(name, vocab, device, seed=0).train()
        self.teacher = build(name, vocab, device, seed=1).eval().requires_grad_(False) if stage == "distill" else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        n = count_parameters(self.model)
        # forward + backward of the trained model; a frozen forward; unlearn runs two trained micro-batches per step
        self.flops_per_token = 6.0 * n + (2.0 * count_parameters(self.teacher) if self.teacher is not None else 0.0)

    def step(self, b: dict) -> int:
        dtype = torch.bfloat16
        with torch.autocast(device_type=torch.device(self.device).type, dtype=dtype):
            if self.stage == "pretrain":
                loss = causal_lm_loss(lm_hidden_states(self.model, b["input_ids"], b["attention_mask"]), b["labels"])
                tokens = b["input_ids"].numel()
            elif self.stage == "unlearn":
                forget = lm_hidden_states(self.model, b["input_ids"], b["attention_mask"])
                retain = lm_hidden_states(self.model, b["input_ids"], b["attention_mask"])
                # one backward for both terms, as the stage does
                loss = maxent_loss(forget, b["labels"]) + causal_lm_loss(retain, b["labels"])
                tokens = 2 * b["input_ids"].numel()
            else:
                with torch.no_grad():
                    teacher = lm_hidden_states(self.teacher, b["input_ids"], b["attention_mask"])
                student = lm_hidden_states(self.model, b["input_ids"], b["attention_mask"])
                loss = forward_kl(student, teacher, b["labels"])
                tokens = b["input_ids"].numel()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fits(stage: Stage, size: int, args) -> bool:
    """Whether one step at micro-batch ``size`` runs without running out of memory."""
    try:
        stage.step(batch(args.vocab, size, args.seq, args.device, seed=size))
        sync(args.device)
        return True
    except torch.OutOfMemoryError:
        stage.optimizer.zero_grad(set_to_none=True)
        return False
    finally:
        reset_peak(args.device)


def measure(stage_name: str, model: str, args, peak_tflops: float | None) -> dict:
    stage = Stage(stage_name, model, args.vocab, args.device)
    b = batch(args.vocab, args.batch, args.seq, args.device, seed=0)
    row = {"stage": stage_name, "model": model, "parameters": count_parameters(stage.model)}
    try:
        for _ in range(2):  # warm-up: allocator, kernels, AdamW state
            stage.step(b)
        sync(args.device)
        reset_peak(args.device)
        seconds, tokens = [], 0
        for _ in range(args.steps):
            start = time.perf_counter()
            tokens = stage.step(b)
            sync(args.device)
            seconds.append(time.perf_counter() - start)
        row["tokens_per_s"] = tokens / statistics.median(seconds)
        row["peak_gib"] = peak_bytes(args.device) / 2**30
        row["mfu"] = (row["tokens_per_s"] * stage.flops_per_token / (peak_tflops * 1e12)) if peak_tflops else None
    except torch.OutOfMemoryError:
        row.update(tokens_per_s=None, peak_gib=None, mfu=None)
    reset_peak(args.device)
    largest, size = 0, 1
    while size <= args.max_batch and fits(stage, size, args):
        largest, size = size, size * 2
    row["largest_batch"] = largest
    del stage
    reset_peak(args.device)
    return row


def run_pipeline(args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "undo_lightning.cli", "pipeline", "-c",
               os.path.join(ROOT, "configs", "arithmetic", "quick.yaml"), "--out_dir", os.path.join(tmp, "run")]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=args.pipeline_timeout)
        except subprocess.TimeoutExpired:
            done = sorted(d for d in os.listdir(os.path.join(tmp, "run")) if os.path.exists(
                os.path.join(tmp, "run", d, "hf"))) if os.path.isdir(os.path.join(tmp, "run")) else []
            return f"did not finish within {args.pipeline_timeout} s; stages exported by then: {done or 'none'}"
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return f"failed (exit {proc.returncode}) after {wall:.0f} s: {proc.stderr.strip().splitlines()[-1:]}"
        return f"finished in {wall:.0f} s ({wall / 60:.1f} min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="gemma2-0.1b,gemma-2-2b")
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch of the speed measurement")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak (default: by device name)")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--pipeline-timeout", type=int, default=360)
    args = parser.parse_args()
    for name in args.models.split(","):
        if name != "gemma-2-2b" and name not in PRESETS:
            parser.error(f"--models: {name!r} is not gemma-2-2b or a preset {sorted(PRESETS)}")

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
        device_name = torch.cuda.get_device_name(args.device)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        device_name = f"CPU ({os.cpu_count()} logical cores)"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    print(f"device: {device_name}; bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (--peak-tflops)'}; "
          f"torch {torch.__version__}; sequences of {args.seq} tokens, vocabulary {args.vocab}, "
          f"speed at micro-batch {args.batch}, median of {args.steps} steps")
    print(f"| model | parameters | stage | tokens/s | MFU | peak GiB | largest micro-batch (<= {args.max_batch}) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for stage in STAGES:
            r = measure(stage, model, args, peak)
            speed = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "out of memory"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            print(f"| {model} | {r['parameters'] / 1e6:.1f} M | {stage} | {speed} | {mfu} | {mem} | "
                  f"{r['largest_batch']} |", flush=True)
    if args.pipeline:
        print(f"undo pipeline -c configs/arithmetic/quick.yaml on {device_name}: {run_pipeline(args)}")


if __name__ == "__main__":
    main()
