import re

import pytest

from undo_lightning.data.arithmetic import ArithmeticSource, Problem, make_problem
from undo_lightning.data.templates import HELDOUT_TEMPLATES, TRAIN_TEMPLATES

OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a // b}


def _all_ops_source(**kw):
    return ArithmeticSource(("add", "sub", "mul", "div"), train_documents=2000, val_documents=200, **kw)


def test_every_answer_is_right():
    src = _all_ops_source()
    for p in src.problems("train", seed=3) + src.problems("val", seed=3):
        a, b = p.operands
        assert p.answer == OPS[p.op](a, b)
        if p.op == "div":
            assert a == p.answer * b and b >= 1  # exact division
        if p.op == "sub":
            assert p.answer >= 0
        if p.form == "equation":
            lhs, rhs = p.text.split(" = ")
            x, sym, y = lhs.split(" ")
            assert (int(x), int(y), int(rhs)) == (a, b, p.answer)
        else:
            assert f" {p.answer}" in p.text and str(a) in p.prompt and str(b) in p.prompt


def test_operand_ranges_respected():
    src = ArithmeticSource(("add", "mul"), train_documents=3000, add_sub_range=(3, 7), mul_div_range=(2, 4))
    for p in src.problems("train", 0):
        lo, hi = (3, 7) if p.op == "add" else (2, 4)
        assert all(lo <= x <= hi for x in p.operands)


def test_retain_and_forget_are_disjoint():
    retain = ArithmeticSource(("add", "sub"), train_documents=3000)
    forget = ArithmeticSource(("mul", "div"), train_documents=3000)
    r, f = retain.problems("train", 0), forget.problems("train", 0)
    assert {p.op for p in r} == {"add", "sub"} and {p.op for p in f} == {"mul", "div"}
    assert not any(re.search(r"\d [*/] \d", p.text) for p in r)
    assert not {p.text for p in r} & {p.text for p in f}


def _template_regex(template: str) -> re.Pattern:
    """The template with every placeholder as a wildcard: matches exactly the texts rendered from it."""
    parts = re.split(r"\{[a-z0-9]+\}", template)
    return re.compile("^" + "(.+?)".join(re.escape(p) for p in parts), re.IGNORECASE)


def test_heldout_templates_never_appear_in_training_documents():
    src = _all_ops_source(word_problem_fraction=1.0)
    train_docs = src.documents("train", 0) + src.documents("val", 0)
    eval_prompts = [item.prompt for items in src.eval_sets(0, 200).values() for item in items]
    for op, templates in HELDOUT_TEMPLATES.items():
        for prompt, _ in templates:
            pattern = _template_regex(prompt)
            assert not any(pattern.match(doc) for doc in train_docs), (op, prompt)
            assert any(pattern.match(p) for p in eval_prompts), (op, prompt)  # ...but evaluation uses them
    train_prompts = {p for ts in TRAIN_TEMPLATES.values() for p, _ in ts}
    assert not train_prompts & {p for ts in HELDOUT_TEMPLATES.values() for p, _ in ts}


def test_generation_is_deterministic_and_seeded():
    src = _all_ops_source()
    assert src.documents("train", 7) == src.documents("train", 7)
    assert src.documents("train", 7) != src.documents("train", 8)
    assert src.documents("train", 7) != src.documents("val", 7)
    assert src.eval_sets(7, 20) == src.eval_sets(7, 20)


def test_eval_sets_per_operation_and_form():
    sets = _all_ops_source().eval_sets(0, 10)
    assert sorted(sets) == sorted(f"{op}_{form}" for op in OPS for form in ("equation", "word_problem"))
    assert all(len(v) == 10 for v in sets.values())
    for item in sets["mul_equation"]:
        a, _, b, _ = item.prompt.split(" ")
        assert int(item.answer) == int(a) * int(b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(operations=("add", "pow")), "pow"),
    (dict(operations=()), "operations"),
    (dict(operations=("div",), mul_div_range=(0, 5)), "division impossible"),
    (dict(operations=("add",), add_sub_range=(9, 3)), "add_sub_range"),
    (dict(operations=("add",), train_documents=0), "empty split"),
    (dict(operations=("add",), word_problem_fraction=1.5), "word_problem_fraction"),
    (dict(operations=("mul",), eval_fact_fraction=1.0), "eval_fact_fraction=1.0"),
])
def test_bad_input_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticSource(**kwargs)


