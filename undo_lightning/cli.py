"""The ``undo`` command.

``undo fit|validate|test -c CONFIG`` is plain LightningCLI over any stage module (``model.class_path``) and
``RetainForgetDataModule``; the other subcommands (``pipeline``, ``report``, ``relearn``, ...) are functions exposed
through jsonargparse, because LightningCLI subcommands must map to Trainer methods.
"""

from __future__ import annotations

import logging
import os
import sys

# glibc's allocator returns freed blocks to the OS eagerly, which made 3-4x slow steps on small CPU models
# (docs/reference.md §14); these thresholds must be set before the process starts, so the CLI re-executes itself once.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

TRAINER_COMMANDS = ("fit", "validate", "test")


# Non-Trainer subcommands: name -> (module, function, one-line summary). Imported only when chosen, so `undo --help`
# and an unknown subcommand answer without importing torch, Lightning and transformers.
TOOLS = {
    "pipeline": ("undo_lightning.experiment.pipeline", "pipeline_command",
                 "Run the whole UNDO experiment (pretrain, unlearn, distill, UNDO, relearn, report); resumable."),
    "relearn": ("undo_lightning.experiment.sweep", "relearn_command", "Relearning-attack sweep over models x LRs x seeds."),
    "report": ("undo_lightning.experiment.report", "main", "Write report.md, report.json and plots for a finished run folder."),
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

    return UndoCLI(UndoModule, RetainForgetDataModule, subclass_mode_model=True, args=args, run=run,
                   save_config_kwargs={"overwrite": True}, parser_kwargs={"default_env": False})


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
    return "\n".join(lines)


def _not_an_install_tip(record: logging.LogRecord) -> bool:
    """Logging filter: Lightning prints two "💡 Tip: ... try installing ..." adverts for every Trainer, i.e. every
    pipeline stage and attack run; the console keeps everything else."""
    return not str(record.msg).startswith("💡 Tip")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``undo`` console script."""
    explicit = argv is not None  # LightningCLI reads sys.argv itself unless called from Python with arguments
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.name == "posix" and os.environ.get("UNDO_NO_REEXEC") is None and any(k not in os.environ
                                                                              for k in _MALLOC_ENV):
        os.environ.update(_MALLOC_ENV)
        os.environ["UNDO_NO_REEXEC"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "undo_lightning.cli", *argv])
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_install_tip)
    if argv[0] == "pipeline":
        _tool("pipeline")(argv[1:])
        return
    if argv[0] in TOOLS:
        from jsonargparse import CLI

        CLI(_tool(argv[0]), args=argv[1:], prog=f"undo {argv[0]}")
        return
    if argv[0] not in TRAINER_COMMANDS:
        raise SystemExit(f"undo: unknown subcommand {argv[0]!r}; expected one of "
                         f"{', '.join(TRAINER_COMMANDS + tuple(TOOLS))}")
    _lightning_cli(argv if explicit else None)
    close_process_group()


if __name__ == "__main__":
    main()
