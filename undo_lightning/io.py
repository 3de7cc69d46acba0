"""The leaf of the package: local-path vs hub-id rule, local record/text readers, hub datasets, atomic writes,
JSON-safe values and dotted-path imports. It imports nothing from ``undo_lightning``, so every layer may use it.

Every reader raises ``ValueError`` naming the file, line and field of bad input, not a deep ``datasets`` or
``pyarrow`` stack trace; every writer writes through a temporary name and a rename, so a reader (or a later pipeline
stage) never sees half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import shutil
import tempfile
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np

SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".txt", ".parquet")
_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # files whose records are dicts (not plain text)

# --------------------------------------------------------------------------------------------------- file reading
def is_local_path(path: str) -> bool:
    """Whether ``path`` names a local file/folder rather than a hub id (``name`` or ``owner/name``).

    Anything that exists, starts like a path, has more than one ``/`` or ends in a supported suffix is local, so a
    mistyped file name gets a "no such file" error instead of a hub lookup.
    """
    return (os.path.exists(os.path.expanduser(path)) or path.startswith((".", "/", "~")) or path.count("/") > 1
            or path.lower().endswith(SUFFIXES) or os.sep != "/" and os.sep in path)


def corpus_files(path: str, suffixes: Sequence[str] = SUFFIXES) -> list[str]:
    """The files of a local corpus: ``path`` itself, or every supported file below the folder ``path``.

    Args:
        path: a file or a folder (searched recursively; hidden files and folders are skipped).
        suffixes: the file endings accepted.

    Returns:
        File paths in sorted order (so the corpus order, and therefore the split, is reproducible).

    Raises:
        ValueError: if ``path`` does not exist, has an unsupported suffix, or is a folder without supported files.
    """
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise ValueError(f"path={path!r}: no such file or folder")
    if os.path.isfile(full):
        if not full.lower().endswith(tuple(suffixes)):
            raise ValueError(f"path={path!r}: unsupported file type; expected one of {', '.join(suffixes)} "
                             "(or a folder of such files)")
        return [full]
    found = []
    for root, dirs, files in os.walk(full):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(tuple(suffixes))]
    if not found:
        raise ValueError(f"path={path!r} is a folder without any {', '.join(suffixes)} files")
    return sorted(found)


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: "\r\n" files split like "\n" files
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {err.start}); re-encode the file as UTF-8") from None


def _jsonl_records(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{path}:{line_no}"
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid UTF-8 text (byte {err.start}); re-encode the file as UTF-8") from None


def _json_records(path: str) -> Iterator[tuple[Any, str]]:
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: a JSON-lines file named .json (as HF's to_json writes)
            yield from _jsonl_records(path)
            return
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        key, data = next(iter(data.items()))  # {"data": [...]} wrapper
        for i, record in enumerate(data):
            yield record, f"{path}: {key}[{i}]"
        return
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records (or one record per line), got a "
                         f"{type(data).__name__}")
    for i, record in enumerate(data):
        yield record, f"{path}: record {i}"


def _parquet_records(path: str, columns: Sequence[str] | None = None) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid & co. for files that are not parquet
        raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    names = pf.schema_arrow.names
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r}; the file has columns {names}")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=list(columns) if columns is not None else None):
        for record in batch.to_pylist():
            yield record, f"{path}: row {row}"
            row += 1


def read_records(path: str, columns: Sequence[str] | None = None) -> Iterator[tuple[Any, str]]:
    """Yields ``(record, location)`` for every record of a local ``.jsonl``/``.json``/``.parquet`` file or folder.

    Args:
        path: a file or a folder of such files.
        columns: Parquet columns to read (all when ``None``); JSON records are always read whole.

    Yields:
        The record (normally a dict) and where it came from, e.g. ``"data/a.jsonl:12"`` or ``"b.parquet: row 3"``.
    """
    for file in corpus_files(path, _RECORD_SUFFIXES):
        suffix = file.lower().rsplit(".", 1)[-1]
        if suffix == "jsonl":
            yield from _jsonl_records(file)
        elif suffix == "json":
            yield from _json_records(file)
        else:
            yield from _parquet_records(file, columns)


def record_field(record: Any, name: str, where: str, kind: str = "field") -> Any:
    """Returns ``record[name]``; raises a ``ValueError`` naming ``where`` and listing the fields that do exist."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a {name!r} {kind}, got {type(record).__name__} "
                         f"{preview(record)}")
    if name not in record:
        raise ValueError(f"{where}: no {kind} {name!r}; the record has {kind}s {sorted(record)}")
    return record[name]


