"""Bad input, as a new user would give it: the message each one gets and the seconds until it.

    python benchmarks/bad_inputs.py [--workdir DIR] [--markdown]

Runs the real ``undo`` console entry point once per case in a fresh process (so each time includes Python, torch and
Lightning start-up, as a user sees it) on configs, options, data files, model folders, run folders and interruptions.
For every case it prints the exit code, the seconds until the process ended, the last line on stderr, and whether
it left behind a folder that a later run would take for finished work (a stage folder with ``DONE`` or an attack run
with ``curve.json`` that did not exist before). A finished smoke pipeline (``configs/arithmetic/smoke.yaml``, about
half a minute on 2 cores) is built first for the cases that need trained models and run folders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "arithmetic" / "smoke.yaml"


def finished_marks(root: Path) -> set[str]:
    """Every file that marks finished work under ``root``."""
    return {str(p.relative_to(root)) for p in [*root.rglob("DONE"), *root.rglob("curve.json")]} \
        if root.exists() else set()


def undo(args: list[str], cwd: Path, interrupt_after: float | None = None) -> tuple[int, float, str]:
    """Runs ``undo ARGS``; returns (exit code, seconds, stderr)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "undo_lightning.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    return proc.returncode, time.perf_counter() - started, err


def config(work: Path, name: str, edit: Callable[[dict], None]) -> str:
    cfg = yaml.safe_load(SMOKE.read_text())
    edit(cfg)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cases(work: Path, run: Path, model: str) -> list[tuple[str, list[str], dict]]:
    """(what, undo arguments, options) per case; options: ``interrupt_after`` seconds, ``watch`` folder."""
    c = lambda name, edit: ["pipeline", "-c", config(work, name, edit), "--out_dir", str(work / name)]  # noqa: E731
    bad_mcq = work / "bad.jsonl"
    bad_mcq.write_text('{"question": "Q?", "choices": ["a"], "answer": 0}\n')
    (work / "notes").mkdir(exist_ok=True)
    (work / "notes" / "todo.txt").write_text("not a run folder")
    (work / "empty_model").mkdir(exist_ok=True)
    broken = work / "broken"
    shutil.copytree(run, broken, dirs_exist_ok=True)
    (broken / "undo_a0.7" / "DONE").unlink()
    ckpt = broken / "undo_a0.7" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy
    other_vocab = work / "other_vocab"
    _model_with_vocab(other_vocab, 512)
    return [
        # config files
        ("misspelt top-level section", c("c1", lambda d: d.update(reporting={})), {}),
        ("misspelt key one level down", c("c2", lambda d: d["undo"].update(alhpas=[0.5])), {}),
        ("misspelt module argument", c("c3", lambda d: d["distill"]["model"].update(stop_treshold=0.1)), {}),
        ("value of the wrong type", c("c4", lambda d: d["relearn"].update(steps="many")), {}),
        ("unknown unlearning method", c("c5", lambda d: d["unlearn"]["model"].update(method="forget-harder")), {}),
        ("negative LR in the attack grid", c("c6", lambda d: d["relearn"].update(lrs=[0.001, -1.0])), {}),
        ("old `relearn: {attack: retain}`", c("c7", lambda d: d["relearn"].update(attack="retain")), {}),
        ("attack trains on an unknown split", c("c8", lambda d: d["relearn"].update(
            attacks={"x": {"train_on": "both"}})), {}),
        ("mixture share above 1", c("c9", lambda d: d["relearn"].update(
            attacks={"mix": {"train_on": "mixture", "data": {"mixture": {"forget": 2.0}}}})), {}),
        ("max_steps: 0", c("c10", lambda d: d["unlearn"]["trainer"].update(max_steps=0)), {}),
        ("block shorter than one example", c("c11", lambda d: d["data"].update(block_size=5)), {}),
        ("RMU layer beyond the model", c("c12", lambda d: d["unlearn"]["model"].update(
            method={"class_path": "undo_lightning.RMU", "init_args": {"layer": 7}})), {}),
        ("student init with another vocabulary", c("c13", lambda d: d.update(
            students={"odd": {"model": {"student_init": str(other_vocab)}}})), {}),
        ("GradDiff at a destructive LR", c("c14", lambda d: d["unlearn"]["model"].update(
            method="graddiff", optimizer={"lr": 1.0, "schedule": "constant"})), {"watch": work / "c14"}),
        ("LoRA target that matches nothing", c("c15", lambda d: d["relearn"].update(
            attacks={"lora": {"model": {"lora": {"target_modules": ["qkv"]}}}})), {}),
        ("quantisation bits 3", c("c16", lambda d: d.update(probes={"quantize": {"bits": [3]}})), {}),
        ("NPO beta <= 0", c("c17", lambda d: d["unlearn"]["model"].update(
            method={"class_path": "undo_lightning.NPO", "init_args": {"beta": 0.0}})), {}),
        ("few-shot with 0 documents", c("c18", lambda d: d["relearn"].update(
            attacks={"few": {"data": {"few_shot": 0}}})), {}),
        # command lines
        ("pipeline: unknown option", ["pipeline", "--relearn.stepz", "5"], {}),
        ("pipeline: missing config file", ["pipeline", "-c", str(work / "missing.yaml")], {}),
        ("pipeline: --only names no stage", ["pipeline", "-c", str(SMOKE), "--out_dir", str(work / "o1"),
                                             "--only", "refrence"], {}),
        ("fit: wrong type on the command line", ["fit", "--trainer.max_steps", "x"], {}),
        ("fit: missing config file", ["fit", "-c", str(work / "missing.yaml")], {}),
        ("undo test (no test split)", ["test", "-c", str(SMOKE)], {}),
        ("unknown subcommand", ["frobnicate"], {}),
        # data files and models
        ("eval: MCQ file with one choice", ["eval", model, "--mcq", f"[{bad_mcq}]"], {}),
        ("eval: folder without a model", ["eval", str(work / "empty_model"), "--mcq", "[wmdp-cyber]"], {}),
        ("relearn: model folder missing", ["relearn", f"[{work / 'missing' / 'hf'}]"], {}),
        # run folders
        ("pipeline into another experiment's folder", ["pipeline", "-c", config(
            work, "renamed", lambda d: d.update(name="renamed")), "--out_dir", str(run)], {"watch": run}),
        ("pipeline into a folder that is no run", ["pipeline", "-c", str(SMOKE), "--out_dir", str(work / "notes")],
         {}),
        ("relearn over a finished pipeline's runs", ["relearn", f"[unlearn={run / 'unlearn' / 'hf'}]", "--steps", "9",
                                                     "--out_dir", str(run)], {"watch": run}),
        ("report: no such run folder", ["report", str(work / "missing")], {}),
        ("resume from a truncated checkpoint", ["pipeline", "-c", str(SMOKE), "--out_dir", str(broken)],
         {"watch": broken}),
        # interruptions
        ("Ctrl-C during a stage", ["pipeline", "-c", str(SMOKE), "--out_dir", str(work / "interrupted")],
         {"interrupt_after": 12.0, "watch": work / "interrupted"}),
    ]


