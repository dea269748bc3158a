"""Soft and hard top-k with costs: the mask operators of Spartan.

The soft top-k is the entropy-regularised fractional knapsack (an optimal transport between the
entries and the two bins "keep" and "drop")::

    maximise  sum_i v_i m_i + (1/beta) sum_i c_i H(m_i)   subject to  sum_i c_i m_i = B,

whose solution is ``m_i = sigmoid(beta * v_i / c_i + mu)`` for the unique scalar ``mu`` that meets
the budget. ``mu`` is found by a safeguarded Newton iteration (no sort), and the backward pass is
the closed form of implicit differentiation, O(d).

The hard top-k keeps the entries of highest unit value ``v_i / c_i`` (ties: lower index first)
whose cumulative cost fits the budget, an entry counting as fitting when at least half of its cost
fits; with unit costs that is exactly ``floor(B + 0.5)`` entries.

Reference: Tai, Tian & Lim, "Spartan: Differentiable Sparsity via Regularized Transportation",
NeurIPS 2022, arXiv:2205.14107.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from torchspartan._select import _select
from torchspartan._solver import safeguarded_newton

__all__ = ["SoftTopK", "SoftTopKResult", "hard_topk", "soft_topk"]

Budget = float | torch.Tensor


@dataclass(frozen=True)
class SoftTopKResult:
    """What ``soft_topk(..., return_result=True)`` returns.

    Attributes:
        mask: the soft mask, same shape and dtype as ``values``.
        mu: the dual variable of each problem, shape ``(*,)``, float64; pass it back as
            ``mu_init`` to warm-start a nearby problem.
        iterations: number of evaluations of the budget residual the solve used.
        budget_error: ``|sum(costs * mask) - budget| / budget`` per problem, shape ``(*,)``.
    """

    mask: torch.Tensor
    mu: torch.Tensor
    iterations: int
    budget_error: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {t.dtype}; "
            f"convert it first, e.g. {name}.float()"
        )


def _row_extremes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-problem minimum and maximum over the last dimension, float64, shape ``(*,)``."""
    if t.dim() == 1:
        lo, hi = torch.aminmax(t)
    else:
        lo, hi = torch.aminmax(t, dim=-1)
    return lo.to(torch.float64), hi.to(torch.float64)


def _check_extremes(
    name: str, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, positive: bool
) -> None:
    """Raise for NaN, Inf, negative (or, with ``positive``, non-positive) entries.

    ``lo`` and ``hi`` are the minimum and maximum of ``t`` (NaN propagates into both), so one
    read pass detects all three kinds of bad value.
    """
    if bool((torch.isnan(lo) | torch.isnan(hi)).any()):
        raise ValueError(
            f"{name} must be finite, found NaN in a tensor of shape {tuple(t.shape)}; "
            f"check the tensor that produced it"
        )
    if bool((torch.isinf(lo) | torch.isinf(hi)).any()):
        raise ValueError(
            f"{name} must be finite, found Inf in a tensor of shape {tuple(t.shape)}; "
            f"check the tensor that produced it"
        )
    smallest = float(lo.min())
    if positive and smallest <= 0:
        raise ValueError(
            f"{name} must be > 0, found minimum {smallest:.6g}; give every entry a "
            f"positive cost (use 1 for plain top-k)"
        )
    if not positive and smallest < 0:
        raise ValueError(
            f"{name} must be >= 0 (scores such as |theta|), found minimum {smallest:.6g}; "
            f"pass {name}.abs() or shift the scores"
        )


def _as_problem_tensor(
    name: str, x: Budget | float, batch_shape: torch.Size, like: torch.Tensor
) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        _check_float(name, x)
    elif isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number or a floating-point tensor, got {x!r}")
    t = torch.as_tensor(x, dtype=torch.float64, device=like.device)
    try:
        return torch.broadcast_to(t, batch_shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the batch shape "
            f"{tuple(batch_shape)} of values (values has shape (*, d) = {tuple(like.shape)}); "
            f"give a scalar or one {name} per problem"
        ) from None


@dataclass(frozen=True)
class _Checked:
    """Validated arguments: costs broadcast to values (or None), per-problem tensors (*,)."""

    costs: torch.Tensor | None
    budget: torch.Tensor
    total: torch.Tensor
    unit_min: torch.Tensor
    unit_max: torch.Tensor


