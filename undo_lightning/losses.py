"""Loss functions, each a small documented function on logits/hidden states (DESIGN §3).

Conventions: ``logits`` are ``[B, T, V]`` as returned by the model for ``input_ids`` ``[B, T]``; ``labels`` are
``[B, T]`` aligned with ``input_ids`` (unshifted) with ``-100`` marking positions to ignore. Every function shifts
internally (position ``t`` predicts ``labels[:, t + 1]``) and computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels -> ``[B, T - 1]`` next-token targets."""
    return labels[:, 1:]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of scored tokens.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``, ``-100`` = ignored.

    Returns:
        ``(nll_sum, n_tokens)``: float32 scalar and int64 scalar; ``nll_sum / n_tokens`` is the token-weighted CE.
    """
    targets = shift_labels(labels)
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-ignored positions (0 if every position is ignored).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``, ``-100`` = ignored.

    Returns:
        float32 scalar.
    """
    nll, n = token_nll(logits, labels)
    return nll / n.clamp(min=1)
