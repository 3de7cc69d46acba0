"""Loss functions, each a small documented function on logits/hidden states (docs/reference.md §5, §7).

Conventions: a model's outputs are either ``[B, T, V]`` logits or :class:`HiddenStates` (the decoder's last hidden
state and the :class:`OutputHead` that maps it to logits); the stages pass hidden states, so the cross-entropy, MaxEnt
and distillation losses build logits one chunk of positions at a time and no ``[B, T, V]`` tensor exists for any
model, forward or backward (what makes a 256k vocabulary trainable at long sequences). ``labels`` are ``[B, T]``
aligned with ``input_ids`` (unshifted) with ``-100`` marking positions to ignore. Every function shifts internally
(position ``t`` predicts ``labels[:, t + 1]``) and computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels -> ``[B, T - 1]`` next-token targets."""
    return labels[:, 1:]


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions that predict a label (``labels[:, t + 1] != -100``): the denominator of every token mean.

    Args:
        labels: ``[B, T]`` unshifted.

    Returns:
        int64 scalar on ``labels``' device.
    """
    return (shift_labels(labels) != IGNORE_INDEX).sum()


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """How a causal LM turns final hidden states into logits: ``cap * tanh(scale * (h W^T + b) / cap)``.

    The losses below apply it chunk by chunk, so the ``[B, T, V]`` logits of a batch never exist at once. Built from
    a model by :meth:`of`, which checks once per model that the head reproduces the model's own logits.

    Args:
        weight: ``[V, H]`` output embedding (Gemma ties it to the input embedding; its gradient reaches both uses).
        bias: ``[V]`` or ``None``.
        scale: logit multiplier (``config.logit_scale`` of e.g. Cohere); 1 for most models.
        softcap: final-logit soft-capping (``config.final_logit_softcapping``: 30 in Gemma-2), ``None`` = none.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states -> ``[..., V]`` logits, computed in the order and dtype the model uses."""
        z = F.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def backward(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. ``h W^T + b`` from the gradient w.r.t. the float32 ``logits`` this head produced.

        Soft-capping ``s = c tanh(z / c)`` has ``ds/dz = 1 - (s / c)^2``; the scale multiplies.
        """
        if self.softcap:
            grad = grad * (1.0 - (logits / self.softcap).square())
        return grad * self.scale if self.scale != 1.0 else grad

    @classmethod
    def of(cls, model: torch.nn.Module) -> OutputHead:
        """The head of a Hugging Face ``*ForCausalLM``, checked once per model against its own ``.logits``.

        Raises:
            ValueError: when the model computes its logits some other way (a head this class does not describe);
                the message names the model class.
        """
        if model not in _CHECKED_HEADS:
            _check_head(model)
            _CHECKED_HEADS.add(model)
        return cls._read(model)

    @classmethod
    def checked_on_another_rank(cls, model: torch.nn.Module) -> None:
        """Records that ``model``'s head passed :meth:`of`'s check on another rank (a model this rank built on the
        meta device, whose values arrive by broadcast, cannot run the check itself)."""
        _CHECKED_HEADS.add(model)

    @classmethod
    def _read(cls, model: torch.nn.Module) -> OutputHead:
        # Read at each use, not cached: a sharded model's parameters are other tensors once gathered by its forward.
        lm_head = model.get_output_embeddings()
        config = model.config
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(lm_head.weight, getattr(lm_head, "bias", None), float(getattr(config, "logit_scale", None) or 1.0),
                   float(softcap) if softcap else None)


_CHECKED_HEADS: weakref.WeakSet = weakref.WeakSet()


