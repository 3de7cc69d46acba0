"""Loss functions against independent float64 references (naive full softmax, slow Python loops, hand values)."""

import math

import pytest
import torch

from undo_lightning.losses import (
    IGNORE_INDEX,
    HiddenStates,
    OutputHead,
    auto_chunk_size,
    causal_lm_loss,
    forward_kl,
    graddiff_loss,
    lm_hidden_states,
    maxent_loss,
    mmd_loss,
    npo_loss,
    repnoise_loss,
    rmu_control_vector,
    rmu_forget_loss,
    rmu_retain_loss,
    scored_tokens,
    sequence_nll,
    simnpo_loss,
    token_nll,
)

B, T, V = 3, 7, 11


def _batch(seed=0, dtype=torch.float32):
    """Random student/teacher logits and labels with ignored positions at the start, middle and end."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    teacher = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX
    labels[2, 0] = IGNORE_INDEX  # labels[:, 0] is never a target: must not matter
    return student, teacher, labels


def test_auto_chunk_size_keeps_one_fp32_chunk_within_the_budget():
    assert auto_chunk_size(256_000) == 65  # 64 MiB / (4 B x 256,000) = 65.5 positions
    assert auto_chunk_size(V, budget_bytes=4 * V * 3) == 3 and auto_chunk_size(V, budget_bytes=4 * V * 3 + 1) == 3
    assert auto_chunk_size(10**9) == 1  # never zero
    with pytest.raises(ValueError, match="vocab_size"):
        auto_chunk_size(0)


def _scored_mask(labels):
    """[B, T] float64, 1 where position t predicts labels[:, t + 1] != -100; written without the library helper."""
    mask = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            mask[b, t] = float(labels[b, t + 1].item() != IGNORE_INDEX)
    return mask


def _naive_kl(student, teacher, labels, temperature=1.0):
    """Float64 full-vocabulary forward KL(teacher || student), mean over scored positions; the teacher's logits are
    divided by ``temperature`` before its softmax."""
    log_p = torch.log_softmax(student.double(), dim=-1)
    log_q = torch.log_softmax(teacher.double() / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T]
    mask = _scored_mask(labels)
    return (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1024, None])
def test_forward_kl_matches_naive_value_and_gradient(chunk_size):
    student, teacher, labels = _batch()
    student.requires_grad_(True)
    loss = forward_kl(student, teacher, labels, chunk_size=chunk_size)
    loss.backward()

    ref_student = student.detach().double().requires_grad_(True)
    ref = _naive_kl(ref_student, teacher, labels)
    ref.backward()

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-5, atol=1e-7)
    # Positions that predict an ignored label, and the last position, get exactly zero gradient.
    assert torch.all(student.grad[:, -1] == 0)
    assert torch.all(student.grad[0, 2] == 0) and torch.all(student.grad[1, -3:] == 0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_forward_kl_tempers_only_the_teacher(temperature):
    student, teacher, labels = _batch(seed=5)
    student.requires_grad_(True)
    loss = forward_kl(student, teacher, labels, chunk_size=3, teacher_temperature=temperature)
    loss.backward()
    ref_student = student.detach().double().requires_grad_(True)
    ref = _naive_kl(ref_student, teacher, labels, temperature)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-5, atol=1e-7)
    # a student that already is the tempered teacher has nothing left to learn; the untempered teacher does not
    tempered = teacher / temperature
    assert forward_kl(tempered, teacher, labels, teacher_temperature=temperature).item() == pytest.approx(0, abs=1e-6)
    assert forward_kl(teacher, teacher, labels, teacher_temperature=temperature).item() > 1e-3


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_forward_kl_rejects_a_temperature_that_is_not_positive_and_finite(temperature):
    student, teacher, labels = _batch()
    with pytest.raises(ValueError, match=f"teacher_temperature={temperature!r}: expected a finite number > 0"):
        forward_kl(student, teacher, labels, teacher_temperature=temperature)


def test_forward_kl_under_no_grad_gives_the_same_value():
    student, teacher, labels = _batch(seed=7)
    student.requires_grad_(True)
    with torch.no_grad():
        loss = forward_kl(student, teacher, labels, chunk_size=5)
    assert loss.grad_fn is None
    assert loss.item() == pytest.approx(_naive_kl(student.detach(), teacher, labels).item(), rel=1e-5)


def test_forward_kl_is_zero_for_identical_logits_and_positive_otherwise():
    student, teacher, labels = _batch(seed=1)
    assert forward_kl(student, student.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(student, teacher, labels).item() > 0.1


def test_forward_kl_bf16_inputs():
    student, teacher, labels = _batch(seed=2, dtype=torch.bfloat16)
    student.requires_grad_(True)
    loss = forward_kl(student, teacher, labels, chunk_size=4)
    loss.backward()

    ref_student = student.detach().double().requires_grad_(True)  # the same bf16 values, upcast exactly
    ref = _naive_kl(ref_student, teacher, labels)
    ref.backward()

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)  # computed in fp32, so no bf16-level error
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-2, atol=1e-4)


def test_forward_kl_scales_with_upstream_gradient_and_leaves_teacher_alone():
    student, teacher, labels = _batch(seed=3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    (forward_kl(student, teacher, labels) * 2.5).backward()
    ref_student = student.detach().double().requires_grad_(True)
    (_naive_kl(ref_student, teacher.detach(), labels) * 2.5).backward()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-5, atol=1e-7)
    assert teacher.grad is None


def test_forward_kl_all_masked_is_zero_with_zero_gradient():
    student, teacher, _ = _batch(seed=4)
    student.requires_grad_(True)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[:, 0] = 5  # first-position labels are never targets
    loss = forward_kl(student, teacher, labels, chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


def test_forward_kl_rejects_bad_arguments():
    student, teacher, labels = _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(student, teacher, labels, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        forward_kl(student, teacher[..., :-1], labels)


def _slow_maxent(logits, labels):
    """KL(uniform || softmax) per scored position by explicit loops over positions and vocabulary."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            row = [float(x) for x in logits[b, t]]
            log_z = math.log(sum(math.exp(x) for x in row))
            vocab = len(row)
            total += sum((1 / vocab) * (math.log(1 / vocab) - (x - log_z)) for x in row)
            count += 1
    return total / count


