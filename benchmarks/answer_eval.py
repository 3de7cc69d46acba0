"""Batched greedy answer evaluation vs one-prompt-at-a-time ``model.generate`` (same model, same prompts).

    python benchmarks/answer_eval.py [--model runs/arithmetic/reference/hf] [--prompts 100]

Prints wall time of each, the speed-up (goal >= 10x) and both accuracies, which must be identical.
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
    default = "runs/arithmetic/reference/hf"
    parser.add_argument("--model", default=default if os.path.isdir(default) else "gemma2-tiny")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per set (8 sets)")
    args = parser.parse_args()
    dm = RetainForgetDataModule(eval_prompts_per_set=args.prompts, eval_batch_size=512)
    dm.setup()
    model = build_model(args.model, dm.tokenizer).eval()
    items = [item for set_items in dm.eval_sets.values() for item in set_items]
    # Per-set answers have different lengths, so a set is batched on its own (as in validation, batches group sets)
    start = time.perf_counter()
    batched = []
    with torch.no_grad():
        for batch in dm.val_dataloader()[-1]:
            batched += answer_correct(model, dm.tokenizer, batch)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        slow = one_by_one(model, dm.tokenizer, items)
    t_slow = time.perf_counter() - start
    print(f"model={args.model}, {len(items)} prompts")
    print(f"batched (left padding, KV cache): {t_batched:7.2f} s   accuracy {sum(batched) / len(items):.4f}")
    print(f"one prompt at a time            : {t_slow:7.2f} s   accuracy {sum(slow) / len(items):.4f}")
    print(f"speed-up = {t_slow / t_batched:.1f}x (goal >= 10x); identical per-prompt results: {batched == slow}")


if __name__ == "__main__":
    main()
