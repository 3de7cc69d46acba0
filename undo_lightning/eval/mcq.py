"""Multiple-choice (WMDP / MMLU) accuracy by log-likelihood, as lm-evaluation-harness scores its ``wmdp_*`` /
``mmlu_*`` tasks (the paper used lm-eval 0.4.8; docs/reference.md §9.3), without depending on it.

One scoring path serves validation during training (:func:`mcq_correct`), ``undo eval`` and the Python API
(:func:`mcq_accuracy`): prompts come from :mod:`undo_lightning.data.mcq`, then

* continuations ``" A"``, ``" B"``, ... are scored by their summed token log-probability given the prompt; the
  prediction is the argmax (first on ties), accuracy = share of predictions equal to the gold index (``acc``);
* tokenisation as lm-eval's ``_encode_pair``: context and context+continuation are encoded separately and the
  continuation tokens are the tail of the joint encoding; the special tokens the tokenizer itself puts before a
  text by default are prepended (lm-eval's rule: ``<bos>`` for Gemma's tokenizer, nothing for GPT-2's).

Scoring is batched with left padding and explicit position ids. Only the positions that predict continuation tokens
get logits (``logits_to_keep``), and log-softmax runs in fp32 on chunks of those rows, so a 256k vocabulary never
materialises a ``[batch, seq, vocab]`` tensor.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch

from undo_lightning.data.mcq import LETTERS, MCQPrompt, MCQRecord, limit_records, mcq_prompts, validate_record
from undo_lightning.losses import auto_chunk_size

# memory of one fp32 log-softmax chunk: bounds memory independently of batch size and vocabulary.
_CHUNK_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------------------------ scoring
def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _keep_kwarg(model: torch.nn.Module) -> str | None:
    """The forward argument that limits logits to the last positions (renamed in transformers 4.50)."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def default_prefix(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text by default (``[<bos>]`` for Gemma's, ``[]`` for GPT-2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    default = tokenizer("a")["input_ids"]
    for start in range(len(default) - len(plain) + 1):  # where the text's own ids begin in the default encoding
        if default[start:start + len(plain)] == plain:
            return list(default[:start])
    return []


