"""Multiple-choice scoring: record validation, the lm-eval prompt format, and batched log-likelihoods checked against a
slow one-sequence-at-a-time reference on a tiny random Gemma-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import undo_lightning.eval.mcq as mcq
from undo_lightning.data.bpe import train_bpe_tokenizer
from undo_lightning.data.mcq import MCQRecord, build_prompt, load_mcq, select_fewshot, validate_record
from undo_lightning.data.text import TextSource
from undo_lightning.eval.mcq import loglikelihoods, mcq_accuracy

FIXTURES = Path(__file__).parent / "fixtures"
MCQ_FILE = FIXTURES / "mcq_wmdp.jsonl"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def records() -> list[MCQRecord]:
    return load_mcq(str(MCQ_FILE))


@pytest.fixture(scope="module")
def tok(records):
    # Solved prompts teach the merges " A".." D", so every choice is one token as with Gemma's tokenizer.
    texts = TextSource(str(FIXTURES / "english.txt")).corpus() + [build_prompt(r) for r in records]
    texts += [build_prompt(records[0], [r]) for r in records] + [f"Answer: {letter}" for letter in "ABCD"] * 5
    return train_bpe_tokenizer(texts, vocab_size=420)


@pytest.fixture(scope="module")
def model(tok):
    # This seed gives varied predictions at 0 and 1 shots; many random tiny models predict the same letter for every
    # question, which would let a scoring bug pass unnoticed.
    torch.manual_seed(5)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       sliding_window=512, initializer_range=0.05, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def slow_loglik(model, tok, context: str, continuation: str, bos: bool = True) -> float:
    """Reference: one unpadded sequence per (context, choice), full logits, lm-eval's context/continuation split."""
    prefix = [tok.bos_token_id] if bos else []
    ctx = prefix + tok(context, add_special_tokens=False)["input_ids"]
    cont = (prefix + tok(context + continuation, add_special_tokens=False)["input_ids"])[len(ctx):]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def slow_accuracy(model, tok, records, k_shot=0, bos=True):
    preds, lls = [], []
    for i, rec in enumerate(records):
        shots = [r for j, r in enumerate(records) if j != i][:k_shot]
        context = build_prompt(rec, shots, subject="biology")
        ll = [slow_loglik(model, tok, context, " " + "ABCD"[c], bos) for c in range(len(rec.choices))]
        lls.append(ll)
        preds.append(max(range(len(ll)), key=lambda c: ll[c]))
    acc = sum(p == r.answer for p, r in zip(preds, records)) / len(records)
    return acc, preds, lls


# -------------------------------------------------------------------------------------------------- validation
def test_load_fixture(records):
    assert len(records) == 10
    assert records[2].question.endswith("energy?  ") and records[2].answer == 2
    assert records[0].choices == ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium")
    assert load_mcq(str(MCQ_FILE), subject="biology")[0].subject == "biology"


@pytest.mark.parametrize("record, match", [
    ({"question": "q", "choices": ["a", "b"]}, r"bad\.jsonl:3: no field 'answer'; the record has fields "
                                                r"\['choices', 'question'\]"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}, r"bad\.jsonl:3: answer index 4 is out of "
                                                                      r"range for 4 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, r"bad\.jsonl:3: answer index -1"),
    ({"question": "q", "choices": ["only"], "answer": 0}, r"bad\.jsonl:3: 1 choice\(s\)"),
    ({"question": "q", "choices": ["a", "b"], "answer": "B"}, r"bad\.jsonl:3: 'answer' is 'B'"),
    ({"question": "q", "choices": ["a", 2], "answer": 0}, r"bad\.jsonl:3: 'choices' must be a list of strings"),
    ({"question": None, "choices": ["a", "b"], "answer": 0}, r"bad\.jsonl:3: 'question' is NoneType"),
])
def test_invalid_record_names_the_line(tmp_path, record, match):
    good = {"question": "fine", "choices": ["x", "y"], "answer": 1}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, record)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_mcq(str(path))


