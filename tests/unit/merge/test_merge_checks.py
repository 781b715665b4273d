"""What budwood merge / compose must check: parents without fingerprints or ranks, unreadable weights, bad weights,
seeds and bounds, outputs, and the peft layout of the merged adapter (each test a documented promise)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from budwood.errors import BudwoodError
from tests.conftest import make_random_adapter, write_jsonl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_parents")
    return make_random_adapter(root / "a", 41, 4), make_random_adapter(root / "b", 42, 4)


def copy(src, dst):
    return shutil.copytree(src, dst)


def peft_adapter(out, seed, **lora):
    """A peft adapter on budwood-tiny with random factors and the given LoraConfig fields."""
    from peft import LoraConfig, get_peft_model

    from budwood.models.load import load_base

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    get_peft_model(load_base("budwood-tiny").model, cfg).save_pretrained(out)
    return out


def peft_deltas(adapter) -> dict[str, torch.Tensor]:
    """Every LoRA layer peft builds when it loads `adapter`, as its delta."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from budwood.models.load import load_base

    model = PeftModel.from_pretrained(load_base("budwood-tiny").model, str(adapter))
    return {n.removeprefix("base_model.model."): m.get_delta_weight("default").double()
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# --- one base -------------------------------------------------------------------------------------

def test_a_parent_without_a_fingerprint_is_still_checked_by_its_base_name(pair, tmp_path):
    """docs/merge.md: recorded base fingerprints (or, without them, base names) must agree. A parent that
    records a fingerprint must not wave through a parent without one that names another base."""
    from budwood.merge.merge import merge_adapters
    from budwood.models.fingerprint import model_fingerprint

    a, b = copy(pair[0], tmp_path / "a"), copy(pair[1], tmp_path / "b")
    (a / "budwood.json").write_text(json.dumps(
        {"base_model": {"name": "budwood-tiny", "fingerprint": model_fingerprint("budwood-tiny")}}))
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BudwoodError, match="different base"):
        merge_adapters([str(a), str(b)], tmp_path / "ab")


# --- the merged adapter as peft loads it ------------------------------------------------------------

def test_peft_loads_the_cat_sum_when_the_first_parent_used_layers_to_transform(tmp_path):
    """merge.py copies parents[0]'s adapter_config (layers_to_transform=[0]) into the merge, so peft loads
    only layer 0 and silently drops the second parent's delta in layers 1..7."""
    from budwood.merge.merge import merge_adapters, read_parent

    a = peft_adapter(tmp_path / "a", 1, target_modules=["q_proj"], layers_to_transform=[0])
    b = peft_adapter(tmp_path / "b", 2, target_modules=["q_proj"])
    merged = merge_adapters([str(a), str(b)], tmp_path / "ab").path
    want = {m: f.delta() for m, f in read_parent("ab", merged).layers.items()}
    got = peft_deltas(merged)
    assert sorted(got) == sorted(want), "peft builds other layers than the merge holds"


def test_peft_adds_no_delta_where_no_parent_had_one(tmp_path):
    """A parent targeting one module (a regex) with init_lora_weights=False: the merge widens
    target_modules to the leaf name ('q_proj', every layer) and keeps init_lora_weights=False, so peft
    gives the 7 untrained q_proj layers random, non-zero deltas."""
    from budwood.merge.merge import merge_adapters, read_parent

    a = peft_adapter(tmp_path / "a", 1, target_modules=r".*layers\.0\.self_attn\.q_proj")
    merged = merge_adapters([str(a)], tmp_path / "m").path
    want = {m: f.delta() for m, f in read_parent("m", merged).layers.items()}
    for name, delta in peft_deltas(merged).items():
        expected = want.get(name, torch.zeros_like(delta))
        assert torch.allclose(delta, expected, atol=1e-5), f"{name}: |delta| {float(delta.norm()):.3f} under peft"


# --- bad input: a clear BudwoodError (CLI exit 2), never garbage or a traceback ----------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(pair, tmp_path, bad):
    """--weights nan,1 writes an adapter full of NaN (cat) and reports it 'exact'; svd crashes in linalg."""
    from budwood.merge.merge import merge_adapters

    with pytest.raises(BudwoodError):
        merge_adapters([str(p) for p in pair], tmp_path / "ab", [bad, 1.0], "cat")
    assert not (tmp_path / "ab").exists()


def test_a_parent_config_without_r_is_a_clear_error(pair, tmp_path):
    from budwood.merge.merge import merge_adapters

    a = copy(pair[0], tmp_path / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    del cfg["r"]
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BudwoodError):  # KeyError: 'r'
        merge_adapters([str(a), str(pair[1])], tmp_path / "ab")


def test_unreadable_parent_weights_are_a_clear_error(pair, tmp_path):
    from budwood.merge.merge import merge_adapters

    a = copy(pair[0], tmp_path / "a")
    (a / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BudwoodError):  # SafetensorError: header too large
        merge_adapters([str(a), str(pair[1])], tmp_path / "ab")


def test_a_large_dare_seed_is_a_clear_error_or_works(pair, tmp_path):
    """--seed 99999999999999999: seed * 1_000_003 overflows torch.manual_seed (ValueError traceback)."""
    from budwood.merge.merge import merge_adapters

    try:
        merge_adapters([str(p) for p in pair], tmp_path / "ab", None, "dare_linear", density=0.5,
                       seed=99999999999999999)
    except BudwoodError:
        pass


def test_compose_with_a_bound_below_one_is_a_clear_error_or_works(pair, tmp_path):
    """--bound 0.5: compose suggests each adapter alone at weight 1, outside [-bound, bound], and
    nevergrad raises ValueError (a traceback from the CLI)."""
    from budwood.merge.compose import compose

    few = write_jsonl(tmp_path / "few.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(2)])
    try:
        compose([str(p) for p in pair], few, tmp_path / "c", steps=3, bound=0.5)
    except BudwoodError:
        pass


def test_into_base_output_is_checked_before_the_merge_is_written(pair, tmp_path):
    """`budwood merge ... --out X --into-base FULL` with FULL not empty: exit 2, but X was written first,
    so the same command cannot simply be run again (X now exists)."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    done = subprocess.run([sys.executable, "-m", "budwood", "merge", *map(str, pair), "--out", str(tmp_path / "x"),
                           "--into-base", str(full)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert not (tmp_path / "x").exists()


def test_evaluating_a_merge_above_the_engine_s_rank_limit_is_a_clear_error(pair, tmp_path):
    """LocalTarget sizes the engine by the adapter's r; a cat merge of e.g. 3 x r256 (r 768) makes
    EngineConfig(max_lora_rank=768) fail pydantic validation: `budwood eval` exits 1 with a traceback."""
    from budwood.eval.targets import LocalTarget

    a = copy(pair[0], tmp_path / "big")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = 768
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BudwoodError):
        LocalTarget(f"budwood-tiny+{a}")
