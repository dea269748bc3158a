"""Soft and hard top-k with costs: the mask operators of Spartan, as used by training.

The soft top-k is the entropy-regularised fractional knapsack (an optimal transport between the
entries and the two bins "keep" and "drop"), with a temperature ``c_i / beta_i`` per entry::

    maximise  sum_i v_i m_i + sum_i (c_i / beta_i) H(m_i)   subject to  sum_i c_i m_i = B,

whose solution is ``m_i = sigmoid(beta_i * (v_i / c_i - tau))`` for the unique threshold ``tau``
that meets the budget. ``tau`` is found by a safeguarded Newton iteration (no sort) and the
backward pass is the closed form of implicit differentiation, O(d), cross-tensor term included.
The same engine (``_engine.py``) computes the masks during training (docs/design.md).

The hard top-k keeps the entries of highest unit value ``v_i / c_i`` (ties: lower position first)
whose cumulative cost fits the budget, an entry counting as fitting when at least half of its cost
fits; with unit costs that is exactly ``floor(B + 0.5)`` entries.

Both take one tensor ``(*, d)`` (every row its own problem) or a list of tensors that an
allocation policy turns into problems (default :class:`~torchspartan.Global`: one budget over
all of them).

Reference: Tai, Tian & Lim, "Spartan: Differentiable Sparsity via Regularized Transportation",
NeurIPS 2022, arXiv:2205.14107.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from torchspartan._blocks import from_rows, to_rows
from torchspartan._device import to_device
from torchspartan._engine import (
    TOLERANCE,
    Piece,
    hard_select,
    select_rows,
    soft_backward,
    solve_soft,
)
from torchspartan.policies import AllocationPolicy, Global, MaskedTensor

__all__ = ["SoftTopK", "SoftTopKResult", "hard_topk", "soft_topk"]

Budget = float | torch.Tensor
Values = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class SoftTopKResult:
    """What ``soft_topk(..., return_result=True)`` returns.

    Attributes:
        mask: the soft mask: same shape and dtype as ``values`` (a list for a list).
        threshold: ``tau`` of every problem, float64: shape ``(*,)`` for a tensor ``(*, d)``;
            one per segment of the policy's problems for a list (one for Global). Pass it back
            as ``threshold_init`` to warm-start a nearby problem.
        iterations: number of evaluations of the budget residual the solve used.
        budget_error: ``|sum(costs * mask) - budget| / budget`` per problem.
    """

    mask: torch.Tensor | list[torch.Tensor]
    threshold: torch.Tensor
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
    elif isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number or a floating-point tensor, got {x!r}")
    t = torch.as_tensor(x if isinstance(x, torch.Tensor) else float(x), dtype=torch.float64,
                        device=like.device)
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
    cost_max: float = 1.0


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
        cost_max = float(cmax)
    else:
        costs_b = None
        total = torch.full(batch, float(d), dtype=torch.float64, device=values.device)
        unit_min, unit_max = vmin, vmax
        cost_max = 1.0
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
    return _Checked(costs_b, b, total, unit_min, unit_max, cost_max)


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




Kind = Literal["batch", "flat", "rows"]


@dataclass(frozen=True)
class _Part:
    """How one input tensor enters the engine: its rows, and the segment of its first row."""

    shape: torch.Size
    kind: Kind  # "batch": rows of the last dim; "flat": one row; "rows": N:M groups along dim 1
    segment: int
    group: int | None = None

    def to_piece(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "rows":
            return to_rows(t, self.group)
        return t.reshape(-1, self.shape[-1]) if self.kind == "batch" else t.reshape(1, -1)

    def from_piece(self, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "rows":
            return from_rows(p, self.shape, self.group)
        return p.reshape(self.shape)

    @property
    def rowwise(self) -> bool:
        return self.kind != "flat"


@dataclass
class _Plan:
    """Validated problem: parts, their beta and cost, the budgets of the segments."""

    parts: list[_Part]
    betas: list[float | torch.Tensor]
    costs: list[float | torch.Tensor]  # per part: a number or per-entry costs (value's shape)
    budgets: torch.Tensor  # (S,) float64
    fill: list[bool | None]  # per part: None (solved), True/False (density 1 or 0: constant)
    tau_init: torch.Tensor | None = None
    tol: float = TOLERANCE
    max_iter: int = 100
    # Guards against overflow and underflow (see _guard): the engine solves for v / scale with
    # beta * scale (the same masks; a power of two, so exact), in float64 when float32 cannot
    # hold beta * (u - tau) or resolve the threshold.
    scale: float = 1.0
    compute: torch.dtype | None = None
    cost_max: float = 1.0

    def pieces(self, values: Sequence[torch.Tensor]) -> list[Piece]:
        out = []
        for part, v, beta, cost, fill in zip(self.parts, values, self.betas, self.costs,
                                             self.fill, strict=True):
            if fill is not None:
                continue
            u = v.detach().to(self.compute or _compute_dtype(v.dtype))
            if self.scale != 1.0:
                u = u * (1.0 / self.scale)
            if isinstance(cost, torch.Tensor):
                c = part.to_piece(cost.to(u.dtype))
                units = part.to_piece(u) / c
                out.append(Piece(units, beta, c, part.segment, part.rowwise))
            else:
                units = part.to_piece(u if cost == 1.0 else u / cost)
                out.append(Piece(units, beta, float(cost), part.segment, part.rowwise))
        return out


class SoftTopK(torch.autograd.Function):
    """Autograd function of the soft top-k; use :func:`soft_topk`, which validates.

    ``SoftTopK.apply(plan, *values)`` returns ``(*masks, threshold, iterations, budget_error)``;
    only the masks are differentiable, with respect to the values. The backward is implicit
    differentiation of the budget equations, per segment ``j`` (``a = m (1 - m)``)::

        S_j = sum_{i in j} c_i beta_i a_i,   Lambda_j = sum_{i in j} g_i beta_i a_i / S_j,
        dL/dv_i = beta_i a_i (g_i / c_i - Lambda_j).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, plan: _Plan, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pieces = plan.pieces(values)
        outputs: list[torch.Tensor] = []
        num_segments = plan.budgets.numel()
        device = plan.budgets.device
        if pieces:
            sol = solve_soft(pieces, plan.budgets, tau_init=plan.tau_init, tol=plan.tol,
                             max_iter=plan.max_iter, masks=True)
            solved = iter(sol.masks)
            tau, evaluations, error = sol.tau, sol.evaluations, sol.error
        else:
            solved = iter(())
            tau = torch.full((num_segments,), math.nan, dtype=torch.float64, device=device)
            evaluations, error = 0, torch.zeros_like(tau)
        masks = []
        for part, v, fill in zip(plan.parts, values, plan.fill, strict=True):
            if fill is None:
                m = next(solved)
                masks.append(m)
                outputs.append(part.from_piece(m).to(v.dtype))
            else:
                outputs.append(torch.full(v.shape, float(fill), dtype=v.dtype, device=v.device))
        ctx.plan = plan
        ctx.dtypes = [v.dtype for v in values]
        ctx.save_for_backward(*masks)
        iterations = torch.tensor(evaluations)
        ctx.mark_non_differentiable(tau, iterations, error)
        return (*outputs, tau, iterations, error)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        masks = list(ctx.saved_tensors)
        n = len(plan.parts)
        solved = [k for k in range(n) if plan.fill[k] is None]
        if not masks:
            return (None,) * (n + 1)
        pieces, g = [], []
        for k, m in zip(solved, masks, strict=True):
            part, cost, grad = plan.parts[k], plan.costs[k], grads[k]
            c = part.to_piece(cost.to(m.dtype)) if isinstance(cost, torch.Tensor) else cost
            pieces.append(Piece(m, plan.betas[k], c, part.segment, part.rowwise))
            g.append(None if grad is None else part.to_piece(grad.to(m.dtype)))
        dv = soft_backward(pieces, masks, g, plan.budgets.numel())
        out: list[torch.Tensor | None] = [None] * n
        for k, d in zip(solved, dv, strict=True):
            if plan.scale != 1.0:  # the engine's scores are values / scale
                d = d.mul_(1.0 / plan.scale)
            out[k] = plan.parts[k].from_piece(d).to(ctx.dtypes[k])
        return (None, *out)


