"""The merge maths on hand-built tensors, and against peft where peft is right (and where it is not)."""
import pytest
import torch

from budwood.errors import BudwoodError
from budwood.merge.methods import Factors, cat, low_rank, merge_layer, method


def factors(seed: int, r: int, shape=(6, 5), scale=2.0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g), scale)


def test_cat_is_the_exact_weighted_sum_of_deltas():
    a, b = factors(1, 3), factors(2, 2, scale=0.5)
    A, B = cat([a, b], [0.7, -1.3], [3, 2], (6, 5))
    assert A.shape == (5, 5) and B.shape == (6, 5)
    assert torch.allclose(B @ A, 0.7 * a.delta() - 1.3 * b.delta(), atol=1e-12)


def test_cat_leaves_a_missing_parent_s_rows_zero():
    a = factors(1, 3)
    A, B = cat([None, a], [1.0, 2.0], [4, 3], (6, 5))
    assert A.shape == (7, 5) and A[:4].abs().sum() == 0 and B[:, :4].abs().sum() == 0
    assert torch.allclose(B @ A, 2.0 * a.delta(), atol=1e-12)


def test_low_rank_error_is_the_tail_energy_and_no_other_factors_do_better():
    delta = factors(3, 4, (8, 7)).delta() + 0.1 * factors(4, 4, (8, 7)).delta()
    S = torch.linalg.svdvals(delta)
    for r in (1, 2, 3):
        A, B, err = low_rank(delta, r)
        assert err == pytest.approx(float((S[r:] ** 2).sum() / (S ** 2).sum()) ** 0.5, rel=1e-9)
        assert float(torch.linalg.norm(delta - B @ A) / torch.linalg.norm(delta)) == pytest.approx(err, rel=1e-9)
        g = torch.Generator().manual_seed(r)
        f64 = torch.float64
        other = torch.randn(8, r, generator=g, dtype=f64) @ torch.randn(r, 7, generator=g, dtype=f64)
        assert torch.linalg.norm(delta - other) > torch.linalg.norm(delta - B @ A)
    A, B, err = low_rank(delta, 12)  # beyond the matrix's rank: exact, zero-padded
    assert err == pytest.approx(0, abs=1e-12) and A.shape == (12, 7) and torch.allclose(B @ A, delta, atol=1e-10)
    assert low_rank(torch.zeros(3, 3, dtype=torch.float64), 2)[2] == 0.0


def test_ties_on_known_tensors():
    """Keep each delta's top half by magnitude, elect the sign by the summed kept values, average the
    agreeing weighted entries (TIES-merging)."""
    d1 = torch.tensor([[4.0, -1.0], [0.5, -3.0]], dtype=torch.float64)
    d2 = torch.tensor([[2.0, 1.5], [-5.0, 0.25]], dtype=torch.float64)
    # kept: d1 {(0,0): 4, (1,1): -3}; d2 {(1,0): -5, (0,0): 2}; signs by sum: (0,0)+6, (0,1) 0 -> +, (1,0) -5, (1,1) -3
    parts = [Factors(torch.eye(2, dtype=torch.float64), d, 1.0) for d in (d1, d2)]
    A, B, err = merge_layer(parts, [1.0, 0.5], [2, 2], (2, 2), method("ties"), 2, 0.5, 0)
    expected = torch.tensor([[(4.0 + 1.0) / 2, 0.0], [-2.5, -3.0]], dtype=torch.float64)
    assert err == pytest.approx(0, abs=1e-6) and torch.allclose(B @ A, expected, atol=1e-5)  # float32, as peft


