"""One error style for every `undo` command: bad input is one line `undo <command>: error: ...` on stderr, exit code
2, no traceback; `--debug` (or UNDO_DEBUG=1) shows the traceback. Each case runs the real console entry point."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "arithmetic" / "smoke.yaml"


def undo(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "undo_lightning.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def _config(tmp_path: Path, edit) -> str:
    cfg = yaml.safe_load(SMOKE.read_text())
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


CASES = {
    "unknown subcommand": (lambda t: ["frobnicate"], r"undo: error: subcommand 'frobnicate': unknown; expected one of"),
    "undo test": (lambda t: ["test", "-c", "x.yaml"],
                  r"undo test: error: the stages have no test split; `undo validate -c CONFIG`"),
    "fit: missing config file": (lambda t: ["fit", "-c", str(t / "none.yaml")],
                                 r"undo fit: error: config: File does not exist: '.*none.yaml'"),
    "fit: unknown module argument": (lambda t: ["fit", "--model.foo", "1"],
                                     r"undo fit: error: model: Option 'foo' is not accepted"),
    "fit: wrong type": (lambda t: ["fit", "--trainer.max_steps", "x"],
                        r"undo fit: error: trainer.max_steps: Expected a int. Got value: x"),
    "relearn: no model folder": (lambda t: ["relearn", f"[{t / 'missing' / 'hf'}]"],
                                 r"undo relearn: error: model 'missing': '.*' is not a Hugging Face model folder"),
    "relearn: wrong type": (lambda t: ["relearn", "[a]", "--lrs", "x"], r"undo relearn: error: lrs: Expected a list"),
    "report: no run folder": (lambda t: ["report", str(t / "none")],
                              r"undo report: error: run folder '.*none' does not exist"),
    "eval: nothing to evaluate": (lambda t: ["eval", str(t)], r"undo eval: error: nothing to evaluate"),
    "eval: a folder without a model": (lambda t: ["eval", str(t), "--mcq", "[wmdp-cyber]"],
                                       r"undo eval: error: model='.*': a folder without a model \(no config.json"),
    "pipeline: unknown option": (lambda t: ["pipeline", "--relearn.stepz", "5"],
                                 r"undo pipeline: error: unrecognized arguments: --relearn.stepz 5"),
    "pipeline: misspelt nested key": (
        lambda t: ["pipeline", "-c", _config(t, lambda c: c["undo"].update(alhpas=[0.5]))],
        r"undo pipeline: error: .*bad.yaml: undo: unknown key\(s\) \['alhpas'\] \(did you mean 'alphas'\?\)"),
}


#: cases checked in this process through the same entry point (``cli.main``): the message is what they test; the
#: subprocess cases above already show that such a message is the whole of stderr
IN_PROCESS = {
    "pipeline: LoRA target that matches nothing": (
        lambda t: ["pipeline", "-c", _config(t, lambda c: c["relearn"].update(
            attacks={"lora": {"model": {"lora": {"target_modules": ["q_proj", "qkv_proj"]}}}}))],
        r"undo pipeline: error: relearn \(attack setting 'lora'\): model\.lora\.target_modules: \['qkv_proj'\] match "
        r"no Linear layer of Gemma2ForCausalLM; its Linear layers are named \['down_proj', .*\(model 'gemma2-micro'\)"),
    "pipeline: quantisation bits": (
        lambda t: ["pipeline", "-c", _config(t, lambda c: c.update(probes={"quantize": {"bits": [8, 3]}}))],
        r"undo pipeline: error: probes: quantisation bits=3: expected 4 or 8"),
    "pipeline: NPO beta": (
        lambda t: ["pipeline", "-c", _config(t, lambda c: c["unlearn"]["model"].update(
            method={"class_path": "undo_lightning.NPO", "init_args": {"beta": 0.0}}))],
        r"undo pipeline: error: stage 'unlearn': UnlearnModule: beta=0.0: NPO's inverse temperature must be > 0$"),
    "relearn: LoRA rank": (lambda t: ["relearn", "[a]", "--lora.rank", "0"],
                           r"undo relearn: error: lora.rank=0: expected a positive integer$"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path):
    args, pattern = CASES[case]
    proc = undo(*args(tmp_path), cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pytest.importorskip("re").match(pattern, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_bad_input_in_process(case, tmp_path, capsys, monkeypatch):
    import undo_lightning.cli as cli

    # process-wide settings of a real `undo` process (heap tuning, warning/log filters) stay out of the test process
    monkeypatch.setattr(cli, "tune_allocator", lambda: False)
    monkeypatch.setattr(cli, "quiet_expected_warnings", lambda: None)
    monkeypatch.chdir(tmp_path)
    args, pattern = IN_PROCESS[case]
    with pytest.raises(SystemExit) as exit_:
        cli.main(args(tmp_path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and lines, lines
    assert pytest.importorskip("re").match(pattern, lines[-1]), lines[-1]
    assert not (tmp_path / "runs").exists()  # nothing started


def test_debug_shows_the_traceback(tmp_path):
    for proc in (undo("report", str(tmp_path / "none"), "--debug", cwd=tmp_path),
                 undo("report", str(tmp_path / "none"), cwd=tmp_path, env={"UNDO_DEBUG": "1"})):
        assert proc.returncode == 1
        assert "Traceback" in proc.stderr and "FileNotFoundError: run folder" in proc.stderr


def test_help_names_the_error_style():
    out = undo("--help", cwd=ROOT).stdout
    assert "exit code 2" in out and "--debug" in out and "UNDO_DEBUG=1" in out


def test_hardware_banner_once_per_process_and_expected_messages_dropped():
    import logging

    from undo_lightning.cli import _not_expected, _shown_once

    def record(msg):
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "", 0, msg, None, None)

    _shown_once.clear()
    assert _not_expected(record("GPU available: False, used: False"))
    assert not _not_expected(record("GPU available: False, used: False"))  # the next stage's Trainer
    assert _not_expected(record("GPU available: True (cuda), used: True"))  # another banner is news
    assert not _not_expected(record("💡 Tip: For seamless cloud logging ..."))
    assert _not_expected(record("`Trainer.fit` stopped: `max_steps=5` reached."))


@pytest.mark.slow
def test_ctrl_c_stops_the_pipeline_with_exit_130_and_says_how_to_resume(tmp_path):
    """Lightning turns Ctrl-C into a graceful stop of `fit`; the pipeline must stop there too (not go on to the next
    stage), leave the stage unfinished, and say how to resume."""
    import signal
    import time

    out = tmp_path / "run"
    # a shell starts background jobs (`pytest &`, CI runners) with SIGINT ignored and children inherit that, so the
    # child gets the default disposition back: Python then installs its KeyboardInterrupt handler as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "undo_lightning.cli", "pipeline", "-c", str(SMOKE), "--out_dir",
                             str(out)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = out / "reference" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "undo pipeline: interrupted; run the same command again to resume"
    assert not (out / "reference" / "DONE").exists() and not (out / "oracle").exists()