def _check_solver_options(tol: float | None, max_iter: int, dtype: torch.dtype) -> float:
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-6
    if isinstance(max_iter, bool) or not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    return float(tol)


def _batch_plan(values: torch.Tensor, budget: Budget, beta: Budget | Sequence[float],
                costs: Any) -> tuple[_Plan, Any]:
    """A tensor ``(*, d)``: every row its own problem."""
    if costs is not None and not isinstance(costs, torch.Tensor):
        raise TypeError(f"for a tensor of values, costs must be a tensor or None, got "
                        f"{type(costs).__name__}")
    checked = _validate(values, budget, costs)
    beta_t = _check_beta(beta, values)  # type: ignore[arg-type]
    rows = int(math.prod(values.shape[:-1]))
    kind: Kind = "batch" if rows > 1 else "flat"
    cost: float | torch.Tensor = 1.0 if checked.costs is None else checked.costs
    plan = _Plan([_Part(values.shape, kind, 0)], [beta_t.reshape(-1)], [cost],
                 checked.budget.reshape(-1), [None])
    _guard(plan, float(checked.unit_max.max()), float(beta_t.min()), float(beta_t.max()),
           checked.cost_max, values.dtype)
    return plan, checked


def _list_plan(values: Sequence[torch.Tensor], budget: Budget, beta: Any, costs: Any,
               policy: AllocationPolicy | None) -> _Plan:
    """A list of tensors: the policy's problems (default: one budget over all)."""
    values = list(values)
    if not values:
        raise ValueError("values must be a tensor or a non-empty list of tensors, got []")
    value_max = []
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"values[{i}] must be a torch.Tensor, got {type(v).__name__}")
        if v.numel() == 0:
            raise ValueError(f"values[{i}] must not be empty, got shape {tuple(v.shape)}")
        _check_float(f"values[{i}]", v)
        vmin, vmax = _row_extremes(v.detach().reshape(-1))
        _check_extremes(f"values[{i}]", v, vmin.reshape(1), vmax.reshape(1), positive=False)
        value_max.append(float(vmax))
    devices = {v.device for v in values}
    if len(devices) > 1:
        raise ValueError(f"values must all be on one device, got {sorted(map(str, devices))}")
    n = len(values)
    betas = _per_tensor("beta", beta, n)
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor) or not (b > 0 and math.isfinite(b)):
            raise ValueError(f"beta[{i}] must be a finite number > 0, got {b!r}")
    cost_list: list[float | torch.Tensor] = (
        [1.0] * n if costs is None else _per_tensor("costs", costs, n))
    unit_costs = []
    cost_lo, cost_hi = [], []
    for i, (v, c) in enumerate(zip(values, cost_list, strict=True)):
        if isinstance(c, torch.Tensor):
            _check_float(f"costs[{i}]", c)
            try:
                cost_list[i] = c = torch.broadcast_to(c, v.shape).to(v.device)
            except RuntimeError:
                raise ValueError(f"costs[{i}] of shape {tuple(c.shape)} does not broadcast to "
                                 f"values[{i}] of shape {tuple(v.shape)}") from None
            lo, hi = torch.aminmax(c.detach().double())
            _check_extremes(f"costs[{i}]", c, lo.reshape(1), hi.reshape(1), positive=True)
            unit_costs.append(float(c.double().mean()))
            cost_lo.append(float(lo))
            cost_hi.append(float(hi))
        else:
            if not (c > 0 and math.isfinite(c)):
                raise ValueError(f"costs[{i}] must be a finite number > 0, got {c!r}")
            unit_costs.append(float(c))
            cost_lo.append(float(c))
            cost_hi.append(float(c))
    total = sum(u * v.numel() for u, v in zip(unit_costs, values, strict=True))
    b = _scalar("budget", budget)
    if not 0 < b < total:
        raise ValueError(
            f"budget must lie strictly between 0 and the total cost of the values "
            f"({total:.6g} here), got {b:.6g}; a budget of 0 or of everything needs no mask"
        )
    policy = policy if policy is not None else Global()
    tensors = [MaskedTensor(f"values[{i}]", tuple(v.shape), None, u)
               for i, (v, u) in enumerate(zip(values, unit_costs, strict=True))]
    policy.check(tensors, b / total)
    parts: list[_Part | None] = [None] * n
    fill: list[bool | None] = [None] * n
    budgets: list[float] = []
    for alloc in policy.allocate(tensors, b / total):
        for i in alloc.tensors:
            if alloc.density >= 1.0 or alloc.density <= 0.0:
                parts[i], fill[i] = _Part(values[i].shape, "flat", 0), alloc.density >= 1.0
        live = [i for i in alloc.tensors if fill[i] is None]
        if not live:
            continue
        if alloc.group is None:
            for i in live:
                parts[i] = _Part(values[i].shape, "flat", len(budgets))
            budgets.append(alloc.density * sum(tensors[i].cost for i in live))
            continue
        for i in live:
            if isinstance(cost_list[i], torch.Tensor):
                raise ValueError(f"{policy!r} with per-entry costs (costs[{i}]) is not "
                                 f"supported: give one cost per tensor")
            rows = values[i].numel() // alloc.group
            parts[i] = _Part(values[i].shape, "rows", len(budgets), alloc.group)
            budgets += [alloc.density * alloc.group * unit_costs[i]] * rows
    if any(p is None for p in parts):
        raise ValueError(f"{policy!r}.allocate left some values without a budget")
    device = values[0].device
    plan_betas: list[float | torch.Tensor] = [float(x) for x in betas]
    plan = _Plan([p for p in parts if p is not None], plan_betas, cost_list,
                 to_device(budgets or [1.0], device, torch.float64), fill)
    live = [i for i in range(n) if fill[i] is None] or list(range(n))
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else values[0].dtype
    _guard(plan, max(value_max[i] / cost_lo[i] for i in live), min(betas[i] for i in live),
           max(betas[i] for i in live), max(cost_hi[i] for i in live), dtype)
    return plan