def test_dare_is_linear_at_density_one_and_repeats_for_a_seed():
    parts = [factors(5, 3), factors(6, 3)]
    linear = merge_layer(parts, [1.0, 0.5], [3, 3], (6, 5), method("linear"), 6, None, 0)
    full = merge_layer(parts, [1.0, 0.5], [3, 3], (6, 5), method("dare_linear"), 6, 1.0, 0)
    assert torch.allclose(full[1] @ full[0], linear[1] @ linear[0], atol=1e-10)
    one = merge_layer(parts, [1.0, 0.5], [3, 3], (6, 5), method("dare_linear"), 5, 0.5, 7)
    again = merge_layer(parts, [1.0, 0.5], [3, 3], (6, 5), method("dare_linear"), 5, 0.5, 7)
    other = merge_layer(parts, [1.0, 0.5], [3, 3], (6, 5), method("dare_linear"), 5, 0.5, 8)
    assert torch.equal(one[1] @ one[0], again[1] @ again[0])
    assert not torch.allclose(one[1] @ one[0], other[1] @ other[0])
    # rescaled drops: unbiased, the mean over seeds approaches the linear sum
    runs = [merge_layer(parts, [1.0, 0.5], [3, 3], (6, 5), method("dare_linear"), 5, 0.5, s) for s in range(400)]
    mean = sum(B @ A for A, B, _ in runs) / len(runs)
    target = linear[1] @ linear[0]
    assert float(torch.linalg.norm(mean - target) / torch.linalg.norm(target)) < 0.2


def test_unknown_methods_are_named_with_a_suggestion():
    with pytest.raises(BudwoodError, match="did you mean 'ties'"):
        method("tie")


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    from tests.conftest import make_random_adapter

    root = tmp_path_factory.mktemp("parents")
    return make_random_adapter(root / "a", 21, 8), make_random_adapter(root / "b", 22, 8)


def peft_merged_deltas(paths, weights, combination, **kwargs) -> dict[str, torch.Tensor]:
    """peft's add_weighted_adapter result, as each layer's delta."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from budwood.models.load import load_base

    model = PeftModel.from_pretrained(load_base("budwood-tiny").model, str(paths[0]), adapter_name="a")
    model.load_adapter(str(paths[1]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination, **kwargs)
    return {name.removeprefix("base_model.model."): m.get_delta_weight("m").double()
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def budwood_merged_deltas(paths, weights, how, tmp_path, **kwargs) -> dict[str, torch.Tensor]:
    from budwood.merge.merge import merge_adapters, read_parent

    out = merge_adapters([str(p) for p in paths], tmp_path / how, weights, how, **kwargs).path
    return {m: f.delta() for m, f in read_parent(how, out).layers.items()}


def test_cat_and_svd_agree_with_peft(two_adapters, tmp_path):
    for how, kwargs, peft_kwargs in (("cat", {}, {}), ("svd", {"rank": 8}, {"svd_rank": 8})):
        ours = budwood_merged_deltas(two_adapters, [0.6, 0.9], how, tmp_path, **kwargs)
        theirs = peft_merged_deltas(two_adapters, [0.6, 0.9], how, **peft_kwargs)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=1e-4), (how, name)


def test_ties_agrees_with_peft_s_delta_space_ties(two_adapters, tmp_path):
    ours = budwood_merged_deltas(two_adapters, [1.0, 1.0], "ties", tmp_path, density=0.3)
    theirs = peft_merged_deltas(two_adapters, [1.0, 1.0], "ties_svd", density=0.3, svd_rank=16)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=1e-4), name


def test_peft_s_factor_wise_linear_is_not_the_weighted_sum_of_deltas(two_adapters, tmp_path):
    """What docs/merge.md says of peft's `linear` (peft issue 3004): sum w B times sum w A is not sum w B A.
    budwood's linear is the sum itself."""
    from budwood.merge.merge import read_parent

    a, b = (read_parent(str(p), p) for p in two_adapters)
    want = {m: 0.5 * a.layers[m].delta() + 0.5 * b.layers[m].delta() for m in a.layers}
    ours = budwood_merged_deltas(two_adapters, [0.5, 0.5], "linear", tmp_path)
    theirs = peft_merged_deltas(two_adapters, [0.5, 0.5], "linear")
    worst_ours = max(float(torch.linalg.norm(ours[m] - want[m]) / torch.linalg.norm(want[m])) for m in want)
    worst_peft = max(float(torch.linalg.norm(theirs[m] - want[m]) / torch.linalg.norm(want[m])) for m in want)
    assert worst_ours < 1e-6 and worst_peft > 0.3
