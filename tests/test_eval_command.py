"""``undo eval``: multiple-choice accuracy and retain/forget CE of a saved model folder, checked against independent
computations, and clear one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from undo_lightning.data.bpe import train_bpe_tokenizer
from undo_lightning.data.mcq import build_prompt, load_mcq
from undo_lightning.data.text import TextSource
from undo_lightning.data.tokenizers import load_tokenizer
from undo_lightning.eval.command import MCQ_PRESETS, eval_command, evaluate_model, parse_mcq
from undo_lightning.eval.mcq import mcq_accuracy
from undo_lightning.models import build_model, export_model

FIXTURES = Path(__file__).parent / "fixtures"
CYBER, MMLU = str(FIXTURES / "wmdp" / "wmdp_cyber.jsonl"), str(FIXTURES / "wmdp" / "mmlu_test.jsonl")
ENGLISH, KOREAN = str(FIXTURES / "language" / "english.jsonl"), str(FIXTURES / "language" / "korean.jsonl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    texts = TextSource(ENGLISH).corpus() + TextSource(KOREAN).corpus()
    texts += [build_prompt(r, [r]) for f in (CYBER, MMLU) for r in load_mcq(f)] * 3
    tok = train_bpe_tokenizer(texts, vocab_size=500)
    return export_model(build_model("gemma2-micro", tok, seed=6), tok, str(tmp_path_factory.mktemp("m") / "hf"))


@pytest.fixture
def offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _independent_ce(folder: str, path: str, block_size: int) -> float:
    """All documents, each after a <bos>, concatenated and cut into full blocks; one forward; token-mean CE."""
    tok, model = load_tokenizer(folder), build_model(folder)
    stream = []
    for doc in TextSource(path).corpus():
        stream += [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
    n = len(stream) // block_size
    ids = torch.tensor(stream[: n * block_size]).view(n, block_size)
    with torch.no_grad():
        logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1)).item()


def test_eval_matches_independent_accuracy_and_ce(folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = eval_command(folder, mcq=[f"cyber={CYBER}", MMLU], k_shot=1, limit=3, retain=ENGLISH, forget=KOREAN,
                          block_size=32, batch_size=3, output=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "cyber" in printed and "mmlu_test" in printed and "forget_ce" in printed
    model, tok = build_model(folder), load_tokenizer(folder)
    cyber = mcq_accuracy(model, tok, load_mcq(CYBER)[:3], k_shot=1)
    mmlu_records = load_mcq(MMLU)
    mmlu_records = [r for r in mmlu_records if r.subject == "astronomy"][:3] + \
        [r for r in mmlu_records if r.subject == "high_school_geography"][:3]
    mmlu = mcq_accuracy(model, tok, mmlu_records, k_shot=1)  # examples from the set itself, same subject first
    assert result["mcq"]["cyber"]["n"] == 3 and result["mcq"]["mmlu_test"]["n"] == 6
    assert result["mcq"]["cyber"]["accuracy"] == cyber["accuracy"]
    assert result["mcq"]["mmlu_test"]["accuracy"] == mmlu["accuracy"]
    for side, path in (("retain", ENGLISH), ("forget", KOREAN)):
        assert result["ce"][side]["ce"] == pytest.approx(_independent_ce(folder, path, 32), rel=1e-5)
    assert result["ce"]["forget"]["tokens"] % 31 == 0  # 31 scored positions per 32-token block


def test_fewshot_examples_from_a_separate_file(folder):
    """lm-eval's MMLU takes its solved examples from the dev split, not from the evaluated questions."""
    model, tok = build_model(folder, load_tokenizer(folder)), load_tokenizer(folder)
    dev = str(FIXTURES / "wmdp" / "mmlu_dev.jsonl")
    result = evaluate_model(folder, mcq=f"mmlu={MMLU}", k_shot=2, fewshot=dev)["mcq"]["mmlu"]
    expected = mcq_accuracy(model, tok, load_mcq(MMLU), k_shot=2, fewshot_records=load_mcq(dev))
    assert (result["correct"], result["n"]) == (expected["correct"], expected["n"])
    from undo_lightning.data.mcq import mcq_prompts

    records = load_mcq(MMLU)
    assert mcq_prompts(records, 2, load_mcq(dev)) != mcq_prompts(records, 2)  # the examples really differ


