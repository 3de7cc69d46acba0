"""Loss functions, each a small documented function on logits/hidden states (docs/reference.md §5, §7).

Conventions: ``logits`` are ``[B, T, V]`` as returned by the model for ``input_ids`` ``[B, T]``; ``labels`` are
``[B, T]`` aligned with ``input_ids`` (unshifted) with ``-100`` marking positions to ignore. Every function shifts
internally (position ``t`` predicts ``labels[:, t + 1]``) and computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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


def _scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch and time indices of the positions that predict a non-ignored label.

    Position ``t`` is scored iff ``labels[:, t + 1] != -100``; the last position has no target and is never scored.

    Args:
        labels: ``[B, T]``.

    Returns:
        ``(b_idx, t_idx)``: two int64 ``[N]`` tensors, ``N`` = number of scored positions.
    """
    return (shift_labels(labels) != IGNORE_INDEX).nonzero(as_tuple=True)


class _ChunkedForwardKL(torch.autograd.Function):
    """Forward KL whose gradient is computed chunk by chunk during the forward pass.

    Autograd through a plain fp32 KL would keep several ``[B, T, V]`` fp32 tensors alive until backward (the upcast
    logits, both log-softmaxes, the teacher probabilities). Here each chunk of positions is upcast, reduced to its
    loss contribution and its exact gradient ``(softmax(s) - q) / N``, and dropped; only the gradient, in the
    student logits' dtype, is kept for backward.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, chunk_size, needs_grad):
        b_idx, t_idx = _scored_positions(labels)
        n = b_idx.numel()
        grad = torch.zeros_like(student_logits) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for start in range(0, n, chunk_size):
            b, t = b_idx[start:start + chunk_size], t_idx[start:start + chunk_size]
            log_p = F.log_softmax(student_logits[b, t].float(), dim=-1)  # [c, V]
            log_q = F.log_softmax(teacher_logits[b, t].float(), dim=-1)  # [c, V]
            q = log_q.exp()
            total += log_q.sub_(log_p).mul_(q).sum()  # in place: log_q is not needed afterwards
            if needs_grad:
                # d KL / d s = softmax(s) - q per position (rows of q sum to 1); the mean over N positions adds 1/N.
                grad[b, t] = log_p.exp_().sub_(q).div_(n).to(grad.dtype)
        if needs_grad:
            ctx.save_for_backward(grad)
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # The usual case is a bare `loss.backward()`: skip the multiply so no second [B, T, V] tensor is allocated.
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad = grad * grad_output
        return grad, None, None, None, None


#: memory of one float32 ``[chunk, V]`` temporary when :func:`forward_kl` picks the chunk size itself
KL_CHUNK_BYTES = 64 * 2**20


def auto_chunk_size(vocab_size: int, budget_bytes: int = KL_CHUNK_BYTES) -> int:
    """Positions per chunk such that one float32 ``[chunk, V]`` temporary fits in ``budget_bytes`` (``vocab_size``: the
    float32 elements one position brings, e.g. ``T * V`` for whole rows). Every chunked loop of the package sizes its
    chunks with it, each from a budget in bytes.

    64 MiB gives 65 positions at Gemma-2's V = 256,000, where ``benchmarks/kl_memory.py`` measured 128-position chunks
    at 0.23x the memory and 0.59x the time of an unchunked KL while 1024-position chunks saved only 24 % of the
    memory; small vocabularies get chunks so large that the loop runs once.
    """
    if vocab_size < 1 or budget_bytes < 1:
        raise ValueError(f"vocab_size and budget_bytes must be >= 1, got {vocab_size} and {budget_bytes}")
    return max(1, budget_bytes // (4 * vocab_size))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               chunk_size: int | None = None) -> torch.Tensor:
    """Distillation loss: forward KL(teacher || student) per position, temperature 1, mean over scored positions.

    ``L = (1/N) sum_{(b,t) in M} sum_v q(v|b,t) (log q(v|b,t) - log p(v|b,t))`` with ``q = softmax(teacher)``,
    ``p = softmax(student)`` and ``M = {(b, t): labels[b, t + 1] != -100}``, ``N = |M|`` (docs/reference.md §7.1).

    Memory: the positions of ``M`` are processed ``chunk_size`` at a time in float32, so full-vocabulary fp32
    tensors exist only for one chunk, in forward and in backward alike. The gradient w.r.t. the student logits is
    computed during the forward pass and stored in their dtype (one extra ``[B, T, V]`` tensor); backward only
    scales it. By default the chunk holds :data:`KL_CHUNK_BYTES` per fp32 temporary (:func:`auto_chunk_size`; with
    ``V`` = 256k a chunk of 1024 positions would cost 1 GiB each). Logits must be finite (soft-capped Gemma logits
    are).

    Args:
        student_logits: ``[B, T, V]``, any float dtype (bf16 is upcast per chunk); receives the gradient.
        teacher_logits: ``[B, T, V]``, any float dtype; treated as a constant (never receives a gradient).
        labels: ``[B, T]`` unshifted, ``-100`` = position ignored.
        chunk_size: scored positions per chunk, >= 1; ``None``: :func:`auto_chunk_size` of the vocabulary.

    Returns:
        float32 scalar; ``0.0`` (with a zero gradient) when no position is scored.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
                         f"vs {tuple(teacher_logits.shape)}")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(student_logits.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: chosen from the vocabulary size), got {chunk_size}")
    # `ctx.needs_input_grad` ignores no_grad mode: decide here, so evaluation never builds the gradient.
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedForwardKL.apply(student_logits, teacher_logits.detach(), labels, chunk_size, needs_grad)