def encode_pair(tokenizer, context: str, continuation: str,
                prefix: list[int] | int | None) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` as lm-eval's ``_encode_pair`` makes them.

    Trailing whitespace of the context moves to the continuation; the continuation's ids are the tail of the joint
    encoding after as many tokens as the context alone has, so BPE merges across the boundary are scored the way
    lm-eval scores them.

    Args:
        tokenizer: the model's tokenizer.
        context: the prompt.
        continuation: the scored text (``" B"``).
        prefix: token ids put before the context (:func:`default_prefix`, ``[bos]``), a single id, or ``None``.

    Returns:
        ``(context ids, continuation ids)``.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    prefix = [prefix] if isinstance(prefix, int) else list(prefix or [])
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   add_bos: bool | None = None, max_length: int | None = None) -> list[float]:
    """Summed log-probabilities of each continuation given its context.

    Requests whose inputs coincide (the usual case: all single-token choices of one question) share one forward row.
    Rows are sorted by length and left-padded; position ids restart at 0 on every row's first real token.

    Args:
        model: a causal LM returning ``.logits`` (a Hugging Face ``*ForCausalLM``); put in eval mode meanwhile.
        tokenizer: its tokenizer.
        requests: ``(context, continuation)`` strings, e.g. ``(prompt, " B")``.
        batch_size: forward rows per batch.
        add_bos: prepend ``<bos>``; ``None``: what the tokenizer prepends by default (:func:`default_prefix`, lm-eval's
            rule).
        max_length: keep at most this many input tokens per row (the left is cut, as lm-eval does); ``None`` uses
            the model's ``max_position_embeddings`` when it has one.

    Returns:
        One float per request, in request order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos token")
    prefix = default_prefix(tokenizer) if add_bos is None else [tokenizer.bos_token_id] if add_bos else []
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    rows: dict[tuple[int, ...], int] = {}  # input ids -> row index
    row_ids: list[tuple[int, ...]] = []
    targets: list[tuple[int, list[int]]] = []  # per request: (row, continuation ids)
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation, prefix)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context ...{context[-40:]!r}")
        if not ctx:
            raise ValueError("an empty context without a bos token cannot be scored (nothing predicts the first "
                             "continuation token); pass add_bos=True with a tokenizer that has one")
        inp = (ctx + cont)[:-1]
        if max_length is not None:
            if len(cont) > max_length:
                raise ValueError(f"continuation {continuation!r} has {len(cont)} tokens, more than max_length")
            inp = inp[-max_length:]
        key = tuple(inp)
        if key not in rows:
            rows[key] = len(row_ids)
            row_ids.append(key)
        targets.append((rows[key], cont))

    by_row: list[list[int]] = [[] for _ in row_ids]  # requests scored on each row
    for req, (row, _) in enumerate(targets):
        by_row[row].append(req)
    order = sorted(range(len(row_ids)), key=lambda r: (-len(row_ids[r]), r))  # longest first: little padding
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out; any id works
    keep = _keep_kwarg(model)
    scores = torch.zeros(len(targets), dtype=torch.float64)
    modes = {m: m.training for m in model.modules()}  # restored one by one: submodules may differ
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch_rows = order[start:start + batch_size]
            width = max(len(row_ids[r]) for r in batch_rows)
            n_keep = max(len(targets[q][1]) for r in batch_rows for q in by_row[r])
            input_ids = torch.full((len(batch_rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
            for b, r in enumerate(batch_rows):
                input_ids[b, width - len(row_ids[r]):] = torch.tensor(row_ids[r], dtype=torch.long)
                mask[b, width - len(row_ids[r]):] = 1
            # Left padding shifts the real tokens right; explicit positions make every row start at position 0.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {keep: n_keep} if keep else {}
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=False, **kwargs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            logits = logits[:, -n_keep:]  # [B, n_keep, V]: position j predicts the token at width - n_keep + j + 1
            _gather_scores(logits, batch_rows, by_row, targets, n_keep, scores)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return scores.tolist()


def _gather_scores(logits: torch.Tensor, batch_rows: list[int], by_row: list[list[int]],
                   targets: list[tuple[int, list[int]]], n_keep: int, scores: torch.Tensor) -> None:
    """Adds each request's continuation log-probs to ``scores``, log-softmaxing ``chunk`` rows at a time in fp32."""
    vocab = logits.shape[-1]
    chunk = auto_chunk_size(n_keep * vocab, _CHUNK_BYTES)
    for c0 in range(0, len(batch_rows), chunk):
        logp = torch.log_softmax(logits[c0:c0 + chunk].float(), dim=-1)  # [chunk, n_keep, V]
        for b in range(c0, min(c0 + chunk, len(batch_rows))):
            for req in by_row[batch_rows[b]]:
                cont = targets[req][1]
                # The row ends with the continuation minus its last token, so the last len(cont) kept positions
                # predict the continuation tokens.
                pos = torch.arange(n_keep - len(cont), n_keep, device=logp.device)
                tok = torch.tensor(cont, device=logp.device)
                scores[req] += logp[b - c0, pos, tok].double().sum().cpu()


def mcq_scores(model, tokenizer, prompts: Sequence[MCQPrompt], batch_size: int = 16,
               add_bos: bool | None = None) -> list[list[float]]:
    """Log-likelihood of each choice letter (``" A"``, ``" B"``, ...) given each prompt.

    Batched by :func:`loglikelihoods`: one forward row per question when every choice letter is one token; only the
    scored positions' logits are materialised, chunked in float32.

    Returns:
        One list of ``prompt.n_choices`` floats per prompt.
    """
    requests = [(p.context, " " + LETTERS[j]) for p in prompts for j in range(p.n_choices)]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, add_bos=add_bos)
    out, start = [], 0
    for p in prompts:
        out.append(scores[start:start + p.n_choices])
        start += p.n_choices
    return out


def argmax_choice(scores: Sequence[float]) -> int:
    """The predicted choice: highest log-likelihood, the first index on ties (lm-eval's ``acc``)."""
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def mcq_predictions(model, tokenizer, prompts: Sequence[MCQPrompt], batch_size: int = 16,
                    add_bos: bool | None = None) -> list[int]:
    """Predicted choice per prompt (:func:`argmax_choice` of :func:`mcq_scores`)."""
    return [argmax_choice(s) for s in mcq_scores(model, tokenizer, prompts, batch_size, add_bos)]


def mcq_correct(model, tokenizer, batch: dict) -> list[bool]:
    """Whether each question of a validation batch (``contexts``, ``n_choices``, ``answers``) is answered correctly."""
    prompts = [MCQPrompt(c, n, a) for c, n, a in zip(batch["contexts"], batch["n_choices"], batch["answers"])]
    predictions = mcq_predictions(model, tokenizer, prompts, batch_size=max(1, len(prompts)))
    return [p == q.answer for p, q in zip(predictions, prompts)]



def mcq_accuracy(model: torch.nn.Module, tokenizer, records: Sequence[MCQRecord | Mapping[str, Any]],
                 k_shot: int = 0, fewshot_records: Sequence[MCQRecord | Mapping[str, Any]] | None = None,
                 batch_size: int = 16, limit: int | float | None = None, subject: str | None = None, *,
                 add_bos: bool | None = None, return_details: bool = False) -> dict:
    """Multiple-choice accuracy by continuation log-likelihood (lm-eval's ``acc`` for wmdp/mmlu tasks).

    The same prompts (:func:`~undo_lightning.data.mcq.mcq_prompts`) and scores (:func:`mcq_scores`) as the
    validation metric ``val/<name>_mcq_acc``.

    Args:
        model: a causal LM returning ``.logits`` (e.g. ``Gemma2ForCausalLM``).
        tokenizer: its tokenizer.
        records: the questions (``MCQRecord`` or raw dicts, validated here).
        k_shot: solved examples before each question (WMDP: 0, MMLU: 5).
        fewshot_records: pool of solved examples (MMLU's dev split); ``None`` takes them from ``records`` (never the
            question itself). See :func:`~undo_lightning.data.mcq.select_fewshot` for the rule.
        batch_size: forward rows per batch (one row per question when all continuations are single tokens).
        limit: evaluate a subset, per subject as lm-eval does (:func:`~undo_lightning.data.mcq.limit_records`).
        subject: subject for the description line; ``None`` uses each record's own subject (omitted when absent),
            ``""`` omits it.
        add_bos: prepend ``<bos>`` (``None``: what the tokenizer prepends by default, lm-eval's rule).
        return_details: also return per-question ``predictions``, ``gold`` and ``loglikelihoods``.

    Returns:
        ``{"accuracy": float, "n": int, "correct": int}`` plus, with ``return_details``, ``"predictions"`` (choice
        index per question), ``"gold"`` and ``"loglikelihoods"`` (one list of floats per question).
    """
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
        raise ValueError(f"k_shot={k_shot!r}: expected an integer >= 0")
    recs = limit_records([validate_record(r, f"records[{i}]") for i, r in enumerate(records)], limit)
    if not recs:
        raise ValueError("records is empty: nothing to evaluate")
    pool = None if fewshot_records is None else [validate_record(r, f"fewshot_records[{i}]")
                                                 for i, r in enumerate(fewshot_records)]
    prompts = mcq_prompts(recs, k_shot, pool, subject)
    per_question = mcq_scores(model, tokenizer, prompts, batch_size, add_bos)
    preds = [argmax_choice(q) for q in per_question]
    gold = [r.answer for r in recs]
    correct = sum(p == g for p, g in zip(preds, gold))
    result: dict[str, Any] = {"accuracy": correct / len(recs), "n": len(recs), "correct": correct}
    if return_details:
        result.update(predictions=preds, gold=gold, loglikelihoods=per_question)
    return result