def test_parse_mcq():
    assert parse_mcq("mmlu") == ("mmlu", MCQ_PRESETS["mmlu"])
    assert MCQ_PRESETS["mmlu"].k_shot == 5 and MCQ_PRESETS["mmlu"].fewshot == "dev"
    name, spec = parse_mcq("bio=cais/wmdp:wmdp-bio")
    assert (name, spec.path, spec.name, spec.split, spec.k_shot) == ("bio", "cais/wmdp", "wmdp-bio", "test", 0)
    name, spec = parse_mcq("cais/mmlu:college_biology:validation")
    assert (name, spec.name, spec.split) == ("college_biology", "college_biology", "validation")
    assert parse_mcq(CYBER)[0] == "wmdp_cyber"
    with pytest.raises(ValueError, match="expected \\[NAME=\\]SET"):
        parse_mcq("x=")
    with pytest.raises(ValueError, match="set name 'a b'"):
        parse_mcq(f"a b={CYBER}")


def test_bad_inputs_are_clear_errors(folder, tmp_path, offline):
    good = {"question": "Q?", "choices": ["a", "b"], "answer": 0}
    cases = {"missing.jsonl": {"question": "Q?", "answer": 0}, "range.jsonl": {**good, "answer": 5}}
    for name, record in cases.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in (good, record)) + "\n")
    with pytest.raises(ValueError, match=r"--mcq missing: .*missing\.jsonl:2: no field 'choices'"):
        evaluate_model(folder, mcq=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"range\.jsonl:2: answer index 5 is out of range for 2 choices"):
        evaluate_model(folder, mcq=str(tmp_path / "range.jsonl"))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="holds no non-empty documents"):
        evaluate_model(folder, retain=str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match=r"english\.jsonl:1: no field 'body'; the record has fields \['text'\]"):
        evaluate_model(folder, retain=ENGLISH, text_field="body")
    with pytest.raises(ValueError, match=r"--mcq wmdp-bio: path='cais/wmdp'.*pass a local path"):
        evaluate_model(folder, mcq="wmdp-bio")
    with pytest.raises(ValueError, match="Offline, pass a local folder"):
        evaluate_model("someone/not-a-cached-model", mcq=CYBER)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_model(folder)
    with pytest.raises(ValueError, match="fewer than one block"):
        evaluate_model(folder, retain=ENGLISH, block_size=100000)
    with pytest.raises(ValueError, match="two sets are named 'x'"):
        evaluate_model(folder, mcq=[f"x={CYBER}", f"x={MMLU}"])


def test_undo_eval_command_line(folder, tmp_path, monkeypatch, capsys):
    from undo_lightning.cli import main

    out = tmp_path / "r.json"
    main(["eval", folder, "--mcq", f"c={CYBER}", "--limit", "2", "--output", str(out)])
    assert json.loads(out.read_text())["mcq"]["c"]["n"] == 2 and "\nc " in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"question": "Q?", "choices": ["a"], "answer": 0}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a one-line message on stderr, no stack trace
        main(["eval", folder, "--mcq", f"[{tmp_path / 'bad.jsonl'}]"])
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert exit_info.value.code == 2
    assert message.startswith("undo eval: error: --mcq bad:") and "bad.jsonl:1: 1 choice(s)" in message


def test_lm_nll_from_hidden_states_equals_the_models_logits(folder, monkeypatch):
    """Validation CE never runs the LM head on a whole batch ([B, T, V] logits) and equals the CE of the logits."""
    import undo_lightning.eval.metrics as evaluation
    from undo_lightning.losses import token_nll

    model = build_model(folder)
    ids = torch.randint(3, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 4:9] = -100
    with torch.no_grad():
        nll, n = token_nll(model(ids).logits, labels)
    head_inputs = []
    original_head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda h: head_inputs.append(tuple(h.shape)) or original_head(h))
    hidden_nll, hidden_n = evaluation.lm_nll(model, ids, torch.ones_like(ids), labels)
    assert int(hidden_n) == int(n) == 5 * 15 - 5
    # the model's forward asks for the last position's logits only; else the head's one-off check on a tiny input
    assert head_inputs and all(shape[:2] == (5, 1) or shape[0] == 1 for shape in head_inputs), head_inputs
    torch.testing.assert_close(hidden_nll, nll, rtol=1e-5, atol=1e-4)