def test_maxent_matches_slow_reference():
    logits, _, labels = _batch(seed=5)
    assert maxent_loss(logits, labels).item() == pytest.approx(_slow_maxent(logits, labels), rel=1e-5)
    assert maxent_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_maxent_is_zero_for_uniform_predictions():
    _, _, labels = _batch()
    # Constant within each row (different constants per row) = uniform distribution.
    logits = torch.randn(B, T, 1).expand(B, T, V).contiguous()
    assert maxent_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_maxent_gradient_step_raises_entropy():
    logits, _, labels = _batch(seed=6)
    mask = _scored_mask(labels)[..., None].float()

    def entropy(x):
        p = torch.softmax(x, -1)
        return (-(p * p.log()).sum(-1, keepdim=True) * mask).sum() / mask.sum()

    logits.requires_grad_(True)
    loss = maxent_loss(logits, labels)
    loss.backward()
    stepped = (logits - 0.5 * logits.grad).detach()
    assert entropy(stepped) > entropy(logits.detach()) + 1e-3
    assert maxent_loss(stepped, labels) < loss


def test_maxent_all_masked_is_zero_without_nan():
    logits = torch.randn(B, T, V, requires_grad=True)
    loss = maxent_loss(logits, torch.full((B, T), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(logits.grad == 0)


def test_graddiff_loss():
    forget, retain = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    loss = graddiff_loss(forget, retain, alpha=15.0)
    loss.backward()
    assert loss.item() == -2.0 + 45.0
    assert forget.grad.item() == -1.0 and retain.grad.item() == 15.0


def test_rmu_losses_hand_values():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [1, 2, 2]
    control = torch.tensor([1.0, 1.0])
    # squared differences: position 0 -> [0, 1], position 1 -> [4, 9]
    assert rmu_forget_loss(hidden, control).item() == pytest.approx(3.5)
    assert rmu_forget_loss(hidden, control, torch.tensor([[True, False]])).item() == pytest.approx(0.5)
    assert rmu_forget_loss(hidden, control, torch.tensor([[0, 1]])).item() == pytest.approx(6.5)
    assert rmu_forget_loss(hidden, control, torch.tensor([[0, 0]])).item() == 0.0

    frozen = torch.tensor([[[0.0, 2.0], [3.0, 2.0]]], requires_grad=True)
    hidden.requires_grad_(True)
    # squared differences: position 0 -> [1, 0], position 1 -> [0, 4]
    loss = rmu_retain_loss(hidden, frozen)
    assert loss.item() == pytest.approx(1.25)
    assert rmu_retain_loss(hidden, frozen, torch.tensor([[1, 0]])).item() == pytest.approx(0.5)
    loss.backward()
    assert frozen.grad is None  # the frozen activations are a target
    torch.testing.assert_close(hidden.grad, torch.tensor([[[0.5, 0.0], [0.0, 1.0]]]))


def test_rmu_forget_loss_bf16_hidden_is_computed_in_float32():
    hidden = torch.randn(2, 3, 8).bfloat16()
    control = rmu_control_vector(8, 6.0, seed=0)
    expected = (hidden.double() - control.double()).pow(2).mean()  # subtract before any bf16 rounding
    loss = rmu_forget_loss(hidden, control)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rmu_control_vector_norm_seed_and_global_rng():
    rng_state = torch.get_rng_state()
    u = rmu_control_vector(32, 6.5, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert u.shape == (32,)
    assert u.norm().item() == pytest.approx(6.5, rel=1e-6)
    torch.manual_seed(123)  # the global seed must not matter
    assert torch.equal(u, rmu_control_vector(32, 6.5, seed=7))
    assert not torch.allclose(u, rmu_control_vector(32, 6.5, seed=8))
    # Same direction for any coefficient.
    torch.testing.assert_close(rmu_control_vector(32, 1.0, seed=7) * 6.5, u)


def _slow_mmd(x, y):
    """Biased MMD^2 with the 5-kernel bandwidth heuristic, by explicit double loops in float64."""
    z = [row.double() for row in torch.cat([x, y]).detach()]
    n, total = x.shape[0], len(z)
    dist = [[float(((a - b) ** 2).sum()) for b in z] for a in z]
    sigma0 = sum(dist[i][j] for i in range(total) for j in range(total) if i != j) / (total * total - total)

    def k(i, j):
        return sum(math.exp(-dist[i][j] / (sigma0 * 2 ** (s - 2))) for s in range(5))

    xs, ys = range(n), range(n, total)
    return (sum(k(i, j) for i in xs for j in xs) / len(xs) ** 2
            + sum(k(i, j) for i in ys for j in ys) / len(ys) ** 2
            - 2 * sum(k(i, j) for i in xs for j in ys) / (len(xs) * len(ys)))


@pytest.mark.parametrize("n,m", [(4, 4), (3, 5)])
def test_mmd_matches_slow_reference(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    x = torch.randn(n, 6, generator=g) + 0.5
    y = 2 * torch.randn(m, 6, generator=g)
    assert mmd_loss(x, y).item() == pytest.approx(_slow_mmd(x, y), rel=1e-4, abs=1e-6)


def test_mmd_of_a_sample_with_itself_is_zero_and_gradients_are_finite():
    x = torch.randn(5, 12, requires_grad=True)
    assert mmd_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    same = torch.ones(4, 3)
    assert mmd_loss(same, same.clone()).item() == 0.0  # zero bandwidth must not give NaN
    loss = mmd_loss(x, torch.randn(5, 12) * 3)
    assert loss.item() > 0.05
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _slow_ce(logits, labels):
    """Mean next-token CE over scored positions, by explicit loops."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            row = [float(x) for x in logits[b, t]]
            total += math.log(sum(math.exp(x) for x in row)) - row[target]
            count += 1
    return total / count


def test_repnoise_terms_match_slow_references():
    g = torch.Generator().manual_seed(11)
    activations = [torch.randn(B, T, 4, generator=g) * (i + 1) for i in range(2)]
    logits = [torch.randn(B, T, V, generator=g) for _ in range(3)]
    _, _, labels = _batch(seed=12)
    mask = torch.ones(B, T)
    mask[1, -2:] = 0
    alpha, beta = 0.5, 0.1

    terms = repnoise_loss(activations, logits, labels, torch.Generator().manual_seed(99), alpha=alpha, beta=beta,
                          mask=mask)

    replay = torch.Generator().manual_seed(99)  # the same Gaussian draws, in layer order
    noise = 0.0
    for act in activations:
        eps = torch.randn(act.shape, generator=replay)
        keep = mask[..., None]
        noise += _slow_mmd((act * keep).flatten(1), (eps * keep).flatten(1)) / len(activations)
    harmful = sum(_slow_ce(x, labels) for x in logits) / len(logits) + 1
    assert terms.noise.item() == pytest.approx(noise, rel=1e-4)
    assert terms.harmful.item() == pytest.approx(harmful, rel=1e-5)
    assert terms.loss.item() == pytest.approx(beta * noise - alpha * math.log(harmful), rel=1e-4)


def test_repnoise_ignores_masked_positions_and_rewards_forget_ce():
    g = torch.Generator().manual_seed(13)
    activations = [torch.randn(2, 5, 4, generator=g)]
    logits = torch.randn(2, 5, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def run(acts):
        return repnoise_loss(acts, [logits], labels, torch.Generator().manual_seed(0), mask=mask)

    changed = activations[0].clone()
    changed[0, 3:] += 100.0  # padding positions only
    assert run([changed]).noise.item() == pytest.approx(run(activations).noise.item(), rel=1e-6)

    run(activations).loss.backward()
    # A gradient-descent step on the loss must raise the forget CE (the harmful term is -alpha * log(CE + 1)).
    ce_before = _slow_ce(logits.detach(), labels)
    ce_after = _slow_ce((logits - 1.0 * logits.grad).detach(), labels)
    assert ce_after > ce_before


# ------------------------------------------------------------------------------ losses from hidden states
H = 5


def _naive_logits(hidden, weight, bias, scale, softcap):
    """The head written out in float64, independent of OutputHead.logits."""
    z = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def _naive(kind, logits, labels, teacher_logits=None):
    """Float64 sum over scored positions of the per-position loss."""
    mask = _scored_mask(labels)
    log_p = torch.log_softmax(logits, dim=-1)
    if kind == "ce":
        targets = torch.cat([labels[:, 1:], torch.zeros(labels.shape[0], 1, dtype=labels.dtype)], 1).clamp(min=0)
        per = -log_p.gather(-1, targets[..., None])[..., 0]
    elif kind == "maxent":
        per = -math.log(logits.shape[-1]) - log_p.mean(-1)
    else:
        log_q = torch.log_softmax(teacher_logits, dim=-1)
        per = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (per * mask).sum()


@pytest.mark.parametrize("kind", ["ce", "maxent", "kl"])
@pytest.mark.parametrize("softcap,scale,with_bias", [(None, 1.0, False), (3.0, 1.0, False), (2.5, 0.7, True)])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_losses_from_hidden_states_match_full_logits(kind, softcap, scale, with_bias, chunk_size):
    g = torch.Generator().manual_seed(11)
    _, _, labels = _batch()
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    head = OutputHead(weight, bias, scale, softcap)
    t_hidden, t_weight = torch.randn(B, T, 3, generator=g), torch.randn(V, 3, generator=g)  # another hidden size
    teacher = HiddenStates(t_hidden, OutputHead(t_weight, None, 1.0, softcap))
    divisor = 7.5
    fn = {"ce": causal_lm_loss, "maxent": maxent_loss, "kl": lambda o, l, **k: forward_kl(o, teacher, l, **k)}[kind]
    loss = fn(HiddenStates(hidden, head), labels, chunk_size=chunk_size, divisor=divisor)
    (2.0 * loss).backward()

    ref_params = [p.detach().double().requires_grad_(True) for p in (hidden, weight) + ((bias,) if with_bias else ())]
    ref_logits = _naive_logits(ref_params[0], ref_params[1], ref_params[2] if with_bias else None, scale, softcap)
    ref = _naive(kind, ref_logits, labels, _naive_logits(t_hidden, t_weight, None, 1.0, softcap)) / divisor
    (2.0 * ref).backward()

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip((hidden, weight, bias), ref_params):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(hidden.grad[:, -1] == 0) and torch.all(hidden.grad[0, 2] == 0)  # unscored positions


def test_token_nll_and_default_divisor_is_the_number_of_scored_tokens():
    student, _, labels = _batch(seed=5)
    n = int(_scored_mask(labels).sum())
    nll, count = token_nll(student, labels)
    assert int(count) == n == int(scored_tokens(labels))
    assert nll.item() == pytest.approx(_naive("ce", student.double(), labels).item(), rel=1e-5)
    assert causal_lm_loss(student, labels).item() == pytest.approx(nll.item() / n, rel=1e-6)


def test_hidden_state_losses_equal_the_models_logits_on_a_gemma2_model():
    """The stages' path (decoder hidden states + head, soft-capped) gives the loss and parameter gradients of the
    model's own logits."""
    from undo_lightning.data.tokenizers import build_arithmetic_tokenizer
    from undo_lightning.models import build_model

    tokenizer = build_arithmetic_tokenizer()
    student, teacher = build_model("gemma2-micro", tokenizer, seed=0), build_model("gemma2-micro", tokenizer, seed=1)
    assert student.config.final_logit_softcapping  # the case that matters: Gemma-2's cap
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=g)
    labels = ids.clone()
    labels[1, 5:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    grads = []
    for use_hidden in (False, True):
        student.zero_grad()
        if use_hidden:
            out, t_out = lm_hidden_states(student, ids, mask), lm_hidden_states(teacher, ids, mask)
        else:
            out = student(input_ids=ids, attention_mask=mask).logits
            t_out = teacher(input_ids=ids, attention_mask=mask).logits
        loss = causal_lm_loss(out, labels) + maxent_loss(out, labels) + forward_kl(out, t_out, labels)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_that_is_not_the_models_is_refused():
    from undo_lightning.data.tokenizers import build_arithmetic_tokenizer
    from undo_lightning.models import build_model

    model = build_model("gemma2-micro", build_arithmetic_tokenizer(), seed=0)
    model.config.final_logit_softcapping = 1.0  # what OutputHead reads; the model itself keeps its cap of 30
    original = model.forward

    def forward(*args, **kwargs):  # a model that post-processes its logits in a way the head does not know
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = forward
    with pytest.raises(ValueError, match="Gemma2ForCausalLM: its logits are not"):
        OutputHead.of(model)


# ------------------------------------------------------------------------------ NPO and SimNPO
def _slow_sequence_nll(logits, labels):
    """Float64 per-row summed NLL over scored positions, written out position by position."""
    out = []
    for b in range(labels.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE_INDEX:
                total = total - torch.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("hidden_states", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_npo_and_simnpo_match_the_papers_formulas_in_value_and_gradient(hidden_states, chunk_size):
    g = torch.Generator().manual_seed(3)
    student, teacher, labels = _batch(seed=9)
    labels[2, :] = IGNORE_INDEX  # a row without scored tokens: left out of the mean
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    logits = student.clone().requires_grad_(True)
    outputs = HiddenStates(hidden, OutputHead(weight, None, 1.0, 3.0)) if hidden_states else logits
    ref_nll = _slow_sequence_nll(teacher.double(), labels).float()
    beta, gamma = 0.7, 0.4
    n = torch.tensor([float(int((labels[b, 1:] != IGNORE_INDEX).sum())) for b in range(B)], dtype=torch.float64)

    for kind in ("npo", "simnpo"):
        leaves = [hidden, weight] if hidden_states else [logits]
        for leaf in leaves:
            leaf.grad = None
        if kind == "npo":
            loss = npo_loss(outputs, labels, ref_nll, beta, chunk_size=chunk_size)
        else:
            loss = simnpo_loss(outputs, labels, beta, gamma, chunk_size=chunk_size)
        loss.backward()

        ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
        ref_logits = _naive_logits(ref_leaves[0], ref_leaves[1], None, 1.0, 3.0) if hidden_states else ref_leaves[0]
        s = _slow_sequence_nll(ref_logits, labels)
        # NPO: -(2/beta) log sigmoid(-beta log(p / p_ref)); SimNPO: -(2/beta) log sigmoid(-(beta / |y|) log p - gamma)
        log_ratio = -s + ref_nll.double()
        inner = -beta * log_ratio if kind == "npo" else -(beta / n.clamp(min=1)) * (-s) - gamma
        per_row = -(2.0 / beta) * torch.nn.functional.logsigmoid(inner)
        ref = per_row[:2].mean()  # row 2 scores nothing
        ref.backward()

        assert loss.item() == pytest.approx(ref.item(), rel=1e-5), kind
        for got, want in zip(leaves, ref_leaves):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6, msg=kind)
    assert torch.equal(sequence_nll(outputs, labels)[2], torch.tensor(0.0))


def test_npo_is_log_4_over_beta_at_the_reference_and_vanishes_once_forgotten():
    student, _, labels = _batch(seed=4)
    nll = sequence_nll(student, labels)
    beta = 0.5
    # at the reference itself every row's log-ratio is 0: (2 / beta) softplus(0) = (2 / beta) ln 2
    assert npo_loss(student, labels, nll, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    assert npo_loss(student, labels, nll - 200.0, beta).item() < 1e-30  # far less likely than the reference


@pytest.mark.parametrize("call, message", [
    (lambda s, l: npo_loss(s, l, torch.zeros(B), 0.0), r"beta=0.0: NPO's inverse temperature must be > 0"),
    (lambda s, l: simnpo_loss(s, l, -1.0), r"beta=-1.0: SimNPO's inverse temperature must be > 0"),
    (lambda s, l: simnpo_loss(s, l, 1.0, gamma=-0.5), r"gamma=-0.5: SimNPO's reward margin must be >= 0"),
])
def test_npo_and_simnpo_refuse_bad_settings(call, message):
    student, _, labels = _batch()
    with pytest.raises(ValueError, match=message):
        call(student, labels)
