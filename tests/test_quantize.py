"""Fake weight quantisation for the quantisation probe, against per-group scales recomputed here with explicit loops,
hand-worked examples, and a tiny Gemma-2 built from a config (tied embeddings, as the real Gemma-2)."""

import math
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config

from undo_lightning.quantize import check_bits, quantize_model_, quantize_rtn

EPS = 1e-6  # float32 slack for bounds that hold exactly in real arithmetic


def _group_scales(row: torch.Tensor, bits: int, group_size: int) -> list[tuple[int, int, float]]:
    """(start, stop, scale) for each group of a 1-D row, by a plain Python loop over the definition."""
    qmax = 2 ** (bits - 1) - 1
    out = []
    for start in range(0, row.numel(), group_size):
        stop = min(start + group_size, row.numel())
        absmax = max(abs(float(v)) for v in row[start:stop])
        out.append((start, stop, absmax / qmax))
    return out


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


# --- check_bits --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_check_bits_accepts(bits):
    check_bits(bits)


@pytest.mark.parametrize("bits", [3, 16, 0, -4, True, False, 4.0, "4", None])
def test_check_bits_rejects_with_value_and_accepted(bits):
    with pytest.raises(ValueError, match=r"expected 4 or 8") as info:
        check_bits(bits)
    assert f"bits={bits!r}" in str(info.value)


def test_check_bits_message():
    with pytest.raises(ValueError) as info:
        check_bits(3)
    assert str(info.value) == "quantisation bits=3: expected 4 or 8"


# --- quantize_rtn ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [1, 4, 7, 16, 37, 128])  # 37 and 7 do not divide 48; 128 > the row length
def test_rtn_error_bound_and_absmax_exact(bits, group_size):
    torch.manual_seed(bits * 1000 + group_size)
    weight = torch.randn(5, 48) * torch.rand(5, 1) * 3  # rows of different magnitudes
    deq = quantize_rtn(weight, bits, group_size)
    assert deq.shape == weight.shape and deq.dtype == weight.dtype
    for r in range(weight.shape[0]):
        groups = _group_scales(weight[r], bits, group_size)
        assert len(groups) == math.ceil(48 / group_size)
        for start, stop, scale in groups:
            w, d = weight[r, start:stop], deq[r, start:stop]
            err = (w - d).abs()
            assert err.max().item() <= scale / 2 + EPS, (r, start)
            peak = w.abs() == w.abs().max()
            torch.testing.assert_close(d[peak], w[peak], rtol=1e-6, atol=0)
            # Output lies on the integer grid of this group's own scale: a wrong group boundary would break this.
            q = d / scale
            torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
            assert q.abs().max().item() <= 2 ** (bits - 1) - 1 + 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_levels_per_group(bits):
    qmax = 2 ** (bits - 1) - 1
    group_size = 1024  # more entries than 8-bit levels, so the count is a real constraint
    torch.manual_seed(1)
    weight = torch.randn(3, 2 * group_size + 100)  # two full groups and a short one per row
    deq = quantize_rtn(weight, bits, group_size)
    for r in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group_size):
            levels = deq[r, start:start + group_size].unique().numel()
            assert levels <= 2 * qmax + 1
            if bits == 4 and start + group_size <= weight.shape[1]:
                assert levels >= 2 * qmax + 1 - 2  # 1024 Gaussian draws hit (nearly) all 15 levels


def test_rtn_hand_worked_4bit():
    # Group 1: absmax 3.5, scale 3.5/7 = 0.5: -1.2/0.5 = -2.4 -> -2 -> -1.0; 0.4/0.5 = 0.8 -> 1 -> 0.5; 2.0 -> 4 -> 2.0.
    # Group 2 (short, 2 entries): absmax 0.3, scale 0.3/7: 0.1/scale = 2.33 -> 2 -> 0.6/7.
    weight = torch.tensor([[3.5, -1.2, 0.4, 2.0, -0.3, 0.1]])
    expected = torch.tensor([[3.5, -1.0, 0.5, 2.0, -0.3, 0.6 / 7]])
    torch.testing.assert_close(quantize_rtn(weight, 4, group_size=4), expected, rtol=1e-6, atol=1e-7)
    # One group of 6: scale 0.5, and -0.3/0.5 = -0.6 -> -1 -> -0.5, 0.1/0.5 = 0.2 -> 0.
    torch.testing.assert_close(quantize_rtn(weight, 4, group_size=6),
                               torch.tensor([[3.5, -1.0, 0.5, 2.0, -0.5, 0.0]]), rtol=1e-6, atol=1e-7)


def test_rtn_hand_worked_8bit_negative_absmax():
    # absmax |-127| gives scale exactly 1: plain rounding, -50.4 -> -50, 0.2 -> 0, 3.6 -> 4.
    weight = torch.tensor([[-127.0, -50.4, 0.2, 3.6]])
    torch.testing.assert_close(quantize_rtn(weight, 8, group_size=4), torch.tensor([[-127.0, -50.0, 0.0, 4.0]]),
                               rtol=0, atol=1e-5)


