"""The benchmark scripts that report numbers nobody re-derives by hand: the memory estimate's arithmetic, and the GPU
check's CPU path (the script runs on a GPU only rarely, so it is kept working here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_estimate_counts_gemma_2_2b_as_published_and_adds_up_by_hand():
    estimate = _load("memory_estimate")
    params, largest = estimate.shapes("gemma-2-2b")
    assert params == 2_614_341_888  # google/gemma-2-2b's model card: 2.61 B, tied embedding counted once
    assert largest == 256_000 * 2304 + 2304  # the root unit: embedding (tied head) + final norm
    p, unit = 1000, 300
    assert estimate.per_gpu(p, unit, trained=1, frozen=0, gpus=1, fsdp=False) == 16 * p
    assert estimate.per_gpu(p, unit, trained=1, frozen=1, gpus=8, fsdp=False) == (16 + 4 + 4) * p  # + DDP buckets
    assert estimate.per_gpu(p, unit, trained=1, frozen=1, gpus=8, fsdp=True) == 20 * p / 8 + 12 * unit


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_the_cpu():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--models",
                           "gemma2-micro", "--seq", "32", "--vocab", "300", "--batch", "2", "--steps", "1",
                           "--max-batch", "4", "--no-pipeline"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| gemma2-micro")]
    assert [cells[2].strip() for cells in rows] == ["pretrain", "unlearn", "distill"]
    for cells in rows:
        assert float(cells[3]) > 0 and float(cells[5]) > 0  # tokens/s, peak GiB
        assert int(cells[6]) == 4  # the micro model fits the largest micro-batch tried
