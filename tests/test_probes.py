"""Quantisation probe and weight-space diagnostics: values against hand-derived ones, endpoints against the models'
own evaluations, reuse, and their report sections."""

import json
import math

import pytest
import torch
from conftest import small_datamodule
from test_report import make_run

import undo_lightning.experiment.probes as probes
from undo_lightning.experiment.probes import (
    barrier,
    interpolate_,
    interpolation_points,
    l2_distance,
    quantization_probe,
    validate_model,
    weight_probe,
)
from undo_lightning.experiment.report import write_report
from undo_lightning.models import build_model, export_model
from undo_lightning.quantize import quantize_model_


def test_barrier_by_hand():
    # CE (lower is better) 1 -> 3 -> 2 at t = 0, .5, 1: the line is 1.5 at the middle, the path 1.5 above it
    assert barrier([0, 0.5, 1], [1.0, 3.0, 2.0], higher_is_better=False) == pytest.approx(1.5)
    # accuracy .8 -> .2 -> .6: the line is .7 at the middle, the path .5 below it
    assert barrier([0, 0.5, 1], [0.8, 0.2, 0.6], higher_is_better=True) == pytest.approx(0.5)
    # a path better than its line everywhere has no barrier; two points never have one
    assert barrier([0, 0.5, 1], [2.0, 0.5, 2.0], higher_is_better=False) == 0.0
    assert barrier([0, 1], [5.0, 1.0], higher_is_better=False) == 0.0
    assert interpolation_points(5) == [0, 0.25, 0.5, 0.75, 1]
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"weights.points={bad!r}"):
            interpolation_points(bad)


