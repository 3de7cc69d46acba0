"""Answer scoring three ways on the same model and prompts: one teacher-forced pass (validation's default with the
arithmetic tokenizer), batched greedy ``generate`` (left padding, KV cache), and one prompt at a time.

    python benchmarks/answer_eval.py [--model runs/arithmetic-quick/reference/hf] [--prompts 100]

Prints the wall time of each, the speed-ups (goals: one-pass >= 5x batched, >= 100x one prompt at a time) and the
accuracies, which must be identical prompt by prompt.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from undo_lightning import RetainForgetDataModule
from undo_lightning.eval.metrics import answer_correct, answer_matches, parse_answer
from undo_lightning.models import build_model


def one_by_one(model, tokenizer, items) -> list[bool]:
    specials = tokenizer.all_special_tokens
    out = []
    for item in items:
        ids = tokenizer(item.prompt, return_tensors="pt")["input_ids"]
        n_new = len(tokenizer(" " + item.answer, add_special_tokens=False)["input_ids"]) + 1
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
        out.append(answer_matches(parse_answer(text, specials), item.answer))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "runs/arithmetic-quick/reference/hf"
    parser.add_argument("--model", default=default if os.path.isdir(default) else "gemma2-tiny")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per set (8 sets)")
    args = parser.parse_args()
    dm = RetainForgetDataModule(eval_prompts_per_set=args.prompts, eval_batch_size=512)
    dm.setup()
    model = build_model(args.model, dm.tokenizer).eval()
    items = [item for set_items in dm.eval_sets.values() for item in set_items]
    batches = list(dm.val_dataloader()[-1])  # the validation batches (sets grouped as in validation)
    results, times = {}, {}
    with torch.no_grad():
        for name, one_pass in (("one pass", True), ("batched generate", False)):
            start = time.perf_counter()
            results[name] = [ok for batch in batches for ok in answer_correct(model, dm.tokenizer, batch, one_pass)]
            times[name] = time.perf_counter() - start
        start = time.perf_counter()
        results["one prompt at a time"] = one_by_one(model, dm.tokenizer, items)
        times["one prompt at a time"] = time.perf_counter() - start
    print(f"model={args.model}, {len(items)} prompts, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name:22s}: {t:8.3f} s   accuracy {sum(results[name]) / len(items):.4f}")
    print(f"one pass vs batched generate: {times['batched generate'] / times['one pass']:.1f}x (goal >= 5x); "
          f"vs one prompt at a time: {times['one prompt at a time'] / times['one pass']:.1f}x (goal >= 100x)")
    same = results["one pass"] == results["batched generate"] == results["one prompt at a time"]
    print(f"identical per-prompt results: {same}")


if __name__ == "__main__":
    main()