def test_rtn_8bit_more_accurate_than_4bit():
    torch.manual_seed(2)
    weight = torch.randn(16, 256)
    err4 = _relative_error(weight, quantize_rtn(weight, 4, 64))
    err8 = _relative_error(weight, quantize_rtn(weight, 8, 64))
    assert 0 < err8 < err4 / 8  # each extra bit roughly halves the step: 4 more bits ~ 16x
    assert err4 < 0.2


def test_rtn_smaller_groups_more_accurate():
    torch.manual_seed(3)
    weight = torch.randn(16, 512)
    assert _relative_error(weight, quantize_rtn(weight, 4, 16)) < _relative_error(weight, quantize_rtn(weight, 4, 512))


def test_rtn_zero_group_gives_zeros():
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.25], [0.0] * 7])
    deq = quantize_rtn(weight, 4, group_size=4)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, :4], torch.zeros(2, 4))
    assert torch.equal(deq[1], torch.zeros(7))
    assert torch.equal(quantize_rtn(torch.zeros(3, 5), 8, 2), torch.zeros(3, 5))


def test_rtn_keeps_dtype_shape_and_input():
    torch.manual_seed(4)
    weight = torch.randn(2, 3, 10)
    before = weight.clone()
    deq = quantize_rtn(weight, 4, 3)
    assert torch.equal(weight, before)  # out of place
    # Leading dimensions are just rows: same as quantising the [6, 10] view.
    torch.testing.assert_close(deq, quantize_rtn(weight.reshape(6, 10), 4, 3).reshape(2, 3, 10), rtol=0, atol=0)
    half = quantize_rtn(weight.bfloat16(), 4, 3)
    assert half.dtype == torch.bfloat16 and half.shape == weight.shape
    torch.testing.assert_close(half, quantize_rtn(weight.bfloat16().float(), 4, 3).bfloat16())


@pytest.mark.parametrize("group_size", [0, -1, 2.5, True, "128", None])
def test_rtn_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match=rf"group_size={group_size!r}.*positive int"):
        quantize_rtn(torch.ones(2, 4), 4, group_size)


@pytest.mark.parametrize("bits", [3, 16, True, "4"])
def test_rtn_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="expected 4 or 8"):
        quantize_rtn(torch.ones(2, 4), bits)


# --- quantize_model_ ---------------------------------------------------------------------------------------------


def _tiny_gemma(tie: bool = True):
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tie,
                          attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_()  # Gemma norm weights start at 0, which would hide an unwanted change
    return model


def _snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters(remove_duplicate=False)}


def _linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def test_tiny_gemma_ties_lm_head_to_embedding():
    model = _tiny_gemma()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the case the embedding skip must catch
    assert _linear_names(model)[-1] == "lm_head" and len(_linear_names(model)) == 15


@pytest.mark.parametrize("bits,group_size", [(4, 24), (8, 128), (4, 16)])
def test_quantize_model_default_skips_embeddings(bits, group_size):
    model = _tiny_gemma()
    before = _snapshot(model)
    summary = quantize_model_(model, bits, group_size)
    after = _snapshot(model)

    quantised = [name for name in _linear_names(model) if name != "lm_head"]
    assert len(quantised) == 14
    err_sq = norm_sq = 0.0
    for name in quantised:
        key = f"{name}.weight"
        assert not torch.equal(after[key], before[key]), key
        torch.testing.assert_close(after[key], quantize_rtn(before[key], bits, group_size), rtol=0, atol=0)
        err_sq += (after[key].double() - before[key].double()).pow(2).sum().item()
        norm_sq += before[key].double().pow(2).sum().item()
    # The tied embedding / lm_head and every 1-D parameter are untouched.
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[key], before[key]), key
    for key, value in before.items():
        if value.dim() == 1:
            assert torch.equal(after[key], value), key
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    assert summary["method"] == "rtn" and summary["bits"] == bits and summary["group_size"] == group_size
    assert summary["tensors"] == 14
    assert summary["parameters"] == sum(before[f"{name}.weight"].numel() for name in quantised)
    assert summary["parameters"] == 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32)
    assert isinstance(summary["tensors"], int) and isinstance(summary["parameters"], int)
    assert isinstance(summary["relative_error"], float)
    assert summary["relative_error"] == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-6)
    assert 0 < summary["relative_error"] < (0.2 if bits == 4 else 0.02)


def test_quantize_model_include_embeddings_tied_once():
    model = _tiny_gemma()
    before = _snapshot(model)
    summary = quantize_model_(model, 4, 24, include_embeddings=True)
    after = _snapshot(model)
    embed = before["model.embed_tokens.weight"]
    assert embed.shape == (64, 32)
    # Quantised along H (the last dimension), the same tensor seen through both names.
    torch.testing.assert_close(after["model.embed_tokens.weight"], quantize_rtn(embed, 4, 24), rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert summary["tensors"] == 15  # 14 Linear weights + the tied embedding, counted once
    assert summary["parameters"] == 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32) + 64 * 32
    expected = math.sqrt(sum((after[k].double() - before[k].double()).pow(2).sum().item() for k in before
                             if before[k].dim() == 2 and k != "lm_head.weight")
                         / sum(before[k].double().pow(2).sum().item() for k in before
                               if before[k].dim() == 2 and k != "lm_head.weight"))
    assert summary["relative_error"] == pytest.approx(expected, rel=1e-6)


