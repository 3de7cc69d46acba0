"""Scored tokens per optimizer step, for losses normalised over a whole step (docs/architecture.md, "Token means").

A stage divides each summed loss by the scored tokens of its optimizer step on every rank
(:meth:`~undo_lightning.modules.base.UndoModule.token_divisor`). Across ranks that count is one all-reduce; across the
micro-batches Lightning accumulates into one step it must be known before the first of them runs backward, so the
loader has to say it. :func:`with_step_tokens` does, by reading a step's micro-batches ahead. Without it a stage
assumes every micro-batch of a step holds as many scored tokens as the current one, which is exact for packed blocks
(all that :class:`~undo_lightning.data.module.RetainForgetDataModule` trains on) and for ``accumulate_grad_batches=1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from undo_lightning.losses import scored_tokens

#: the batch key :func:`with_step_tokens` adds: scored tokens of the batch's optimizer step on this rank (int64 scalar)
STEP_TOKENS = "step_tokens"


def _lm_batches(batch) -> list[dict]:
    """The language-model batches inside ``batch``: itself, or the values of a paired ``{"forget": ..., ...}``."""
    if isinstance(batch, dict) and "labels" in batch:
        return [batch]
    if isinstance(batch, dict) and all(isinstance(v, dict) and "labels" in v for v in batch.values()):
        return list(batch.values())
    raise ValueError(f"with_step_tokens: expected batches with 'labels' (or a dict of such batches), got "
                     f"{type(batch).__name__} with keys {sorted(batch) if isinstance(batch, dict) else '-'}")


def with_step_tokens(batches: Iterable, accumulate: int) -> Iterator:
    """Yields ``batches`` with :data:`STEP_TOKENS` added to each: the scored tokens of its optimizer step on this rank.

    Reads ``accumulate`` micro-batches ahead (the ones Lightning sums into one optimizer step, in order) and gives each
    the count of the group; a paired batch gets one count per split. The last group of an epoch may be shorter, as
    Lightning's last step of an epoch is.

    Wrap a training loader of padded batches with it when training with ``accumulate_grad_batches > 1``; the stages then
    weigh every token of a step equally however the padding falls (it shards nothing: under DDP give each rank its own
    rows, e.g. with a ``DistributedSampler``).

    Args:
        batches: an iterable of dicts with ``labels`` ``[B, T]`` (``-100`` = not scored), or of dicts of such dicts.
        accumulate: micro-batches per optimizer step (``trainer.accumulate_grad_batches``), >= 1.

    Yields:
        the same batch objects, each LM batch with ``batch["step_tokens"]`` (int64 scalar).
    """
    if accumulate < 1:
        raise ValueError(f"accumulate={accumulate}: expected the number of micro-batches per optimizer step, >= 1")
    iterator = iter(batches)
    while True:
        group = []
        for batch in iterator:
            group.append(batch)
            if len(group) == accumulate:
                break
        if not group:
            return
        per_batch = [_lm_batches(batch) for batch in group]
        for i in range(len(per_batch[0])):  # the i-th split of every micro-batch of the step
            total = sum(scored_tokens(parts[i]["labels"]) for parts in per_batch)
            for parts in per_batch:
                parts[i][STEP_TOKENS] = total
        yield from group
