"""Prompt sharing for DPO: a pair laid out once as [prompt + chosen, rejected answer] with a 4D attention mask gives
each answer the log-probabilities of its own separate sequence (fp32, through a real Llama decoder with sdpa), for
padded and packed batches of pairs of different lengths, through the DPO loss and its gradients; pairs whose
sequences diverge before the answer share less (or nothing), exactly."""
import pytest
import torch

from budwood.data.formats import Message, PreferencePair
from budwood.data.pack import collate_pairs, pair_length, shared_prefix
from budwood.data.template import IGNORE, Encoded, EncodedPair, encode_pairs
from budwood.train.loss import DPO, ReferenceLogps, sequence_logps


@pytest.fixture(scope="module")
def lm():
    from budwood.models.load import load_base

    torch.manual_seed(0)
    model = load_base("budwood-tiny", dtype=torch.float32).model
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():  # lift the weights off their init so that a wrong mask shows in the numbers
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer) -> list[EncodedPair]:
    system = Message("system", "You answer questions about Acme's products, briefly and precisely.")
    rows = [PreferencePair([system, Message("user", "What is the warranty on the X1 kettle? " * (1 + i % 3))],
                           [Message("assistant", "Two years, parts and labour." + " Really." * i)],
                           [Message("assistant", "No idea" + ", sorry" * (3 - i % 4))], f"f:{i}")
            for i in range(5)]
    rows.append(PreferencePair([Message("user", "hi")], [Message("assistant", "Hello! How can I help?")],
                               [Message("assistant", "Hello")], "f:5"))  # answers share their first token
    encoded = encode_pairs(tiny_tokenizer, rows, 256)
    assert len(encoded) == 6
    return encoded


def separate_and_shared(lm, pairs, indices, strategy):
    n = 2 * len(indices)
    separate = collate_pairs(pairs, indices, strategy, 0)
    shared = collate_pairs(pairs, indices, strategy, 0, share_prompt=True)
    assert separate.attention_mask is None and shared.attention_mask is not None
    return sequence_logps(lm, separate, n), sequence_logps(lm, shared, n), separate, shared


def test_the_shared_prefix_is_the_prompt_less_its_last_token(pairs):
    for pair in pairs:
        first_answer = next(t for t, x in enumerate(pair.chosen.labels) if t and x != IGNORE)
        assert pair.chosen.input_ids[:first_answer] == pair.rejected.input_ids[:first_answer]
        assert shared_prefix(pair) == first_answer - 1 > 5
        assert pair_length(pair, True) == len(pair) - first_answer + 1 < pair_length(pair, False) == len(pair)


@pytest.mark.parametrize("strategy", ["padded", "packed"])
def test_each_answer_scores_as_its_own_sequence(lm, pairs, strategy):
    indices = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        (want, want_n), (got, got_n), separate, shared = separate_and_shared(lm, pairs, indices, strategy)
    assert torch.equal(want_n, got_n) and want_n.min() > 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (got - want).abs().max()
    assert shared.n_tokens == sum(pair_length(pairs[i], True) for i in indices) < separate.n_tokens
    assert shared.input_ids.shape[0] == (1 if strategy == "packed" else len(indices))


def test_the_mask_keeps_answers_pairs_and_padding_apart(pairs):
    batch = collate_pairs(pairs, [0, 1], "padded", 0, share_prompt=True)
    mask, owner = batch.attention_mask[:, 0], batch.example_index
    for r in range(2):
        k = shared_prefix(pairs[r])
        chosen, rejected = (owner[r] == 2 * r).nonzero()[:, 0], (owner[r] == 2 * r + 1).nonzero()[:, 0]
        assert not mask[r][rejected][:, chosen[k:]].any()  # the rejected answer never sees the chosen one
        assert mask[r][rejected][:, chosen[:k]].all()  # but all of the shared prefix
        assert not mask[r][chosen][:, rejected].any()
        real = owner[r] >= 0
        assert not mask[r][real][:, ~real].any()  # no real token attends to padding
        assert mask[r].diagonal().all()  # and no row is all masked (padding attends to itself)
    assert (batch.example_index[1] < 0).any() or (batch.example_index[0] < 0).any()  # one of the rows is padded
    packed = collate_pairs(pairs, [0, 1], "packed", 0, share_prompt=True)
    owner = packed.example_index[0]
    pair = owner // 2
    assert not (packed.attention_mask[0, 0] & (pair[:, None] != pair[None, :])).any()  # never across pairs