def test_parquet_and_hub_offline(tmp_path, monkeypatch, records):
    import datasets
    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [r.question for r in records], "choices": [list(r.choices) for r in records],
                             "answer": [r.answer for r in records]}), tmp_path / "m.parquet")
    assert load_mcq(str(tmp_path / "m.parquet")) == records
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="pass a local path"):
        load_mcq("cais/wmdp", name="wmdp-bio")


# ------------------------------------------------------------------------------------------------------ prompts
Q1 = MCQRecord("  What is 2 + 2? ", ("3", "4", "5", "22"), 1)
Q2 = MCQRecord("Pick the colour of the sky.", ("Green", " Blue", "Red", "Black"), 1)


def test_zero_shot_prompt_matches_lm_eval_format():
    expected = ("The following are multiple choice questions (with answers) about biology.\n\n"
                "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert build_prompt(Q1, subject="biology") == expected
    assert build_prompt(Q1) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"  # no subject: no description


def test_one_shot_prompt_matches_lm_eval_format():
    expected = ("The following are multiple choice questions (with answers) about college biology.\n\n"
                "Pick the colour of the sky.\nA. Green\nB.  Blue\nC. Red\nD. Black\nAnswer: B\n\n"
                "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    mmlu_q1 = MCQRecord(Q1.question, Q1.choices, Q1.answer, subject="college_biology")
    assert build_prompt(mmlu_q1, [Q2]) == expected  # MMLU subject: underscores shown as spaces
    assert build_prompt(mmlu_q1, [Q2], subject="").startswith("Pick the colour")


def test_fewshot_selection_is_deterministic(records):
    assert select_fewshot(0, records, 2) == records[1:3]  # never the question itself
    assert select_fewshot(3, records, 2) == records[0:2]
    pool = [MCQRecord("p", ("a", "b"), 0, "x"), MCQRecord("q", ("a", "b"), 0, "y"), MCQRecord("r", ("a", "b"), 1, "y")]
    target = [MCQRecord("t", ("a", "b"), 0, "y")]
    assert select_fewshot(0, target, 2, pool) == pool[1:]  # same subject first (MMLU dev split)
    with pytest.raises(ValueError, match="k_shot=3 but only 2"):
        select_fewshot(0, target, 3, pool[1:])


# ------------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("k_shot", [0, 1])
def test_batched_accuracy_equals_slow_reference(model, tok, records, k_shot):
    ref_acc, ref_preds, ref_lls = slow_accuracy(model, tok, records, k_shot)
    out = mcq_accuracy(model, tok, records, k_shot=k_shot, batch_size=4, subject="biology", return_details=True)
    assert out["predictions"] == ref_preds
    assert out["accuracy"] == ref_acc and out["n"] == 10 and out["correct"] == round(ref_acc * 10)
    torch.testing.assert_close(torch.tensor(out["loglikelihoods"]), torch.tensor(ref_lls), atol=1e-4, rtol=1e-5)
    assert len(set(ref_preds)) > 1  # the random model is not trivially constant


def test_batch_size_invariance(model, tok, records):
    outs = [mcq_accuracy(model, tok, records, k_shot=1, batch_size=bs, return_details=True) for bs in (1, 3, 64)]
    assert outs[0]["predictions"] == outs[1]["predictions"] == outs[2]["predictions"]
    for other in outs[1:]:
        torch.testing.assert_close(torch.tensor(other["loglikelihoods"]), torch.tensor(outs[0]["loglikelihoods"]),
                                   atol=1e-4, rtol=1e-5)


def test_multi_token_continuations_and_mixed_lengths(model, tok, records):
    # Whole-answer continuations: different token counts and different rows within one padded batch.
    requests = [(build_prompt(r), " " + c) for r in records[:4] for c in r.choices]
    got = loglikelihoods(model, tok, requests, batch_size=5)
    ref = [slow_loglik(model, tok, c, x) for c, x in requests]
    assert max(len(tok(x, add_special_tokens=False)["input_ids"]) for _, x in requests) > 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-5)


def test_absolute_position_model(tok, records):
    # Gemma's rotary positions are shift-invariant, so only a model with absolute positions shows whether left
    # padding is given the right position ids.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                      initializer_range=0.2)).eval()
    requests = [(build_prompt(r, records[:i % 3]), " " + x) for i, r in enumerate(records[:6]) for x in "ABCD"]
    got = loglikelihoods(gpt2, tok, requests, batch_size=4)
    ref = [slow_loglik(gpt2, tok, c, x) for c, x in requests]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-5)


