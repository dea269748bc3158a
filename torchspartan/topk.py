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

from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

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


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[:3].tolist()
        raise ValueError(
            f"{name} must be finite, found {bad} (NaN or Inf) in a tensor of shape "
            f"{tuple(t.shape)}; check the tensor that produced it"
        )


def _as_problem_tensor(
    name: str, x: Budget, batch_shape: torch.Size, like: torch.Tensor
) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=like.device)
    try:
        return torch.broadcast_to(t, batch_shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the batch shape "
            f"{tuple(batch_shape)} of values (values has shape (*, d) = {tuple(like.shape)}); "
            f"give a scalar or one {name} per problem"
        ) from None


def _validate(
    values: torch.Tensor,
    budget: Budget,
    costs: torch.Tensor | None,
    beta: Budget | None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Check every argument; return costs broadcast to values, budget (*,), beta (*,), sum(c)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    _check_float("values", values)
    if values.dim() < 1 or values.shape[-1] == 0:
        raise ValueError(
            f"values must have shape (*, d) with d >= 1, got shape {tuple(values.shape)}"
        )
    _check_finite("values", values)
    if bool((values < 0).any()):
        raise ValueError(
            f"values must be >= 0 (scores such as |theta|), found minimum "
            f"{values.min().item():.6g}; pass values.abs() or shift the scores"
        )
    batch = values.shape[:-1]
    if costs is not None:
        if not isinstance(costs, torch.Tensor):
            raise TypeError(f"costs must be a torch.Tensor or None, got {type(costs).__name__}")
        _check_float("costs", costs)
        try:
            costs = torch.broadcast_to(costs, values.shape)
        except RuntimeError:
            raise ValueError(
                f"costs of shape {tuple(costs.shape)} does not broadcast to values of shape "
                f"{tuple(values.shape)}"
            ) from None
        _check_finite("costs", costs)
        if bool((costs <= 0).any()):
            raise ValueError(
                f"costs must be > 0, found minimum {costs.min().item():.6g}; give every entry a "
                f"positive cost (use 1 for plain top-k)"
            )
        total = costs.sum(-1, dtype=torch.float64)
    else:
        total = torch.full(batch, float(values.shape[-1]), dtype=torch.float64,
                           device=values.device)
    if isinstance(budget, torch.Tensor):
        _check_float("budget", budget)
    b = _as_problem_tensor("budget", budget, batch, values)
    _check_finite("budget", b)
    bad = (b <= 0) | (b >= total)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"budget must lie strictly between 0 and sum(costs) (the total cost, "
            f"{total.flatten()[i].item():.6g} here), got {b.flatten()[i].item():.6g}; "
            f"a budget of 0 or of everything needs no mask"
        )
    beta_t = None
    if beta is not None:
        if isinstance(beta, torch.Tensor):
            _check_float("beta", beta)
        beta_t = _as_problem_tensor("beta", beta, batch, values)
        if not bool((torch.isfinite(beta_t) & (beta_t > 0)).all()):
            raise ValueError(
                f"beta must be finite and > 0 (the sharpness; larger is closer to hard top-k), "
                f"got {beta_t.flatten()[~(torch.isfinite(beta_t) & (beta_t > 0)).flatten()][0]}"
            )
    return costs, b, beta_t, total


