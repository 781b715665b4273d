"""Packing is exact: an example's loss does not depend on what shares its row or batch."""
import pytest
import torch

from budwood.data.formats import read_dataset
from budwood.data.pack import collate, plan_epoch
from budwood.data.template import IGNORE, encode_conversations
from budwood.models.load import load_base
from budwood.train.loss import token_losses


@pytest.fixture(scope="module")
def model_and_examples(company_data):
    base = load_base("budwood-tiny", dtype=torch.float32)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # random (non-zero) LoRA weights, so the adapter path is exercised too
    model = get_peft_model(base.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    ds = read_dataset(company_data["train"])
    examples = encode_conversations(base.tokenizer, ds.conversations[:24], 256)
    return model.get_base_model(), examples, base.tokenizer.pad_token_id


def _per_example(lm, examples, plan, strategy, pad_id):
    sums = {}
    with torch.no_grad():
        for indices in plan:
            losses, owner = token_losses(lm, collate(examples, indices, strategy, pad_id))
            for i in indices:
                sums[i] = losses[owner == i].sum().item()
    return sums


def test_packed_and_padded_losses_equal_unpacked_in_fp32(model_and_examples):
    lm, examples, pad_id = model_and_examples
    n = len(examples)
    alone = _per_example(lm, examples, [[i] for i in range(n)], "padded", pad_id)
    packed_plan = plan_epoch([len(e) for e in examples], "packed", 8, 300, seed=1, epoch=0)
    assert any(len(b) > 2 for b in packed_plan), "rows must really hold several examples"
    packed = _per_example(lm, examples, packed_plan, "packed", pad_id)
    padded = _per_example(lm, examples, plan_epoch([len(e) for e in examples], "padded", 6, None, 1, 0),
                          "padded", pad_id)
    for i in range(n):
        assert packed[i] == pytest.approx(alone[i], abs=1e-5 * max(1, abs(alone[i])))
        assert padded[i] == pytest.approx(alone[i], abs=1e-5 * max(1, abs(alone[i])))


def test_packed_rows_restart_positions_and_mask_example_starts(model_and_examples):
    _, examples, pad_id = model_and_examples
    batch = collate(examples, [0, 1, 2], "packed", pad_id)
    lengths = [len(examples[i]) for i in range(3)]
    assert batch.input_ids.shape == (1, sum(lengths))
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert [int(batch.position_ids[0, s]) for s in starts] == [0, 0, 0]
    assert all(int(batch.labels[0, s]) == IGNORE for s in starts)


@pytest.mark.parametrize("strategy", ["padded", "packed"])
def test_every_example_once_per_epoch_and_plans_are_deterministic(strategy):
    lengths = [((i * 37) % 300) + 20 for i in range(200)]
    plan = plan_epoch(lengths, strategy, 8, 1024, seed=3, epoch=2)
    assert sorted(i for b in plan for i in b) == list(range(200))
    assert plan == plan_epoch(lengths, strategy, 8, 1024, seed=3, epoch=2)
    assert plan != plan_epoch(lengths, strategy, 8, 1024, seed=3, epoch=3)
    for b in plan:
        if strategy == "packed":
            assert sum(lengths[i] for i in b) <= 1024
        else:
            assert len(b) <= 8 and max(lengths[i] for i in b) * len(b) <= 1024 or len(b) == 1


def test_padded_batches_group_similar_lengths():
    lengths = list(range(20, 1020, 5))
    plan = plan_epoch(lengths, "padded", 8, None, seed=0, epoch=0)
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)
    assert padding / sum(lengths) < 0.05
