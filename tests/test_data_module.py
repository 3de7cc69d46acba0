import numpy as np
import pytest
import torch
from conftest import small_datamodule

from undo_lightning import ArithmeticSource, RetainForgetDataModule
from undo_lightning.data.module import StepSampler, pack_documents


def test_pack_documents_by_hand():
    blocks = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12]], block_size=4, separator_id=2)
    # stream: 2 5 6 7 | 2 8 2 9 | 10 11 12 (tail dropped); long documents continue into the next block
    assert blocks.tolist() == [[2, 5, 6, 7], [2, 8, 2, 9]]
    assert pack_documents([[1]], 4, 2).shape == (0, 4)


def test_mixture_probabilities_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to 0.9"):
        RetainForgetDataModule(mixture={"retain": 0.5, "forget": 0.4})
    with pytest.raises(ValueError, match="keys must be"):
        RetainForgetDataModule(mixture={"retain": 0.5, "other": 0.5})


def _has_forget_ops(tokenizer, blocks: torch.Tensor) -> float:
    ops = {tokenizer.convert_tokens_to_ids(t) for t in ("▁*", "▁/")}
    return sum(int(t) in ops for t in blocks.flatten()) / blocks.numel()


def test_oracle_mixture_has_no_forget_data(tokenizer):
    oracle = small_datamodule(tokenizer, mixture={"retain": 1.0})
    reference = small_datamodule(tokenizer, mixture={"retain": 0.5, "forget": 0.5})
    assert _has_forget_ops(tokenizer, oracle.train_blocks("mixture")) == 0.0
    assert _has_forget_ops(tokenizer, reference.train_blocks("mixture")) > 0.0
    assert _has_forget_ops(tokenizer, reference.train_blocks("retain")) == 0.0


def test_mixture_respects_probabilities(tokenizer):
    dm = small_datamodule(tokenizer, docs=4000, mixture={"retain": 0.8, "forget": 0.2})
    dm.setup()
    docs, is_forget = dm._mixture_docs()
    forget = {tuple(d) for d in dm._docs[("forget", "train")]}
    assert is_forget == [tuple(d) in forget for d in docs]  # the flags name each document's split
    share = sum(is_forget) / len(docs)
    assert 0.17 < share < 0.23


def test_forget_tokens_per_block_and_in_mixture_batches(tokenizer):
    from undo_lightning.data.module import forget_tokens_per_block, pack_documents

    docs = [np.arange(n) for n in (3, 7, 2, 9, 4)]
    flags = [False, True, True, False, True]
    # slow reference: the packed stream token by token, each token (separator included) labelled by its document
    labels = [f for doc, f in zip(docs, flags) for _ in range(len(doc) + 1)]
    blocks = pack_documents(docs, 5, separator_id=99)
    expected = [sum(labels[i * 5:(i + 1) * 5]) for i in range(blocks.shape[0])]
    assert forget_tokens_per_block(docs, flags, 5).tolist() == expected == [1, 5, 5, 0, 0, 5]
    # the mixture loader's batches carry each row's forget-token count
    dm = small_datamodule(tokenizer, mixture={"retain": 0.5, "forget": 0.5})
    dm.trainer = _FakeTrainer("mixture")
    batch = next(iter(dm.train_dataloader()))
    assert batch["forget_tokens"].shape == (batch["input_ids"].shape[0],)
    assert 0 < int(batch["forget_tokens"].sum()) < batch["input_ids"].numel()
    dm.trainer = _FakeTrainer("forget")
    assert "forget_tokens" not in next(iter(dm.train_dataloader()))


class _FakeModule:
    def __init__(self, kind):
        self.train_data = kind


class _FakeTrainer:
    global_step, accumulate_grad_batches, global_rank, world_size = 0, 1, 0, 1

    def __init__(self, kind):
        self.lightning_module = _FakeModule(kind)


