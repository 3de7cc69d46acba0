import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from undo_lightning.models import PRESETS, build_model, count_parameters, export_model


def test_presets_and_seeded_init(tokenizer):
    a, b = build_model("gemma2-micro", tokenizer, seed=3), build_model("gemma2-micro", tokenizer, seed=3)
    c = build_model("gemma2-micro", tokenizer, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    tiny = build_model("gemma2-tiny", tokenizer)
    assert 400_000 < count_parameters(tiny) < 700_000  # ~0.5 M, the CPU default
    assert tiny.config.vocab_size == len(tokenizer) and tiny.config.pad_token_id == tokenizer.pad_token_id
    assert {"gemma2-0.1b", "gemma2-0.3b"} <= set(PRESETS)


def test_paper_preset_sizes_match_the_spec():
    from undo_lightning.models import preset_config

    class FakeTok:  # the 256k Gemma vocabulary without downloading it
        pad_token_id, bos_token_id, eos_token_id = 0, 2, 1

        def __len__(self):
            return 256_000

    with torch.device("meta"):
        from transformers import Gemma2ForCausalLM

        for name, expected in (("gemma2-0.1b", 112.9e6), ("gemma2-0.3b", 328.8e6)):
            n = count_parameters(Gemma2ForCausalLM(preset_config(name, FakeTok())))
            assert abs(n - expected) / expected < 0.01, (name, n)


def test_bad_model_names(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="gemma2-tiny"):
        build_model("gemma2-huge", tokenizer)
    with pytest.raises(ValueError, match="no Hugging Face model folder"):
        build_model(str(tmp_path / "missing"), tokenizer)


def test_export_round_trip_gives_identical_logits(tokenizer, tmp_path):
    model = build_model("gemma2-micro", tokenizer, seed=0).eval()
    out = export_model(model, tokenizer, str(tmp_path / "stage" / "hf"))
    assert sorted(os.listdir(tmp_path / "stage")) == ["hf"]  # no temporary folder left behind
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["12 * 3 = 36", "Ava has 3 pens."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, loaded(**ids).logits)
    # exporting again replaces the folder whole
    export_model(build_model("gemma2-micro", tokenizer, seed=9), tokenizer, out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(again.model.embed_tokens.weight, loaded.model.embed_tokens.weight)
    assert sorted(os.listdir(tmp_path / "stage")) == ["hf"]


def test_loading_a_folder_checks_the_vocabulary(tokenizer, tmp_path):
    model = build_model("gemma2-micro", tokenizer)
    export_model(model, tokenizer, str(tmp_path / "hf"))
    assert count_parameters(build_model(str(tmp_path / "hf"), tokenizer)) == count_parameters(model)

    class Bigger:
        def __len__(self):
            return len(tokenizer) + 10

    with pytest.raises(ValueError, match="vocab_size"):
        build_model(str(tmp_path / "hf"), Bigger())
