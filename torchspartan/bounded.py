"""A shared budget with density bounds: which tensors sit at a bound, then the masks, once.

A masked tensor may have to keep at least (``min_density``, or in a shared budget the default
floors) or at most (``max_density``) a share of its entries. The bounded solution holds at its
bound every tensor whose share at the shared hard threshold would break it, and shares the rest
of the budget among the others (docs/design.md, "Floors"). It is found in rounds of hard
selection alone: select the free tensors at the free budget, hold the violators at their bounds,
again until none is left. Only then are the soft thresholds solved, once: the free tensors'
shared one and the held tensors' own. Nothing is written before, so every solve starts from the
thresholds of the last step, and the masks do not depend on how the held set was found.

The held set rarely changes from one step to the next, so the last one is tried first (usually
one round). It is the bounded solution when no free tensor breaks a bound at the free threshold
``t`` and every held tensor's own threshold lies strictly below ``t`` (freed, it would keep
fewer entries than its bound); otherwise the rounds start again with no tensor held.
"""

from __future__ import annotations

import math

import torch

from torchspartan._chunks import count_true
from torchspartan.allocation import AllocationSolver, Each, Pending

__all__ = ["solve_bounded"]

Held = list[tuple[int, float]]


def solve_bounded(solver: AllocationSolver, idx: tuple[int, ...], density: float, beta: float,
                  step: int = 0) -> tuple[int, float]:
    """Solve one shared budget (``density`` of its tensors' cost), holding the tensors that break
    their density bounds at them; writes the masks. Returns the Newton evaluations and the
    relative budget error."""
    budget = density * sum(solver.cost(i) for i in idx)
    shared = len(idx) > 1
    last = solver.held.pop(idx, [])
    pending, held = _rounds(solver, idx, budget, beta, step, last)
    each = _select_held(solver, idx, held, beta)
    if last and not _holds(solver, held, each, pending, shared):
        pending, held = _rounds(solver, idx, budget, beta, step, [])
        each = _select_held(solver, idx, held, beta)
    solver.solve_pending(pending)
    iterations, error = pending.commit(
        torch.stack(pending.scalars).tolist() if pending.scalars else [])
    if each is not None:
        its, err = solver.write_each(each, beta)
        iterations += its
        error = max(error, err)
    if held and all(bound == solver.min_density(i, shared) for i, bound in held):
        solver.held[idx] = held  # all at their lower bounds: tried first next time
    return iterations, error


def _rounds(solver: AllocationSolver, idx: tuple[int, ...], budget: float, beta: float,
            step: int, start: Held) -> tuple[Pending, Held]:
    """The held set, starting from ``start`` (its tensors with their bounds), and the free
    tensors' prepared hard masks (no soft threshold yet)."""
    shared = len(idx) > 1

    def low(i: int) -> float:
        return solver.min_density(i, shared)

    held = list(start)
    taken = {i for i, _ in held}
    free = [i for i in idx if i not in taken]
    budget = max(budget - sum(bound * solver.cost(i) for i, bound in held), 0.0)
    for _ in range(len(idx) + 1):
        b = budget
        if len(free) == 1:
            m = solver.refs[free[0]].mask
            cap = solver.cost(free[0])
            b = min(max(b, low(free[0]) * cap), m.max_density * cap)
        pending = solver.prepare(tuple(free), b, beta, step, soft=False)
        if len(free) == 1 or all(low(i) == 0.0 and solver.refs[i].mask.max_density == 1.0
                                 for i in free):
            break
        kept = torch.stack([count_true(pending.hard_of[i]) for i in free]).tolist()
        violators = []
        for i, k in zip(free, kept, strict=True):
            m = solver.refs[i].mask
            d = k * m.block_numel / solver.numels[i]
            if d < low(i) - 1e-12:
                violators.append((i, low(i)))
            elif d > m.max_density + 1e-12:
                violators.append((i, m.max_density))
        if not violators:
            break
        for i, bound in violators:
            budget -= bound * solver.cost(i)
            free.remove(i)
        budget = max(budget, 0.0)
        held += violators
    return pending, held


def _select_held(solver: AllocationSolver, idx: tuple[int, ...], held: Held, beta: float
                 ) -> Each | None:
    """The held tensors' hard masks at their bounds, selected together in the order of ``idx``
    (so that their thresholds are solved the same way whichever route found them)."""
    if not held:
        return None
    position = {i: k for k, i in enumerate(idx)}
    ordered = sorted(held, key=lambda h: position[h[0]])
    return solver.select_each([i for i, _ in ordered],
                              [bound * solver.cost(i) for i, bound in ordered], beta)


def _holds(solver: AllocationSolver, held: Held, each: Each | None, pending: Pending,
           shared: bool) -> bool:
    """Whether every held tensor is at its lower bound with its own hard threshold strictly
    below the free tensors' (freed, it would keep fewer entries than its bound)."""
    if each is None or any(bound != solver.min_density(i, shared) for i, bound in held):
        return False
    t = pending.threshold
    if t is None:  # the free tensors keep all (nothing is below) or nothing
        t = -math.inf if any(bool(h.any()) for h in pending.hard_of.values()) else math.inf
    return not each.fills and all(h < t for h in each.thresholds)