# Unit values beyond these bounds are rescaled by a power of two before the solve; sharpnesses
# times the unit values beyond FLOAT32_SHARPEST (or beta * scale below FLOAT32_FLATTEST) make
# float32 unable to resolve the threshold (or to hold beta * (u - tau)), so float64 is used.
_SCALE_RANGE = (2.0**-32, 2.0**32)
FLOAT32_SHARPEST = 2.0**20
FLOAT32_FLATTEST = 1e-30


def _guard(plan: _Plan, unit_max: float, beta_min: float, beta_max: float, cost_max: float,
           dtype: torch.dtype) -> None:
    """Choose the plan's scale and compute dtype so that no intermediate overflows, underflows
    or loses the threshold: unit values near float32's largest (1e38) or smallest, sharpnesses
    below 1e-30, or ``beta * max(u)`` beyond float32's resolution of the threshold."""
    plan.cost_max = cost_max
    scale = 1.0
    if unit_max > 0 and not (_SCALE_RANGE[0] <= unit_max <= _SCALE_RANGE[1]):
        scale = 2.0 ** round(math.log2(unit_max))
    if scale != 1.0:
        plan.scale = scale
        plan.betas = [b * scale for b in plan.betas]
    if _compute_dtype(dtype) == torch.float32 and (
            beta_min * scale < FLOAT32_FLATTEST or beta_max * max(unit_max, 1e-300) >
            FLOAT32_SHARPEST):
        plan.compute = torch.float64


