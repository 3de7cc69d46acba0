"""Peak memory and time of the chunked ``forward_kl`` (or ``causal_lm_loss``) vs a naive fp32 full-vocabulary loss,
forward + backward.

    python benchmarks/kl_memory.py                            # V = 256000, 2 x 512 tokens, bf16 logits, default chunk
    python benchmarks/kl_memory.py --chunk-sizes auto,128,1024   # "auto" = forward_kl's default (65 at V = 256000)
    python benchmarks/kl_memory.py --device cuda --dtype fp32
    python benchmarks/kl_memory.py --hidden 256               # from hidden states through soft-capped heads
    python benchmarks/kl_memory.py --hidden 2304 --seq 1024 --loss ce   # cross-entropy at gemma-2-2b shapes

With ``--hidden H`` the inputs are what a distillation step has: both models' last hidden states ``[B, T, H]`` and
output embeddings ``[V, H]`` (soft-capping 30, as Gemma-2). ``naive`` and ``chunked=...`` first build both models'
full logits through the head (what the stages did before they passed hidden states); ``hidden=...`` passes
:class:`~undo_lightning.losses.HiddenStates`, so logits exist one chunk at a time. Gradients are compared for the
student's hidden states and head weight. ``--loss ce`` measures the next-token cross-entropy of the student alone
(pretraining, the retain terms, the attack, validation) against ``F.cross_entropy`` on full fp32 logits.

Each variant runs in a fresh subprocess holding only its inputs (student logits requiring grad, teacher logits,
labels). Peak memory is measured on top of those inputs:

* CPU (Linux only): the process's RSS high-water mark (``VmHWM`` in ``/proc/self/status``) after one forward +
  backward, minus its RSS (``VmRSS``) right before; the high-water mark is reset to the current RSS just before the
  run (``echo 5 > /proc/self/clear_refs``), so transients from building the inputs do not hide the run's peak.
* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` before the run.

Each memory worker also saves its loss and input gradient; the parent checks that every chunked variant reproduces
the naive values and gradients. Time: with ``--reps 1`` the memory run's own wall time; otherwise one more subprocess
that alternates the variants for ``--reps`` rounds (so a busy machine slows all of them alike) and reports each one's
median (it holds every variant's inputs at once, so at gemma-2-2b shapes on a 24 GB machine use ``--reps 1``).
The table gives chunked / naive ratios (goals: memory <= 0.5x, time <= 1.1x).
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
import torch.nn.functional as F

from undo_lightning.losses import IGNORE_INDEX, HiddenStates, OutputHead, causal_lm_loss, forward_kl

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def naive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Textbook fp32 forward KL over the full vocabulary (the reference's approach): log-softmax both, sum, mask."""
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    log_q = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)[:, :-1]  # [B, T - 1]
    mask = labels[:, 1:] != IGNORE_INDEX
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def naive_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Textbook fp32 next-token cross-entropy over the full vocabulary."""
    logits = student_logits.float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: current RSS, ``VmHWM``: its high-water mark), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


SOFTCAP = 30.0


def _inputs(args):
    """Deterministic logits (filled in place, so no transient fp32 copy), or with ``--hidden`` hidden states and heads
    (:class:`HiddenStates`), and labels with a few ignored positions."""
    g = torch.Generator(device=args.device).manual_seed(0)
    dtype = DTYPES[args.dtype]

    def tensor(*shape, std=2.0, grad=False):
        return torch.empty(shape, dtype=dtype, device=args.device).normal_(0, std, generator=g).requires_grad_(grad)

    if args.hidden:
        student = HiddenStates(tensor(args.batch, args.seq, args.hidden, grad=True),
                               OutputHead(tensor(args.vocab, args.hidden, std=0.1, grad=True), softcap=SOFTCAP))
        teacher = None if args.loss == "ce" else HiddenStates(
            tensor(args.batch, args.seq, args.hidden), OutputHead(tensor(args.vocab, args.hidden, std=0.1),
                                                                  softcap=SOFTCAP))
    else:
        student = tensor(args.batch, args.seq, args.vocab, grad=True)
        teacher = None if args.loss == "ce" else tensor(args.batch, args.seq, args.vocab)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=g)
    labels[:, : args.seq // 16] = IGNORE_INDEX  # as with masked prompts: these positions must cost nothing
    return student, teacher, labels


def _leaves(student) -> list[torch.Tensor]:
    """The tensors that receive a gradient."""
    return [student.hidden, student.head.weight] if isinstance(student, HiddenStates) else [student]


def _step(variant: str, student, teacher, labels) -> torch.Tensor:
    for leaf in _leaves(student):
        leaf.grad = None
    kind, _, size = variant.partition("=")
    chunk_size = None if size in ("", "auto") else int(size)
    if isinstance(student, HiddenStates) and kind != "hidden":  # full logits through the heads first
        student = student.head.logits(student.hidden)
        teacher = None if teacher is None else teacher.head.logits(teacher.hidden).detach()
    if teacher is None:  # --loss ce
        loss = naive_ce(student, labels) if kind == "naive" else causal_lm_loss(student, labels, chunk_size=chunk_size)
    elif kind == "naive":
        loss = naive_kl(student, teacher, labels)
    else:
        loss = forward_kl(student, teacher, labels, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_worker(args) -> None:
    """Run one variant once; print its peak memory in bytes and save ``{loss, grad}`` to ``args.out``."""
    student, teacher, labels = _inputs(args)
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
    start = time.perf_counter()
    loss = _step(args.variant, student, teacher, labels)
    _sync(args.device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda" else _status_bytes("VmHWM")) - before
    torch.save({"loss": loss.cpu(), "grads": [leaf.grad.cpu() for leaf in _leaves(student)]}, args.out)
    print(peak, seconds)


def timing_worker(args, variants: list[str]) -> None:
    """Time every variant ``args.reps`` times, alternating between them; print ``variant median_seconds`` lines."""
    student, teacher, labels = _inputs(args)
    times = {variant: [] for variant in variants}
    for _ in range(args.reps):
        for variant in variants:
            _sync(args.device)
            start = time.perf_counter()
            _step(variant, student, teacher, labels)
            _sync(args.device)
            times[variant].append(time.perf_counter() - start)
    for variant, seconds in times.items():
        print(variant, statistics.median(seconds))


def _run_worker(args, *extra: str) -> str:
    """Run this script in a fresh interpreter with the parent's options plus ``extra``; return its stdout."""
    parent_only = ("variant", "out", "timing", "hidden_only")
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in parent_only]
    cmd = [sys.executable, __file__, *options, *extra]
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of both logits tensors")
    parser.add_argument("--chunk-sizes", default="auto", help="comma-separated forward_kl chunk sizes; auto = None "
                        "(forward_kl picks it from the vocabulary size)")
    parser.add_argument("--hidden", type=int, default=0, help="hidden size: inputs are hidden states + heads "
                        "(0: logits)")
    parser.add_argument("--loss", choices=["kl", "ce"], default="kl", help="forward KL of student and teacher, or the "
                        "student's cross-entropy")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden-only", action="store_true", help="with --hidden: compare only the hidden-state "
                        "variants with naive (skip the chunked-logits ones)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # worker subprocess: memory run of one variant
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # worker subprocess: timing
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["naive"] + ([] if args.hidden_only else [f"chunked={c}" for c in args.chunk_sizes.split(",")])
    if args.hidden:
        variants += [f"hidden={c}" for c in args.chunk_sizes.split(",")]
    if args.variant:
        memory_worker(args)
        return
    if args.timing:
        timing_worker(args, variants)
        return

    scored = args.batch * (args.seq - 1 - args.seq // 16)
    inputs = f"{args.dtype} hidden states (H={args.hidden}) + heads" if args.hidden else f"{args.dtype} logits"
    name = "forward KL" if args.loss == "kl" else "cross-entropy"
    print(f"{name}, forward + backward: V={args.vocab}, {args.batch} x {args.seq} tokens ({scored} scored), "
          f"{inputs}, device={args.device}, {args.threads} threads, median of {args.reps} reps")
    print("memory = " + ("peak RSS over inputs (VmHWM after reset - VmRSS before), fresh subprocess per variant"
                         if args.device == "cpu" else "torch.cuda.max_memory_allocated over inputs"))
    peaks, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            out = os.path.join(tmp, variant.replace("=", "_") + ".pt")
            peak, wall = _run_worker(args, f"--variant={variant}", f"--out={out}").split()
            peaks[variant], seconds[variant] = int(peak), float(wall)
            print(f"  {variant}: peak {int(peak) / 2**20:.0f} MiB, {float(wall):.2f} s", flush=True)
            saved = torch.load(out)
            if variant == "naive":
                reference = saved
                continue
            torch.testing.assert_close(saved["loss"], reference["loss"], rtol=1e-5, atol=1e-7)
            # Both gradients are fp32 values rounded to the inputs' dtype; they may differ by one rounding step.
            for got, want in zip(saved["grads"], reference["grads"]):
                torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if args.dtype == "bf16" else 1e-4,
                                           atol=1e-9 if not args.hidden else 1e-6)
            del saved
    if args.reps > 1:
        for line in _run_worker(args, "--timing").splitlines():
            variant, value = line.split()
            seconds[variant] = float(value)

    print(f"{'variant':<15} {'peak MiB':>10} {'time s':>8} {'mem ratio':>10} {'time ratio':>11}")
    for variant in variants:
        print(f"{variant:<15} {peaks[variant] / 2**20:>10.0f} {seconds[variant]:>8.2f} "
              f"{peaks[variant] / peaks['naive']:>10.2f} {seconds[variant] / seconds['naive']:>11.2f}")
    print(f"loss {reference['loss'].item():.6f}; chunked losses and gradients match naive (rtol 1e-5 on loss)")


if __name__ == "__main__":
    main()
