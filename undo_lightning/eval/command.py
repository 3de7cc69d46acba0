"""``undo eval``: multiple-choice accuracy (WMDP / MMLU) and retain/forget CE of any Hugging Face model folder.

Example (the paper's WMDP evaluation, docs/reference.md §9.3: WMDP 0-shot, MMLU 5-shot from its dev split)::

    undo eval runs/wmdp/undo/hf --mcq '[wmdp-cyber, mmlu]' --dtype bfloat16 --output runs/wmdp/undo/eval.json

Multiple-choice scoring is :func:`undo_lightning.eval.mcq.mcq_accuracy` (lm-evaluation-harness's prompts and
log-likelihood accuracy, batched); CE is the token-weighted next-token cross-entropy over packed blocks of every
document of a text file, as the stages' ``val/retain_ce`` / ``val/forget_ce`` are computed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import torch

from undo_lightning.data.mcq import MCQSpec, check_set_name
from undo_lightning.data.module import pack_documents
from undo_lightning.data.text import TextSource
from undo_lightning.data.tokenizers import load_tokenizer
from undo_lightning.eval.mcq import mcq_accuracy
from undo_lightning.eval.metrics import lm_nll
from undo_lightning.io import is_local_path, write_json_atomic
from undo_lightning.models import build_model, is_hf_folder

#: named multiple-choice sets: the paper's evaluation (docs/reference.md §9.3)
MCQ_PRESETS: dict[str, MCQSpec] = {
    "wmdp-bio": MCQSpec("cais/wmdp", name="wmdp-bio", split="test", side="forget"),
    "wmdp-cyber": MCQSpec("cais/wmdp", name="wmdp-cyber", split="test", side="forget"),
    "wmdp-chem": MCQSpec("cais/wmdp", name="wmdp-chem", split="test", side="forget"),
    "mmlu": MCQSpec("cais/mmlu", name="all", split="test", side="retain", k_shot=5, fewshot="dev"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_mcq(item: str) -> tuple[str, MCQSpec]:
    """``[NAME=]SET`` -> ``(name, spec)``.

    ``SET`` is a preset (:data:`MCQ_PRESETS`: ``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``, ``mmlu``), a local
    ``.jsonl``/``.json``/``.parquet`` file or folder (0-shot), or ``HUB_ID:CONFIG[:SPLIT]`` (split ``test`` by default).
    ``NAME`` defaults to the preset name, the file's stem, or ``CONFIG``.

    Raises:
        ValueError: for an empty item or a bad name.
    """
    name, sep, target = item.partition("=")
    if not sep:
        name, target = "", item
    target = target.strip()
    if not target:
        raise ValueError(f"--mcq item {item!r}: expected [NAME=]SET with SET a preset {sorted(MCQ_PRESETS)}, a local "
                         "file, or HUB_ID:CONFIG[:SPLIT]")
    if target in MCQ_PRESETS:
        spec, default = MCQ_PRESETS[target], target
    elif is_local_path(target):
        spec = MCQSpec(target)
        default = target.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    else:
        hub_id, _, rest = target.partition(":")
        config, _, split = rest.partition(":")
        spec = MCQSpec(hub_id, name=config or None, split=split or "test")
        default = config or hub_id.rsplit("/", 1)[-1]
    name = name.strip() or default
    check_set_name(name)
    return name, spec


def evaluate_model(model: str, mcq: list[str] | str | None = None, limit: int | float | None = None,
                   k_shot: int | None = None, fewshot: str | None = None,
                   retain: str | None = None, forget: str | None = None, text_field: str = "text",
                   max_documents: int | None = None, tokenizer: str | None = None, block_size: int = 256,
                   batch_size: int = 8, device: str = "auto",
                   dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> dict:
    """Evaluates a model; see :func:`eval_command` for the arguments.

    Returns:
        ``{"model", "mcq": {name: {"accuracy", "correct", "n", "k_shot", "limit", "side", "path", "name",
        "split"}}, "ce": {"retain"|"forget": {"ce", "tokens", "path"}}}``.

    Raises:
        ValueError: for bad arguments, unreadable files or records, or a hub id that cannot be reached.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    if k_shot is not None and (isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0):
        raise ValueError(f"k_shot={k_shot!r}: expected an integer >= 0")
    if block_size < 2 or batch_size < 1:
        raise ValueError(f"block_size={block_size}, batch_size={batch_size}: expected block_size >= 2 and "
                         "batch_size >= 1")
    specs: dict[str, MCQSpec] = {}
    for item in [mcq] if isinstance(mcq, str) else mcq or []:
        name, spec = parse_mcq(item)
        if name in specs:
            raise ValueError(f"--mcq: two sets are named {name!r}; name them with NAME=SET")
        overrides = {"limit": limit} if limit is not None else {}
        if k_shot is not None:
            overrides["k_shot"] = k_shot
        if fewshot is not None:
            overrides["fewshot"] = fewshot
        specs[name] = dataclasses.replace(spec, **overrides)  # re-validates the overridden fields
    texts = {side: TextSource(path, text_field=text_field, max_documents=max_documents)
             for side, path in (("retain", retain), ("forget", forget)) if path is not None}
    if not specs and not texts:
        raise ValueError("nothing to evaluate: give --mcq sets and/or --retain/--forget text files")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if os.path.isdir(model) and not is_hf_folder(model):
        raise ValueError(f"model={model!r}: a folder without a model (no config.json there); expected a Hugging Face "
                         "model folder (e.g. a stage's hf/, written when the stage finishes) or a hub id")
    tok = load_tokenizer(tokenizer or model)
    net = build_model(model, tok).to(device=device, dtype=_DTYPES[dtype]).eval()
    result: dict = {"model": model, "mcq": {}, "ce": {}}
    for name, spec in specs.items():
        try:
            records = spec.records()
            scores = mcq_accuracy(net, tok, records, k_shot=spec.k_shot, fewshot_records=spec.fewshot_records(),
                                  batch_size=batch_size, subject=spec.subject)
        except ValueError as err:
            raise ValueError(f"--mcq {name}: {err}") from None
        result["mcq"][name] = {**scores, "k_shot": spec.k_shot, "limit": spec.limit, "side": spec.side,
                               "path": spec.path, "name": spec.name, "split": spec.split}
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for side, source in texts.items():
        docs = tok(source.corpus(), add_special_tokens=False)["input_ids"]
        blocks = pack_documents(docs, block_size, sep)
        if blocks.shape[0] == 0:
            raise ValueError(f"--{side} {source.path}: {sum(len(d) + 1 for d in docs)} tokens, fewer than one block "
                             f"of block_size={block_size}; lower --block_size")
        nll, n = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            chunk_nll, chunk_n = lm_nll(net, ids, torch.ones_like(ids), ids)
            nll, n = nll + chunk_nll.double().cpu(), n + int(chunk_n)
        result["ce"][side] = {"ce": float(nll) / n, "tokens": n, "path": source.path}
    return result