def _solve_soft(
    values: torch.Tensor,
    costs: torch.Tensor | None,
    budget: torch.Tensor,
    beta: torch.Tensor,
    total: torch.Tensor,
    mu_init: torch.Tensor | None,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Forward solve in the compute dtype. Returns (mask, mu (*,), evaluations, rel. error)."""
    cdt = _compute_dtype(values.dtype)
    v = values.to(cdt)
    c = None if costs is None else costs.to(cdt)
    z = (v if c is None else v / c) * beta.to(cdt).unsqueeze(-1)
    zmax = z.amax(-1).double()
    zmin = z.amin(-1).double()
    base = torch.logit(budget / total)
    lo, hi = base - zmax, base - zmin
    if mu_init is None:
        mean_z = z.mean(-1, dtype=torch.float64)
        x0 = base - mean_z
    else:
        x0 = torch.broadcast_to(torch.as_tensor(mu_init, dtype=torch.float64,
                                                device=values.device), budget.shape)
    x0 = torch.minimum(torch.maximum(x0, lo), hi)

    def evaluate(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.sigmoid(z + mu.to(cdt).unsqueeze(-1))
        a = m * (1 - m)
        if c is None:
            f = m.sum(-1, dtype=torch.float64) - budget
            fp = a.sum(-1, dtype=torch.float64)
        else:
            f = (c * m).sum(-1, dtype=torch.float64) - budget
            fp = (c * a).sum(-1, dtype=torch.float64)
        return f, fp

    mu, f, evaluations = safeguarded_newton(
        evaluate, x0, lo, hi, budget, tol, max_iter
    )
    mask = torch.sigmoid(z + mu.to(cdt).unsqueeze(-1))
    return mask, mu, evaluations, (f.abs() / budget)


class SoftTopK(torch.autograd.Function):
    """Autograd function of the soft top-k; use :func:`soft_topk`, which validates.

    ``SoftTopK.apply(values, budget, beta, costs, mu_init, tol, max_iter)`` with ``budget`` and
    ``beta`` float64 tensors of shape ``(*,)`` returns ``(mask, mu, iterations, budget_error)``;
    only ``mask`` is differentiable, and only with respect to ``values``. The backward is
    implicit differentiation of the budget equation::

        S = sum_j c_j m_j (1 - m_j),   Lambda = sum_j g_j m_j (1 - m_j) / S,
        dL/dv_i = (beta / c_i) m_i (1 - m_i) (g_i - c_i Lambda).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(  # type: ignore[override]
        ctx: Any,
        values: torch.Tensor,
        budget: torch.Tensor,
        beta: torch.Tensor,
        costs: torch.Tensor | None,
        mu_init: torch.Tensor | None,
        tol: float,
        max_iter: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        total = (
            costs.sum(-1, dtype=torch.float64)
            if costs is not None
            else torch.full_like(budget, float(values.shape[-1]))
        )
        mask, mu, evaluations, error = _solve_soft(
            values, costs, budget, beta, total, mu_init, tol, max_iter
        )
        ctx.save_for_backward(mask, costs, beta)
        ctx.values_dtype = values.dtype
        iterations = torch.tensor(evaluations)
        ctx.mark_non_differentiable(mu, iterations, error)
        return mask.to(values.dtype), mu, iterations, error

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(  # type: ignore[override]
        ctx: Any, grad_mask: torch.Tensor, *unused: Any
    ) -> tuple[torch.Tensor | None, ...]:
        mask, costs, beta = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad_mask is None:
            return (None,) * 7
        g = grad_mask.to(mask.dtype)
        a = mask * (1 - mask)
        b = beta.to(mask.dtype).unsqueeze(-1)
        if costs is None:
            s = a.sum(-1, keepdim=True)
            lam = (g * a).sum(-1, keepdim=True) / s.clamp_min(torch.finfo(s.dtype).tiny)
            grad = b * a * (g - lam)
        else:
            c = costs.to(mask.dtype)
            s = (c * a).sum(-1, keepdim=True)
            lam = (g * a).sum(-1, keepdim=True) / s.clamp_min(torch.finfo(s.dtype).tiny)
            grad = b / c * a * (g - c * lam)
        return grad.to(ctx.values_dtype), None, None, None, None, None, None


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
    if tol is None:
        tol = 1e-10 if values.dtype == torch.float64 else 1e-6
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    costs_b, b, beta_t, _ = _validate(values, budget, costs, beta)
    assert beta_t is not None
    mu0 = None if mu_init is None else torch.as_tensor(mu_init, dtype=torch.float64)
    if mu0 is not None:
        mu0 = mu0.to(values.device)
    mask, mu, iterations, error = SoftTopK.apply(
        values, b, beta_t, costs_b, mu0, float(tol), max_iter
    )
    if return_result:
        return SoftTopKResult(mask, mu, int(iterations), error)
    return mask


def _hard_topk_unit(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k`` (per row) largest entries of each row, ties by lower index; no sort."""
    d = values.shape[-1]
    rows = values.reshape(-1, d)
    ks = k.reshape(-1)
    out = torch.zeros(rows.shape, dtype=torch.bool, device=values.device)
    for kk in torch.unique(ks).tolist():
        sel = (ks == kk).nonzero().squeeze(-1)
        if kk <= 0:
            continue
        if kk >= d:
            out[sel] = True
            continue
        x = rows[sel]
        thr = x.kthvalue(d - int(kk) + 1, dim=-1, keepdim=True).values
        greater = x > thr
        need = kk - greater.sum(-1, keepdim=True)
        equal = x == thr
        out[sel] = greater | (equal & (equal.cumsum(-1) <= need))
    return out.reshape(values.shape)


def hard_topk(
    values: torch.Tensor, budget: Budget, costs: torch.Tensor | None = None
) -> torch.Tensor:
    """Hard top-k with costs: the greedy fractional-knapsack mask, rounded to whole entries.

    Entries are taken by decreasing unit value ``v_i / c_i`` (ties: lower index first); an entry
    is kept while at least half of its cost still fits in the budget ``B``. With unit costs that
    keeps exactly ``floor(B + 0.5)`` entries per problem and needs no sort (a selection).

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
    """
    costs_b, b, _, _ = _validate(values, budget, costs, None)
    if costs_b is None:
        k = torch.floor(b + 0.5).long()
        return _hard_topk_unit(values, k)
    cdt = torch.float64
    u = values.to(cdt) / costs_b.to(cdt)
    order = torch.sort(u, dim=-1, descending=True, stable=True).indices
    c_sorted = torch.gather(costs_b.to(cdt), -1, order)
    keep_sorted = (c_sorted.cumsum(-1) - 0.5 * c_sorted) <= b.unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

