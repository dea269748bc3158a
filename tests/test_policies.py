"""Allocation policies alone, and through the public operators (ts.soft_topk / ts.hard_topk)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchspartan as ts

torch.set_flush_denormal(True)


def tensors(*shapes: tuple[int, ...], costs: list[float] | None = None) -> list[ts.MaskedTensor]:
    costs = costs or [1.0] * len(shapes)
    return [ts.MaskedTensor(f"t{i}", s, None, c) for i, (s, c) in
            enumerate(zip(shapes, costs, strict=True))]


def test_global_uniform_erk_nm_allocations() -> None:
    ts_ = tensors((4, 8), (16, 8), (2, 4, 3, 3))
    assert ts.Global().allocate(ts_, 0.3) == [ts.Allocation((0, 1, 2), 0.3)]
    assert ts.Uniform().allocate(ts_, 0.3) == [ts.Allocation((i,), 0.3) for i in range(3)]
    erk = ts.ERK().allocate(ts_, 0.3)
    kept = sum(a.density * ts_[a.tensors[0]].numel for a in erk)
    assert math.isclose(kept, 0.3 * sum(t.numel for t in ts_))
    score = [sum(t.shape) / math.prod(t.shape) for t in ts_]
    ratios = [a.density / s for a, s in zip(erk, score, strict=True) if a.density < 1]
    assert max(ratios) - min(ratios) < 1e-12  # proportional to the ERK score below the cap
    assert ts.NM(2, 4).allocate(ts_, 0.5) == [ts.Allocation((i,), 0.5, 4) for i in range(3)]


def test_erk_with_flop_costs_keeps_the_flop_budget() -> None:
    # ERK densities scaled so that the kept *cost* (FLOPs) is the density of the total cost
    ts_ = tensors((8, 8), (32, 8), (4, 4, 3, 3), costs=[1.0, 0.25, 9.0])
    erk = ts.ERK(costs=ts.UnitCost()).allocate(ts_, 0.2)
    spent = sum(a.density * ts_[a.tensors[0]].cost for a in erk)
    assert math.isclose(spent, 0.2 * sum(t.cost for t in ts_))


def test_erk_with_flop_cost_model_trains_to_the_flop_budget() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    ts.sparsify(model)
    x = torch.randn(1, 1, 6, 6)
    policy = ts.ERK(costs=ts.FlopCost(x))
    updater = ts.MaskUpdater(model, policy)
    assert len({round(t.unit_cost, 9) for t in updater.tensors}) == 2  # conv entries cost more
    updater.update(density=0.3, beta=4.0)
    spent = sum(float(r.mask.hard_mask.sum()) * t.unit_cost
                for r, t in zip(ts.find_masks(model), updater.tensors, strict=True))
    budget = 0.3 * sum(t.cost for t in updater.tensors)
    assert abs(spent - budget) <= max(t.unit_cost for t in updater.tensors)


class EveryOtherTensorDense(ts.AllocationPolicy):
    """A custom policy, written with exported names only: even tensors dense, odd ones share
    the rest of the budget."""

    def allocate(self, tensors: list[ts.MaskedTensor], density: float) -> list[ts.Allocation]:
        dense = [i for i in range(len(tensors)) if i % 2 == 0]
        rest = [i for i in range(len(tensors)) if i % 2 == 1]
        kept = density * sum(t.cost for t in tensors) - sum(tensors[i].cost for i in dense)
        share = max(0.0, kept / sum(tensors[i].cost for i in rest))
        return [ts.Allocation(tuple(dense), 1.0), ts.Allocation(tuple(rest), share)]


def test_custom_policy_with_exported_types_trains() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 8))
    ts.sparsify(model)
    updater = ts.MaskUpdater(model, EveryOtherTensorDense())
    updater.update(density=0.8, beta=5.0)
    kept = [int(r.mask.hard_mask.sum()) for r in ts.find_masks(model)]
    assert kept[0] == kept[2] == 64
    assert kept[1] == math.floor(0.8 * 192 - 128 + 0.5)


@pytest.mark.parametrize("bad, match", [
    (lambda t, d: [ts.Allocation((0,), d)], "without a budget"),
    (lambda t, d: [ts.Allocation((0, 0, 1), d)], "each used once"),
    (lambda t, d: [ts.Allocation((0, 1), 1.5)], "density in"),
    (lambda t, d: [(0, 1)], "Allocation"),
])
def test_bad_custom_policy_output_is_named(bad: object, match: str) -> None:
    class Bad(ts.AllocationPolicy):
        def allocate(self, tensors, density):  # type: ignore[no-untyped-def]
            return bad(tensors, density)  # type: ignore[operator]

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ts.sparsify(model)
    with pytest.raises((ValueError, TypeError), match=match):
        ts.MaskUpdater(model, Bad()).update(density=0.5, beta=1.0)


def test_nm_policy_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match=r"1 <= n < m"):
        ts.NM(4, 4)
    with pytest.raises(ValueError, match=r"t0 of shape \(4, 6\).*multiple of 4"):
        ts.NM(2, 4).check(tensors((4, 6)), 0.5)
    with pytest.raises(ValueError, match=r"sparsity=0.5"):
        ts.NM(2, 4).check(tensors((4, 8)), 0.1)
    with pytest.raises(ValueError, match=r"block"):
        ts.NM(2, 4).check([ts.MaskedTensor("b", (4, 8), (2, 2))], 0.5)
    model = nn.Sequential(nn.Linear(6, 4))
    ts.sparsify(model)
    with pytest.raises(ValueError, match=r"0.weight .*multiple of 4"):
        ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.5,
                         total_steps=10, policy=ts.NM(2, 4))


# ---------------------------------------------------------------------------------------------
# the public operators with policies: the same engine as training


def test_soft_topk_list_global_equals_one_concatenated_problem() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 7, generator=g, dtype=torch.float64), torch.rand(30, generator=g,
                                                                          dtype=torch.float64)
    ma, mb = ts.soft_topk([a, b], 12.0, 4.0)
    m = ts.soft_topk(torch.cat([a.reshape(-1), b]), 12.0, 4.0)
    torch.testing.assert_close(torch.cat([ma.reshape(-1), mb]), m, rtol=0, atol=1e-10)
    ha, hb = ts.hard_topk([a, b], 12.0)
    h = ts.hard_topk(torch.cat([a.reshape(-1), b]), 12.0)
    assert torch.equal(torch.cat([ha.reshape(-1), hb]), h)


def test_soft_topk_list_gradient_matches_autograd_through_unrolled_reference() -> None:
    # per-tensor beta and cost, one shared budget: the cross-tensor term of the backward
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(4, 5, generator=g, dtype=torch.float64),
          torch.rand(9, generator=g, dtype=torch.float64)]
    betas, costs, budget = [3.0, 7.0], [1.0, 2.5], 9.0

    def check(*vals: torch.Tensor) -> torch.Tensor:
        return sum((m * w).sum() for m, w in zip(  # type: ignore[return-value]
            ts.soft_topk(list(vals), budget, betas, costs, tol=1e-13), weights, strict=True))

    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
    torch.autograd.gradcheck(check, tuple(x.clone().requires_grad_() for x in xs))
    # and the masks meet the budget with the per-tensor temperatures
    ms = ts.soft_topk(xs, budget, betas, costs, tol=1e-13)
    spent = sum(c * m.sum() for c, m in zip(costs, ms, strict=True))
    assert abs(float(spent) - budget) < 1e-9


def test_soft_and_hard_topk_with_nm_policy_give_exact_groups() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.rand(6, 16, generator=g)
    total = w.numel()
    soft = ts.soft_topk([w], 0.5 * total, 30.0, policy=ts.NM(2, 4))[0]
    hard = ts.hard_topk([w], 0.5 * total, policy=ts.NM(2, 4))[0]
    rows = soft.reshape(-1, 4).double().sum(-1)
    torch.testing.assert_close(rows, torch.full_like(rows, 2.0), rtol=0, atol=1e-5)
    assert bool((hard.reshape(-1, 4).sum(-1) == 2).all())
    top2 = w.reshape(-1, 4).topk(2, dim=-1).indices
    assert bool(hard.reshape(-1, 4).gather(1, top2).all())
    conv = torch.rand(3, 8, 2, 2, generator=g)  # groups along dim 1 (input channels)
    hard = ts.hard_topk([conv], 0.25 * conv.numel(), policy=ts.NM(1, 4))[0]
    assert bool((hard.movedim(1, -1).reshape(-1, 4).sum(-1) == 1).all())


def test_soft_topk_list_uniform_policy_solves_each_tensor_alone() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(20, generator=g), torch.rand(10, generator=g)
    r = ts.soft_topk([a, b], 0.3 * 30, 5.0, policy=ts.Uniform(), return_result=True)
    assert r.threshold.shape == (2,)
    torch.testing.assert_close(r.mask[0], ts.soft_topk(a, 6.0, 5.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.mask[1], ts.soft_topk(b, 3.0, 5.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, error, match", [
    (([torch.ones(3), "x"], 1.0, 1.0), TypeError, r"values\[1\]"),
    (([torch.ones(3), torch.ones(2)], 1.0, [1.0]), ValueError, "one number per tensor"),
    (([torch.ones(3)], 3.0, 1.0), ValueError, "strictly between"),
    (([torch.ones(3)], 1.0, 1.0, [-1.0]), ValueError, r"costs\[0\]"),
    (([torch.tensor([1.0, math.nan])], 1.0, 1.0), ValueError, "NaN"),
])
def test_list_input_errors_name_the_argument(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ts.soft_topk(*args)


def test_readme_custom_policy_runs_as_written() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("class DenseEnds"):]
    block = block[:block.index("```")]
    model = nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 2))
    ts.sparsify(model)
    namespace = {"ts": ts, "base": torch.optim.SGD(model.parameters(), lr=0.1), "model": model,
                 "T": 10}
    exec(block, namespace)  # defines DenseEnds and builds opt
    opt = namespace["opt"]
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(4, 4)).square().mean().backward()
        opt.step()
    kept = [int(r.mask.hard_mask.sum()) for r in ts.find_masks(model)]
    assert kept[0] == 512 and kept[2] == 256  # the ends stay dense
    assert kept[1] == math.floor(0.1 * (512 + 16384 + 256) - 768 + 0.5)  # the rest of the budget
