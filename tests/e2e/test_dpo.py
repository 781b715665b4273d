"""DPO in the one training recipe: ln 2 at the first step, TRL's statistics, packed = padded, exact resume from a
checkpoint (the reference log-probabilities kept with it), init_adapter (SFT continues it, DPO's reference is it),
and torchrun DDP training what one process does."""
import json
import math
import shutil

import pytest
from safetensors.torch import load_file

from budwood.config import load_config
from budwood.errors import ConfigError
from budwood.train.checkpoint import list_checkpoints
from budwood.train.recipe import train
from tests.conftest import torchrun, torchrun_config

COLUMNS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_config(data: dict, out, *more: str):
    return load_config(None, [f"data.train={data['train']}", f"data.validation={data['validation']}",
                              "training.method=dpo", "training.max_steps=12", "training.batch_size=8",
                              "training.learning_rate=1e-3", "training.precision=fp32", "training.compile=false",
                              "training.warmup_steps=0", "training.save_every=4", "training.eval_every=6",
                              "training.keep_checkpoints=5", "training.max_seq_len=256", "lora.r=8", "lora.alpha=16",
                              "lora.dropout=0.0", f"output_dir={out}", *more])


def steps(adapter) -> list[dict]:
    return [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines()]


def max_diff(a, b) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def relative_diff(a, b) -> float:
    """|a - b| / |a| over every LoRA weight together (Frobenius norms)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    diff = sum(((x[k] - y[k]) ** 2).sum().item() for k in x) ** 0.5
    return diff / sum((x[k] ** 2).sum().item() for k in x) ** 0.5


@pytest.fixture(scope="module")
def straight(tmp_path_factory, preference_data):
    tmp = tmp_path_factory.mktemp("dpo")
    return train(dpo_config(preference_data, tmp / "straight")), tmp


def test_first_step_is_ln2_and_the_pairs_are_learned(straight):
    adapter, _ = straight
    records = steps(adapter)
    train_steps = [r for r in records if "loss" in r]
    assert train_steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(train_steps[0]["rewards/margins"]) < 1e-3
    assert all(set(COLUMNS) <= set(r) for r in train_steps)
    late = train_steps[-4:]
    assert sum(r["rewards/margins"] for r in late) > 0 and sum(r["rewards/accuracies"] for r in late) / 4 > 0.5
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[-1] < math.log(2)
    prov = json.loads((adapter / "budwood.json").read_text())
    assert prov["method"]["type"] == "dpo"
    assert prov["method"]["dpo"] == {"beta": 0.1, "loss_type": "sigmoid", "sft_weight": 0.0, "share_prompt": True}
    assert 12 * 6 < prov["method"]["pairs_seen"] <= 12 * 8  # an epoch's last micro-batch may be short
    assert prov["data"]["train"]["format"] == "openai_preference"
    assert (list_checkpoints(adapter / "checkpoints")[0] / "reference.safetensors").exists()


def test_resume_from_a_checkpoint_is_exact(straight, preference_data):
    """What a SIGKILL leaves (the last periodic checkpoint) resumes to the same adapter; the reference
    log-probabilities come from the checkpoint, not from the (already trained) policy."""
    adapter, tmp = straight
    killed = tmp / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(adapter / "checkpoints" / "step-00000004", killed / "checkpoints" / "step-00000004")
    records = [r for r in steps(adapter) if r["step"] <= 4]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train(dpo_config(preference_data, killed), resume=True)
    assert max_diff(adapter, killed) <= 1e-6
    assert [r["loss"] for r in steps(killed) if "loss" in r] == [r["loss"] for r in steps(adapter) if "loss" in r]


def test_packed_batches_train_like_padded_ones(straight, preference_data, tmp_path):
    adapter, _ = straight
    packed = train(dpo_config(preference_data, tmp_path / "packed", "training.batching=packed",
                              "training.max_steps=3"))
    first = steps(packed)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # the same first step's pairs? packed plans rows differently, so compare the log-probabilities' scale
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


def test_separate_sequences_when_prompt_sharing_is_off(straight, preference_data, tmp_path):
    """share_prompt false: each answer its own sequence (the prompt run twice), the same start, more tokens."""
    adapter, _ = straight
    off = train(dpo_config(preference_data, tmp_path / "off", "training.dpo.share_prompt=false",
                           "training.max_steps=2"))
    assert steps(off)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    per_pair = {}
    for name, out in (("on", adapter), ("off", off)):
        prov = json.loads((out / "budwood.json").read_text())
        per_pair[name] = prov["tokens_seen"] / prov["method"]["pairs_seen"]
    assert per_pair["on"] < 0.8 * per_pair["off"]  # the prompts are most of a pair's tokens


def test_ipo_and_rpo_start_where_their_formulas_say(preference_data, tmp_path):
    ipo = train(dpo_config(preference_data, tmp_path / "ipo", "training.dpo.loss_type=ipo", "training.max_steps=1",
                           "training.dpo.beta=0.5"))
    assert steps(ipo)[0]["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-4)
    rpo = train(dpo_config(preference_data, tmp_path / "rpo", "training.dpo.sft_weight=1.0", "training.max_steps=1"))
    assert steps(rpo)[0]["loss"] > math.log(2) + 0.5  # plus the preferred answers' mean token NLL


def test_init_adapter_continues_sft_and_is_dpos_reference(company_data, preference_data, tmp_path):
    sft = train(load_config(None, [f"data.train={company_data['train']}", "training.max_steps=8",
                                   "training.batch_size=8", "training.learning_rate=2e-3", "training.precision=fp32",
                                   "training.compile=false", "lora.r=4", "lora.alpha=8",
                                   "training.max_seq_len=256", f"output_dir={tmp_path / 'sft'}"]))
    sft_loss = [r["loss"] for r in steps(sft) if "loss" in r]
    more = train(load_config(None, [f"data.train={company_data['train']}", "training.max_steps=2",
                                    "training.batch_size=8", "training.learning_rate=2e-3", "training.warmup_steps=0",
                                    "training.precision=fp32", "training.max_seq_len=256", f"init_adapter={sft}",
                                    f"output_dir={tmp_path / 'more'}"]))
    assert json.loads((more / "adapter_config.json").read_text())["r"] == 4  # the adapter's own LoRA shape
    assert steps(more)[0]["loss"] < sft_loss[0] - 0.3  # it starts where the first run ended, not afresh
    dpo = train(dpo_config(preference_data, tmp_path / "dpo", f"init_adapter={sft}", "training.max_steps=2",
                           "lora.r=4", "lora.alpha=8"))
    assert steps(dpo)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the reference is base + that adapter
    method = json.loads((dpo / "budwood.json").read_text())["method"]
    assert method["init_adapter"]["ref"] == str(sft) and len(method["init_adapter"]["fingerprint"]) == 64
    with pytest.raises(ConfigError, match="lora.r: 8 disagrees with init_adapter .*sft's 4"):
        train(dpo_config(preference_data, tmp_path / "bad", f"init_adapter={sft}"))
    with pytest.raises(ConfigError, match="init_adapter: 'nowhere' is not an adapter folder"):
        train(dpo_config(preference_data, tmp_path / "bad2", "init_adapter=nowhere"))


def test_two_processes_train_what_one_does(preference_data, tmp_path):
    single = train(load_config(torchrun_config(tmp_path, preference_data, tmp_path / "one", method="dpo",
                                               max_steps=6, save_every=3, eval_every=3)))
    config = torchrun_config(tmp_path, preference_data, tmp_path / "two", method="dpo", max_steps=6, save_every=3,
                             eval_every=3, distributed="ddp")
    code, output = torchrun(config)
    assert code == 0, output[-3000:]
    one, two = ([r for r in steps(a) if "loss" in r] for a in (single, tmp_path / "two"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-4)
    assert [r["rewards/margins"] for r in two] == pytest.approx([r["rewards/margins"] for r in one], abs=1e-4)
    # the weights: Adam divides each update by sqrt(v), so an entry whose gradient is near zero, summed by two ranks
    # in another order than by one process, moves by a different fraction of the learning rate; a few such entries
    # differ by up to ~2e-4 after 6 steps (lr 2e-3) while the adapter as a whole agrees to 1.5e-5 of its norm
    assert max_diff(single, tmp_path / "two") < 5e-4
    assert relative_diff(single, tmp_path / "two") < 1e-4
