"""The ``undo`` command.

``undo fit|validate -c CONFIG`` is plain LightningCLI over any stage module (``model.class_path``) and
``RetainForgetDataModule``; the other subcommands (``pipeline``, ``report``, ``relearn``, ...) are functions exposed
through jsonargparse, because LightningCLI subcommands must map to Trainer methods.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

#: no ``test``: the stages have no test split (the data module serves training and validation loaders only)
TRAINER_COMMANDS = ("fit", "validate")


# Non-Trainer subcommands: name -> (module, function, one-line summary). Imported only when chosen, so `undo --help`
# and an unknown subcommand answer without importing torch, Lightning and transformers.
TOOLS = {
    "pipeline": ("undo_lightning.experiment.pipeline", "pipeline_command",
                 "Run the whole UNDO experiment (pretrain, unlearn, distill, UNDO, relearn, report); resumable."),
    "relearn": ("undo_lightning.experiment.sweep", "relearn_command",
                "Relearning-attack sweep over models x LRs x seeds."),
    "report": ("undo_lightning.experiment.report", "main",
               "Write report.md, report.json and plots for a finished run folder."),
    "eval": ("undo_lightning.eval.command", "eval_command",
             "Multiple-choice accuracy (WMDP/MMLU format) and retain/forget CE of any HF model folder."),
}


def _tool(name: str):
    from undo_lightning.io import import_object

    module, function, _ = TOOLS[name]
    return import_object(f"{module}.{function}")


def _lightning_cli(args: list[str] | None, run: bool = True):
    from lightning.pytorch.cli import LightningCLI

    from undo_lightning.data import RetainForgetDataModule
    from undo_lightning.modules import UndoModule

    class UndoCLI(LightningCLI):
        """LightningCLI whose TensorBoard logs land in ``<default_root_dir>/tb`` next to the stage's exports."""

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            trainer = config.trainer
            if trainer.logger in (None, True):
                root = trainer.default_root_dir or os.getcwd()
                trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": root, "name": "tb", "version": "",
                                                "default_hp_metric": False}}

    # exit_on_error=False: a parser error is raised (and printed as one line by `main`) instead of a usage dump
    return UndoCLI(UndoModule, RetainForgetDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_kwargs={"overwrite": True},
                   parser_kwargs={"default_env": False, "exit_on_error": False})


def close_process_group() -> None:
    """Tears torch.distributed down after a DDP run. A gloo process group left to interpreter exit can abort the
    process ("terminate called without an active exception"), turning a finished run into a failed exit code."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank is done: none tears its connections down under another
        dist.destroy_process_group()


def _usage() -> str:
    lines = ["usage: undo {" + ",".join(TRAINER_COMMANDS + tuple(TOOLS)) + "} ...", "",
             "UNDO (Unlearn, Noise, Distill-on-Outputs) on PyTorch Lightning.", "",
             "Trainer subcommands (LightningCLI; see `undo fit --help`):"]
    lines += [f"  {c:10s} runs Trainer.{c} on the stage module and data of -c CONFIG" for c in TRAINER_COMMANDS]
    lines += ["", "Tools (see `undo <tool> --help`):"]
    for name, (_, _, summary) in TOOLS.items():
        lines.append(f"  {name:10s} {summary}")
    lines += ["", "Bad input is refused with one line `undo <command>: error: ...` and exit code 2; --debug (anywhere on",
              f"the command line) or {DEBUG_ENV}=1 shows the traceback instead."]
    return "\n".join(lines)


#: Lightning messages every stage would print that say nothing to an undo user: two "Tip: ... try installing ..."
#: adverts per Trainer, and the note that our modules' own checkpoint callback (last.ckpt written atomically, see
#: UndoModule.configure_callbacks) replaces the Trainer's default one.
_EXPECTED_LIGHTNING_MESSAGES = ("💡 Tip", "The following callbacks returned in `LightningModule.configure_callbacks` "
                                "will override existing callbacks passed to Trainer: ModelCheckpoint")


#: Lightning's hardware banner, printed by every Trainer: an experiment builds one per stage and attack run, so it is
#: shown once per process (the hardware does not change between stages).
_ONCE_PER_PROCESS = ("GPU available:", "TPU available:", "HPU available:")
_shown_once: set[str] = set()


def _not_expected(record: logging.LogRecord) -> bool:
    """Logging filter: drops :data:`_EXPECTED_LIGHTNING_MESSAGES` and repeats of :data:`_ONCE_PER_PROCESS`; the
    console keeps everything else."""
    msg = str(record.msg)
    if msg.startswith(_ONCE_PER_PROCESS):
        if msg in _shown_once:
            return False
        _shown_once.add(msg)
    return not msg.startswith(_EXPECTED_LIGHTNING_MESSAGES)


def quiet_expected_warnings() -> None:
    """Filters what is ours or expected and not actionable by a user (see :data:`_EXPECTED_LIGHTNING_MESSAGES`), a
    deprecation inside Lightning itself (its pytree helper on torch >= 2.10: `isinstance(treespec, LeafSpec)`), and
    Lightning's note on modules in eval mode (our frozen models, by design)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_expected)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    # frozen teachers and frozen starting copies are in eval mode on purpose (UndoModule.freeze)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training", category=Warning)
    # the summary table's size estimate under bf16-mixed: a footnote on Lightning's own estimate, nothing to act on
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary",
                            category=Warning)


