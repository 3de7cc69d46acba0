"""Weight quantisation for the quantisation probe: does a "forgotten" capability come back once the weights are rounded?

Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization" (ICLR 2025, arXiv 2410.16454) found that
quantising an unlearned model to 4 bits restores much of the knowledge that gradient-ascent-style unlearning removed:
such methods move the weights only a little, and the change falls inside the quantisation step, so rounding undoes it.
The probe evaluates a model after :func:`quantize_model_` and compares with the unquantised score.

Quantisation here is *simulated* ("fake quantisation"): every selected weight is quantised and immediately dequantised
in place, ``W <- Q(W)``, where ``Q(W)`` holds exactly the values a real low-bit kernel would multiply by. The model
stays an ordinary float model of the same dtype, so the evaluation code, hooks and devices (CPU included) are unchanged;
only the memory and speed benefits of real low-bit storage are given up, which a probe does not need.

Only the weights of ``nn.Linear`` layers are quantised by default. The input and output embeddings stay in full
precision unless ``include_embeddings=True``: that is what bitsandbytes' ``load_in_4bit`` / ``load_in_8bit`` and GPTQ /
AWQ do (they replace the Linear layers and skip ``lm_head``), and it is the setting of the paper, so the probe matches
how unlearned models are actually deployed. Biases and other 1-D parameters (norm weights) are never quantised: every
such scheme keeps them in full precision, and they are a negligible share of the parameters.

Two methods:

* ``"rtn"`` (:func:`quantize_rtn`): round-to-nearest onto a symmetric integer grid with one absmax scale per
  contiguous group of ``group_size`` input features; any bit width of :data:`Bits`, any device, pure torch.
* ``"nf4"``: bitsandbytes' 4-bit NormalFloat (the ``load_in_4bit`` format of the paper's 4-bit runs), through
  ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``; needs CUDA and the optional ``bitsandbytes``
  package, which is imported only when this method is asked for.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Bits = Literal[4, 8]
Method = Literal["rtn", "nf4"]

_BITS: tuple[int, ...] = (4, 8)
_METHODS: tuple[str, ...] = ("rtn", "nf4")


def check_bits(bits: object) -> None:
    """Reject a bit width other than those of :data:`Bits`.

    Args:
        bits: the requested bit width.

    Raises:
        ValueError: ``bits`` is not the int 4 or 8 (bools, floats and strings are refused too, even ``True`` or
            ``4.0``, so that a config typo cannot silently pick a width).
    """
    # bool is a subclass of int (True == 1) and 4.0 == 4, so test the exact type before the value.
    if type(bits) is not int or bits not in _BITS:
        raise ValueError(f"quantisation bits={bits!r}: expected {' or '.join(map(str, _BITS))}")


def _check_group_size(group_size: object) -> None:
    if type(group_size) is not int or group_size <= 0:
        raise ValueError(f"quantisation group_size={group_size!r}: expected a positive int")


def _check_method(method: object) -> None:
    if method not in _METHODS:
        raise ValueError(f"quantisation method={method!r}: expected one of {', '.join(map(repr, _METHODS))}")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest fake quantisation with one symmetric absmax scale per group of the last dimension.

    Each row (every index of the leading dimensions) is cut into contiguous groups of ``group_size`` entries along the
    last dimension (the input features of a Linear weight ``[out, in]``); a last group shorter than ``group_size``,
    when the row length is not a multiple of it, is a group of its own. For each group, with
    ``qmax = 2**(bits-1) - 1``::

        scale = max|w| / qmax
        q     = clamp(round(w / scale), -qmax, qmax)      # integers in [-qmax, qmax]: 2*qmax + 1 levels
        out   = q * scale

    so every element moves by at most ``scale / 2`` and the group's absmax is kept exactly (up to float rounding). An
    all-zero group has scale 0 and stays zero. Rounding is torch's (ties to even). Non-finite weights give non-finite
    output. Computed in float32 whatever the input dtype; the input is not modified.

    Args:
        weight: ``[..., in]`` floating tensor, at least 1-D; typically a Linear weight ``[out, in]``.
        bits: bit width, one of :data:`Bits`.
        group_size: entries per group along the last dimension; a positive int.

    Returns:
        ``[..., in]`` dequantised tensor of ``weight``'s shape, dtype and device.

    Raises:
        ValueError: bad ``bits`` or ``group_size``, or a 0-D ``weight``.
    """
    check_bits(bits)
    _check_group_size(group_size)
    if weight.dim() == 0:
        raise ValueError("quantize_rtn needs a tensor with at least 1 dimension, got a 0-D tensor")
    qmax = 2 ** (bits - 1) - 1
    shape = weight.shape
    n = shape[-1]
    if weight.numel() == 0:
        return weight.clone()
    groups = -(-n // group_size)  # ceil
    w = weight.detach().to(torch.float32).reshape(-1, n)
    pad = groups * group_size - n
    if pad:
        # Zero padding turns the short last group into a full one without changing its absmax (|0| <= max|w|), and
        # the padded zeros quantise to zeros that are cut off again below.
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.reshape(-1, groups, group_size)
    scale = w.abs().amax(dim=-1, keepdim=True) / qmax
    # An all-zero group has scale 0: divide by 1 instead (its q is 0 either way), which keeps 0/0 = NaN out.
    q = torch.round(w / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp_(-qmax, qmax)
    out = (q * scale).reshape(-1, groups * group_size)[:, :n]
    return out.reshape(shape).to(weight.dtype)


def _embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``model.get_input_embeddings()`` / ``get_output_embeddings()``, where the model has them."""
    weights = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(model, getter, None)
        if method is None:
            continue
        try:
            module = method()
        except NotImplementedError:  # transformers' base implementation for models without embeddings
            continue
        weight = getattr(module, "weight", None) if module is not None else None
        if isinstance(weight, torch.Tensor):
            weights.append(weight)
    return weights


def _targets(model: nn.Module, include_embeddings: bool) -> list[torch.Tensor]:
    """The 2-D tensors to quantise, each once (tied weights are one tensor), in module order."""
    embeddings = _embedding_weights(model)
    embedding_ids = {id(w) for w in embeddings}
    targets: dict[int, torch.Tensor] = {}
    for module in model.modules():
        # A Hugging Face model with tied embeddings has an `lm_head` Linear whose weight *is* the input embedding
        # tensor: skip it by identity, not by module type, or the "full precision" embedding would be rounded.
        if (isinstance(module, nn.Linear) and module.weight.dim() == 2
                and (include_embeddings or id(module.weight) not in embedding_ids)):
            targets.setdefault(id(module.weight), module.weight)
    if include_embeddings:
        for weight in embeddings:
            # Embeddings are [V, H]: the last dimension (hidden) is the grouped one, as for a Linear's input features.
            if weight.dim() == 2:
                targets.setdefault(id(weight), weight)
    return list(targets.values())


def _nf4_quantizer(group_size: int):
    """``W -> Q(W)`` through bitsandbytes NF4, after checking that CUDA, the package and the blocksize all work.

    Everything that can fail is tried here on a tiny tensor, before the caller touches any weight, so a refused
    request never leaves a half-quantised model.
    """
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        bnb_functional = None
        missing.append("the bitsandbytes package (not installed)")
    if missing:
        raise ValueError(f'quantisation method="nf4" needs {" and ".join(missing)}; method="rtn" works on CPU')

    def quantize(weight: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' kernels run on CUDA only; a CPU model is quantised on the GPU and copied back.
        source = weight.detach()
        on_gpu = source if source.is_cuda else source.to("cuda")
        packed, state = bnb_functional.quantize_4bit(on_gpu, blocksize=group_size, quant_type="nf4")
        return bnb_functional.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.device, weight.dtype)

    try:
        quantize(torch.ones(2 * group_size, dtype=torch.float32))
    except Exception as error:  # an unsupported blocksize, a broken install: report it as the caller's ValueError
        raise ValueError(f'quantisation method="nf4" failed with blocksize=group_size={group_size} '
                         f"(bitsandbytes accepts only some powers of two, 64 to 4096): {error}") from error
    return quantize


@torch.no_grad()
def quantize_model_(model: nn.Module, bits: int, group_size: int = 128, method: Method = "rtn",
                    include_embeddings: bool = False) -> dict:
    """Fake-quantise the weight of every ``nn.Linear`` of ``model`` in place (``W <- Q(W)``), for the probe.

    Every 2-D weight of an ``nn.Linear`` module is replaced by its quantised-then-dequantised value, through
    ``copy_`` so that tied parameters stay tied and references to them (optimisers, hooks) stay valid. The weights of
    ``model.get_input_embeddings()`` / ``get_output_embeddings()`` (when the model has those methods) are skipped,
    even when they are an ``nn.Linear``'s weight, as the tied ``lm_head`` of Gemma is, unless ``include_embeddings``;
    then each distinct tensor is quantised once, an embedding ``[V, H]`` along ``H``. Biases and other 1-D parameters
    are never touched, nor are modules that are not ``nn.Linear`` (e.g. GPT-2's ``Conv1D``).

    ``method="rtn"`` applies :func:`quantize_rtn`. ``method="nf4"`` applies bitsandbytes' NF4 with
    ``blocksize=group_size``; unlike RTN, its blocks run over the flattened tensor, so they coincide with groups of a
    row only when ``in_features`` is a multiple of ``group_size``.

    All arguments, and for NF4 the presence of CUDA and bitsandbytes, are checked before any weight is modified.

    Args:
        model: the model to quantise, in place.
        bits: bit width, one of :data:`Bits`; must be 4 for ``"nf4"``.
        group_size: entries per quantisation group (RTN) or block (NF4); a positive int.
        method: ``"rtn"`` (any device) or ``"nf4"`` (CUDA and bitsandbytes).
        include_embeddings: quantise the input / output embedding weights too.

    Returns:
        Summary dict: ``method``, ``bits``, ``group_size``; ``tensors`` (int, distinct tensors quantised),
        ``parameters`` (int, their total number of elements) and ``relative_error`` (float,
        ``||W - Q(W)||_F / ||W||_F`` over all quantised tensors together, measured on the values stored in the model,
        i.e. after the cast back to the parameter dtype).

    Raises:
        ValueError: bad ``bits``, ``group_size`` or ``method``; ``"nf4"`` with ``bits != 4``, without CUDA, without
            bitsandbytes or with a blocksize bitsandbytes refuses; or a model with no weight to quantise (a probe
            that quantised nothing would report a false negative).
    """
    check_bits(bits)
    _check_group_size(group_size)
    _check_method(method)
    if method == "nf4":
        if bits != 4:
            raise ValueError(f'quantisation method="nf4" is 4-bit only, got bits={bits}; use method="rtn" for 8 bits')
        quantize = _nf4_quantizer(group_size)
    else:
        def quantize(weight: torch.Tensor) -> torch.Tensor:
            return quantize_rtn(weight, bits, group_size)

    targets = _targets(model, include_embeddings)
    if not targets:
        raise ValueError(f"quantize_model_ found no nn.Linear weight to quantise in {type(model).__name__} "
                         f"(include_embeddings={include_embeddings})")

    # Accumulate in float64 on the host: the sums over billions of squared entries lose digits in float32.
    error_sq = 0.0
    norm_sq = 0.0
    parameters = 0
    for weight in targets:
        quantised = quantize(weight)
        original = weight.detach().float()
        error_sq += (original - quantised.float()).pow(2).sum(dtype=torch.float64).item()
        norm_sq += original.pow(2).sum(dtype=torch.float64).item()
        parameters += weight.numel()
        weight.copy_(quantised)
    relative_error = (error_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0
    return {"method": method, "bits": bits, "group_size": group_size, "tensors": len(targets),
            "parameters": parameters, "relative_error": relative_error}
