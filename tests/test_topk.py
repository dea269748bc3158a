"""Tests of the soft and hard top-k operators and of the multi-tensor selection.

The pyramid: Hypothesis properties on generated shapes, budgets, costs and betas; comparison with
slow, obviously correct references (a brute-force fractional knapsack, a greedy loop, a bisection
solver differentiated by autograd); gradcheck in float64; low-precision sanity; every bad input.
"""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import torchspartan as ts
import torchspartan._engine as engine_module
import torchspartan._select as select_module
import torchspartan.topk as topk_module
from torchspartan._select import select_top_budget

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# generators and references


def make_values(
    seed: int, shape: tuple[int, ...], kind: str, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Scores >= 0: ``uniform`` (distinct), ``ties`` (small integers), ``spread`` (log-uniform)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        v = torch.randint(0, 4, shape, generator=g).to(torch.float64)
    elif kind == "spread":
        v = torch.exp(8 * torch.rand(shape, generator=g, dtype=torch.float64) - 4)
    else:
        v = 10 * torch.rand(shape, generator=g, dtype=torch.float64)
    return v.to(dtype)


def make_costs(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Positive dyadic costs (multiples of 1/4 in [1/4, 4]): cumulative sums are exact."""
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randint(1, 17, shape, generator=g).to(torch.float64) / 4


@st.composite
def soft_problems(draw: st.DrawFn, max_d: int = 24) -> dict:
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    d = draw(st.integers(2, max_d))
    shape = (*batch, d)
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["uniform", "ties", "spread"]))
    values = make_values(seed, shape, kind)
    costs = make_costs(seed, shape) if draw(st.booleans()) else None
    total = float(d) if costs is None else costs.sum(-1)
    fraction = draw(st.floats(0.05, 0.95))
    budget = fraction * total
    beta = draw(st.floats(0.1, 100.0))
    return {"values": values, "costs": costs, "budget": budget, "beta": beta}


def greedy_reference(u: list[float], c: list[float], budget: float) -> list[bool]:
    """The hard top-k by its definition: a loop over entries by (decreasing u, index)."""
    keep = [False] * len(u)
    used = 0.0
    for i in sorted(range(len(u)), key=lambda i: (-u[i], i)):
        if used + c[i] / 2 > budget:
            break
        keep[i] = True
        used += c[i]
    return keep


def knapsack_lp_bruteforce(v: list[float], c: list[float], budget: float) -> list[float]:
    """Optimal fractional knapsack with sum(c m) = B by enumerating the LP's vertices.

    A vertex is a set fully on plus at most one item at a fraction in [0, 1].
    """
    n = len(v)
    best, best_m = -math.inf, None
    for r in range(n + 1):
        for full in itertools.combinations(range(n), r):
            used = sum(c[i] for i in full)
            base = sum(v[i] for i in full)
            rest = budget - used
            candidates: list[tuple[float, int | None, float]] = []
            if abs(rest) <= 1e-12:
                candidates.append((base, None, 0.0))
            else:
                for j in set(range(n)) - set(full):
                    f = rest / c[j]
                    if 0 <= f <= 1:
                        candidates.append((base + f * v[j], j, f))
            for value, jj, f in candidates:
                if value > best + 1e-12:
                    m = [1.0 if i in full else 0.0 for i in range(n)]
                    if jj is not None:
                        m[jj] = f
                    best, best_m = value, m
    assert best_m is not None
    return best_m


def soft_reference(
    values: torch.Tensor, budget: torch.Tensor, beta: float, costs: torch.Tensor | None
) -> torch.Tensor:
    """Soft top-k by bisection (no grad) and one differentiable Newton step, in float64.

    At the root, the Newton step's derivative in ``values`` is the implicit-function derivative,
    so autograd through it gives the reference gradient.
    """
    c = torch.ones_like(values) if costs is None else costs
    z = beta * values / c
    target = budget if isinstance(budget, torch.Tensor) else torch.tensor(budget)
    target = target.to(torch.float64)
    with torch.no_grad():
        base = torch.logit(target / c.sum(-1))
        lo, hi = base - z.amax(-1), base - z.amin(-1)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            f = (c * torch.sigmoid(z + mid.unsqueeze(-1))).sum(-1) - target
            lo, hi = torch.where(f < 0, mid, lo), torch.where(f < 0, hi, mid)
        mu0 = 0.5 * (lo + hi)
    m0 = torch.sigmoid(z + mu0.unsqueeze(-1))
    phi = (c * m0).sum(-1) - target
    dphi = (c * m0 * (1 - m0)).sum(-1)
    mu = mu0 - phi / dphi
    return torch.sigmoid(z + mu.unsqueeze(-1))


def costs_or_ones(problem: dict) -> torch.Tensor:
    v = problem["values"]
    return torch.ones_like(v) if problem["costs"] is None else problem["costs"]


def as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# soft top-k: properties


@given(soft_problems())
def test_soft_mask_in_unit_interval_and_meets_budget(problem: dict) -> None:
    m = ts.soft_topk(**problem)
    assert m.shape == problem["values"].shape and m.dtype == torch.float64
    assert bool(((m >= 0) & (m <= 1)).all())
    spent = (costs_or_ones(problem) * m).sum(-1)
    budget = torch.as_tensor(problem["budget"], dtype=torch.float64)
    torch.testing.assert_close(spent, torch.broadcast_to(budget, spent.shape), rtol=1e-8, atol=0)


@given(soft_problems(), st.integers(0, 2**16))
def test_soft_permutation_equivariant(problem: dict, seed: int) -> None:
    d = problem["values"].shape[-1]
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    m = ts.soft_topk(**problem)
    permuted = dict(problem, values=problem["values"][..., perm])
    if problem["costs"] is not None:
        permuted["costs"] = problem["costs"][..., perm]
    torch.testing.assert_close(ts.soft_topk(**permuted), m[..., perm], rtol=0, atol=1e-9)


@given(soft_problems())
def test_soft_monotone_in_unit_value(problem: dict) -> None:
    m = as_rows(ts.soft_topk(**problem))
    u = as_rows(problem["values"] / costs_or_ones(problem))
    higher = u.unsqueeze(-1) > u.unsqueeze(-2)  # [r, i, j]: u_i > u_j
    assert bool((m.unsqueeze(-1) >= m.unsqueeze(-2) - 1e-12)[higher].all())


@given(soft_problems(), st.floats(0.1, 10.0))
def test_soft_invariant_to_scaling_values_and_inverse_beta(problem: dict, s: float) -> None:
    m = ts.soft_topk(**problem)
    scaled = dict(problem, values=problem["values"] * s, beta=problem["beta"] / s)
    torch.testing.assert_close(ts.soft_topk(**scaled), m, rtol=0, atol=1e-8)


@given(st.integers(2, 7), st.integers(0, 2**16), st.booleans(), st.floats(0.05, 0.95))
def test_soft_large_beta_tends_to_knapsack_and_hard_topk(
    d: int, seed: int, with_costs: bool, fraction: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    # distinct unit values at least 1/(2d) apart, so beta = 1e4 is sharp
    u = (torch.randperm(d, generator=g).to(torch.float64) + 1) / d
    c = make_costs(seed, (d,)) if with_costs else torch.ones(d, dtype=torch.float64)
    v = u * c
    budget = fraction * float(c.sum())
    lp = torch.tensor(knapsack_lp_bruteforce(v.tolist(), c.tolist(), budget), dtype=torch.float64)
    soft = ts.soft_topk(v, budget, 1e4, c if with_costs else None)
    torch.testing.assert_close(soft, lp, rtol=0, atol=1e-3)
    fractional = lp[(lp > 0) & (lp < 1)]
    assume(fractional.numel() == 0 or abs(float(fractional[0]) - 0.5) > 1e-9)
    hard = ts.hard_topk(v, budget, c if with_costs else None)
    assert hard.tolist() == (lp >= 0.5).tolist()


# ---------------------------------------------------------------------------------------------
# soft top-k: gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, with_costs, per_row",
    [((6,), False, False), ((6,), True, False), ((3, 5), False, True), ((2, 2, 4), True, True)],
)
def test_soft_gradcheck(device: str, shape: tuple[int, ...], with_costs: bool,
                        per_row: bool) -> None:
    v = make_values(1, shape, "uniform").to(device).requires_grad_()
    c = make_costs(1, shape).to(device) if with_costs else None
    total = (c.sum(-1) if c is not None else torch.full(shape[:-1], float(shape[-1]),
                                                       dtype=torch.float64, device=device))
    beta: float | torch.Tensor
    if per_row:
        frac = torch.linspace(0.2, 0.7, total.numel(), dtype=torch.float64, device=device)
        budget = total * frac.view(total.shape)
        beta = torch.linspace(0.5, 2.0, total.numel(), dtype=torch.float64,
                              device=device).view(total.shape)
    else:
        budget, beta = 0.4 * total, 0.8
    assert torch.autograd.gradcheck(
        lambda x: ts.soft_topk(x, budget, beta, c, tol=1e-14), (v,), atol=1e-6, rtol=1e-4
    )


@given(soft_problems(max_d=16), st.integers(0, 2**16))
def test_soft_backward_matches_autograd_through_reference_solver(problem: dict, seed: int) -> None:
    v = problem["values"]
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = v.clone().requires_grad_()
    (ts.soft_topk(x, problem["budget"], problem["beta"], problem["costs"]) * g).sum().backward()
    y = v.clone().requires_grad_()
    budget = torch.as_tensor(problem["budget"], dtype=torch.float64)
    m_ref = soft_reference(y, budget, problem["beta"], problem["costs"])
    (m_ref * g).sum().backward()
    assert x.grad is not None and y.grad is not None
    scale = 1 + float(y.grad.abs().max())
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-7 * scale)


def test_soft_matches_reference_on_sampled_cold_start_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # long enough rows that the cold start comes from a strided sample
    monkeypatch.setattr(engine_module, "SAMPLE_SIZE", 512)
    d = 4 * 512 + 123
    v = make_values(3, (2, d), "spread")
    c = make_costs(3, (2, d))
    for costs in (None, c):
        total = d if costs is None else costs.sum(-1)
        budget = torch.as_tensor(0.1 * total, dtype=torch.float64) * torch.ones(2)
        r = ts.soft_topk(v, budget, 3.0, costs, return_result=True)
        assert r.iterations <= 8
        torch.testing.assert_close(r.mask, soft_reference(v, budget, 3.0, costs).detach(),
                                   rtol=0, atol=1e-9)


def test_soft_float32_meets_budget_on_large_problem() -> None:
    d = 300_000
    v = make_values(4, (d,), "spread", torch.float32)
    r = ts.soft_topk(v, 0.05 * d, 10.0, return_result=True)
    assert r.mask.dtype == torch.float32
    assert float(r.budget_error) <= 1e-6
    assert abs(float(r.mask.double().sum()) - 0.05 * d) <= 2e-6 * 0.05 * d


def test_soft_topk_result_outputs_are_not_differentiable() -> None:
    # the budget is fixed: the thresholds and errors carry no gradient, and the gradient of
    # the mask's sum (the spent budget) is zero
    v = make_values(2, (2, 9), "uniform").requires_grad_()
    budget = torch.tensor([3.0, 4.5], dtype=torch.float64)
    beta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    r = ts.soft_topk(v, budget, beta, tol=1e-12, return_result=True)
    assert type(r.mask.grad_fn).__name__ == "SoftTopKBackward"
    assert r.threshold.shape == (2,) and r.iterations >= 1 and float(r.budget_error.max()) <= 1e-12
    assert not r.threshold.requires_grad and not r.budget_error.requires_grad
    r.mask.sum().backward()
    assert v.grad is not None and float(v.grad.abs().max()) < 1e-9


@pytest.mark.parametrize("beta, most", [(1e3, 12), (1e5, 30)])
def test_soft_float32_sharp_beta_stops_at_float32_resolution(beta: float, most: int) -> None:
    # with a sharp beta the float32 residual cannot reach tol; the solve must stop once the
    # bracket on tau is below float32 resolution instead of bisecting float64 digits
    v = make_values(12, (20_000,), "uniform", torch.float32)
    r = ts.soft_topk(v, 500.5, beta, return_result=True)
    assert r.iterations <= most  # bisecting to float64 resolution would take about 50
    assert float(r.budget_error) <= 1e-3


# ---------------------------------------------------------------------------------------------
# soft top-k: low precision and warm start


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_low_precision_returns_dtype_and_agrees_with_float32(dtype: torch.dtype) -> None:
    v = make_values(5, (3, 200), "uniform", dtype)
    x = v.clone().requires_grad_()
    m = ts.soft_topk(x, 50.0, 2.0)
    assert m.dtype == dtype
    m32 = ts.soft_topk(v.float(), 50.0, 2.0)
    torch.testing.assert_close(m.float(), m32, rtol=0, atol=1e-2)
    m.float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
    assert torch.equal(ts.hard_topk(v, 50.0), ts.hard_topk(v.float(), 50.0))


def test_warm_start_same_mask_fewer_iterations() -> None:
    v = make_values(6, (4, 500), "spread")
    cold = ts.soft_topk(v, 100.0, 5.0, return_result=True)
    nearby = v * 1.001
    cold2 = ts.soft_topk(nearby, 100.0, 5.0, return_result=True)
    warm = ts.soft_topk(nearby, 100.0, 5.0, threshold_init=cold.threshold, return_result=True)
    assert warm.iterations < cold2.iterations
    torch.testing.assert_close(warm.mask, cold2.mask, rtol=0, atol=1e-8)
    same = ts.soft_topk(v, 100.0, 5.0, threshold_init=cold.threshold, return_result=True)
    assert same.iterations == 1
    torch.testing.assert_close(same.mask, cold.mask, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# hard top-k


@given(st.integers(1, 7), st.integers(0, 2**16), st.booleans(), st.integers(1, 100))
def test_hard_topk_matches_bruteforce_knapsack(d: int, seed: int, with_costs: bool,
                                               eighths: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = (torch.randperm(d, generator=g).to(torch.float64) + 1) / d  # distinct unit values
    c = make_costs(seed, (d,)) if with_costs else torch.ones(d, dtype=torch.float64)
    total = float(c.sum())
    budget = eighths / 101 * total
    v = u * c
    lp = knapsack_lp_bruteforce(v.tolist(), c.tolist(), budget)
    hard = ts.hard_topk(v, budget, c if with_costs else None)
    assert hard.tolist() == [m >= 0.5 for m in lp]


@given(st.sampled_from([(), (3,), (2, 2)]), st.integers(1, 30), st.integers(0, 2**16),
       st.sampled_from(["uniform", "ties"]), st.floats(0.01, 0.99), st.booleans())
def test_hard_topk_matches_greedy_reference(batch: tuple[int, ...], d: int, seed: int, kind: str,
                                            fraction: float, with_costs: bool) -> None:
    shape = (*batch, d)
    v = make_values(seed, shape, kind)
    c = make_costs(seed, shape) if with_costs else torch.ones(shape, dtype=torch.float64)
    budget = fraction * c.sum(-1)
    hard = ts.hard_topk(v, budget, c if with_costs else None)
    u = v / c
    for row, (ur, cr, br) in enumerate(zip(as_rows(u), as_rows(c), budget.reshape(-1),
                                           strict=True)):
        expected = greedy_reference(ur.tolist(), cr.tolist(), float(br))
        assert as_rows(hard)[row].tolist() == expected
    if not with_costs:
        k = torch.floor(budget + 0.5)
        assert torch.equal(hard.sum(-1).to(torch.float64), k)


@pytest.mark.parametrize("with_costs", [False, True])
def test_hard_topk_selection_path_matches_sort_path(with_costs: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    v = make_values(8, (3, 600), "ties").float()
    c = make_costs(8, (3, 600)).float() if with_costs else None
    budget = torch.tensor([1.0, 333.5, 599.25]) * (1 if c is None else c.mean(-1))
    sorted_path = ts.hard_topk(v, budget, c)
    monkeypatch.setattr(engine_module, "SELECT_MIN_LENGTH", 16)
    monkeypatch.setattr(select_module, "_SAMPLE_SIZE", 32)
    monkeypatch.setattr(select_module, "_MAX_SORTED", 8)
    assert torch.equal(ts.hard_topk(v, budget, c), sorted_path)


def test_hard_topk_unit_costs_keeps_round_budget_entries_on_long_row() -> None:
    v = make_values(9, (100_000,), "ties", torch.float32)  # massive ties
    for budget in (0.4, 0.5, 1.0, 12345.49, 12345.5, 99_999.6):
        h = ts.hard_topk(v, budget)
        k = math.floor(budget + 0.5)
        assert int(h.sum()) == k
        kept, dropped = v[h], v[~h]
        if k and dropped.numel():
            assert float(kept.min()) >= float(dropped.max())
            # ties at the boundary: lower index first
            t = float(kept.min())
            tied = (v == t).nonzero().squeeze(1)
            tied_kept = h[tied]
            assert bool((tied_kept[:-1].int() >= tied_kept[1:].int()).all())


# ---------------------------------------------------------------------------------------------
# select_top_budget


@st.composite
def chunked_problems(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[float], float]:
    # up to 12 chunks: with few distinct costs and group=True, 8 or more are concatenated
    n_chunks = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["uniform", "ties"]))
    chunks = []
    for i in range(n_chunks):
        shape = draw(st.sampled_from([(0,), (1,), (7,), (3, 4), (25,)]))
        chunks.append(make_values(seed + i, shape, kind, torch.float32))
    palette = draw(st.sampled_from([[1.0], [1.0, 2.0], [0.25, 0.5, 1.0, 2.0, 3.0]]))
    costs = [draw(st.sampled_from(palette)) for _ in chunks]
    total = sum(c * t.numel() for c, t in zip(costs, chunks, strict=True))
    assume(total > 0)
    budget = draw(st.floats(0.01, 0.99)) * total
    return chunks, costs, budget


def concatenated(chunks: list[torch.Tensor], costs: list[float]) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    values = torch.cat([t.reshape(-1) for t in chunks])
    c = torch.cat([torch.full((t.numel(),), w, dtype=values.dtype) for t, w in
                   zip(chunks, costs, strict=True)])
    return values, c


@given(chunked_problems(), st.booleans(),
       st.sampled_from([None, 0.0, 0.5, 2.0, 1e9, math.nan, select_module.Hint(0.5, 2.0**-16),
                        select_module.Hint(0.3, 0.5)]), st.sampled_from([None, True]))
def test_select_top_budget_equals_hard_topk_on_concatenation(
    problem: tuple[list[torch.Tensor], list[float], float], small_sample: bool,
    hint: float | select_module.Hint | None, group: bool | None,
) -> None:
    chunks, costs, budget = problem
    values, c = concatenated(chunks, costs)
    # chunks hold unit values u; hard_topk takes v = u * c (exact in float64 for these costs)
    expected = ts.hard_topk(values.double() * c.double(), budget, c.double())
    saved = (select_module._SAMPLE_SIZE, select_module._MAX_SORTED)
    try:
        if small_sample:  # exercise the retries and the recursive narrowing
            select_module._SAMPLE_SIZE, select_module._MAX_SORTED = 4, 2
        masks, threshold = select_top_budget(chunks, costs, budget, hint, group=group)
    finally:
        select_module._SAMPLE_SIZE, select_module._MAX_SORTED = saved
    assert [m.shape for m in masks] == [t.shape for t in chunks]
    assert all(m.dtype == torch.bool for m in masks)
    got = torch.cat([m.reshape(-1) for m in masks])
    assert torch.equal(got, expected)
    kept = values[expected]
    assert threshold == (float(kept.min()) if kept.numel() else math.inf)


@pytest.mark.parametrize("device", DEVICES)
def test_select_top_budget_mixed_dtypes_ties_and_hint(device: str) -> None:
    chunks = [
        torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float16, device=device),
        torch.tensor([[2.0, 0.1], [3.0, 2.0]], dtype=torch.float32, device=device),
        torch.tensor([2.0, 1.0 / 3.0], dtype=torch.float64, device=device),
    ]
    costs = [1.0, 0.5, 2.0]
    flat_u = [x for t in chunks for x in t.double().reshape(-1).tolist()]
    flat_c = [w for t, w in zip(chunks, costs, strict=True) for _ in range(t.numel())]
    for budget in (0.2, 1.0, 2.0, 3.25, 5.0, 6.0, 7.5, 8.9):
        expected = greedy_reference(flat_u, flat_c, budget)
        for hint in (None, 2.0, 1.0 / 3.0, 5.0):
            masks, threshold = select_top_budget(chunks, costs, budget, hint)
            got = [x for m in masks for x in m.reshape(-1).tolist()]
            assert got == expected, (budget, hint)
            kept = [u for u, k in zip(flat_u, expected, strict=True) if k]
            assert threshold == (min(kept) if kept else math.inf)


def test_select_top_budget_large_and_budget_edges() -> None:
    g = torch.Generator().manual_seed(11)
    chunks = [torch.rand(n, generator=g) for n in (100_000, 3, 250_000, 0, 77_777)]
    costs = [1.0, 5.0, 0.5, 1.0, 2.0]
    values, c = concatenated(chunks, costs)
    total = float(c.double().sum())
    for fraction in (1e-6, 0.3, 0.999999):
        budget = fraction * total
        masks, threshold = select_top_budget(chunks, costs, budget)
        expected = ts.hard_topk(values.double() * c.double(), budget, c.double())
        assert torch.equal(torch.cat(masks), expected)
        masks2, threshold2 = select_top_budget(chunks, costs, budget, hint=threshold)
        assert torch.equal(torch.cat(masks2), expected) and threshold2 == threshold
    masks, threshold = select_top_budget(chunks, costs, 0.0)
    assert not any(bool(m.any()) for m in masks) and threshold == math.inf
    masks, threshold = select_top_budget(chunks, costs, total)
    assert all(bool(m.all()) for m in masks) and threshold == float(values.min())


@pytest.mark.parametrize("group", [None, True])
@pytest.mark.parametrize(
    "chunks, costs, budget, error, match",
    [
        ([torch.tensor([1.0, math.nan])], [1.0], 1.0, ValueError, r"chunks\[0\].*NaN"),
        ([torch.ones(2), torch.tensor([math.inf])], [1.0, 1.0], 1.0, ValueError,
         r"chunks\[1\].*Inf"),
        ([torch.tensor([1.0, -1.0])], [1.0], 1.0, ValueError, r"chunks\[0\].*negative"),
        ([torch.ones(3)] * 8 + [torch.tensor([1.0, -1.0])], [1.0] * 9, 1.0, ValueError,
         r"chunks\[8\].*negative"),  # the grouped path names the chunk too
        ([torch.tensor([1, 2])], [1.0], 1.0, TypeError, r"chunks\[0\]"),
        ([torch.ones(2)], [0.0], 1.0, ValueError, r"costs\[0\]"),
        ([torch.ones(2)], [1.0, 1.0], 1.0, ValueError, "costs"),
        ([torch.ones(2)], [1.0], math.nan, ValueError, "budget"),
    ],
)
def test_select_top_budget_rejects_bad_input(chunks: list, costs: list, budget: float,
                                             error: type, match: str, group: bool | None) -> None:
    with pytest.raises(error, match=match):
        select_top_budget(chunks, costs, budget, group=group)


# ---------------------------------------------------------------------------------------------
# validation


V = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.25, 4.0]])


@pytest.mark.parametrize("fn", ["soft", "hard"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"values": torch.tensor([1.0, math.nan, 2.0])}, ValueError, "values.*NaN"),
        ({"values": torch.tensor([1.0, math.inf, 2.0])}, ValueError, "values.*Inf"),
        ({"values": torch.tensor([1.0, -math.inf, 2.0])}, ValueError, "values.*Inf"),
        ({"values": torch.tensor([1.0, -0.5, 2.0])}, ValueError, "values.*>= 0"),
        ({"values": torch.tensor([1, 2, 3])}, TypeError, "values"),
        ({"values": [1.0, 2.0]}, TypeError, "values"),
        ({"values": torch.ones(2, 0)}, ValueError, "values"),
        ({"costs": torch.tensor([1.0, 0.0, 1.0])}, ValueError, "costs.*> 0"),
        ({"costs": torch.tensor([1.0, -2.0, 1.0])}, ValueError, "costs.*> 0"),
        ({"costs": torch.tensor([1.0, math.nan, 1.0])}, ValueError, "costs.*NaN"),
        ({"costs": torch.tensor([1, 1, 1])}, TypeError, "costs"),
        ({"costs": torch.ones(4)}, ValueError, "costs.*broadcast"),
        ({"budget": 0.0}, ValueError, "budget"),
        ({"budget": -1.0}, ValueError, "budget"),
        ({"budget": 3.0}, ValueError, "budget"),
        ({"budget": math.nan}, ValueError, "budget"),
        ({"budget": torch.tensor([1.0, 3.5])}, ValueError, "budget"),
        ({"budget": torch.tensor([1.0, 1.0, 1.0])}, ValueError, "budget.*broadcast"),
        ({"budget": torch.tensor(1)}, TypeError, "budget"),
        ({"budget": "1"}, TypeError, "budget"),
    ],
)
def test_bad_input_raises_named_error(fn: str, kwargs: dict, error: type, match: str) -> None:
    args = {"values": V, "budget": 1.5, "costs": None} | kwargs
    with pytest.raises(error, match=match):
        if fn == "soft":
            ts.soft_topk(args["values"], args["budget"], 1.0, args["costs"])
        else:
            ts.hard_topk(args["values"], args["budget"], args["costs"])


@pytest.mark.parametrize(
    "beta, error, match",
    [(0.0, ValueError, "beta"), (-1.0, ValueError, "beta"), (math.inf, ValueError, "beta"),
     (math.nan, ValueError, "beta"), (torch.tensor([1.0, -1.0]), ValueError, "beta"),
     (torch.ones(3), ValueError, "beta.*broadcast"), (torch.tensor(2), TypeError, "beta"),
     (None, TypeError, "beta")],
)
def test_bad_beta_raises_named_error(beta: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ts.soft_topk(V, 1.5, beta)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"tol": 0.0}, "tol"), ({"tol": math.nan}, "tol"), ({"max_iter": 0}, "max_iter"),
     ({"threshold_init": torch.zeros(3)}, "threshold_init.*broadcast"),
     ({"threshold_init": math.inf}, "threshold_init")],
)
def test_bad_solver_options_raise_named_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ts.soft_topk(V, 1.5, 1.0, **kwargs)


# ---------------------------------------------------------------------------------------------
# docstring examples


@pytest.mark.parametrize("module", [topk_module, select_module])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# Newton's certified last step


def _sigmoid_problem(units: torch.Tensor, beta: float, budget: float):  # noqa: ANN202
    """``evaluate(x, curvature)`` of ``f(x) = sum sigmoid(beta (u + x)) - budget`` in float64."""
    def evaluate(x: torch.Tensor, curvature: bool):  # noqa: ANN202
        m = torch.sigmoid(beta * (units + x))
        f = (m.sum() - budget).reshape(1)
        fp = (beta * (m * (1 - m)).sum()).reshape(1)
        fpp = (beta**2 * (m * (1 - m) * (1 - 2 * m)).sum()).reshape(1)
        return f, fp, fpp if curvature else None
    return evaluate


@pytest.mark.parametrize("offset", [3e-3, 1e-2, 3e-2])
def test_the_certified_step_bounds_its_residual_tightly(offset: float) -> None:
    # units all near 1 with the masks near 0: f'' is nearly beta f' (the bound's worst case),
    # so the residual after the step is nearly the bound |f| (e^a - 1 - a) / a
    n, beta = 1000, 4.0
    units = 1.0 + 1e-3 * torch.rand(n, dtype=torch.float64, generator=torch.Generator()
                                    .manual_seed(0))
    root = math.log(0.005 / 0.995) / beta - 1.0  # sigmoid(beta (1 + x)) = 0.005
    budget = float(torch.sigmoid(beta * (units + root)).sum())
    evaluate = _sigmoid_problem(units, beta, budget)
    x0 = torch.tensor([root + offset], dtype=torch.float64)
    target = torch.tensor([budget], dtype=torch.float64)
    lo, hi = x0 - 1.0, x0 + 1.0
    x, bound, evaluations, slope = engine_module.safeguarded_newton(
        evaluate, x0, lo, hi, target, 1.0, 1, check=False,
        beta_max=torch.tensor([beta], dtype=torch.float64), max_shift=1.0)
    assert evaluations == 1 and not torch.equal(x, x0)  # the step was taken
    f, fp, _ = evaluate(x, False)
    assert 0.8 * float(bound) <= float(f.abs()) <= float(bound)
    f0, fp0, _ = evaluate(x0, False)
    a = beta * abs(float(f0 / fp0))
    assert float(bound) < float(f0.abs()) * a  # quadratic: far below the residual before
    assert abs(float(slope / fp) - 1) <= a * a  # f' + f'' dx: off by about a^2 / 2


def test_a_warm_float32_solve_takes_one_evaluation_and_keeps_its_promises() -> None:
    g = torch.Generator().manual_seed(1)
    units = torch.rand(1, 300_000, generator=g) ** 2
    beta, density = 20.0, 0.1
    budget = torch.tensor([density * units.numel()], dtype=torch.float64)
    piece = engine_module.Piece(units, beta, 1.0, 0)
    exact = engine_module.solve_soft([piece], budget, tol=1e-9, masks=True)
    # a warm start as close as a training step's (a relative budget error of about 1e-5)
    start = exact.tau + 1e-5 * float(budget[0]) / float(exact.slope[0])
    for chunks in (True, False):
        solution = engine_module.solve_soft([piece], budget, tau_init=start, chunks=chunks)
        assert solution.evaluations == 1 and float(solution.error[0]) <= 1e-6
        m = torch.sigmoid(beta * (units.double() - float(solution.tau[0])))
        assert abs(float(m.sum()) - float(budget[0])) <= 1e-6 * float(budget[0])
        slope = beta * float((m * (1 - m)).sum())
        assert float(solution.slope[0]) == pytest.approx(slope, rel=1e-6)