def maxent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MaxEnt forget loss: KL(uniform || model) per scored position, averaged (docs/reference.md §5.3).

    ``L = mean_{(b,t) in M} [-log V - (1/V) sum_v log p(v|b,t)]``, which is ``>= 0`` and ``0`` iff ``p`` is
    uniform. Uses ``-(1/V) sum_v log p(v) = logsumexp(s) - mean_v(s)``, so no ``[N, V]`` log-softmax is built.

    Args:
        logits: ``[B, T, V]``, any float dtype (computed in float32).
        labels: ``[B, T]`` unshifted, ``-100`` = position ignored; only positions predicting a label are scored.

    Returns:
        float32 scalar; ``0.0`` when no position is scored.
    """
    b_idx, t_idx = _scored_positions(labels)
    scored = logits[b_idx, t_idx].float()  # [N, V]
    per_position = scored.logsumexp(dim=-1) - scored.mean(dim=-1) - math.log(logits.shape[-1])  # [N]
    return per_position.sum() / max(b_idx.numel(), 1)


def graddiff_loss(forget_ce: torch.Tensor, retain_ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """GradDiff objective ``-CE(forget) + alpha * CE(retain)`` (docs/reference.md §5.2): ascend forget, descend retain.

    Args:
        forget_ce: scalar mean CE on the forget batch (e.g. :func:`causal_lm_loss`).
        retain_ce: scalar mean CE on the retain batch.
        alpha: retain weight (reference: 1 for language, 15 for arithmetic).

    Returns:
        scalar.
    """
    return -forget_ce + alpha * retain_ce


def _masked_mean_square(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``diff ** 2`` over the hidden dim and the positions where ``mask`` is nonzero (0 if none are).

    ``diff`` is ``[B, T, H]`` and already float32: the subtraction itself must not run in bf16.
    """
    per_position = diff.pow(2).mean(dim=-1)  # [B, T]
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMU forget loss: push the target block's activations on forget inputs towards ``c * u`` (docs/reference.md §5.4).

    ``L_f = mean_{(b,t) unmasked, d} (h[b,t,d] - control[d])^2``. The reference averages over every position
    (padding included); pass the attention mask to leave padding out.

    Args:
        hidden: ``[B, T, H]`` activations of the target block on forget inputs.
        control: ``[H]`` control vector, already scaled (see :func:`rmu_control_vector`).
        mask: optional ``[B, T]`` bool/0-1 tensor, nonzero = position counted.

    Returns:
        float32 scalar; 0 if the mask selects no position.
    """
    return _masked_mean_square(hidden.float() - control.float(), mask)


def rmu_retain_loss(hidden: torch.Tensor, frozen_hidden: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMU retain loss: keep the target block's retain activations at the frozen model's (docs/reference.md §5.4).

    ``L_r = mean_{(b,t) unmasked, d} (h[b,t,d] - h_frozen[b,t,d])^2``; ``frozen_hidden`` is a target and is detached.

    Args:
        hidden: ``[B, T, H]`` activations of the trained model on retain inputs.
        frozen_hidden: ``[B, T, H]`` activations of the frozen reference model on the same inputs.
        mask: optional ``[B, T]`` bool/0-1 tensor, nonzero = position counted.

    Returns:
        float32 scalar; 0 if the mask selects no position.
    """
    return _masked_mean_square(hidden.float() - frozen_hidden.detach().float(), mask)


def rmu_control_vector(hidden_size: int, coefficient: float, seed: int) -> torch.Tensor:
    """RMU target ``c * u`` with ``u`` a uniformly random unit direction (normalised Gaussian, docs/reference.md §5.4).

    Drawn on CPU from a dedicated ``torch.Generator`` seeded with ``seed``, so it depends on nothing but the
    arguments (the reference uses the global CUDA RNG after ``manual_seed``).

    Args:
        hidden_size: ``H``.
        coefficient: ``c``, the norm of the result (reference: 6.5 language, 6 arithmetic).
        seed: generator seed.

    Returns:
        float32 ``[H]`` on CPU with norm ``|c|``; move it to the activations' device.
    """
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden_size, generator=generator)
    return coefficient * direction / direction.norm()