def _validate(
    values: torch.Tensor,
    budget: Budget,
    costs: torch.Tensor | None,
) -> _Checked:
    """Check every argument in one read pass over ``values`` (and one over ``costs``)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    _check_float("values", values)
    if values.dim() < 1 or values.shape[-1] == 0:
        raise ValueError(
            f"values must have shape (*, d) with d >= 1, got shape {tuple(values.shape)}"
        )
    if values.numel() == 0:
        raise ValueError(f"values must not be empty, got shape {tuple(values.shape)}")
    vmin, vmax = _row_extremes(values.detach())
    _check_extremes("values", values, vmin, vmax, positive=False)
    batch = values.shape[:-1]
    d = values.shape[-1]
    if costs is not None:
        if not isinstance(costs, torch.Tensor):
            raise TypeError(f"costs must be a torch.Tensor or None, got {type(costs).__name__}")
        _check_float("costs", costs)
        if costs.device != values.device:
            raise ValueError(
                f"costs must be on the device of values ({values.device}), got {costs.device}"
            )
        try:
            costs_b = torch.broadcast_to(costs, values.shape)
        except RuntimeError:
            raise ValueError(
                f"costs of shape {tuple(costs.shape)} does not broadcast to values of shape "
                f"{tuple(values.shape)}"
            ) from None
        if costs.numel() == 0:
            raise ValueError("costs must not be empty")
        cmin, cmax = torch.aminmax(costs.detach())
        _check_extremes("costs", costs, cmin.reshape(1).double(), cmax.reshape(1).double(),
                        positive=True)
        total = costs_b.sum(-1, dtype=torch.float64)
        unit_min = vmin / float(cmax)
        unit_max = vmax / float(cmin)
    else:
        costs_b = None
        total = torch.full(batch, float(d), dtype=torch.float64, device=values.device)
        unit_min, unit_max = vmin, vmax
    b = _as_problem_tensor("budget", budget, batch, values)
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"budget must be finite, got {b.flatten()[:3].tolist()}")
    bad = (b <= 0) | (b >= total)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"budget must lie strictly between 0 and sum(costs) (the total cost, "
            f"{total.flatten()[i].item():.6g} here), got {b.flatten()[i].item():.6g}; "
            f"a budget of 0 or of everything needs no mask"
        )
    return _Checked(costs_b, b, total, unit_min, unit_max)


def _check_beta(beta: Budget, values: torch.Tensor) -> torch.Tensor:
    """``beta`` as a float64 tensor of shape ``(*,)``, finite and > 0."""
    beta_t = _as_problem_tensor("beta", beta, values.shape[:-1], values)
    ok = torch.isfinite(beta_t) & (beta_t > 0)
    if not bool(ok.all()):
        raise ValueError(
            f"beta must be finite and > 0 (the sharpness; larger is closer to hard top-k), "
            f"got {beta_t.flatten()[~ok.flatten()][0].item()}"
        )
    return beta_t


# Problems with at least this many entries get their cold start from a strided sample.
_SAMPLE_SIZE = 1 << 14


def _cold_start(
    values: torch.Tensor,
    costs: torch.Tensor | None,
    budget: torch.Tensor,
    beta: torch.Tensor,
    total: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> torch.Tensor:
    """Initial ``mu``: the root of the same budget equation on a strided sample of every problem.

    The sampled problem is cheap (``_SAMPLE_SIZE`` entries) and its root is within the sampling
    error of the full root, so the full Newton iteration starts in its quadratic regime.
    """
    d = values.shape[-1]
    if d < 4 * _SAMPLE_SIZE:
        return 0.5 * (lo + hi)
    stride = d // _SAMPLE_SIZE
    sample = values[..., stride // 2::stride]
    if costs is None:
        sample_costs = None
        target = budget * (sample.shape[-1] / d)
    else:
        sample_costs = costs[..., stride // 2::stride]
        target = budget * (sample_costs.sum(-1, dtype=torch.float64) / total)
    _, mu, _, _ = _solve_soft(sample, sample_costs, target, beta, None, 1e-6, 60)
    return mu


def _solve_soft(
    values: torch.Tensor,
    costs: torch.Tensor | None,
    budget: torch.Tensor,
    beta: torch.Tensor,
    mu_init: torch.Tensor | None,
    tol: float,
    max_iter: int,
    unit_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Forward solve in the compute dtype. Returns (mask, mu (*,), evaluations, rel. error).

    Each evaluation of the budget residual is five passes with two preallocated buffers:
    ``m = sigmoid(beta * u + mu)`` (two, in place), ``sum(c m)``, ``m - m^2`` and its sum. The
    mask is the ``m`` of the last evaluation, so it costs no extra pass.
    """
    cdt = _compute_dtype(values.dtype)
    v = values.to(cdt)
    d = v.shape[-1]
    if costs is None:
        c = None
        units = v
        total = torch.full_like(budget, float(d))
    else:
        c = torch.broadcast_to(costs.to(cdt), v.shape)
        units = v / c
        total = c.sum(-1, dtype=torch.float64)
    if unit_range is None:
        unit_range = _row_extremes(units)
    zmin, zmax = unit_range[0] * beta, unit_range[1] * beta
    # phi(mu) <= 0 when every beta*u + mu <= logit(B / total), >= 0 when every one is >= it.
    base = torch.logit(budget / total)
    lo, hi = base - zmax, base - zmin
    if mu_init is None:
        x0 = _cold_start(values, costs, budget, beta, total, lo, hi)
    else:
        x0 = torch.broadcast_to(mu_init.to(torch.float64), budget.shape)
    x0 = torch.minimum(torch.maximum(x0, lo), hi)
    beta_c = beta.to(cdt).unsqueeze(-1)
    m = torch.empty_like(v, dtype=cdt)
    a = torch.empty_like(m)

    def evaluate(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.addcmul(mu.to(cdt).unsqueeze(-1), units, beta_c, out=m)
        m.sigmoid_()
        if c is None:
            f = m.sum(-1).to(torch.float64) - budget
            torch.addcmul(m, m, m, value=-1, out=a)
        else:
            f = torch.mul(m, c, out=a).sum(-1).to(torch.float64) - budget
            torch.addcmul(m, m, m, value=-1, out=a).mul_(c)
        return f, a.sum(-1).to(torch.float64)

    # The sigmoid's argument beta * u + mu is rounded to the compute dtype: a bracket on mu
    # narrower than that rounding cannot improve the residual.
    resolution = 8 * torch.finfo(cdt).eps
    mu, f, evaluations = safeguarded_newton(
        evaluate, x0, lo, hi, budget, tol, max_iter, resolution=resolution
    )
    return m, mu, evaluations, f.abs() / budget


class SoftTopK(torch.autograd.Function):
    """Autograd function of the soft top-k; use :func:`soft_topk`, which validates.

    ``SoftTopK.apply(values, budget, beta, costs, mu_init, tol, max_iter)`` with ``budget`` and
    ``beta`` float64 tensors of shape ``(*,)`` returns ``(mask, mu, iterations, budget_error)``;
    only ``mask`` is differentiable, and only with respect to ``values``. The backward is
    implicit differentiation of the budget equation::

        S = sum_j c_j m_j (1 - m_j),   Lambda = sum_j g_j m_j (1 - m_j) / S,
        dL/dv_i = (beta / c_i) m_i (1 - m_i) (g_i - c_i Lambda).

    An optional eighth argument ``(unit_min, unit_max)``, lower and upper bounds of ``v / c`` per
    problem, saves the forward one pass (``soft_topk`` passes what validation measured).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx: Any,
        values: torch.Tensor,
        budget: torch.Tensor,
        beta: torch.Tensor,
        costs: torch.Tensor | None,
        mu_init: torch.Tensor | None,
        tol: float,
        max_iter: int,
        unit_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mask, mu, evaluations, error = _solve_soft(
            values, costs, budget, beta, mu_init, tol, max_iter, unit_range
        )
        ctx.save_for_backward(mask, costs, beta)
        ctx.values_dtype = values.dtype
        iterations = torch.tensor(evaluations)
        ctx.mark_non_differentiable(mu, iterations, error)
        out = mask if mask.dtype == values.dtype else mask.to(values.dtype)
        return out, mu, iterations, error

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(
        ctx: Any, grad_mask: torch.Tensor | None, *unused: Any
    ) -> tuple[torch.Tensor | None, ...]:
        mask, costs, beta = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad_mask is None:
            return (None,) * 8
        g = grad_mask.to(mask.dtype)
        a = torch.addcmul(mask, mask, mask, value=-1)  # m (1 - m)
        b = beta.to(mask.dtype).unsqueeze(-1)
        tiny = torch.finfo(mask.dtype).tiny
        grad = g * a
        lam_num = grad.sum(-1, keepdim=True)
        if costs is None:
            s = a.sum(-1, keepdim=True)
        else:
            c = torch.broadcast_to(costs.to(mask.dtype), mask.shape)
            s = (c * a).sum(-1, keepdim=True)
            grad.div_(c)
        lam = lam_num / s.clamp_min(tiny)
        # beta * (g a / c - a Lambda)
        grad.addcmul_(a, lam, value=-1).mul_(b)
        return grad.to(ctx.values_dtype), None, None, None, None, None, None, None


@overload
def soft_topk(
    values: torch.Tensor, budget: Budget, beta: Budget, costs: torch.Tensor | None = ..., *,
    mu_init: torch.Tensor | float | None = ..., tol: float | None = ..., max_iter: int = ...,
    return_result: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def soft_topk(
    values: torch.Tensor, budget: Budget, beta: Budget, costs: torch.Tensor | None = ..., *,
    mu_init: torch.Tensor | float | None = ..., tol: float | None = ..., max_iter: int = ...,
    return_result: Literal[True],
) -> SoftTopKResult: ...


def soft_topk(
    values: torch.Tensor,
    budget: Budget,
    beta: Budget,
    costs: torch.Tensor | None = None,
    *,
    mu_init: torch.Tensor | float | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    return_result: bool = False,
) -> torch.Tensor | SoftTopKResult:
    """Soft top-k mask with costs: the entropy-regularised fractional knapsack.

    Solves, for every leading index independently::

        m = argmax_m  sum_i v_i m_i + (1/beta) sum_i c_i H(m_i)  s.t.  sum_i c_i m_i = B,
        m_i = sigmoid(beta * v_i / c_i + mu),

    with ``H`` the binary entropy and ``mu`` the root of the budget equation, found by a
    safeguarded Newton iteration to a relative budget error of ``tol``. As ``beta`` grows the mask
    tends to :func:`hard_topk`'s. Differentiable in ``values`` (closed-form O(d) backward);
    ``budget``, ``beta`` and ``costs`` get no gradient.

    Args:
        values: scores ``v >= 0`` of shape ``(*, d)``, e.g. ``weight.abs()``. float16 and
            bfloat16 are computed in float32 and returned in their own dtype.
        budget: ``B`` with ``0 < B < sum(costs)`` (``sum(costs) = d`` without costs): a number or
            a tensor broadcastable to ``(*,)``. With unit costs this is the number of entries kept.
        beta: sharpness ``> 0``, a number or a tensor broadcastable to ``(*,)``.
        costs: positive costs ``c`` broadcastable to ``values``; ``None`` means all ones.
        mu_init: warm start for ``mu`` (e.g. ``result.mu`` of the previous training step).
        tol: relative budget tolerance; default 1e-6 (1e-10 for float64 values).
        max_iter: most evaluations of the budget equation (each is one pass over ``values``).
        return_result: return a :class:`SoftTopKResult` with ``mu``, the iteration count and the
            achieved budget error instead of the mask alone.

    Returns:
        The mask ``m`` in ``[0, 1]``, same shape and dtype as ``values`` (or a result object).

    Raises:
        TypeError: a non-floating ``values``, ``costs``, ``budget`` or ``beta``.
        ValueError: NaN/Inf or negative values, non-positive costs, a budget outside
            ``(0, sum(costs))``, ``beta <= 0``, or shapes that do not broadcast.

    Example:
        >>> import torch, torchspartan as ts
        >>> v = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
        >>> m = ts.soft_topk(v, budget=2, beta=10.0)
        >>> round(m.sum().item(), 4)
        2.0
        >>> m.argsort(descending=True)[0, :2].tolist()
        [0, 2]
    """
    checked = _validate(values, budget, costs)
    beta_t = _check_beta(beta, values)
    if tol is None:
        tol = 1e-10 if values.dtype == torch.float64 else 1e-6
    if isinstance(max_iter, bool) or not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    mu0 = None
    if mu_init is not None:
        mu0 = _as_problem_tensor("mu_init", mu_init, values.shape[:-1], values)
        if not bool(torch.isfinite(mu0).all()):
            raise ValueError(
                f"mu_init must be finite, got {mu0.flatten()[:3].tolist()}; pass the mu of a "
                f"previous SoftTopKResult"
            )
    unit_range = (checked.unit_min, checked.unit_max)
    mask, mu, iterations, error = SoftTopK.apply(
        values, checked.budget, beta_t, checked.costs, mu0, float(tol), max_iter,
        unit_range,
    )
    if return_result:
        return SoftTopKResult(mask, mu, int(iterations), error)
    return mask


# Rows at least this long are selected one by one without sorting; shorter rows are sorted in
# one batched call (cheaper for many short rows, e.g. N:M groups).
_SELECT_MIN_LENGTH = 1 << 12


def hard_topk(
    values: torch.Tensor, budget: Budget, costs: torch.Tensor | None = None
) -> torch.Tensor:
    """Hard top-k with costs: the greedy fractional-knapsack mask, rounded to whole entries.

    Entries are taken by decreasing unit value ``v_i / c_i`` (ties: lower index first); an entry
    is kept while at least half of its cost still fits in the budget ``B``::

        keep i  <=>  sum of c_j over the entries j before i  +  c_i / 2  <=  B.

    With unit costs that keeps exactly ``floor(B + 0.5)`` entries per problem. Long rows are
    handled by selection (a sampled window verified by exact comparisons), not by a sort, so the
    cost is a few passes over ``values``.

    Args:
        values: scores ``v >= 0`` of shape ``(*, d)``.
        budget: ``0 < B < sum(costs)``, a number or a tensor broadcastable to ``(*,)``.
        costs: positive costs broadcastable to ``values``; ``None`` means all ones.

    Returns:
        A bool tensor of ``values``' shape, True for kept entries.

    Raises:
        TypeError / ValueError: as :func:`soft_topk`.

    Example:
        >>> import torch, torchspartan as ts
        >>> ts.hard_topk(torch.tensor([3.0, 1.0, 2.0, 0.5]), budget=2).tolist()
        [True, False, True, False]
        >>> ts.hard_topk(torch.tensor([3.0, 1.0, 2.0]), budget=2.5,
        ...              costs=torch.tensor([2.0, 1.0, 1.0])).tolist()
        [True, False, True]
    """
    checked = _validate(values, budget, costs)
    d = values.shape[-1]
    rows = values.reshape(-1, d)
    budgets = checked.budget.reshape(-1)
    cost_rows = None if checked.costs is None else checked.costs.reshape(-1, d)
    if rows.shape[0] == 1 and cost_rows is None:
        masks, _ = _select([rows[0]], [1.0], float(budgets[0]), None)
        return masks[0].view(values.shape)
    if d >= _SELECT_MIN_LENGTH or rows.shape[0] == 1:
        out = torch.empty(rows.shape, dtype=torch.bool, device=values.device)
        for r, b in enumerate(budgets.tolist()):
            if cost_rows is None:
                masks, _ = _select([rows[r]], [1.0], b, None)
            else:
                c = cost_rows[r].to(torch.float64)
                masks, _ = _select([rows[r].to(torch.float64) / c], [c], b, None)
            out[r] = masks[0]
        return out.view(values.shape)
    cdt = torch.float64
    if cost_rows is None:
        u = rows
    else:
        u = rows.to(cdt) / cost_rows.to(cdt)
    order = torch.sort(u, dim=-1, descending=True, stable=True).indices
    if cost_rows is None:
        position = torch.arange(1, d + 1, dtype=cdt, device=values.device)
        keep_sorted = (position - 0.5) <= budgets.unsqueeze(-1)
        keep_sorted = keep_sorted.expand(rows.shape)
    else:
        c_sorted = torch.gather(cost_rows.to(cdt), -1, order)
        keep_sorted = (c_sorted.cumsum(-1) - 0.5 * c_sorted) <= budgets.unsqueeze(-1)
    out = torch.zeros(rows.shape, dtype=torch.bool, device=values.device)
    return out.scatter_(-1, order, keep_sorted).view(values.shape)
