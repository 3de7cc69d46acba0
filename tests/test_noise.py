"""Shrink-and-perturb against docs/reference.md §6 with a regenerated noise draw on a tiny Gemma-2 and plain modules."""

import math

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM

from undo_lightning.noise import shrink_and_perturb


@pytest.fixture(scope="module")
def base_model():
    config = Gemma2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=8, intermediate_size=32, attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_()  # Gemma norm weights start at 0, which would hide the shrink
    return model


@pytest.fixture
def model(base_model):
    copy = Gemma2ForCausalLM(base_model.config)
    copy.load_state_dict(base_model.state_dict())
    return copy


def _unique_params(model):
    """(name, tensor) once per distinct tensor, in named_parameters order, as plain clones."""
    return [(name, param.detach().clone()) for name, param in model.named_parameters()]


def _expected(before, alpha, beta, seed):
    """Apply θ <- (1-α)θ + αβN with N regenerated: one U(-a, a) draw per 2-D tensor, in order, from a CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, theta in before:
        if theta.dim() == 2:
            bound = math.sqrt(6.0 / (theta.shape[0] + theta.shape[1]))
            noise = torch.empty(theta.shape).uniform_(-bound, bound, generator=generator)
            out[name] = (1 - alpha) * theta + alpha * beta * noise
        else:
            out[name] = (1 - alpha) * theta
    return out


def test_alpha_zero_is_identity(model):
    before = _unique_params(model)
    shrink_and_perturb(model, alpha=0.0, beta=1.0, seed=1)
    for name, param in model.named_parameters():
        assert torch.equal(param, dict(before)[name]), name


def test_alpha_one_beta_zero_zeroes_everything(model):
    shrink_and_perturb(model, alpha=1.0, beta=0.0, seed=1)
    for name, param in model.named_parameters():
        assert torch.all(param == 0), name


def test_exact_formula_with_regenerated_noise(model):
    before = _unique_params(model)
    summary = shrink_and_perturb(model, alpha=0.3, beta=0.1, seed=5)
    expected = _expected(before, 0.3, 0.1, seed=5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    n_2d = sum(1 for _, p in before if p.dim() == 2)
    n_elements = sum(p.numel() for _, p in before)
    assert summary == {"tensors_noised": n_2d, "tensors_shrunk": len(before) - n_2d, "elements_updated": n_elements,
                       "elements_total": n_elements, "fraction_updated": 1.0}


@pytest.mark.parametrize("shape", [(300, 200), (2000, 40), (40, 2000)])
def test_noise_distribution_per_shape(shape):
    layer = nn.Linear(shape[1], shape[0], bias=False)  # weight is [out, in] = shape
    shrink_and_perturb(layer, alpha=1.0, beta=1.0, seed=0)  # θ = N
    noise = layer.weight.detach().double()
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    n = noise.numel()
    assert noise.abs().max() <= bound
    assert noise.abs().max() > 0.99 * bound
    # U(-a, a): mean 0, variance a²/3 (std of the sample variance ≈ a²·sqrt(4/45)/sqrt(n)).
    assert abs(noise.mean().item()) < 5 * bound / math.sqrt(3 * n)
    assert noise.var().item() == pytest.approx(bound ** 2 / 3, rel=5 * math.sqrt(4 / 5) / math.sqrt(n))


def test_seed_determinism_and_independence_from_global_rng(model, base_model):
    other = Gemma2ForCausalLM(base_model.config)
    other.load_state_dict(base_model.state_dict())
    third = Gemma2ForCausalLM(base_model.config)
    third.load_state_dict(base_model.state_dict())

    torch.manual_seed(1)
    shrink_and_perturb(model, alpha=0.5, beta=0.5, seed=42)
    torch.manual_seed(2)  # a different global state must not matter
    rng_state = torch.get_rng_state()
    shrink_and_perturb(other, alpha=0.5, beta=0.5, seed=42)
    assert torch.equal(torch.get_rng_state(), rng_state)  # and the global RNG is not consumed
    shrink_and_perturb(third, alpha=0.5, beta=0.5, seed=43)

    for (name, a), b, c in zip(model.named_parameters(), other.parameters(), third.parameters(), strict=True):
        assert torch.equal(a, b), name
        if a.dim() == 2:
            assert not torch.allclose(a, c), name
        else:
            assert torch.equal(a, c), name  # 1-D tensors are only shrunk: no noise, no seed dependence


def test_include_regex_and_predicate(model, base_model):
    before = dict(_unique_params(model))
    summary = shrink_and_perturb(model, alpha=0.5, beta=0.1, seed=0, include=r"\.mlp\.")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (".mlp." in name), name
    assert summary["tensors_noised"] == 6 and summary["tensors_shrunk"] == 0
    assert summary["elements_updated"] == 6 * 32 * 16

    # The touched tensors get the draws in order, as if they were the only parameters.
    mlp = [(name, p) for name, p in before.items() if ".mlp." in name]
    expected = _expected(mlp, 0.5, 0.1, seed=0)
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-7)

    fresh = Gemma2ForCausalLM(base_model.config)
    fresh.load_state_dict(base_model.state_dict())
    summary = shrink_and_perturb(fresh, alpha=0.5, beta=0.1, seed=0, include=lambda name, p: p.dim() == 1)
    assert summary["tensors_noised"] == 0 and summary["tensors_shrunk"] == 9
    for name, param in fresh.named_parameters():
        expected_value = 0.5 * before[name] if param.dim() == 1 else before[name]
        torch.testing.assert_close(param, expected_value, rtol=0, atol=0, msg=name)


def test_mask_limits_the_update(model):
    before = dict(_unique_params(model))
    name_2d, name_1d = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    bool_mask = torch.zeros(16, 16, dtype=torch.bool)
    bool_mask[:, :4] = True
    blend = torch.full((16,), 0.25)
    summary = shrink_and_perturb(model, alpha=0.4, beta=0.2, seed=3, include=lambda n, p: n in (name_2d, name_1d),
                                 mask={name_2d: bool_mask, name_1d: blend})
    full = _expected([(name_2d, before[name_2d]), (name_1d, before[name_1d])], 0.4, 0.2, seed=3)
    params = dict(model.named_parameters())
    torch.testing.assert_close(params[name_2d][:, :4], full[name_2d][:, :4], rtol=1e-6, atol=1e-7)
    assert torch.equal(params[name_2d][:, 4:], before[name_2d][:, 4:])
    torch.testing.assert_close(params[name_1d], before[name_1d] + 0.25 * (full[name_1d] - before[name_1d]))
    assert summary["elements_updated"] == 16 * 4 + 16


def test_tied_weights_are_noised_once(model):
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.lm_head.weight.detach().clone()
    # Selected through the alias name only; a double update would shrink by (1 - α)² and add two draws.
    summary = shrink_and_perturb(model, alpha=0.5, beta=1.0, seed=9, include=r"^lm_head\.")
    bound = math.sqrt(6.0 / (64 + 16))
    noise = torch.empty(64, 16).uniform_(-bound, bound, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(model.lm_head.weight.detach(), 0.5 * before + 0.5 * noise, rtol=1e-6, atol=1e-7)
    assert summary["tensors_noised"] == 1 and summary["elements_updated"] == 64 * 16
    assert summary["elements_total"] == sum(p.numel() for p in model.parameters())


def test_bf16_parameters_get_the_fp32_result_rounded_once():
    layer = nn.Linear(24, 12).bfloat16()
    before = [(name, p.detach().float()) for name, p in layer.named_parameters()]
    shrink_and_perturb(layer, alpha=0.3, beta=0.5, seed=4)
    expected = _expected(before, 0.3, 0.5, seed=4)
    for name, param in layer.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, expected[name].bfloat16()), name


@pytest.mark.parametrize("alpha,beta,bad", [(1.5, 0.1, "alpha"), (-0.1, 0.1, "alpha"), (0.5, 2.0, "beta"),
                                            (0.5, float("nan"), "beta")])
def test_bad_alpha_beta_raise_and_leave_the_model_alone(model, alpha, beta, bad):
    before = dict(_unique_params(model))
    with pytest.raises(ValueError, match=rf"{bad} must be in \[0, 1\], got {beta if bad == 'beta' else alpha}"):
        shrink_and_perturb(model, alpha=alpha, beta=beta, seed=0)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])


def test_unsupported_rank_raises_naming_the_parameter_unless_excluded():
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(2, 2, 3))
    before = net[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"'1\.weight'.*\(2, 2, 3\)"):
        shrink_and_perturb(net, alpha=0.5, beta=0.1, seed=0)
    assert torch.equal(net[0].weight, before)  # validated before anything was modified
    summary = shrink_and_perturb(net, alpha=0.5, beta=0.1, seed=0, include=r"^0\.")
    assert summary["tensors_noised"] == 1 and summary["tensors_shrunk"] == 1


def test_bad_mask_raises(model):
    with pytest.raises(ValueError, match="does not have"):
        shrink_and_perturb(model, alpha=0.5, beta=0.1, seed=0, mask={"no.such.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        shrink_and_perturb(model, alpha=0.5, beta=0.1, seed=0, mask={"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="tied"):
        shrink_and_perturb(model, alpha=0.5, beta=0.1, seed=0,
                           mask={"lm_head.weight": torch.ones(64, 16), "model.embed_tokens.weight": torch.ones(64, 16)})