@torch.no_grad()
def _check_head(model: torch.nn.Module) -> None:
    """Raises unless the head applied to the decoder's last hidden state gives the model's logits (one tiny forward)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.arange(min(vocab, 8), device=model.get_output_embeddings().weight.device)[None]
    was_training = model.training
    model.eval()  # dropout would make the two readings differ
    try:
        out, hidden = _run_decoder(model, dict(input_ids=ids, use_cache=False), keep_logits=0)
        got = OutputHead._read(model).logits(hidden)
    finally:
        model.train(was_training)
    expected = out.logits
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(f"{type(model).__name__}: its logits are not the output embedding (+ logit_scale, "
                         "final_logit_softcapping) applied to the decoder's last hidden state, which the chunked "
                         "losses assume; this model family is not supported by undo_lightning's losses")


def _run_decoder(model: torch.nn.Module, kwargs: dict, keep_logits: int):
    """Runs the model's own ``forward`` (so whatever wraps it — FSDP's parameter gathering, hooks — sees an ordinary
    forward) and reads the decoder's (``base_model``) last hidden state on the way.

    Returns:
        ``(output, hidden)``: the model's output, with logits for the last ``keep_logits`` positions (0 = all) where
        its ``forward`` takes ``logits_to_keep`` (else the decoder's own output), and ``[B, T, H]`` hidden states.
    """
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        if keep_logits == 0:  # the head check needs real logits: read them from an ordinary forward
            return model(**kwargs), model.base_model(**kwargs).last_hidden_state
        out = model.base_model(**kwargs)
        return out, out.last_hidden_state
    captured = []
    hook = model.base_model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        out = model(**kwargs, logits_to_keep=keep_logits)
    finally:
        hook.remove()
    return out, captured[-1]


class HiddenStates(NamedTuple):
    """A model's final hidden states and its output head: logits ``head.logits(hidden)``, computed only per chunk."""

    hidden: torch.Tensor
    """``[B, T, H]``: the decoder's last hidden state (after its final norm)."""
    head: OutputHead
    layers: tuple[torch.Tensor, ...] | None = None
    """Every layer's hidden state (embeddings first, as Hugging Face returns them), when asked for."""


def lm_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     output_hidden_states: bool = False):
    """Runs a causal LM for its decoder's last hidden state: the input of every loss below.

    The model's own ``forward`` runs (so FSDP gathers its parameters as for any forward), asked for the logits of the
    last position only (``logits_to_keep=1``: ``[B, 1, V]``); the hidden state is read from its decoder on the way.
    Models whose ``forward`` has no ``logits_to_keep`` run their decoder (``base_model``) directly.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (its ``base_model`` is the decoder).
        input_ids, attention_mask: ``[B, T]``.
        output_hidden_states: also return every layer's hidden state (the embeddings first, as Hugging Face does).

    Returns:
        :class:`HiddenStates` (with ``layers`` when ``output_hidden_states``).
    """
    out, hidden = _run_decoder(model, dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                           output_hidden_states=output_hidden_states), keep_logits=1)
    return HiddenStates(hidden, OutputHead.of(model), out.hidden_states if output_hidden_states else None)


#: what a loss reads: ``[B, T, V]`` logits, or hidden states and the head that turns them into logits
Outputs = torch.Tensor | HiddenStates


@dataclasses.dataclass
class _Job:
    """One chunked loss evaluation (see :class:`_ChunkedLoss`)."""

    kind: str  # "ce" | "maxent" | "kl"
    head: OutputHead | None  # None: the input already holds logits
    positions: tuple[torch.Tensor, torch.Tensor]  # (b_idx, t_idx) of the scored positions, [N] each
    targets: torch.Tensor | None  # "ce": [N] next tokens
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # "kl": (b, t) -> float32 [c, V] log q
    chunk_size: int
    divisor: float | torch.Tensor
    weights: torch.Tensor | None = None  # "ce": [N] float32 weight of each position's loss (a constant)


