"""The leaf module: path rule, atomic writers, JSON-safe values, dotted-path imports and checked instantiation."""

from __future__ import annotations

import json
import math
from typing import Literal

import numpy as np
import pytest

from undo_lightning.io import (
    atomic_folder,
    atomic_write,
    check_choice,
    import_object,
    instantiate,
    is_local_path,
    json_safe,
    write_json_atomic,
)


@pytest.mark.parametrize("name, local", [
    ("gpt2", False), ("google/gemma-2-2b", False),  # hub ids: `name` or `owner/name`
    ("runs/x/hf", True), ("./model", True), ("/abs/model", True), ("~/model", True), ("data.jsonl", True),
])
def test_one_local_path_rule_for_models_tokenizers_and_data(name, local):
    assert is_local_path(name) is local


def test_models_and_tokenizers_agree_on_a_bare_hub_id(tmp_path):
    """Both treat `gpt2` as a hub id (offline: the same clear error), not one as a missing folder."""
    from undo_lightning.data.tokenizers import load_tokenizer
    from undo_lightning.models import build_model

    for load in (lambda: build_model("no-such-model-xyz"), lambda: load_tokenizer("no-such-model-xyz")):
        with pytest.raises(ValueError, match="Offline, pass a local folder"):
            load()


def test_json_safe_by_hand():
    data = {"a": float("nan"), "b": (1, np.float32(0.5)), "c": {2: np.int64(3), "d": -0.0000001}, "e": np.bool_(True)}
    assert json_safe(data) == {"a": None, "b": [1, 0.5], "c": {"2": 3, "d": -1e-7}, "e": True}
    rounded = json_safe({"x": 1 / 3, "y": -1e-9}, digits=3)
    assert rounded == {"x": 0.333, "y": -1e-9} and json.dumps(json_safe(-0.0001, digits=1)) == "-0.0001"
    assert math.copysign(1.0, json_safe(-0.0, digits=3)) == 1.0  # no "-0.0" in rounded output


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"v": 1})

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "hf"
    with atomic_folder(out) as tmp:
        (tmp_path / tmp / "a").write_text("1")  # tmp is an absolute, existing folder
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp_path / tmp / "b").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_import_object_and_its_errors():
    assert import_object("undo_lightning.io.json_safe") is json_safe
    for bad in ("json_safe", "undo_lightning.io.nope", "no_such_module.x"):
        with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
            import_object(bad)


def test_instantiate_checks_types_and_unknown_keys():
    from undo_lightning import ArithmeticSource, UnlearnModule

    module = instantiate(UnlearnModule, {"model": "gemma2-micro", "method": {"class_path": "undo_lightning.RMU",
                                                                             "init_args": {"layer": 0}}}, "unlearn")
    assert module.method.layer == 0
    # one line each: the key as the config spells it, the value, what is accepted
    for args, message in [
        ({"lrr": 0.1}, "unlearn: model.lrr: not an argument of UnlearnModule; arguments: ["),
        ({"methd": "maxent"}, "unlearn: model.methd: not an argument of UnlearnModule (did you mean 'method'?)"),
        ({"optimizer": {"lrr": 1}}, "unlearn: UnlearnModule: model.optimizer.lrr: not an argument"),
        ({"method": "forget-harder"},
         "unlearn: UnlearnModule: model.method=forget-harder: expected a UnlearningMethod class_path or 'graddiff', "
         "'maxent', 'npo', 'simnpo', 'rmu'"),
        ({"method": {"class_path": "undo_lightning.RMU", "init_args": {"layr": 1}}},
         "unlearn: UnlearnModule: model.method: undo_lightning.RMU: init_args.layr is not an argument"),
        ({"method": {"class_path": "undo_lightning.RMU", "init_args": {"layer": "x"}}},
         "unlearn: UnlearnModule: model.method: undo_lightning.RMU: init_args.layer: Expected a int. Got value: x"),
    ]:
        with pytest.raises(ValueError) as err:
            instantiate(UnlearnModule, args, "unlearn")
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="train_documents"):
        instantiate(ArithmeticSource, {"train_documents": "many"}, "retain")


def test_check_choice_names_the_value_and_the_choices():
    check_choice("schedule", "cosine", Literal["cosine", "constant"])
    with pytest.raises(ValueError, match=r"schedule='linear': expected one of 'cosine', 'constant'"):
        check_choice("schedule", "linear", Literal["cosine", "constant"])
    with pytest.raises(ValueError, match=r"mode='up': expected one of 'max', 'min'"):
        check_choice("mode", "up", ("max", "min"))


def test_union_reasons_keep_the_alternatives_own_errors():
    from undo_lightning.io import union_reasons

    text = ("Does not validate against any of the Union subtypes\nSubtypes: [<class 'X'>, typing.Literal['a']]\n"
            "Errors:\n  - beta=0.0: must be > 0\n  - Expected a typing.Literal['a']\nGiven value type: <class 'N'>\n"
            "Given value: Namespace(beta=0.0)")
    assert union_reasons(text) == "beta=0.0: must be > 0"
    only_types = text.replace("  - beta=0.0: must be > 0\n", "")
    assert union_reasons(only_types) == "Expected a typing.Literal['a']"
    assert union_reasons("plain message") == "plain message"