def test_l2_distance_and_interpolation_by_hand():
    a = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([[4.0, 6.0]]), "b": torch.tensor([12.0])}
    assert l2_distance(a, b) == pytest.approx(math.sqrt(9 + 16 + 144))
    assert l2_distance(a, {"w": b["w"]}) is None  # another architecture: no distance
    model = torch.nn.Linear(2, 1)
    model.weight.data, model.bias.data = torch.zeros(1, 2), torch.zeros(1)
    named = {"weight": a["w"], "bias": a["b"]}, {"weight": b["w"], "bias": b["b"]}
    interpolate_(model, *named, 0.25)
    assert model.weight.tolist() == [[1.75, 3.0]] and model.bias.tolist() == [3.0]
    interpolate_(model, *named, 1.0)
    assert torch.equal(model.weight.data, b["w"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {name: export_model(build_model("gemma2-micro", tokenizer, seed=seed), tokenizer, str(root / name))
            for name, seed in (("reference", 1), ("unlearn", 2), ("student", 3))}


@pytest.fixture(scope="module")
def data(tokenizer):
    dm = small_datamodule(tokenizer, docs=100, prompts=4)
    dm.setup()
    return dm


def _load(path, tokenizer):
    return build_model(path, tokenizer).eval()


def test_weight_probe_endpoints_are_the_models_own_metrics(tmp_path, tokenizer, folders, data):
    ids = {name: f"id-{name}" for name in folders}
    result = weight_probe(tmp_path, folders, ids, data, teacher="unlearn", reference="reference", points=3)
    own = {name: validate_model(_load(path, tokenizer), data) for name, path in folders.items()}
    student = result["models"]["student"]
    for metric in ("val/forget_acc", "val/retain_acc", "val/forget_ce", "val/retain_ce"):
        assert student["path"][metric][0] == pytest.approx(own["unlearn"][metric], abs=1e-6)
        assert student["path"][metric][-1] == pytest.approx(own["student"][metric], abs=1e-6)
    # the middle point is the model with the averaged weights
    params = {n: {k: v.detach() for k, v in _load(p, tokenizer).named_parameters()} for n, p in folders.items()}
    middle = _load(folders["student"], tokenizer)
    with torch.no_grad():
        for name, p in middle.named_parameters():
            p.copy_((params["unlearn"][name] + params["student"][name]) / 2)
    assert student["path"]["val/retain_ce"][1] == pytest.approx(validate_model(middle, data)["val/retain_ce"], abs=1e-5)
    expected = math.sqrt(sum(float((params["student"][k].double() - params["reference"][k].double()).pow(2).sum())
                             for k in params["student"]))
    assert student["l2_to_reference"] == pytest.approx(expected, rel=1e-9)
    assert result["models"]["unlearn"]["l2_to_teacher"] == 0.0 and result["models"]["unlearn"]["path"] is None
    ce = student["path"]["val/retain_ce"]
    assert student["barrier"]["val/retain_ce"] == pytest.approx(max(0.0, ce[1] - (ce[0] + ce[2]) / 2))
    assert json.loads((tmp_path / "probes" / "weights.json").read_text())["models"].keys() == folders.keys()


def test_quantization_probe_values_and_reuse(tmp_path, tokenizer, folders, data, monkeypatch):
    ids = {name: f"id-{name}" for name in folders}
    models = {"unlearn": folders["unlearn"], "student": folders["student"]}
    result = quantization_probe(tmp_path, models, ids, data, bits=[4], group_size=16)
    for name, path in models.items():
        entry = result["models"][name]
        assert entry["full"] == pytest.approx(validate_model(_load(path, tokenizer), data))
        model = _load(path, tokenizer)
        info = quantize_model_(model, 4, 16)
        expected = validate_model(model, data)
        assert {k: v for k, v in entry["int4"].items() if k != "relative_error"} == pytest.approx(expected)
        assert entry["int4"]["relative_error"] == pytest.approx(info["relative_error"])
        assert entry["int4"]["val/retain_ce"] != entry["full"]["val/retain_ce"]  # 4 bits do change the model

    calls = []
    real = probes.validate_model
    monkeypatch.setattr(probes, "validate_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    quantization_probe(tmp_path, models, ids, data, bits=[4], group_size=16)
    assert calls == []  # same models, same settings: reused
    quantization_probe(tmp_path, models, {**ids, "student": "id-redone"}, data, bits=[4], group_size=16)
    assert len(calls) == 2  # only the changed model: full + int4
    with pytest.raises(ValueError, match="bits=3"):
        quantization_probe(tmp_path, models, ids, data, bits=[3], group_size=16)


def test_probe_sections_in_the_report(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "probes").mkdir()
    variants = {"teacher": (0.02, 0.40), "undo_a0.6": (0.03, 0.05)}  # forget acc: full, int4
    (run / "probes" / "quantize.json").write_text(json.dumps({
        "settings": {"bits": [4], "group_size": 64, "method": "rtn", "include_embeddings": False},
        "models": {name: {"record": "x", "full": {"val/forget_acc": full, "val/retain_acc": 0.9},
                          "int4": {"val/forget_acc": q, "val/retain_acc": 0.85, "relative_error": 0.1}}
                   for name, (full, q) in variants.items()}}))
    (run / "probes" / "weights.json").write_text(json.dumps({
        "settings": {"points": 3, "teacher": "teacher", "reference": "reference"},
        "models": {"undo_a0.6": {"record": "x", "l2_to_reference": 12.5, "l2_to_teacher": 7.25,
                                 "barrier": {"val/forget_acc": 0.0, "val/retain_acc": 0.125, "val/retain_ce": 0.5,
                                             "val/forget_ce": 0.0},
                                 "path": {"t": [0, 0.5, 1], "val/forget_acc": [0.02, 0.0, 0.03],
                                          "val/retain_acc": [0.93, 0.8, 0.92]}}}}))
    report = write_report(run, steps=[50, 200])
    assert report["probes"]["quantize"]["models"]["teacher"]["int4"]["forget"] == 0.4
    md = (run / "report.md").read_text()
    overview = md[md.index("## Worst case per attack"):md.index("## Quantisation probe")]
    # each attack setting's worst case at step 200 (forget: teacher .9, undo_a0.6 .5; retain: only the teacher
    # was attacked, 1.0) beside the quantised value
    assert "| teacher | 0.020 | 0.900 | 1.000 | 0.400 (int4) |" in overview
    assert "| undo_a0.6 | 0.030 | 0.500 | – | 0.050 (int4) |" in overview
    assert "| oracle | 0.050 | 0.300 | – | – |" in overview
    quant = md[md.index("## Quantisation probe"):md.index("## Weight space")]
    assert "| teacher | 0.020 | 0.400 | 0.900 | 0.850 | 0.1000 |" in quant
    weights = md[md.index("## Weight space"):]
    assert "| undo_a0.6 | 12.500 | 7.250 | 0.000 | 0.125 | 0.000 | 0.500 |" in weights
    assert (run / "weight_interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