def preview(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def load_hub_dataset(path: str, name: str | None, split: str, streaming: bool = False):
    """``datasets.load_dataset(path, name, split=split, streaming=streaming)`` with errors as one clear ``ValueError``.

    Raises:
        ValueError: when the dataset cannot be loaded (offline, unknown id, unknown config or split); the message says
            to pass a local path, which is the fix offline.
    """
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, streaming=streaming)
    except Exception as err:  # ConnectionError, DatasetNotFoundError, ValueError for a bad config/split, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"path={path!r} is not a local file or folder, and loading it as a Hugging Face dataset "
            f"(name={name!r}, split={split!r}) failed: {type(err).__name__}: {detail[:300]}. Offline (or with "
            f"HF_HUB_OFFLINE=1), pass a local path instead: a {'/'.join(SUFFIXES)} file or a folder of them."
        ) from None


# ------------------------------------------------------------------------------------------------------------ writing
def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """Writes a file through a temporary sibling and ``os.replace``, so readers never see a half-written file.

    Args:
        path: the final file.
        write: called with the open binary temporary file.
        mode: permission bits of the result (``mkstemp`` would leave 0600; run artefacts are meant to be shared).
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes ``data`` as JSON (indent 2, sorted keys) atomically; pass it through :func:`json_safe` first for strict
    JSON (``null`` instead of ``NaN``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary sibling folder to fill; on success it replaces ``path`` as a whole, on error it is removed.

    ``path`` therefore either holds a complete result or what it held before: a later stage can never pick up a
    half-written folder.
    """
    out = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.exists(out):
            old = f"{tmp}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def json_safe(x: Any, digits: int | None = None) -> Any:
    """``x`` as plain JSON values: NaN/inf -> ``None``, numpy scalars/arrays -> Python, tuples -> lists.

    Args:
        x: nested dicts/lists of numbers and strings.
        digits: round floats to this many significant digits (``None``: keep them exact). Rounded values never
            print as ``-0.0``.
    """
    if isinstance(x, dict):
        return {str(k): json_safe(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [json_safe(v, digits) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            return None
        return x if digits is None else float(f"{x:.{digits}g}") + 0.0
    return x


# ------------------------------------------------------------------------------------------------------- importing
def import_object(path: str) -> Any:
    """The object a dotted path names (``"undo_lightning.modules.RetainGapStop"``).

    Raises:
        ValueError: the path has no module part, the module cannot be imported, or it has no such attribute.
    """
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r}: expected a dotted path such as 'package.module.Name'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{path!r} cannot be imported ({type(err).__name__}: {err})") from None


def init_kwargs(cls: type, init_args: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``init_args`` checked against ``cls``'s typed signature by jsonargparse, as LightningCLI checks a stage config:
    unknown keys and wrong types are errors, and nested ``{class_path, init_args}`` values (sources, unlearning
    methods) are instantiated.

    Args:
        cls: the class the arguments are for.
        init_args: its keyword arguments in config form.
        what: names the config section in error messages.

    Returns:
        The keyword arguments, ready for ``cls(**kwargs)``.

    Raises:
        ValueError: naming ``what``, the class and the bad argument.
    """
    import inspect

    from jsonargparse import ArgumentError, ArgumentParser

    params = [n for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in init_args:
        if key not in params:
            raise ValueError(f"{what}: model.{key}: not an argument of {cls.__name__}{did_you_mean(key, params)}; "
                             f"arguments: {params}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init", instantiate=False)
    try:
        namespace = parser.parse_object({"init": dict(init_args)})
    except ArgumentError as err:
        raise ValueError(f"{what}: {cls.__name__}: {parse_error_message(err, 'init.', 'model.')}") from None
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    try:
        return dict(vars(build(namespace).init))
    except ValueError as err:  # a nested class (e.g. an unlearning method) refused its arguments
        if not str(err).startswith(UNION_FAILURE):
            raise
        raise ValueError(f"{what}: {cls.__name__}: {union_reasons(str(err))}") from None


def settings_from(cls: type, value: Any, name: str, default: Any = None) -> Any:
    """``value`` as an instance of the settings dataclass ``cls``: an instance as it is; a mapping (a config section, a
    checkpoint's ``hparams``) sets the fields it names over ``default`` (``cls``'s own defaults when ``None``).

    Raises:
        ValueError: ``value`` is neither, or names a field ``cls`` does not have (naming ``name`` and the fields).
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}={value!r}: expected {cls.__name__}(...) or a mapping of its fields")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; expected some of {names}")
    return cls(**value) if default is None else dataclasses.replace(default, **value)


def did_you_mean(name: Any, choices: Any) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``choices`` to a misspelt ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_error_message(err: Exception, prefix: str = "", replacement: str = "") -> str:
    """A jsonargparse error as ``key=value: expected ...`` on one line.

    jsonargparse reports a value that fits none of a union's types as ``Parser key "K": Does not validate against any
    of the Union subtypes / Subtypes: [...] / Errors: ... / Given value: V``; this keeps the key (with ``prefix``
    replaced by ``replacement``), the value and the accepted types (a class as ``a Name class_path``, a ``Literal``
    as its values). Any other message is returned with its lines joined.
    """
    import re

    text = str(err)
    key = re.search(r'Parser key "([^"]+)"', text)
    value = re.search(r"Given value: (.*)", text)
    subtypes = re.search(r"Subtypes: \[(.*)\]", text)
    inner = re.search(r"Problem with given class_path '([^']+)':\s*\n(.*?)(?=\n\s*- |\n\s*Given value type|\Z)", text,
                      re.S)
    if key and inner:  # the class was recognised: what is wrong is inside its arguments
        name = key.group(1)
        name = replacement + name[len(prefix):] if prefix and name.startswith(prefix) else name
        reason = re.sub(r"Option '([^']+)' is not accepted", r"init_args.\1 is not an argument", inner.group(2))
        reason = re.sub(r'Parser key "([^"]+)":', r"init_args.\1:", reason)
        reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason)
        return f"{name}: {inner.group(1)}: " + " ".join(line.strip() for line in reason.splitlines() if line.strip())
    if key and value and subtypes:
        accepted = []
        for part in re.findall(r"<class '[\w.]+'>|typing\.Literal\[[^\]]*\]|[\w.]+", subtypes.group(1)):
            if part.startswith("<class"):
                name = part.split("'")[1].rsplit(".", 1)[-1]
                accepted.append(f"a {name} class_path" if name != "NoneType" else "null")
            elif part.startswith("typing.Literal"):
                accepted.append(part[len("typing.Literal["):-1])
        name = key.group(1)
        name = replacement + name[len(prefix):] if prefix and name.startswith(prefix) else name
        return f"{name}={value.group(1).strip()}: expected {' or '.join(accepted) or subtypes.group(1)}"
    text = tidy_parser_text(text)
    return text.replace(prefix, replacement) if prefix else text