def test_without_bos(model, tok, records):
    _, ref_preds, ref_lls = slow_accuracy(model, tok, records[:5], bos=False)
    out = mcq_accuracy(model, tok, records[:5], subject="biology", add_bos=False, return_details=True)
    assert out["predictions"] == ref_preds
    torch.testing.assert_close(torch.tensor(out["loglikelihoods"]), torch.tensor(ref_lls), atol=1e-4, rtol=1e-5)


def test_default_bos_follows_the_tokenizer_as_lm_eval_does(model, tok, records):
    """add_bos=None prepends what the tokenizer prepends by default: <bos> for ours (as Gemma's), nothing for a
    tokenizer that adds no special tokens (as GPT-2's)."""
    import copy

    from tokenizers import processors

    from undo_lightning.eval.mcq import default_prefix

    assert default_prefix(tok) == [tok.bos_token_id]
    plain = copy.deepcopy(tok)
    plain._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    assert plain("x")["input_ids"] == plain("x", add_special_tokens=False)["input_ids"]  # the stand-in adds nothing
    assert default_prefix(plain) == []
    requests = [(build_prompt(r, []), " A") for r in records[:4]]
    assert loglikelihoods(model, plain, requests) == loglikelihoods(model, tok, requests, add_bos=False)
    assert loglikelihoods(model, tok, requests) == loglikelihoods(model, tok, requests, add_bos=True)
    assert loglikelihoods(model, tok, requests) != loglikelihoods(model, plain, requests)


def test_only_continuation_logits_are_materialised(model, tok, records, monkeypatch):
    shapes, calls = [], []
    original = mcq._gather_scores

    def spy(logits, *args):
        shapes.append(tuple(logits.shape))
        return original(logits, *args)

    def counting_log_softmax(x, dim):
        calls.append(tuple(x.shape))
        return torch.nn.functional.log_softmax(x, dim)

    monkeypatch.setattr(mcq, "_gather_scores", spy)
    monkeypatch.setattr(mcq, "_CHUNK_BYTES", 4 * 2 * len(tok))  # two rows per log-softmax chunk
    monkeypatch.setattr(mcq.torch, "log_softmax", counting_log_softmax)
    base = mcq_accuracy(model, tok, records, batch_size=5, return_details=True)
    # Single-token choices: one row per question and one kept position per row.
    assert shapes == [(5, 1, len(tok)), (5, 1, len(tok))]
    assert calls and all(c[0] <= 2 and c[1] == 1 for c in calls)
    monkeypatch.undo()
    torch.testing.assert_close(torch.tensor(base["loglikelihoods"]),
                               torch.tensor(mcq_accuracy(model, tok, records, return_details=True)["loglikelihoods"]))


def test_models_without_logits_to_keep(model, tok, records):
    class Plain(torch.nn.Module):  # a forward without logits_to_keep: full logits, sliced by the scorer
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    a = mcq_accuracy(model, tok, records, batch_size=4, return_details=True)
    b = mcq_accuracy(Plain(model), tok, records, batch_size=4, return_details=True)
    assert a["predictions"] == b["predictions"]
    torch.testing.assert_close(torch.tensor(a["loglikelihoods"]), torch.tensor(b["loglikelihoods"]))


def test_limit_and_raw_dicts(model, tok, records):
    raw = [{"question": r.question, "choices": list(r.choices), "answer": r.answer} for r in records]
    assert mcq_accuracy(model, tok, raw, limit=3)["n"] == 3
    assert mcq_accuracy(model, tok, raw, limit=0.25)["n"] == 3  # ceil(0.25 * 10), lm-eval's rule
    with pytest.raises(ValueError, match=r"records\[1\]: no field 'answer'"):
        mcq_accuracy(model, tok, [raw[0], {"question": "q", "choices": ["a", "b"]}])
    assert model.training is False


def test_validate_record_accepts_records():
    assert validate_record(Q1, "x") == Q1