def test_make_problem_heldout_uses_heldout_templates():
    import random

    for seed in range(20):
        p = make_problem("add", "word_problem", random.Random(seed), heldout=True)
        assert any(_template_regex(t).match(p.prompt) for t, _ in HELDOUT_TEMPLATES["add"])
        assert not any(_template_regex(t).match(p.prompt) for t, _ in TRAIN_TEMPLATES["add"])


def test_eval_forms_selects_the_evaluated_sets():
    sets = ArithmeticSource(("mul", "div"), eval_forms=["equation"]).eval_sets(0, 5)
    assert sorted(sets) == ["div_equation", "mul_equation"]
    with pytest.raises(ValueError, match="eval_forms"):
        ArithmeticSource(("mul",), eval_forms=["essay"])


SYMBOL_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


def test_eval_fact_fraction_keeps_evaluated_facts_out_of_every_document():
    source = ArithmeticSource(("mul", "div"), train_documents=3000, val_documents=300, eval_fact_fraction=0.5,
                              mul_div_range=(1, 20))
    evaluated = set()
    for name, items in source.eval_sets(seed=3, n_per_set=60).items():
        for item in items:
            if name.endswith("equation"):
                a, symbol, b = re.fullmatch(r"(\d+) (\S) (\d+) =", item.prompt).groups()
                evaluated.add((SYMBOL_OPS[symbol], (int(a), int(b))))
    assert len(evaluated) > 60
    seen = {(p.op, p.operands) for split in ("train", "val") for p in source.problems(split, seed=3)}
    assert len(seen) > 300 and not seen & evaluated  # word problems included: the fact, not the wording, is held out
    # the split is a fixed function of the fact: another seed holds out the same facts
    facts = [(op, (a * b, b) if op == "div" else (a, b)) for op in ("mul", "div") for a in range(1, 21)
             for b in range(1, 21)]
    held = {(op, ops) for op, ops in facts if source.is_eval_fact(Problem(op, "equation", "", 0, operands=ops))}
    assert evaluated <= held and not {(p.op, p.operands) for p in source.problems("train", seed=4)} & held
    assert 0.4 < len(held) / 800 < 0.6
    # without the option nothing is held out and the documents are those of a plain source
    plain = ArithmeticSource(("mul", "div"), train_documents=3000, val_documents=300, mul_div_range=(1, 20))
    assert plain.documents("train", 3) != source.documents("train", 3)
    assert plain.documents("train", 3) == ArithmeticSource(("mul", "div"), train_documents=3000, val_documents=300,
                                                           mul_div_range=(1, 20), eval_fact_fraction=None
                                                           ).documents("train", 3)


def test_trained_eval_sets_score_the_facts_the_documents_hold():
    source = ArithmeticSource(("mul", "div"), train_documents=3000, val_documents=300, eval_fact_fraction=0.5,
                              mul_div_range=(1, 20), word_problem_fraction=0.0, eval_forms=("equation",))

    def facts(sets):
        out = set()
        for items in sets.values():
            for item in items:
                a, symbol, b = re.fullmatch(r"(\d+) (\S) (\d+) =", item.prompt).groups()
                assert int(item.answer) == (int(a) * int(b) if symbol == "*" else int(a) // int(b))
                out.add((SYMBOL_OPS[symbol], (int(a), int(b))))
        return out

    trained_sets = source.trained_eval_sets(seed=3, n_per_set=60)
    assert set(trained_sets) == set(source.eval_sets(seed=3, n_per_set=60)) == {"mul_equation", "div_equation"}
    trained, held = facts(trained_sets), facts(source.eval_sets(seed=3, n_per_set=60))
    documented = {(p.op, p.operands) for p in source.problems("train", seed=3)}
    assert len(trained) > 60 and not trained & held
    assert trained <= documented  # 3000 documents cover every training-side fact of 1..20
    assert not any(source.is_eval_fact(Problem(op, "equation", "", 0, operands=ops)) for op, ops in trained)
    # without held-out facts every evaluated fact is trained: no second set
    assert ArithmeticSource(("mul",), train_documents=5).trained_eval_sets(seed=3, n_per_set=10) == {}


def test_an_empty_side_of_the_fact_split_is_a_clear_error():
    # one multiplication fact (1 * 1): it is either held out or not, so one side of the split has no fact at all
    source = ArithmeticSource(("mul",), mul_div_range=(1, 1), eval_fact_fraction=0.5, train_documents=5)
    side = "training" if source.is_eval_fact(Problem("mul", "equation", "", 1, operands=(1, 1))) else "held-out"
    with pytest.raises(ValueError, match=f"no {side} .*fact in 10000 draws"):
        source.documents("train", 0) if side == "training" else source.eval_sets(0, 2)
