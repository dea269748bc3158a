"""The one-dimensional dual solve shared by ``soft_topk`` and the training-time mask update.

Both solve ``f(x) = 0`` for a strictly increasing ``f`` (the budget residual of the soft top-k as
a function of its dual variable), elementwise over a tensor of independent problems, by Newton's
method safeguarded with a bracket: a Newton step that leaves the bracket is replaced by bisection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__: list[str] = []

Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def safeguarded_newton(
    evaluate: Evaluate,
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    target: torch.Tensor,
    tol: float,
    max_iter: int,
    *,
    resolution: float = 8 * torch.finfo(torch.float64).eps,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve ``f(x) = 0`` for increasing ``f`` with ``f(lo) <= 0 <= f(hi)``, all float64.

    ``evaluate(x)`` returns ``(f(x), f'(x))``. Stops when ``|f| <= tol * target`` everywhere, when
    the bracket has shrunk to ``resolution * (1 + |x|)`` (the tolerance is not attainable at the
    precision ``f`` is computed in: pass e.g. ``8 * finfo(float32).eps`` when ``evaluate`` works in
    float32), or after ``max_iter`` evaluations. On CUDA the convergence test (a host
    synchronisation) runs every fourth iteration only.

    Returns ``(x, f(x), evaluations)``.
    """
    check_every = 4 if x.is_cuda else 1
    f, fp = evaluate(x)
    evaluations = 1
    while True:
        if evaluations % check_every == 0 or evaluations >= max_iter:
            converged = f.abs() <= tol * target
            resolved = (hi - lo) <= resolution * (1 + x.abs())
            if bool((converged | resolved).all()) or evaluations >= max_iter:
                return x, f, evaluations
        lo = torch.where(f <= 0, x, lo)
        hi = torch.where(f >= 0, x, hi)
        step = x - f / fp
        inside = (step > lo) & (step < hi) & torch.isfinite(step)
        x = torch.where(inside, step, 0.5 * (lo + hi))
        f, fp = evaluate(x)
        evaluations += 1