def format_result(result: dict) -> str:
    """The result as a small text table."""
    lines = [f"model: {result['model']}"]
    if result["mcq"]:
        lines.append(f"{'set':20s} {'side':7s} {'k':>2s} {'n':>6s} {'accuracy':>9s}")
        for name, r in result["mcq"].items():
            lines.append(f"{name:20s} {r['side']:7s} {r['k_shot']:2d} {r['n']:6d} {r['accuracy']:9.4f}")
    for side, r in result["ce"].items():
        lines.append(f"{side}_ce = {r['ce']:.4f} over {r['tokens']} tokens ({r['path']})")
    return "\n".join(lines)


def eval_command(model: str, mcq: list[str] | str | None = None, limit: int | float | None = None,
                 k_shot: int | None = None, fewshot: str | None = None,
                 retain: str | None = None, forget: str | None = None, text_field: str = "text",
                 max_documents: int | None = None, tokenizer: str | None = None, block_size: int = 256,
                 batch_size: int = 8, device: str = "auto",
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32", output: str | None = None) -> dict:
    """Evaluate a model folder: WMDP/MMLU multiple-choice accuracy and retain/forget CE on text files.

    Examples::

        undo eval runs/wmdp/undo/hf --mcq '[wmdp-cyber, mmlu]' --dtype bfloat16
        undo eval runs/lang/unlearn/hf --retain data/english.jsonl --forget data/korean.jsonl --output eval.json
        undo eval my_model --mcq '[bio=questions.jsonl, cais/mmlu:college_biology]' --limit 100

    Args:
        model: a Hugging Face model folder (any stage's ``hf/``) or a hub id (needs network access).
        mcq: one multiple-choice set or a YAML list of them (``'[wmdp-cyber, mmlu]'``), each ``[NAME=]SET``: a
            preset (``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``: 0-shot; ``mmlu``: 5-shot from its dev split), a
            local ``.jsonl``/``.json``/``.parquet`` file with ``question``, ``choices``, ``answer`` (index) fields
            (0-shot), or ``HUB_ID:CONFIG[:SPLIT]``.
        limit: evaluate a subset of every set, per subject as lm-eval does: an integer N (first N questions of each
            subject) or a fraction in (0, 1) (e.g. the paper's MMLU 0.4).
        k_shot: solved examples per question for every set (overrides the presets' 0 / 5).
        fewshot: where the solved examples of every set come from: a local file of solved questions (e.g. MMLU's
            ``dev`` split saved as ``.jsonl``) or, for hub sets, a split name (``dev``). Default: a preset's own
            (MMLU: its dev split); a local set without it takes its examples from its own other questions.
        retain: a local text corpus (file or folder; ``.jsonl``/``.json``/``.txt``/``.parquet``) or hub dataset id
            on which to report the retain CE.
        forget: the same for the forget CE.
        text_field: record field holding the text in ``--retain``/``--forget`` records.
        max_documents: read at most this many documents of each text corpus.
        tokenizer: tokenizer folder or hub id (default: the one shipped in ``model``).
        block_size: tokens per packed block for the CE (documents separated by ``<bos>``, as in training).
        batch_size: sequences (questions or blocks) per forward batch.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: model weights' dtype (``bfloat16`` for large models on GPU).
        output: also write the result as JSON to this file.

    Returns:
        The result dict (also printed as a table).
    """
    result = evaluate_model(model, mcq, limit, k_shot, fewshot, retain, forget, text_field, max_documents,
                            tokenizer, block_size, batch_size, device, dtype)
    print(format_result(result))
    if output is not None:
        write_json_atomic(output, result)
    return result