class _ChunkedLoss(torch.autograd.Function):
    """A sum of per-position losses over the scored positions, divided by ``divisor``, with its gradient computed
    chunk by chunk during the forward pass.

    Autograd through a plain float32 loss would keep several ``[B, T, V]`` float32 tensors alive until backward (the
    logits, their upcast, log-softmaxes, the teacher's probabilities). Here each chunk of positions is turned into
    logits (from hidden states through the head, or read from the given logits), upcast, reduced to its loss
    contribution and its exact gradient, and dropped. Only gradients the size of the inputs are kept for backward:
    ``[B, T, H]`` for the hidden states plus ``[V, H]`` for the head's weight, or ``[B, T, V]`` for given logits.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, job: _Job, needs_grad: bool):
        head, (b_idx, t_idx) = job.head, job.positions
        n = b_idx.numel()
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.zeros_like(x) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) \
            if needs_grad and weight is not None and weight.requires_grad else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) \
            if needs_grad and bias is not None and bias.requires_grad else None
        for start in range(0, n, job.chunk_size):
            b, t = b_idx[start:start + job.chunk_size], t_idx[start:start + job.chunk_size]
            x_c = x[b, t]  # [c, D]
            s = (x_c if head is None else head.logits(x_c)).float()  # [c, V]
            log_p = F.log_softmax(s, dim=-1)
            if job.kind == "ce":
                y = job.targets[start:start + job.chunk_size, None]  # [c, 1]
                w = None if job.weights is None else job.weights[start:start + job.chunk_size, None]  # [c, 1]
                nll = -log_p.gather(1, y)
                total += (nll if w is None else nll * w).sum()
                grad = log_p.exp_().scatter_add_(1, y, torch.full(y.shape, -1.0, device=y.device)) if needs_grad \
                    else None  # d CE / d s = softmax(s) - onehot(y)
                if grad is not None and w is not None:
                    grad.mul_(w)
            elif job.kind == "maxent":
                # KL(uniform || p) = logsumexp(s) - mean_v(s) - log V; d/ds = softmax(s) - 1/V
                total += (s.logsumexp(dim=-1) - s.mean(dim=-1)).sum() - s.shape[0] * math.log(s.shape[1])
                grad = log_p.exp_().sub_(1.0 / s.shape[1]) if needs_grad else None
            else:
                log_q = job.teacher(b, t)  # [c, V]
                q = log_q.exp()
                total += (log_q - log_p).mul_(q).sum()
                grad = log_p.exp_().sub_(q) if needs_grad else None  # d KL / d s = softmax(s) - q
            if not needs_grad:
                continue
            grad = grad.div_(job.divisor)
            if head is None:
                grad_x[b, t] = grad.to(grad_x.dtype)
                continue
            grad = head.backward(grad, s)  # [c, V] w.r.t. h W^T + b
            grad_x[b, t] = (grad.to(weight.dtype) @ weight).to(grad_x.dtype)
            if grad_w is not None:
                # in place: `grad_w += grad.T @ x_c` would allocate (and page-fault) a second [V, H] every chunk
                grad_w.addmm_(grad.T, x_c.float())
            if grad_b is not None:
                grad_b += grad.sum(dim=0)
        if needs_grad:
            # Held as attributes, not saved tensors, so backward can let go of them: autograd then takes the returned
            # gradient as .grad without copying it (it copies a tensor something else still references).
            ctx.grads = [grad_x, grad_w, grad_b]
            ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return total / job.divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_w, grad_b = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        # The usual case is a bare `loss.backward()`: skip the multiply so no second input-sized tensor is allocated.
        scale = None if torch.equal(grad_output, torch.ones_like(grad_output)) else grad_output
        out = []
        for grad, dtype in ((grad_x, None), (grad_w, w_dtype), (grad_b, b_dtype)):
            if grad is not None:
                grad = grad if scale is None else grad * scale
                grad = grad if dtype is None else grad.to(dtype)
            out.append(grad)
        return (*out, None, None)


#: memory of one float32 ``[chunk, V]`` temporary when a loss picks the chunk size itself
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


def _parts(outputs: Outputs, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, OutputHead | None, int]:
    """``(tensor, head or None, vocabulary size)`` of ``outputs``, after checking its shape against ``labels``."""
    if isinstance(outputs, HiddenStates):
        x, head = outputs.hidden, outputs.head
        vocab = head.weight.shape[0]
        if head.weight.dim() != 2 or head.weight.shape[1] != x.shape[-1]:
            raise ValueError(f"{what}: the head's weight {tuple(head.weight.shape)} does not map hidden size "
                             f"{x.shape[-1]} to a vocabulary")
    else:
        x, head, vocab = outputs, None, outputs.shape[-1]
    if x.dim() != 3 or labels.shape != x.shape[:2]:
        raise ValueError(f"{what}: expected [B, T, V] logits or [B, T, H] hidden states and [B, T] labels, got "
                         f"{tuple(x.shape)} and {tuple(labels.shape)}")
    return x, head, vocab


def _teacher_log_probs(teacher: Outputs, temperature: float = 1.0
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(b, t) -> log_softmax(logits / temperature)`` of the teacher's float32 logits at those positions (a constant:
    no gradient)."""
    if isinstance(teacher, HiddenStates):
        hidden, head = teacher.hidden.detach(), teacher.head
        return lambda b, t: F.log_softmax(head.logits(hidden[b, t]).detach().float() / temperature, dim=-1)
    logits = teacher.detach()
    return lambda b, t: F.log_softmax(logits[b, t].float() / temperature, dim=-1)