def _model_with_vocab(folder: Path, vocab_size: int) -> None:
    from undo_lightning.data.tokenizers import load_tokenizer
    from undo_lightning.models import build_model, export_model

    tokenizer = load_tokenizer("arithmetic")
    model = build_model("gemma2-micro", tokenizer, seed=0)
    model.resize_token_embeddings(vocab_size)
    export_model(model, tokenizer, str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="undo-bad-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "smoke-run"
    if not (run / "report.json").is_file():
        print(f"building a finished smoke run in {run} ...", file=sys.stderr)
        rc, seconds, err = undo(["pipeline", "-c", str(SMOKE), "--out_dir", str(run)], ROOT)
        if rc != 0:
            raise SystemExit(f"the smoke run failed:\n{err}")
        print(f"  {seconds:.1f} s", file=sys.stderr)
    rows = []
    for what, argv, opts in cases(work, run, str(run / "reference" / "hf")):
        watch = opts.get("watch")
        before = finished_marks(watch) if watch else set()
        rc, seconds, err = undo(argv, work, opts.get("interrupt_after"))
        lines = [line for line in err.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else ""
        traceback = "Traceback" in err
        new_marks = (finished_marks(watch) - before) if watch else set()
        if watch and watch.name == "interrupted":  # the stage that was interrupted must not be marked done
            stale = [m for m in new_marks if m.endswith("DONE") and not (watch / Path(m).parent / "hf").is_dir()]
        else:
            stale = sorted(new_marks) if watch and watch.name != "c14" else [
                m for m in new_marks if m.startswith("unlearn")]
        rows.append((what, rc, seconds, traceback, bool(stale), message))
        print(f"{what}: rc={rc} {seconds:.1f}s {'TRACEBACK ' if traceback else ''}"
              f"{'STALE ' + str(stale) + ' ' if stale else ''}{message[:200]}", file=sys.stderr)
    print(f"\nmachine: {_cpu()}, {os.cpu_count()} cores; {len(rows)} cases\n")
    if args.markdown:
        print("| # | bad input | exit | s | message (last stderr line) |")
        print("|---|---|---|---|---|")
        for i, (what, rc, seconds, tb, stale, message) in enumerate(rows, 1):
            flag = (" **traceback**" if tb else "") + (" **left finished-looking output**" if stale else "")
            print(f"| {i} | {what} | {rc} | {seconds:.1f} | `{message.replace('|', '/')[:260]}`{flag} |")
    else:
        for i, (what, rc, seconds, tb, stale, message) in enumerate(rows, 1):
            print(f"{i:2d} {what:<42} rc={rc:<3} {seconds:6.1f} s  {message[:150]}")
    bad = [r for r in rows if r[3] or r[4] or r[1] == 0]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} refused cleanly (non-zero exit, no traceback, nothing that looks "
          "finished left behind)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