def _check_met(plan: _Plan, error: torch.Tensor, iterations: int, beta: Any) -> None:
    """Raise when the solve missed a budget by more than one entry (an overflow, an underflow,
    or a threshold beyond the compute precision); a solve cut short by ``max_iter`` is the
    caller's choice and passes."""
    budgets = plan.budgets.reshape(error.shape)
    gap = error * budgets
    bad = ~torch.isfinite(error)
    if iterations < plan.max_iter:
        bad |= gap > plan.cost_max * (1 + 1e-6) + plan.tol * budgets
        worst = float(error.max()) if error.numel() else 0.0
        if not bool(bad.any()) and worst > 10 * plan.tol:
            warnings.warn(
                f"soft_topk met the budget only to a relative error of {worst:.3g} (less than "
                f"one entry): at beta={beta!r} the soft mask is a step narrower than the compute "
                f"precision resolves around the threshold, so it is close to ts.hard_topk's; "
                f"lower beta for a softer mask",
                RuntimeWarning, stacklevel=3,
            )
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"soft_topk could not meet the budget of problem {i} (relative error "
            f"{float(error.flatten()[i]):.3g}): at beta={beta!r} the soft mask is a step narrower "
            f"than {'float64' if plan.compute == torch.float64 else 'the values dtype'} resolves "
            f"around the threshold, or beta * values over- or underflows. Lower beta (beta * "
            f"max(values / costs) below about 1e12), rescale the values, or use ts.hard_topk"
        )


def _per_tensor(name: str, x: Any, n: int) -> list[Any]:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} must be one number per tensor ({n}), got {len(x)}")
        return [float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
                for v in x]
    return [_scalar(name, x)] * n


def _scalar(name: str, x: Any) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        _check_float(name, x)
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise TypeError(f"{name} must be a finite number, got {x!r}")
    return float(x)