def _chunked_loss(kind: str, outputs: Outputs, labels: torch.Tensor, teacher: Outputs | None = None,
                  chunk_size: int | None = None, divisor: float | torch.Tensor | None = None,
                  row_weights: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    x, head, vocab = _parts(outputs, labels, kind)
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: chosen from the vocabulary size), got {chunk_size}")
    b_idx, t_idx = (shift_labels(labels) != IGNORE_INDEX).nonzero(as_tuple=True)
    if divisor is None:
        divisor = max(b_idx.numel(), 1)
    job = _Job(kind, head, (b_idx, t_idx), labels[b_idx, t_idx + 1] if kind == "ce" else None,
               _teacher_log_probs(teacher, temperature) if teacher is not None else None, chunk_size, divisor,
               None if row_weights is None else row_weights.detach().float()[b_idx])
    weight, bias = (head.weight, head.bias) if head is not None else (None, None)
    # `ctx.needs_input_grad` ignores no_grad mode: decide here, so evaluation never builds a gradient.
    needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, weight, bias))
    return _ChunkedLoss.apply(x, weight, bias, job, needs_grad)


def causal_lm_loss(outputs: Outputs, labels: torch.Tensor, chunk_size: int | None = None,
                   divisor: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: ``sum_{(b,t) in M} -log p(labels[b, t+1] | b, t) / divisor``.

    ``M = {(b, t): labels[b, t + 1] != -100}``; ``divisor`` defaults to ``|M|`` (the token mean; 0 when ``M`` is
    empty). Computed in float32 chunks (see :func:`forward_kl`).

    Args:
        outputs: ``[B, T, V]`` logits, or :class:`HiddenStates` (no ``[B, T, V]`` tensor is built).
        labels: ``[B, T]`` unshifted, ``-100`` = ignored.
        chunk_size: scored positions per chunk; ``None``: :func:`auto_chunk_size` of the vocabulary.
        divisor: what the sum is divided by, e.g. the scored tokens of a whole optimizer step on every rank
            (:meth:`~undo_lightning.modules.base.UndoModule.token_divisor`).

    Returns:
        float32 scalar.
    """
    return _chunked_loss("ce", outputs, labels, chunk_size=chunk_size, divisor=divisor)


def token_nll(outputs: Outputs, labels: torch.Tensor, chunk_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of scored tokens (for metrics summed over batches).

    Returns:
        ``(nll_sum, n_tokens)``: float32 scalar and int64 scalar; ``nll_sum / n_tokens`` is the token-weighted CE.
    """
    return causal_lm_loss(outputs, labels, chunk_size, divisor=1.0), scored_tokens(labels)


def forward_kl(student: Outputs, teacher: Outputs, labels: torch.Tensor, chunk_size: int | None = None,
               divisor: float | torch.Tensor | None = None, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss: forward KL(teacher || student) per position, mean over scored positions.

    ``L = (1/N) sum_{(b,t) in M} sum_v q(v|b,t) (log q(v|b,t) - log p(v|b,t))`` with
    ``q = softmax(teacher / teacher_temperature)``, ``p = softmax(student)`` and
    ``M = {(b, t): labels[b, t + 1] != -100}``, ``N = |M|`` (docs/reference.md §7.1) unless ``divisor`` is given.
    The paper distils at temperature 1. Only the target is tempered: the student learns the softened (> 1) or
    sharpened (< 1) distribution itself, unlike Hinton et al.'s recipe, which tempers both and scales by ``T^2``.

    Memory: the positions of ``M`` are processed ``chunk_size`` at a time in float32; given hidden states, each
    chunk's logits are computed from them (for teacher and student) and dropped, so no ``[B, T, V]`` tensor exists
    for either model, forward or backward. The gradient is computed during the forward pass and stored in the
    inputs' dtype; backward only scales it. By default the chunk holds :data:`KL_CHUNK_BYTES` per float32
    temporary (:func:`auto_chunk_size`; with ``V`` = 256k a chunk of 1024 positions would cost 1 GiB each).
    Logits must be finite (soft-capped Gemma logits are).

    Args:
        student: ``[B, T, V]`` logits or :class:`HiddenStates`, any float dtype (upcast per chunk); receives the
            gradient (through the head's weight and bias too).
        teacher: the same for the teacher (its vocabulary must be the student's); a constant, never differentiated.
        labels: ``[B, T]`` unshifted, ``-100`` = position ignored.
        chunk_size: scored positions per chunk, >= 1; ``None``: :func:`auto_chunk_size` of the vocabulary.
        divisor: see :func:`causal_lm_loss`.
        teacher_temperature: divides the teacher's logits before the softmax; finite and > 0.

    Returns:
        float32 scalar; ``0.0`` (with a zero gradient) when no position is scored.
    """
    check_temperature(teacher_temperature)
    s, _, v_student = _parts(student, labels, "forward_kl student")
    t, _, v_teacher = _parts(teacher, labels, "forward_kl teacher")
    if v_student != v_teacher or s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(s.shape)} (vocabulary {v_student}) vs "
                         f"{tuple(t.shape)} (vocabulary {v_teacher})")
    return _chunked_loss("kl", student, labels, teacher=teacher, chunk_size=chunk_size, divisor=divisor,
                         temperature=teacher_temperature)


def check_temperature(temperature: float) -> None:
    """Raises unless ``temperature`` is a finite number > 0 (a distillation target's temperature)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"teacher_temperature={temperature!r}: expected a finite number > 0 (1 = the teacher's own "
                         "distribution, as in the paper)")


def maxent_loss(outputs: Outputs, labels: torch.Tensor, chunk_size: int | None = None,
                divisor: float | torch.Tensor | None = None) -> torch.Tensor:
    """MaxEnt forget loss: KL(uniform || model) per scored position, averaged (docs/reference.md §5.3).

    ``L = mean_{(b,t) in M} [-log V - (1/V) sum_v log p(v|b,t)]``, which is ``>= 0`` and ``0`` iff ``p`` is
    uniform; ``-(1/V) sum_v log p(v) = logsumexp(s) - mean_v(s)``.

    Args:
        outputs: ``[B, T, V]`` logits or :class:`HiddenStates`, any float dtype (computed in float32 chunks).
        labels: ``[B, T]`` unshifted, ``-100`` = position ignored; only positions predicting a label are scored.
        chunk_size, divisor: see :func:`causal_lm_loss`.

    Returns:
        float32 scalar; ``0.0`` when no position is scored.
    """
    return _chunked_loss("maxent", outputs, labels, chunk_size=chunk_size, divisor=divisor)


def sequence_nll(outputs: Outputs, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Each row's summed next-token negative log-likelihood, ``-log p(y_b | x_b)`` over its scored tokens (no gradient).

    Returns:
        float32 ``[B]`` (0 for a row without scored tokens).
    """
    with torch.no_grad():
        return torch.stack([causal_lm_loss(_rows(outputs, b), labels[b:b + 1], chunk_size, divisor=1.0)
                            for b in range(labels.shape[0])])


def _rows(outputs: Outputs, b: int) -> Outputs:
    """Row ``b`` of ``outputs``, as a batch of one."""
    if isinstance(outputs, HiddenStates):
        return HiddenStates(outputs.hidden[b:b + 1], outputs.head)
    return outputs[b:b + 1]


def _sequence_preference_loss(outputs: Outputs, labels: torch.Tensor, margin: Callable, beta: float,
                              chunk_size: int | None) -> torch.Tensor:
    """``(2 / beta) mean_b softplus(z_b)`` over the rows with scored tokens, ``z_b = margin(s_b, n_b)`` with ``s_b`` a
    row's summed NLL and ``n_b`` its scored tokens.

    Logits-free like the other losses: ``s_b`` is computed once without gradient, and the gradient comes from a
    chunked CE whose tokens are weighted by ``dL/ds_b`` (constant per row), so ``d/dtheta`` is exact:
    ``dL/dtheta = sum_b dL/ds_b * ds_b/dtheta``. The returned value is the loss itself.
    """
    nll = sequence_nll(outputs, labels, chunk_size)
    n = (shift_labels(labels) != IGNORE_INDEX).sum(dim=1).float()
    rows = n > 0
    s = nll.detach().requires_grad_(True)
    with torch.enable_grad():
        z = margin(s, n.clamp(min=1))
        value = torch.where(rows, F.softplus(z), torch.zeros_like(z)).sum() * (2.0 / beta) / rows.sum().clamp(min=1)
        (weights,) = torch.autograd.grad(value, s)  # dL/ds_b
    surrogate = _chunked_loss("ce", outputs, labels, chunk_size=chunk_size, divisor=1.0, row_weights=weights)
    return value.detach() + (surrogate - surrogate.detach())


def check_preference_settings(method: str, beta: float, gamma: float = 0.0) -> None:
    """Raises unless ``beta > 0`` (inverse temperature) and ``gamma >= 0`` (SimNPO's reward margin)."""
    if not beta > 0:
        raise ValueError(f"beta={beta}: {method}'s inverse temperature must be > 0")
    if not gamma >= 0:
        raise ValueError(f"gamma={gamma}: {method}'s reward margin must be >= 0")


def npo_loss(outputs: Outputs, labels: torch.Tensor, reference_nll: torch.Tensor, beta: float,
             chunk_size: int | None = None) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024, arXiv 2404.05868, Eq. 3): the forget sequences as
    dispreferred answers against a frozen reference model,
    ``L = -(2 / beta) mean_b log sigmoid(-beta log(p(y_b) / p_ref(y_b)))``
    ``= (2 / beta) mean_b softplus(beta (s_ref - s))`` with ``s = -log p(y_b | x_b)`` summed over the row's scored
    tokens. It tends to 0 as the model's likelihood of the forget sequences falls below the reference's; its gradient
    is gradient ascent on ``s`` weighted per row by ``sigmoid(beta (s_ref - s))``, which fades on rows already
    forgotten (unlike GradDiff's unbounded ascent).

    Args:
        outputs: the trained model's ``[B, T, V]`` logits or :class:`HiddenStates` on the forget batch.
        labels: ``[B, T]``, ``-100`` = ignored.
        reference_nll: ``[B]`` the reference model's :func:`sequence_nll` on the same batch.
        beta: inverse temperature, > 0 (the NPO paper: 0.1).

    Returns:
        float32 scalar, the mean over rows with at least one scored token.
    """
    check_preference_settings("NPO", beta)
    ref = reference_nll.detach().float()
    return _sequence_preference_loss(outputs, labels, lambda s, n: beta * (ref - s), beta, chunk_size)


def simnpo_loss(outputs: Outputs, labels: torch.Tensor, beta: float, gamma: float = 0.0,
                chunk_size: int | None = None) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163, Eq. 4): NPO without a reference model, on the length-normalised
    likelihood with a margin, ``L = -(2 / beta) mean_b log sigmoid(-(beta / n_b) log p(y_b | x_b) - gamma)
    = (2 / beta) mean_b softplus(gamma - beta s_b / n_b)`` (``n_b``: the row's scored tokens).

    Args:
        outputs, labels: as :func:`npo_loss`.
        beta: inverse temperature, > 0.
        gamma: reward margin, >= 0 (the paper's default 0).

    Returns:
        float32 scalar, the mean over rows with at least one scored token.
    """
    check_preference_settings("SimNPO", beta, gamma)
    return _sequence_preference_loss(outputs, labels, lambda s, n: gamma - beta * s / n, beta, chunk_size)


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


def repnoise_loss(activations: Sequence[torch.Tensor], forget_logits: Sequence[Outputs],
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
        forget_logits: ``>= 1`` outputs on the forget inputs: ``[B, T, V]`` logits or :class:`HiddenStates`.
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
