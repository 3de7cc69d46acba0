"""What a finished result depends on, so that a re-run redoes only what changed.

Every pipeline stage and every attack run writes a *record* into its folder before it starts: the resolved settings
its result depends on (for a stage: its module, data and Trainer arguments and the digests of the stages it reads;
for an attack run: the attacked model's digest, LR, seed, steps, data and Trainer arguments). A re-run compares the
record with what the current config asks for: equal -> the finished result (or the checkpoint of an interrupted one)
is reused; different -> the folder is removed and redone, and the log says which setting changed. A stage's digest
is part of the record of every stage and attack run that reads it, so a change reaches everything downstream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from undo_lightning.io import json_safe, write_json_atomic

#: Trainer arguments that change what is shown or logged, not what a run computes: changing one redoes nothing.
COSMETIC_TRAINER = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "logger")


def computed_trainer(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer`` without :data:`COSMETIC_TRAINER` keys."""
    return {k: v for k, v in trainer.items() if k not in COSMETIC_TRAINER}


def digest(settings: Mapping[str, Any]) -> str:
    """A short, order-independent hash of a record (16 hex digits of SHA-256 over its sorted-key JSON)."""
    text = json.dumps(normalized(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None if there is none (or it cannot be read: then the result is redone)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, settings: Mapping[str, Any]) -> None:
    """Writes a record atomically (as plain JSON, so that it compares equal to ``settings`` read back)."""
    write_json_atomic(str(path), normalized(settings))


def normalized(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as it reads back from its JSON record (tuples become lists, keys strings, other objects their
    ``str``)."""
    return json.loads(json.dumps(json_safe(dict(settings)), default=str))


def describe_change(old: Mapping[str, Any] | None, new: Mapping[str, Any], limit: int = 3) -> str:
    """Why ``old`` and ``new`` records differ, for the log: the changed inputs, else up to ``limit`` changed settings
    as ``key.path: old -> new``.

    Example:
        >>> describe_change({"model": {"lr": 0.1}, "inputs": {}}, {"model": {"lr": 0.2}, "inputs": {}})
        'settings changed: model.lr 0.1 -> 0.2'
    """
    if old is None:
        return "no record of the settings it was made with"
    old, new = normalized(old), normalized(new)
    inputs = sorted(k for k in set(old.get("inputs", {})) | set(new.get("inputs", {}))
                    if old.get("inputs", {}).get(k) != new.get("inputs", {}).get(k))
    if inputs:
        return f"its input{'s' if len(inputs) > 1 else ''} {', '.join(inputs)} changed"
    changes = _diff({k: v for k, v in old.items() if k != "inputs"}, {k: v for k, v in new.items() if k != "inputs"})
    more = f" (and {len(changes) - limit} more)" if len(changes) > limit else ""
    return "settings changed: " + "; ".join(changes[:limit]) + more


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{path}.{key}".lstrip("."))
        return out
    return [] if old == new else [f"{path or 'value'} {_short(old)} -> {_short(new)}"]


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."
