"""Preference data (DPO): OpenAI's and TRL's forms read into one pair, encoded, batched and checked."""
import json
import math

import pytest
import torch

from budwood.config import load_config
from budwood.data.formats import read_dataset
from budwood.data.pack import collate_pairs
from budwood.data.template import IGNORE, encode_pairs
from budwood.errors import DataError
from budwood.train.data import prepare_data
from budwood.train.loss import DPO, sequence_logps
from tests.conftest import write_jsonl

USER = {"role": "user", "content": "What is the return window?"}
GOOD = {"role": "assistant", "content": "30 days."}
BAD = {"role": "assistant", "content": "Forever."}


def _read(tmp_path, rows, **kw):
    return read_dataset(write_jsonl(tmp_path / "d.jsonl", rows), raise_errors=False, **kw)


@pytest.mark.parametrize("row,fmt", [
    ({"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]}, "openai_preference"),
    ({"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}, "trl_preference"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "trl_preference"),
    ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "trl_preference"),  # TRL's implicit prompt
])
def test_every_preference_form_reads_into_the_same_pair(tmp_path, row, fmt):
    ds = _read(tmp_path, [row])
    assert (ds.format, ds.kind, ds.errors) == (fmt, "preference", [])
    (pair,) = ds.pairs
    assert [(m.role, m.content) for m in pair.prompt] == [("user", USER["content"])]
    assert [m.content for m in pair.chosen] == ["30 days."] and [m.content for m in pair.rejected] == ["Forever."]
    assert pair.source.endswith("d.jsonl:1")


def test_trl_prompt_is_not_mistaken_for_prompt_completion(tmp_path):
    ds = _read(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "completion": "a"}])
    assert ds.format == "trl_preference"
    assert [i.code for i in ds.errors] == ["format_mismatch"] and ds.errors[0].line == 2


@pytest.mark.parametrize("row,code", [
    ({"input": {"messages": [USER]}, "preferred_output": [GOOD]}, "invalid_output"),
    ({"input": {"messages": [USER]}, "preferred_output": [USER], "non_preferred_output": [BAD]}, "invalid_output"),
    ({"input": {"messages": [USER, GOOD]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]},
     "prompt_ends_with_assistant"),
    ({"input": {"messages": [USER], "tools": []}, "preferred_output": [GOOD], "non_preferred_output": [BAD]},
     "unsupported_key"),
    ({"input": [USER], "preferred_output": [GOOD], "non_preferred_output": [BAD]}, "invalid_input"),
    ({"prompt": "q", "chosen": [GOOD], "rejected": "b"}, "mixed_forms"),
    ({"prompt": "q", "chosen": "a"}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "extra": 1, "weight": 2}, None),  # unknown keys: warnings
])
def test_bad_pairs_are_reported_by_line_and_code(tmp_path, row, code):
    ds = _read(tmp_path, [{"prompt": "fine", "chosen": "a", "rejected": "b"}, row]
               if "prompt" in row or "chosen" in row else
               [{"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]}, row])
    if code is None:
        assert not ds.errors and {i.code for i in ds.issues} == {"unknown_key"}
        return
    assert code in [i.code for i in ds.errors] and all(i.line == 2 for i in ds.errors)
    with pytest.raises(DataError, match=f"d.jsonl:2: {code}"):
        read_dataset(tmp_path / "d.jsonl")


def test_identical_answers_warn(tmp_path):
    ds = _read(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    assert not ds.errors and [i.code for i in ds.issues] == ["identical_answers"]


def test_pairs_encode_with_labels_on_the_answers_only(tiny_tokenizer):
    from budwood.data.formats import Message, PreferencePair

    pair = PreferencePair([Message("user", "q"), Message("assistant", "earlier"), Message("user", "again")],
                          [Message("assistant", "yes indeed")], [Message("assistant", "no")], "f:1")
    (enc,) = encode_pairs(tiny_tokenizer, [pair], 256)
    for side, text in ((enc.chosen, "yes indeed"), (enc.rejected, "no")):
        trained = tiny_tokenizer.decode([t for t, lab in zip(side.input_ids, side.labels) if lab != IGNORE])
        assert trained.startswith(text) and "earlier" not in trained
    assert len(enc) == len(enc.chosen) + len(enc.rejected)
    batch = collate_pairs([enc, enc], [1, 0], "padded", 0)
    assert batch.input_ids.shape[0] == 4 and batch.reference is None
    assert sorted(set(batch.example_index[batch.example_index >= 0].tolist())) == [0, 1, 2, 3]


def test_method_and_data_kind_must_agree(tmp_path, company_data, preference_data, tiny_tokenizer):
    sft_on_pairs = load_config(None, [f"data.train={preference_data['train']}"])
    with pytest.raises(DataError, match="preference data .*training.method is sft; set training.method=dpo"):
        prepare_data(sft_on_pairs, tiny_tokenizer)
    dpo_on_chat = load_config(None, [f"data.train={company_data['train']}", "training.method=dpo"])
    with pytest.raises(DataError, match="chat \\(SFT\\) data .*training.method is dpo; DPO needs preference pairs"):
        prepare_data(dpo_on_chat, tiny_tokenizer)
    data = prepare_data(load_config(None, [f"data.train={preference_data['train']}", "training.method=dpo"]),
                        tiny_tokenizer)
    assert data.fingerprints["train"]["format"] == "openai_preference" and len(data.train) > 10


def test_dpo_settings_need_the_dpo_method():
    from budwood.errors import ConfigError

    with pytest.raises(ConfigError, match="training.dpo is set but training.method is sft"):
        load_config(None, ["data.train=x", "training.dpo.beta=0.5"])
    cfg = load_config(None, ["data.train=x", "training.method=dpo", "training.dpo.loss_type=ipo"])
    assert (cfg.training.dpo.beta, cfg.training.dpo.loss_type) == (0.1, "ipo")
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(None, ["data.train=x", "training.method=dpo", "training.dpo.loss_type=hinge2"])


class _ToyLM(torch.nn.Module):
    """Embedding -> output head: enough of a causal LM for token_losses."""

    def __init__(self, vocab: int = 600):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)
        self.config = type("C", (), {})()

    def get_decoder(self):
        embed = self.embed

        class _Dec(torch.nn.Module):
            def forward(self, input_ids, position_ids=None, use_cache=False):
                return type("O", (), {"last_hidden_state": embed(input_ids)})()
        return _Dec()

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_dpo_loss_is_the_papers_formula(tiny_tokenizer, loss_type, sft_weight):
    from budwood.data.formats import Message, PreferencePair

    pairs = [PreferencePair([Message("user", f"question {i}")], [Message("assistant", "a good answer" * (i + 1))],
                            [Message("assistant", "bad")], f"f:{i}") for i in range(3)]
    enc = encode_pairs(tiny_tokenizer, pairs, 256)
    lm = _ToyLM(len(tiny_tokenizer))
    batch = collate_pairs(enc, [0, 1, 2], "padded", 0)
    logps, counts = (t.detach() for t in sequence_logps(lm, batch, 6))
    ref = logps + torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5, 0.0])  # a reference the policy has moved from
    batch.reference = ref
    beta = 0.2
    out = DPO(beta, loss_type, sft_weight).losses(lm, batch)
    pol, rf = (logps / counts, ref / counts) if loss_type == "ipo" else (logps, ref)
    for k in range(3):
        margin = (pol[2 * k] - rf[2 * k]) - (pol[2 * k + 1] - rf[2 * k + 1])
        sigmoid = -math.log(1 / (1 + math.exp(-beta * margin)))
        expected = (margin - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else sigmoid
        expected += sft_weight * (-logps[2 * k] / counts[2 * k])
        assert out[k, 0].item() == pytest.approx(float(expected), rel=1e-5)
        assert out[k, 4].item() == pytest.approx(beta * float(margin), rel=1e-5)  # rewards/margins
    out[:, 1:].sum().backward(retain_graph=True)  # the statistics carry no gradient
    assert all(p.grad is None or not p.grad.any() for p in lm.parameters())
    out[:, 0].sum().backward()
    assert lm.head.weight.grad.abs().sum() > 0


def test_data_check_reports_pairs(preference_data):
    from typer.testing import CliRunner

    from budwood.cli import app

    result = CliRunner().invoke(app, ["data", "check", str(preference_data["train"])])
    assert result.exit_code == 0, result.output
    assert "format openai_preference" in result.output and "preference pairs (for training.method dpo)" in result.output
    assert json.loads(preference_data["train"].read_text().splitlines()[0])["preferred_output"]


def test_sft_reports_the_share_of_trained_tokens_that_are_the_models_argmax():
    """mean_token_accuracy (TRL's SFTTrainer and OpenAI's job metrics): per trained token, argmax == target."""
    from budwood.data.pack import Batch
    from budwood.train.loss import SFT

    lm = _ToyLM()
    ids = torch.tensor([[5, 9, 11, 7, 3, 2]])
    labels = torch.tensor([[-100, -100, 11, 7, 3, -100]])
    batch = Batch(ids, labels, None, torch.zeros_like(ids), 6)
    out = SFT().losses(lm, batch)
    logits = lm.head(lm.embed(ids))[0, 1:4]
    expected = (logits.argmax(-1) == torch.tensor([11, 7, 3])).float()
    assert out.shape == (3, 2) and torch.equal(out[:, 1], expected)
    assert torch.allclose(out[:, 0], torch.nn.functional.cross_entropy(logits, torch.tensor([11, 7, 3]),
                                                                      reduction="none"))
    lm.head.bias.data[:] = -1e4  # make target 7 the argmax of every position: exactly one of the three is right
    lm.head.bias.data[7] = 1e4
    assert SFT().losses(lm, batch)[:, 1].tolist() == [0.0, 1.0, 0.0]