@overload
def soft_topk(
    values: Values, budget: Budget, beta: Budget | Sequence[float], costs: Any = ..., *,
    policy: AllocationPolicy | None = ..., threshold_init: torch.Tensor | float | None = ...,
    tol: float | None = ..., max_iter: int = ..., return_result: Literal[False] = ...,
) -> Any: ...


@overload
def soft_topk(
    values: Values, budget: Budget, beta: Budget | Sequence[float], costs: Any = ..., *,
    policy: AllocationPolicy | None = ..., threshold_init: torch.Tensor | float | None = ...,
    tol: float | None = ..., max_iter: int = ..., return_result: Literal[True],
) -> SoftTopKResult: ...


def soft_topk(
    values: Values,
    budget: Budget,
    beta: Budget | Sequence[float],
    costs: Any = None,
    *,
    policy: AllocationPolicy | None = None,
    threshold_init: torch.Tensor | float | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    return_result: bool = False,
) -> Any:
    """Soft top-k mask with costs: the entropy-regularised fractional knapsack.

    Solves, for every problem, with ``u_i = v_i / c_i``::

        m = argmax_m  sum_i v_i m_i + sum_i (c_i / beta_i) H(m_i)  s.t.  sum_i c_i m_i = B,
        m_i = sigmoid(beta_i * (u_i - tau)),

    with ``H`` the binary entropy and the threshold ``tau`` the root of the budget equation,
    found by a safeguarded Newton iteration to a relative budget error of ``tol``. As ``beta``
    grows the mask tends to :func:`hard_topk`'s. Differentiable in ``values`` (closed-form O(d)
    backward, the term through the shared ``tau`` included); budgets, betas and costs get no
    gradient. Training computes its masks with this same engine.

    Args:
        values: scores ``v >= 0``: a tensor ``(*, d)`` (every row its own problem), or a list
            of tensors that ``policy`` turns into problems (default one budget over all: the
            global soft top-k of training). float16/bfloat16 are computed in float32.
        budget: ``B`` with ``0 < B < sum(costs)`` (``sum(costs) = d`` without costs). For a
            tensor: a number or a tensor broadcastable to ``(*,)``; for a list: the total budget
            (the policy splits it: the kept fraction ``B / sum(costs)`` is its density).
        beta: sharpness ``> 0``: a number, one per row (tensor) or one per tensor (list).
        costs: positive costs; for a tensor a tensor broadcastable to ``values``; for a list a
            number or one per tensor (a number or a tensor of its shape). ``None``: all ones.
        policy: for a list: an allocation policy (:class:`~torchspartan.Global`, ``Uniform``,
            ``ERK``, ``NM``, or your own).
        threshold_init: warm start for ``tau`` (e.g. ``result.threshold`` of a previous step).
        tol: relative budget tolerance; default 1e-6 (1e-10 for float64 values).
        max_iter: most evaluations of the budget equation (each is one pass over ``values``).
        return_result: return a :class:`SoftTopKResult` with the thresholds, the iteration count
            and the achieved budget error instead of the mask alone.

    Returns:
        The mask ``m`` in ``[0, 1]``, same shape and dtype as ``values`` (a list for a list), or
        a result object.

    Extreme scales are guarded: unit values beyond ``2**+-32`` (e.g. float32 values near
    ``1e38``) are solved as ``values / 2**k`` with ``beta * 2**k`` (the same mask, exactly), and
    float32 problems whose ``beta`` cannot be held or whose threshold cannot be resolved in
    float32 (``beta * max(values / costs) > 2**20``) are solved in float64. The budget is then
    met to ``tol``; when even that precision cannot resolve the threshold, the mask is within one
    entry of the budget (effectively the hard top-k) and a ``RuntimeWarning`` says so.

    Raises:
        TypeError: a non-floating ``values``, ``costs``, ``budget`` or ``beta``.
        ValueError: NaN/Inf or negative values, non-positive costs, a budget outside
            ``(0, sum(costs))``, ``beta <= 0``, shapes that do not broadcast, or a budget
            missed by more than one entry (the solve over- or underflowed).

    Example:
        >>> import torch, torchspartan as ts
        >>> v = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
        >>> m = ts.soft_topk(v, budget=2, beta=10.0)
        >>> round(m.sum().item(), 4)
        2.0
        >>> m.argsort(descending=True)[0, :2].tolist()
        [0, 2]
        >>> a, b = ts.soft_topk([torch.tensor([3.0, 0.1]), torch.tensor([2.0, 1.0, 0.2])],
        ...                     budget=2, beta=20.0)
        >>> round((a.sum() + b.sum()).item(), 4)
        2.0
    """
    if isinstance(values, torch.Tensor):
        if policy is not None:
            raise ValueError("policy= applies to a list of tensors; a tensor (*, d) is solved "
                             "row by row: pass [values] to allocate over it")
        plan, _ = _batch_plan(values, budget, beta, costs)
        inputs: list[torch.Tensor] = [values]
        dtype = values.dtype
    else:
        plan = _list_plan(values, budget, beta, costs, policy)
        inputs = list(values)
        dtype = plan.compute or inputs[0].dtype
    plan.tol = _check_solver_options(tol, max_iter, dtype)
    plan.max_iter = max_iter
    if threshold_init is not None:
        if isinstance(threshold_init, torch.Tensor):
            t0 = threshold_init.to(device=plan.budgets.device, dtype=torch.float64)
        else:
            t0 = to_device(float(threshold_init), plan.budgets.device, torch.float64)
        try:
            t0 = torch.broadcast_to(t0.reshape(-1) if t0.dim() > 0 else t0,
                                    plan.budgets.shape).clone()
        except RuntimeError:
            raise ValueError(f"threshold_init of shape {tuple(t0.shape)} does not broadcast to the "
                             f"{plan.budgets.numel()} problems; give one per problem") from None
        if not bool(torch.isfinite(t0).all()):
            raise ValueError(f"threshold_init must be finite, got {t0.flatten()[:3].tolist()}; "
                             f"pass the threshold of a previous SoftTopKResult")
        plan.tau_init = t0 / plan.scale if plan.scale != 1.0 else t0
    *masks, tau, iterations, error = SoftTopK.apply(plan, *inputs)
    _check_met(plan, error, int(iterations), beta)
    if plan.scale != 1.0:
        tau = tau * plan.scale
    if isinstance(values, torch.Tensor):
        mask: torch.Tensor | list[torch.Tensor] = masks[0]
        tau = tau.reshape(values.shape[:-1])
        error = error.reshape(values.shape[:-1])
    else:
        mask = list(masks)
    if return_result:
        return SoftTopKResult(mask, tau, int(iterations), error)
    return mask


