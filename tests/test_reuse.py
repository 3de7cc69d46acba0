"""Records of what a result depends on: digests and the reasons the log gives for redoing a stage."""

from undo_lightning.experiment.reuse import computed_trainer, describe_change, digest, normalized, read_record, \
    write_record


def test_digest_ignores_key_order_and_sees_every_value():
    a = {"model": {"lr": 0.1, "seed": 0}, "steps": [0, 3]}
    assert digest(a) == digest({"steps": [0, 3], "model": {"seed": 0, "lr": 0.1}})
    assert digest(a) == digest({"model": {"lr": 0.1, "seed": 0}, "steps": (0, 3)})  # as read back from JSON
    assert digest(a) != digest({"model": {"lr": 0.1, "seed": 1}, "steps": [0, 3]})
    assert len(digest(a)) == 16 and int(digest(a), 16) >= 0


def test_describe_change_names_inputs_first_then_settings():
    old = {"model": {"lr": 0.1, "beta": 0.2}, "trainer": {"max_steps": 5}, "inputs": {"unlearn": "a", "oracle": "b"}}
    assert describe_change(None, old) == "no record of the settings it was made with"
    assert describe_change(old, {**old, "inputs": {"unlearn": "c", "oracle": "b"}}) == "its input unlearn changed"
    assert describe_change(old, {**old, "inputs": {"unlearn": "c", "oracle": "d"}}) == \
        "its inputs oracle, unlearn changed"
    new = {**old, "model": {"lr": 0.3, "beta": 0.2, "alpha": 0.5}, "trainer": {"max_steps": 6}}
    assert describe_change(old, new) == ("settings changed: model.alpha <unset> -> 0.5; model.lr 0.1 -> 0.3; "
                                         "trainer.max_steps 5 -> 6")
    assert describe_change(old, new, limit=1) == "settings changed: model.alpha <unset> -> 0.5 (and 2 more)"


def test_a_record_reads_back_equal_and_cosmetic_trainer_keys_are_left_out(tmp_path):
    record = {"trainer": computed_trainer({"max_steps": 5, "enable_progress_bar": True, "log_every_n_steps": 3}),
              "steps": (0, 3), "path": tmp_path}
    assert record["trainer"] == {"max_steps": 5}
    write_record(tmp_path / "r.json", record)
    assert read_record(tmp_path / "r.json") == normalized(record) == {"trainer": {"max_steps": 5}, "steps": [0, 3],
                                                                      "path": str(tmp_path)}
    (tmp_path / "bad.json").write_text("{trunc")
    assert read_record(tmp_path / "bad.json") is None and read_record(tmp_path / "none.json") is None