UNION_FAILURE = "Does not validate against any of the Union subtypes"


def union_reasons(text: str) -> str:
    """The reasons of a union value that jsonargparse could not build (``Does not validate against any of the Union
    subtypes ... Errors: - reason ...``), without the bookkeeping: the alternatives' own errors (e.g. an unlearning
    method's ``beta=0.0: ... must be > 0``), leaving out "Expected a <type>" lines of the alternatives the value was
    never meant as when another reason is given. Any other text is returned as is."""
    if not text.startswith(UNION_FAILURE):
        return text
    errors = text.split("Errors:", 1)[-1].split("Given value type:", 1)[0]
    reasons = [line.strip()[2:] for line in errors.splitlines() if line.strip().startswith("- ")]
    meant = [r for r in reasons if not r.startswith("Expected a ")]
    return "; ".join(meant or reasons) or text


def tidy_parser_text(text: str) -> str:
    """jsonargparse's wording made readable, on one line: ``Parser key "k":`` -> ``k:``, ``<class 'int'>`` ->
    ``int``, ``Group 'g' does not accept option 'o'`` -> ``g.o: not an argument``."""
    import re

    text = re.sub(r"<class '([\w.]+)'>", r"\1", re.sub(r'Parser key "([^"]+)":', r"\1:", text))
    text = re.sub(r"Group '([^']+)' does not accept option '([^']+)'", r"\1.\2: not an argument", text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def instantiate(cls: type, init_args: Mapping[str, Any], what: str) -> Any:
    """``cls(**init_args)`` with the arguments checked and converted by :func:`init_kwargs`."""
    return cls(**init_kwargs(cls, init_args, what))


def check_choice(name: str, value: Any, options: Any) -> None:
    """Raises ``ValueError`` naming ``name=value`` and what is accepted, unless ``value`` is one of ``options``.

    Args:
        name: the argument's name.
        value: its value.
        options: a ``Literal[...]`` type (the one in the signature, so the choices are written once) or a collection.
    """
    allowed = typing.get_args(options) or tuple(options)
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}")