def test_quantize_model_untied_embeddings():
    model = _tiny_gemma(tie=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    before = _snapshot(model)
    assert quantize_model_(model, 8, 32)["tensors"] == 14
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])

    model = _tiny_gemma(tie=False)
    summary = quantize_model_(model, 8, 32, include_embeddings=True)
    assert summary["tensors"] == 16
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(dict(model.named_parameters())[key], quantize_rtn(before[key], 8, 32), rtol=0,
                                   atol=0)


def test_quantize_model_plain_module_biases_untouched():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.LayerNorm(6), nn.Linear(6, 3))
    before = _snapshot(model)
    summary = quantize_model_(model, 4, 4)
    after = _snapshot(model)
    for key in ("0.weight", "3.weight"):
        torch.testing.assert_close(after[key], quantize_rtn(before[key], 4, 4), rtol=0, atol=0)
        assert not torch.equal(after[key], before[key])
    for key in ("0.bias", "2.weight", "2.bias", "3.bias"):
        assert torch.equal(after[key], before[key]), key
    assert summary["tensors"] == 2 and summary["parameters"] == 60 + 18


def test_quantize_model_output_still_runs():
    model = _tiny_gemma()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        reference = model(ids).logits
        quantize_model_(model, 8, 16)
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, reference)
    torch.testing.assert_close(logits, reference, rtol=0.1, atol=0.1)  # 8 bits barely moves the logits


def test_quantize_model_no_linear_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model_(nn.Sequential(nn.Embedding(4, 3)), 4)


# --- refused calls leave the model untouched ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_model():
    return _tiny_gemma()


def _assert_refused(model, match, **kwargs):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        quantize_model_(model, **kwargs)
    after = _snapshot(model)
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("bits", [3, 16, True, "4"])
def test_quantize_model_rejects_bits(shared_model, bits):
    _assert_refused(shared_model, rf"bits={bits!r}: expected 4 or 8", bits=bits)


@pytest.mark.parametrize("group_size", [0, -1])
def test_quantize_model_rejects_group_size(shared_model, group_size):
    _assert_refused(shared_model, rf"group_size={group_size}", bits=4, group_size=group_size)


def test_quantize_model_rejects_method(shared_model):
    _assert_refused(shared_model, r"method='gptq'.*'rtn', 'nf4'", bits=4, method="gptq")


def test_quantize_model_nf4_needs_4_bits(shared_model):
    _assert_refused(shared_model, r"nf4.*bits=8", bits=8, method="nf4")


def test_quantize_model_nf4_without_cuda(shared_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _assert_refused(shared_model, r'nf4.*CUDA.*method="rtn" works on CPU', bits=4, method="nf4")


def test_quantize_model_nf4_without_bitsandbytes(shared_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so only the package is missing
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes...` raise ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    _assert_refused(shared_model, r'nf4.*bitsandbytes package.*method="rtn" works on CPU', bits=4, method="nf4")
    with pytest.raises(ValueError) as info:
        quantize_model_(shared_model, 4, method="nf4")
    assert "CUDA" not in str(info.value)


def test_module_does_not_import_bitsandbytes_at_top_level():
    import undo_lightning.quantize as module

    with open(module.__file__) as file:
        top_level = [line for line in file if line.startswith(("import ", "from "))]
    assert top_level and not any("bitsandbytes" in line for line in top_level)


def test_quantize_model_nf4_backend_failure_refused_before_any_change(shared_model, monkeypatch):
    # A bitsandbytes that refuses the blocksize (or a CUDA that does not work): the trial call on a tiny tensor turns
    # it into a ValueError before the first weight is written.
    import types

    def refuse(*args, **kwargs):
        raise RuntimeError("blocksize 24 not supported")

    package = types.ModuleType("bitsandbytes")
    functional = types.ModuleType("bitsandbytes.functional")
    functional.quantize_4bit = functional.dequantize_4bit = refuse
    package.functional = functional
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)
    _assert_refused(shared_model, r'nf4.*blocksize=group_size=24', bits=4, group_size=24, method="nf4")


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not (torch.cuda.is_available() and _has_bitsandbytes()), reason="nf4 needs CUDA and bitsandbytes")
def test_quantize_model_nf4_on_cuda():
    model = _tiny_gemma()
    before = _snapshot(model)
    summary = quantize_model_(model, 4, 64, method="nf4")
    after = _snapshot(model)
    assert summary["tensors"] == 14 and summary["method"] == "nf4"
    assert 0 < summary["relative_error"] < 0.2
    weight = after["model.layers.0.self_attn.q_proj.weight"]  # [32, 32]: one 64-block = two rows
    assert weight.device == before["model.layers.0.self_attn.q_proj.weight"].device
    for block in weight.reshape(-1, 64):
        assert block.unique().numel() <= 16  # NF4 has 16 code values per block
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
