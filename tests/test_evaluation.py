import math

import pytest
import torch
from conftest import small_datamodule

from undo_lightning.eval.metrics import ValidationMetrics, answer_correct, answer_matches, parse_answer
from undo_lightning.models import build_model


@pytest.mark.parametrize("text, answer, expected", [
    (" 42<bos>7", "42", True), (" 42 apples", "42", True), (" 17.0", "17", True), (" 17.", "17", True),
    (" 420", "42", False), (" 4", "42", False), ("<bos>", "42", False), (" apples", "42", False),
    (" 42", "forty-two", False), (" forty-two", "forty-two", True),  # text answers: no float() of the answer
])
def test_parse_and_match(text, answer, expected):
    assert answer_matches(parse_answer(text, ["<bos>", "<eos>", "<pad>"]), answer) is expected


def _slow_greedy_piece(model, tokenizer, prompt, n_new):
    """One prompt at a time, no padding: the reference the batched evaluator must equal."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    return parse_answer(text, tokenizer.all_special_tokens)


def test_batched_answers_equal_one_by_one_generation(tokenizer):
    torch.manual_seed(0)
    model = build_model("gemma2-micro", tokenizer, seed=1).eval()
    dm = small_datamodule(tokenizer, prompts=3)
    dm.setup()
    items = [(name, item) for name, items in dm.eval_sets.items() for item in items]
    # make every other answer right by construction (the model's own one-by-one output), the rest wrong
    answers, expected = [], []
    for i, (_, item) in enumerate(items):
        piece = _slow_greedy_piece(model, tokenizer, item.prompt, len(tokenizer(" " + item.answer,
                                                                               add_special_tokens=False)["input_ids"]) + 1)
        right = i % 2 == 0 and piece is not None
        answers.append(piece if right else "999999")
        expected.append(right)
    batch = dm._collate_prompts([(n, type(it)(it.prompt, a)) for (n, it), a in zip(items, answers)])
    # the batch may generate more tokens than a short answer needs; recompute the expectation for that length
    n_new = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
    expected = [a == _slow_greedy_piece(model, tokenizer, it.prompt, n_new) for (_, it), a in zip(items, answers)]
    assert sum(expected) >= len(items) // 4
    assert answer_correct(model, tokenizer, batch) == expected


def test_validation_metrics_by_hand():
    m = ValidationMetrics({"add_equation": "retain", "sub_equation": "retain", "mul_equation": "forget"})
    m.update_lm("retain", torch.tensor(6.0), torch.tensor(3))
    m.update_lm("retain", torch.tensor(2.0), torch.tensor(1))
    m.update_lm("forget", torch.tensor(9.0), torch.tensor(2))
    m.update_answers(["add_equation", "add_equation", "sub_equation", "mul_equation"], [True, False, True, False])
    out = m.compute()
    assert out["val/retain_ce"] == pytest.approx(8 / 4) and out["val/forget_ce"] == pytest.approx(4.5)
    assert out["val/add_equation_acc"] == 0.5 and out["val/sub_equation_acc"] == 1.0
    assert out["val/retain_acc"] == pytest.approx(0.75) and out["val/forget_acc"] == 0.0
    doubled = m.compute(lambda t: 2 * t)  # a cross-rank sum scales sums and counts alike
    assert all(math.isclose(doubled[k], out[k]) for k in out)
    m.reset()
    assert m.compute() == {}


def test_group_accuracies_are_unweighted_means_per_side_by_hand():
    split = {"add_equation": "retain", "add_word_problem": "retain", "mul_equation": "forget",
             "div_equation": "forget", "mul_word_problem": "forget"}
    groups = {name: name.split("_", 1)[1] for name in split}
    m = ValidationMetrics(split, eval_set_group=groups)
    m.update_answers(["mul_equation"] * 4 + ["div_equation"] * 2 + ["mul_word_problem"] * 2 + ["add_word_problem"],
                     [True, True, True, False] + [False, True] + [False, False] + [True])
    out = m.compute()
    assert out["val/forget_equation_acc"] == pytest.approx((0.75 + 0.5) / 2)  # per set first, then the mean
    assert out["val/forget_word_problem_acc"] == 0.0 and out["val/retain_word_problem_acc"] == 1.0
    assert "val/retain_equation_acc" not in out  # add_equation was never scored


def test_trained_sets_have_their_own_side_mean_outside_the_forget_accuracy_by_hand():
    split = {"mul_equation": "forget", "div_equation": "forget", "mul_equation_trained": "forget_trained",
             "div_equation_trained": "forget_trained", "add_equation": "retain"}
    m = ValidationMetrics(split, eval_set_group={"mul_equation": "equation", "div_equation": "equation"})
    m.update_answers(["mul_equation", "div_equation", "div_equation", "mul_equation_trained", "mul_equation_trained",
                      "div_equation_trained", "add_equation"], [False, True, False, True, True, False, True])
    out = m.compute()
    assert out["val/forget_acc"] == pytest.approx((0.0 + 0.5) / 2)  # the held-out sets only
    assert out["val/forget_equation_acc"] == out["val/forget_acc"]
    assert out["val/forget_trained_acc"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["val/mul_equation_trained_acc"] == 1.0 and out["val/retain_acc"] == 1.0
    assert "val/forget_trained_equation_acc" not in out  # trained sets carry no group


def test_mixture_keeps_each_components_set_groups_under_the_renamed_set_names():
    from undo_lightning import ArithmeticSource, MixtureSource

    a = ArithmeticSource(("mul",), train_documents=5, val_documents=2)
    b = ArithmeticSource(("mul", "div"), train_documents=5, val_documents=2, eval_forms=("equation",))
    mix = MixtureSource([a, b])
    assert set(mix.eval_groups()) == set(mix.eval_sets(0, 2))
    assert mix.eval_groups() == {"mul_equation": "equation", "mul_word_problem": "word_problem",
                                 "source1_mul_equation": "equation", "div_equation": "equation"}