def hard_topk(values: Values, budget: Budget, costs: Any = None, *,
              policy: AllocationPolicy | None = None) -> Any:
    """Hard top-k with costs: the greedy fractional-knapsack mask, rounded to whole entries.

    Entries are taken by decreasing unit value ``v_i / c_i`` (ties: lower position first, and in
    a list the earlier tensor first); an entry is kept while at least half of its cost still
    fits in the budget ``B``::

        keep i  <=>  sum of c_j over the entries j before i  +  c_i / 2  <=  B.

    With unit costs that keeps exactly ``floor(B + 0.5)`` entries per problem. Long rows are
    handled by selection (a sampled window verified by exact comparisons), not by a sort, so the
    cost is a few passes over ``values``.

    Args:
        values: scores ``v >= 0``: a tensor ``(*, d)`` or a list of tensors (as
            :func:`soft_topk`).
        budget: ``0 < B < sum(costs)``: a number or a tensor broadcastable to ``(*,)``; for a
            list the total budget that ``policy`` splits.
        costs: positive costs, as :func:`soft_topk`; ``None`` means all ones.
        policy: for a list, the allocation policy (default one budget over all).

    Returns:
        A bool tensor of ``values``' shape (a list for a list), True for kept entries.

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
    if isinstance(values, torch.Tensor):
        if policy is not None:
            raise ValueError("policy= applies to a list of tensors; pass [values]")
        plan, checked = _batch_plan(values, budget, 1.0, costs)
        d = values.shape[-1]
        rows = values.detach().reshape(-1, d)
        cost: float | torch.Tensor = 1.0
        if checked.costs is not None:
            c = checked.costs.reshape(-1, d).to(torch.float64)
            rows, cost = rows.to(torch.float64) / c, c
        return select_rows(rows, cost, plan.budgets.tolist()).view(values.shape)
    plan = _list_plan(values, budget, 1.0, costs, policy)
    values = list(values)
    pieces = plan.pieces(values)
    found, _ = hard_select(pieces, plan.budgets.tolist()) if pieces else ([], [])
    out, it = [], iter(found)
    for part, v, fill in zip(plan.parts, values, plan.fill, strict=True):
        out.append(part.from_piece(next(it)) if fill is None
                   else torch.full(v.shape, bool(fill), dtype=torch.bool, device=v.device))
    return out