def tune_allocator() -> bool:
    """Keeps memory freed by a training step in glibc's heap for the next step instead of returning it to the OS.

    glibc serves large blocks with ``mmap`` (returned to the OS on every free) and trims the heap top back to the OS
    once 128 KiB are free; a small model on the CPU frees and re-allocates the same activation buffers every step and
    paid for it with page faults: steps were 3-4x slower (docs/reference.md §14). Raising both thresholds to 2 GiB
    keeps those buffers in the heap. Set in-process with ``mallopt`` (both together: a trim threshold alone freezes
    the mmap threshold at 128 KiB and is slower than glibc's defaults), so ``undo`` runs in one process (debuggers and
    profilers see it); ``benchmarks/malloc_settings.py`` compares it with the environment variables and the defaults.

    Returns:
        Whether the setting was applied (only with glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library of this process; musl and macOS have no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


#: exit code of a command refused for bad input (a config value, an option, a path, a run folder), as argparse uses
EXIT_BAD_INPUT = 2
#: environment variable that, like ``--debug``, shows the traceback of a refused command
DEBUG_ENV = "UNDO_DEBUG"


def is_bad_input(err: BaseException) -> bool:
    """Whether ``err`` reports bad input that its message already explains: our ``ValueError`` messages (they name
    the key, the value and what is accepted), a missing or unreadable path (``OSError``), or a parser error of
    jsonargparse / LightningCLI (``argparse.ArgumentError``). Anything else is a bug and keeps its traceback."""
    import argparse

    return isinstance(err, (ValueError, OSError, argparse.ArgumentError))


def one_line(err: BaseException) -> str:
    """``err``'s message on one line: jsonargparse's bookkeeping about union types dropped and its wording tidied
    (:func:`~undo_lightning.io.tidy_parser_text`), lines joined."""
    from undo_lightning.experiment.config import error_message
    from undo_lightning.io import tidy_parser_text, union_reasons

    # jsonargparse raises a union's validation failure (e.g. an optional dataclass group) as a plain ValueError
    from_parser = err.__class__.__name__ == "ArgumentError"
    text = tidy_parser_text(error_message(err)) if from_parser else union_reasons(str(err))
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``undo`` console script.

    Every subcommand refuses bad input the same way: one line ``undo <command>: error: <key>=<value>: <what is
    accepted>`` on stderr and exit code 2; ``--debug`` (anywhere on the command line) or ``UNDO_DEBUG=1`` shows the
    traceback instead. An interrupt exits with 130 and says how to resume.
    """
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not explicit:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (and DDP re-launches it): --debug is ours
    prog = f"undo {argv[0]}" if argv and argv[0] in (*TRAINER_COMMANDS, *TOOLS, "test") else "undo"
    how = "add --ckpt_path last to the same command" if prog == "undo fit" else "run the same command again"
    try:
        _run(argv, explicit)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted; {how} to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as exit_:
        # Lightning turns Ctrl-C inside Trainer.fit into a graceful stop and sys.exit(1) while handling it
        if debug or not isinstance(exit_.__context__, KeyboardInterrupt):
            raise
        print(f"{prog}: interrupted; {how} to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `undo ... | head`: the reader left; nothing to report (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except Exception as err:
        if debug or not is_bad_input(err):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def _run(argv: list[str], explicit: bool) -> None:
    tune_allocator()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    quiet_expected_warnings()
    if argv[0] == "pipeline":
        _tool("pipeline")(argv[1:])
        return
    if argv[0] in TOOLS:
        from jsonargparse import CLI

        CLI(_tool(argv[0]), args=argv[1:], prog=f"undo {argv[0]}", exit_on_error=False)
        return
    if argv[0] == "test":
        raise ValueError("the stages have no test split; `undo validate -c CONFIG` runs the shared "
                         "validation metrics, `undo eval MODEL_DIR` scores any exported model")
    if argv[0] not in TRAINER_COMMANDS:
        raise ValueError(f"subcommand {argv[0]!r}: unknown; expected one of "
                         f"{', '.join(TRAINER_COMMANDS + tuple(TOOLS))}")
    _lightning_cli(argv if explicit else None)
    close_process_group()


if __name__ == "__main__":
    main()