def test_loaders_tag_their_split(tokenizer):
    dm = small_datamodule(tokenizer)
    dm.trainer = _FakeTrainer("paired")
    paired = dm.train_dataloader()
    assert set(paired) == {"forget", "retain"}
    assert next(iter(paired["forget"]))["split"] == "forget" and next(iter(paired["retain"]))["split"] == "retain"
    assert len(paired["forget"]) == len(paired["retain"])  # same epoch length keeps resume exact
    dm.trainer = _FakeTrainer("forget")
    batch = next(iter(dm.train_dataloader()))
    assert batch["split"] == "forget" and batch["input_ids"].shape == (8, 32)
    assert _has_forget_ops(tokenizer, batch["input_ids"]) > 0
    dm.trainer = _FakeTrainer("nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        dm.train_dataloader()


def test_step_sampler_batch_is_a_function_of_step_and_rank():
    def order(start, rank=0, world=1, n=4):
        s = StepSampler(50, 5, n, seed=3, start_batch=lambda: start, rank_world=lambda: (rank, world))
        return list(s)

    full = order(0, n=12)
    assert order(4, n=8) == full[20:]  # resuming at batch 4 continues exactly where a full run is
    assert sorted(full[:10]) == sorted(set(full[:10]))  # within an epoch no sample repeats
    r0, r1 = order(0, 0, 2), order(0, 1, 2)
    assert not set(r0[:5]) & set(r1[:5]) and r0 != order(0, 0, 1)


def test_validation_loaders(tokenizer):
    dm = small_datamodule(tokenizer)
    dm.setup()
    retain, forget, prompts = dm.val_dataloader()
    assert next(iter(retain))["split"] == "retain" and next(iter(forget))["split"] == "forget"
    batch = next(iter(prompts))
    assert batch["kind"] == "answer" and len(batch["answers"]) == batch["input_ids"].shape[0]
    lengths = batch["attention_mask"].sum(1)
    assert (lengths < batch["attention_mask"].shape[1]).any()
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    assert set(dm.eval_set_split.values()) == {"retain", "forget"} and len(dm.eval_set_split) == 8


def test_held_out_facts_add_trained_sets_on_a_side_of_their_own(tokenizer):
    dm = small_datamodule(tokenizer)
    dm.forget.eval_fact_fraction = 0.5
    dm.setup()
    trained = {n: s for n, s in dm.eval_set_split.items() if s == "forget_trained"}
    assert set(trained) == {f"{n}_trained" for n, s in dm.eval_set_split.items() if s == "forget"}
    sets = dm.forget.trained_eval_sets(dm.seed, dm.eval_prompts_per_set)
    assert all(dm.eval_sets[n] == sets[n.removesuffix("_trained")] for n in trained)
    assert not set(trained) & set(dm.eval_set_group)  # no group: they never join val/forget_<group>_acc


def test_empty_or_too_small_split_is_a_clear_error(tokenizer):
    class Empty(ArithmeticSource):
        def documents(self, split, seed):
            return [] if split == "train" else super().documents(split, seed)

    dm = small_datamodule(tokenizer)
    dm.forget = Empty(("mul",), train_documents=5)
    with pytest.raises(ValueError, match="forget source has an empty train split"):
        dm.setup()
    dm = small_datamodule(tokenizer, block_size=100_000)
    with pytest.raises(ValueError, match="block_size=100000"):
        dm.setup()


def test_same_seed_same_blocks(tokenizer):
    a, b = small_datamodule(tokenizer, seed=1), small_datamodule(tokenizer, seed=1)
    assert torch.equal(a.train_blocks("mixture"), b.train_blocks("mixture"))
    assert not torch.equal(a.train_blocks("mixture"), small_datamodule(tokenizer, seed=2).train_blocks("mixture"))


def test_order_seed_reorders_the_same_documents_and_keeps_the_prompts(tokenizer):
    base, other = small_datamodule(tokenizer, seed=1), small_datamodule(tokenizer, seed=1, order_seed=7)
    for dm in (base, other):
        dm.setup()
    assert base.eval_sets == other.eval_sets
    assert all(base._docs[key] is not None and [d.tolist() for d in base._docs[key]] ==
               [d.tolist() for d in other._docs[key]] for key in base._docs)
    assert torch.equal(base.train_blocks("forget"), other.train_blocks("forget"))  # the attack's blocks
    a, b = base.train_blocks("mixture"), other.train_blocks("mixture")  # the same documents, mixed otherwise
    assert not torch.equal(a, b)
    assert torch.equal(a, small_datamodule(tokenizer, seed=1, order_seed=1).train_blocks("mixture"))


def test_resuming_with_another_data_order_is_refused(tokenizer):
    state = small_datamodule(tokenizer, seed=1).state_dict()
    small_datamodule(tokenizer, seed=1, order_seed=1).load_state_dict(state)  # the same order: accepted
    with pytest.raises(ValueError, match="order_seed=2"):
        small_datamodule(tokenizer, seed=1, order_seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        small_datamodule(tokenizer, seed=3).load_state_dict(state)


def test_few_shot_forget_data_is_the_chosen_documents_repeated(tokenizer):
    """The few-shot attack's data: exactly ``few_shot`` forget documents (chosen by order_seed), repeated."""
    def stream(dm):
        dm.setup()
        return dm.train_blocks("forget").flatten().tolist()

    full = small_datamodule(tokenizer, docs=100)
    full.setup()
    pool = [tuple(d.tolist()) for d in full._docs[("forget", "train")]]
    sep = full.separator_id
    for seed in (0, 1):
        dm = small_datamodule(tokenizer, docs=100, few_shot=3, order_seed=seed)
        tokens = stream(dm)
        assert len(tokens) >= dm.block_size * dm.batch_size  # one whole batch of blocks
        # cut the packed stream at separators: every whole document is one of 3 distinct training documents
        docs, current = [], []
        for t in tokens:
            if t == sep:
                docs.append(tuple(current))
                current = []
            else:
                current.append(t)
        whole = docs[1:]  # the first piece precedes the first separator
        assert set(whole) <= set(pool) and len(set(whole)) == 3
        if seed == 0:
            first = set(whole)
    assert set(whole) != first  # another attack seed holds other examples
    assert stream(small_datamodule(tokenizer, docs=100)) == full.train_blocks("forget").flatten().tolist()
    with pytest.raises(ValueError, match="few_shot=101: the forget split has only 100 training documents"):
        stream(small_datamodule(tokenizer, docs=100, few_shot=101))
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ValueError, match=f"few_shot={bad!r}"):
            small_datamodule(tokenizer, few_shot=bad)