def mmd_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples under a sum of 5 Gaussian kernels (docs/reference.md §5.5).

    ``MMD = mean(K_xx) + mean(K_yy) - mean(K_xy) - mean(K_yx)`` with
    ``K(a, b) = sum_{k=0..4} exp(-|a - b|^2 / sigma_k)``, ``sigma_k = sigma_0 * 2^(k - 2)``. The bandwidth is
    data-dependent, as in RepNoise: ``sigma_0 = sum_{i != j} |z_i - z_j|^2 / (n'^2 - n')`` over the joined sample
    ``z = [x; y]`` of ``n' = n + m`` rows, i.e. the mean pairwise squared distance. It is a heuristic scale, not an
    objective, so it is detached (as in the RepNoise code). For ``n == m`` this equals the reference's
    ``mean(K_xx + K_yy - K_xy - K_yx)``.

    Args:
        x: ``[n, d]``.
        y: ``[m, d]``, with ``n + m >= 2``.

    Returns:
        float32 scalar (>= 0 up to rounding).
    """
    n = x.shape[0]
    z = torch.cat([x, y]).float()  # [n + m, d]
    total = z.shape[0]
    if total < 2:
        raise ValueError("mmd_loss needs at least two samples in total")
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: avoids a [n', n', d] difference tensor; clamp the rounding below zero and
    # zero the diagonal exactly (it would otherwise hold rounding noise).
    sq_norms = z.pow(2).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * z @ z.T).clamp(min=0)
    sq_dist = sq_dist.masked_fill(torch.eye(total, dtype=torch.bool, device=z.device), 0)
    # All-identical samples give sigma_0 = 0; any positive floor then yields K = 1 everywhere and MMD = 0.
    sigma0 = (sq_dist.detach().sum() / (total ** 2 - total)).clamp(min=torch.finfo(torch.float32).tiny)
    kernel = sum(torch.exp(-sq_dist / (sigma0 * 2.0 ** (k - 2))) for k in range(5))  # [n', n']
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - kernel[:n, n:].mean() - kernel[n:, :n].mean()


class RepNoiseTerms(NamedTuple):
    """Output of :func:`repnoise_loss`; every field is a float32 scalar."""

    loss: torch.Tensor
    """``beta * noise - alpha * log(harmful)``: add it to the unlearning method's loss."""
    noise: torch.Tensor
    """Mean over layers of the MMD between activations and Gaussian noise."""
    harmful: torch.Tensor
    """``H``: mean forget CE over the given logits, plus 1."""


def repnoise_loss(activations: Sequence[torch.Tensor], forget_logits: Sequence[torch.Tensor],
                  forget_labels: torch.Tensor, generator: torch.Generator, alpha: float = 1.0, beta: float = 0.001,
                  mask: torch.Tensor | None = None) -> RepNoiseTerms:
    """RepNoise noise and harmful terms, from tensors already computed on the forget batch (docs/reference.md §5.5).

    * noise: ``N = (1/L) sum_i MMD(flatten(a_i * m), flatten(eps_i * m))`` with ``eps_i ~ N(0, I)`` drawn from
      ``generator``, each sample a ``T * H`` vector; ``m`` is the attention mask, not the reference's token
      inequality between two unrelated batches.
    * harmful: ``H = mean_j CE(forget_logits[j], forget_labels) + 1``; ``-alpha * log H`` rewards a high forget CE,
      and the log makes the push fade (gradient ``-alpha / H``) as the CE grows instead of diverging like plain
      gradient ascent.

    Full RepNoise is ``CE(retain) + beta * N - alpha * log H``; the retain CE is left to the caller, which
    computes it anyway. ``forget_logits`` should hold the final logits plus the logit lens of every hidden state,
    each built exactly like the final logits (final norm applied once, soft-capping included) — the reference
    normed the last hidden state twice and skipped soft-capping.

    Args:
        activations: ``L >= 1`` tensors ``[B, T, H]``, e.g. each block's MLP output on the forget inputs.
        forget_logits: ``>= 1`` tensors ``[B, T, V]`` on the forget inputs.
        forget_labels: ``[B, T]`` unshifted, ``-100`` = ignored.
        generator: source of the Gaussian noise; on the activations' device to avoid a host-device copy.
        alpha: weight of the harmful term.
        beta: weight of the noise term.
        mask: optional ``[B, T]`` attention mask (1 = real token) applied to activations and noise alike.

    Returns:
        :class:`RepNoiseTerms` ``(loss, noise, harmful)``.
    """
    noise_terms = []
    for act in activations:
        act = act.float()
        eps = torch.randn(act.shape, generator=generator, device=generator.device).to(act.device)
        if mask is not None:
            keep = mask.to(act.dtype)[..., None]  # [B, T, 1]
            act, eps = act * keep, eps * keep
        noise_terms.append(mmd_loss(act.flatten(1), eps.flatten(1)))
    noise = torch.stack(noise_terms).mean()
    harmful = torch.stack([causal_lm_loss(logits, forget_labels) for logits in forget_logits]).mean() + 1
    return RepNoiseTerms(loss=beta * noise - alpha * torch.log(harmful), noise=noise, harmful=harmful)