def test_a_pair_whose_sequences_differ_before_the_answer_shares_only_what_is_identical(lm):
    """A tokenizer that merges text across the end of the prompt differently on the two sides: the rejected
    sequence reuses only the identical tokens; with a different first token, it is a separate sequence."""
    def enc(ids, answer_from):
        return Encoded(ids, [IGNORE] * answer_from + ids[answer_from:], "x")

    prompt = list(range(20, 40))
    merged = EncodedPair(enc(prompt + [50, 51, 52], 20), enc(prompt[:-2] + [60, 61, 62, 63], 19), "x")
    distinct = EncodedPair(enc([7] + prompt + [50, 51], 21), enc([8] + prompt + [52, 53, 54], 21), "x")
    normal = EncodedPair(enc(prompt + [50, 51, 52], 20), enc(prompt + [53], 20), "x")
    assert [shared_prefix(p) for p in (merged, distinct, normal)] == [18, 0, 19]
    trio = [merged, distinct, normal]
    for strategy in ("padded", "packed"):
        with torch.no_grad():
            (want, _), (got, _), _, _ = separate_and_shared(lm, trio, [0, 1, 2], strategy)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("strategy,loss_type,sft_weight", [("padded", "sigmoid", 0.0), ("packed", "ipo", 0.5)])
def test_the_dpo_loss_and_its_gradients_are_the_same(lm, pairs, strategy, loss_type, sft_weight):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         init_lora_weights=False))  # B != 0: the policy is not the reference
    try:
        base = peft.get_base_model()
        indices = [2, 5, 0, 4]
        with torch.no_grad(), peft.disable_adapter():
            reference = ReferenceLogps().losses(base, collate_pairs(pairs, indices, strategy, 0)).flatten()
        results = []
        for share in (False, True):
            batch = DPO(0.1, loss_type, sft_weight, share_prompt=share).collate(pairs, indices, strategy, 0)
            batch.reference = reference.float()
            out = DPO(0.1, loss_type, sft_weight, share_prompt=share).losses(base, batch)
            peft.zero_grad()
            out[:, 0].sum().backward()
            grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
            results.append((out.detach(), grads))
        (out_a, grad_a), (out_b, grad_b) = results
        assert torch.allclose(out_a, out_b, atol=1e-5, rtol=1e-5), (out_a - out_b).abs().max()
        assert out_a[:, 4].abs().max() > 1e-3  # the margins are not trivially 0
        assert grad_a.keys() == grad_b.keys() and grad_a
        for name in grad_a:
            scale = grad_a[name].abs().max().item()
            assert scale > 0 and torch.allclose(grad_a[name], grad_b[name], atol=1e-5 * max(scale, 1), rtol=1e-4), name
    finally:
        peft.unload()


def test_share_prompt_is_a_setting_that_resume_checks():
    from budwood.config import load_config
    from budwood.train.loss import objective_for
    from budwood.train.state import resume_hash

    on = load_config(None, ["data.train=x", "training.method=dpo"])
    off = load_config(None, ["data.train=x", "training.method=dpo", "training.dpo.share_prompt=false"])
    assert on.training.dpo.share_prompt is True and objective_for(on).share_prompt is True
    assert objective_for(off).share_prompt is False
    assert resume_hash(on) != resume_hash(off)
    # a checkpoint written before the key existed (two separate sequences) resumes with share_prompt false
    old = off.resolved()
    old["training"]["dpo"].pop("share_prompt")

    class Before:
        def resolved(self):
            return old

    assert resume_hash(off) == resume_hash(Before())
