"""`budwood compose`: learn one weight per adapter from a few examples, as LoraHub does (Huang et al., 2023).

Read top to bottom: load the base once with every adapter in it -> the objective, the few-shot loss of
the weighted sum of the adapters' deltas plus an L1 penalty on the weights -> a gradient-free search
over the weights (nevergrad, LoraHub's optimiser) -> the best weights, written as a `cat` merge, whose
delta is exactly the sum the search measured.

LoraHub composes the A and the B factors separately (sum w_i A_i, sum w_i B_i), whose product is not
the weighted sum of the deltas; budwood searches over the exact sum instead (see methods.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from budwood.errors import BudwoodError
from budwood.merge.merge import MergeResult, merge_adapters, read_parent, resolve

log = logging.getLogger(__name__)


@dataclass
class ComposeResult:
    weights: list[float]
    loss_base: float  # every weight 0: the base alone
    loss_initial: float  # at the starting weights
    loss_final: float  # at the weights found (loss + penalty decided them)
    merged: MergeResult
    history: list[tuple[list[float], float]] = field(repr=False)


def few_shot_batches(path: Path, tokenizer, max_seq_len: int, batch_size: int = 8):
    from budwood.data.formats import data_fingerprint, read_dataset
    from budwood.data.pack import collate
    from budwood.data.template import encode_conversations

    dataset = read_dataset(path)
    examples = encode_conversations(tokenizer, dataset.conversations, max_seq_len)
    if not examples:
        raise BudwoodError(f"{path}: no example with assistant tokens to measure the loss on")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [collate(examples, order[i:i + batch_size], "padded", tokenizer.pad_token_id)
               for i in range(0, len(order), batch_size)]
    return batches, len(examples), data_fingerprint(dataset.conversations)


def compose(sources: list[str], examples: str | Path, out: str | Path, steps: int = 40, l1: float = 0.05,
            bound: float = 1.5, init: list[float] | None = None, seed: int = 0, max_seq_len: int = 1024,
            registry=None, accept_license: bool = False) -> ComposeResult:
    from budwood.errors import require_extra

    require_extra("merge", "budwood compose (the weight search)", "nevergrad")
    import nevergrad as ng
    import numpy as np
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from budwood.merge.merge import check_same_base
    from budwood.models.load import load_base
    from budwood.train.loss import token_losses

    if steps < 1:
        raise BudwoodError(f"--steps must be at least 1, got {steps}")
    if not bound > 0:
        raise BudwoodError(f"--bound must be above 0, got {bound}")
    paths = [resolve(s, registry, accept_license) for s in sources]
    base_name, _ = check_same_base([read_parent(s, p) for s, p in zip(sources, paths, strict=True)])
    init = list(init) if init is not None else [1.0 / len(sources)] * len(sources)
    if len(init) != len(sources):
        raise BudwoodError(f"{len(init)} starting weight(s) for {len(sources)} adapter(s)")
    if any(abs(w) > bound for w in init):
        raise BudwoodError(f"starting weights {init} are outside [-{bound}, {bound}]")

    # -- the base once, with every adapter in it, all active: output = base + sum_i w_i s_i B_i A_i x
    base = load_base(base_name, dtype=torch.float32)
    names = [f"p{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(base.model, str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    model.base_model.set_adapter(names)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    scaling = [{n: layer.scaling[n] for n in names if n in layer.scaling} for layer in layers]
    batches, n_examples, fingerprint = few_shot_batches(Path(examples), base.tokenizer, max_seq_len)
    lm = model.get_base_model()

    @torch.no_grad()
    def loss_at(weights) -> float:
        for layer, scales in zip(layers, scaling, strict=True):
            for n, s in scales.items():
                layer.scaling[n] = float(weights[names.index(n)]) * s
        total, count = 0.0, 0
        for batch in batches:
            losses, _ = token_losses(lm, batch)
            total, count = total + losses.sum().item(), count + losses.numel()
        return total / count

    def objective(weights) -> float:
        return loss_at(weights) + l1 * float(np.abs(weights).sum())

    # -- the search: LoraHub's NGOpt over [-bound, bound]^k, from `init`; its first asks are each adapter
    # alone (weight 1, the rest 0), so a few-shot set that one parent fits is never missed in a small budget
    parametrization = ng.p.Array(init=np.array(init, dtype=float)).set_bounds(-bound, bound)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=steps)
    for i in range(min(len(names), steps)):
        optimizer.suggest(np.eye(len(names))[i] * min(1.0, bound))
    history: list[tuple[list[float], float]] = []
    best = (objective(np.array(init)), list(init))
    history.append((list(init), best[0]))
    for _ in range(steps):
        candidate = optimizer.ask()
        value = objective(candidate.value)
        optimizer.tell(candidate, value)
        history.append((candidate.value.tolist(), value))
        if value < best[0]:
            best = (value, candidate.value.tolist())
        log.info("compose: weights %s objective %.4f", np.round(candidate.value, 3).tolist(), value)
    weights = [round(w, 6) for w in best[1]]
    loss_base, loss_initial, loss_final = loss_at([0.0] * len(names)), loss_at(init), loss_at(weights)
    record = {"compose": {"data": str(examples), "examples": n_examples, "fingerprint": fingerprint,
                          "optimizer": "nevergrad NGOpt", "steps": steps, "l1": l1, "bound": bound, "init": init,
                          "seed": seed, "loss_base": loss_base, "loss_initial": loss_initial,
                          "loss_final": loss_final}}
    merged = merge_adapters(sources, out, weights, "cat", registry=registry, accept_license=accept_license,
                            extra=record)
    return ComposeResult(weights, loss_base, loss_initial, loss_final, merged, history)
