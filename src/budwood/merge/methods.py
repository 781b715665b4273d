"""The maths of merging LoRA adapters: pure functions on tensors, which know nothing of models.

An adapter changes one linear layer W by delta = s * B @ A (A: [r, in], B: [out, r], s its scaling:
alpha / r, or alpha / sqrt(r) with rsLoRA). Merging adapters with weights w_i is about their deltas:

  cat          sum_i w_i delta_i exactly, as concatenated factors: A = [w_i s_i A_i], B = [B_i]; rank sum r_i.
  linear       the same sum, re-factored by SVD (orthogonal factors); exact at its default rank sum r_i.
  svd          the same sum truncated to a chosen rank (default: the largest parent rank), with the
               relative error ||delta - delta_r||_F / ||delta||_F, which SVD makes the least possible.
  ties         TIES-merging (Yadav et al., 2023) of the deltas: keep each delta's largest `density`
               share of entries, elect a sign per entry, average the agreeing ones; then SVD.
  dare_linear  DARE (Yu et al., 2024): drop entries at random (keep `density`, rescale by 1/density),
  dare_ties    then sum (linear) or TIES-merge (ties) the deltas; then SVD.

The delta-space combinations are peft's own (peft.utils.merge_utils: task_arithmetic, ties,
dare_linear, dare_ties), as its add_weighted_adapter uses them for `cat` and the `*_svd` methods.
peft's `linear`, `ties`, `dare_*` and `magnitude_prune` without `_svd` instead combine the A and the B
factors separately, and (sum w_i B_i)(sum w_i A_i) is not sum w_i B_i A_i (peft issue 3004):
budwood never merges that way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from budwood.errors import BudwoodError, did_you_mean


def _peft(name: str) -> Callable:
    """peft's delta-space combination `name`, imported when first used (peft pulls in transformers)."""
    def combine(deltas, weights, density):
        from peft.utils import merge_utils

        fn = getattr(merge_utils, name)
        return fn(deltas, weights) if name == "task_arithmetic" else fn(deltas, weights, density)
    return combine


@dataclass
class Factors:
    """One adapter's LoRA pair on one layer: delta = scale * B @ A."""
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(frozen=True)
class Method:
    name: str
    combine: Callable | None  # peft's delta-space combination; None: cat (factors concatenated)
    density: bool  # takes a density
    default_rank: str  # "sum" of the parents' ranks, or their "max"
    exact: bool  # the merged delta is the weighted sum, at the default rank


METHODS = {m.name: m for m in (
    Method("cat", None, False, "sum", True),
    Method("linear", _peft("task_arithmetic"), False, "sum", True),
    Method("svd", _peft("task_arithmetic"), False, "max", False),
    Method("ties", _peft("ties"), True, "sum", False),
    Method("dare_linear", _peft("dare_linear"), True, "sum", False),
    Method("dare_ties", _peft("dare_ties"), True, "sum", False),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise BudwoodError(f"unknown merge method {name!r}{did_you_mean(name, METHODS)}; choose from "
                           f"{', '.join(METHODS)}")
    return METHODS[name]


def cat(parts: list[Factors | None], weights: list[float], ranks: list[int], shape: tuple[int, int]
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact weighted sum as concatenated factors (scale 1). A parent without this layer leaves its
    rows zero, so every layer has the same rank, sum r_i."""
    out_f, in_f = shape
    A = torch.zeros(sum(ranks), in_f, dtype=torch.float64)
    B = torch.zeros(out_f, sum(ranks), dtype=torch.float64)
    at = 0
    for part, w, r in zip(parts, weights, ranks, strict=True):
        if part is not None:
            A[at:at + r] = w * part.scale * part.A.double()
            B[:, at:at + r] = part.B.double()
        at += r
    return A, B


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    k = min(rank, S.numel())
    A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64)
    B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
    A[:k], B[:, :k] = Vh[:k].double(), (U[:, :k] * S[:k]).double()
    S = S.double()
    total = float((S ** 2).sum())
    error = float((S[k:] ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    return A, B, error


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of `delta` (Eckart-Young), B = U S, A = V^T, and the relative error
    ||delta - B A||_F / ||delta||_F (0 for a zero delta). Ranks beyond the matrix's are zero-padded."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(U, S, Vh, rank)


def low_rank_of_product(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """low_rank(B @ A) without forming it: B A = Qb (Rb Ra^T) Qa^T, so its SVD is that of the small
    R x R middle matrix; O((out + in) R^2) instead of a full out x in decomposition."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return _truncate(Qb @ U, S, Vh @ Qa.T, rank)


def merge_layer(parts: list[Factors | None], weights: list[float], ranks: list[int], shape: tuple[int, int],
                how: Method, rank: int, density: float | None, generator_seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer's merged factors (A [rank, in], B [out, rank], scale 1) and the relative error of the
    merged delta against what the method combined (0 for cat)."""
    if how.combine is None:
        return (*cat(parts, weights, ranks, shape), 0.0)
    if not how.density:  # linear, svd: the weighted sum is the cat product, decomposed through its factors
        return low_rank_of_product(*reversed(cat(parts, weights, ranks, shape)), rank)
    # TIES and DARE: entry-wise on the full deltas, in float32 as peft computes them
    deltas = [p.delta(torch.float32) if p is not None else torch.zeros(shape) for p in parts]
    with torch.random.fork_rng(devices=[]):  # DARE's random drops: the same for the same seed, every time
        torch.manual_seed(generator_seed)
        combined = how.combine(deltas, torch.tensor(weights, dtype=torch.float32), density)
    return low_rank(combined, rank)
