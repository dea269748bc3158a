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
from torchspartan._engine import Piece
from torchspartan.allocation import AllocationSolver, Each, Pending

__all__ = ["solve_bounded"]

Held = list[tuple[int, float]]


def solve_bounded(solver: AllocationSolver, idx: tuple[int, ...], density: float, beta: float,
                  step: int = 0) -> tuple[int, float]:
    """Solve one shared budget (``density`` of its tensors' cost), holding the tensors that break
    their density bounds at them; writes the masks. Returns the Newton evaluations and the
    relative budget error."""
    budget = density * sum(solver.cost(i) for i in idx)
    last = solver.held.pop(idx, None)
    found = _rounds(solver, idx, budget, beta, step, last) if last else None
    if found is None:
        found = _rounds(solver, idx, budget, beta, step, [])
    if found is None:  # pragma: no cover - the rounds from no tensor held always end
        raise RuntimeError("the bounded solve found no held set")
    pending, held, selections = found
    solver.solve_pending(pending)
    iterations, error = pending.commit(
        torch.stack(pending.scalars).tolist() if pending.scalars else [])
    if selections:  # one solve for all held tensors, in the budget's order whatever the route
        its, err = solver.write_each(_merged(selections, idx), beta)
        iterations += its
        error = max(error, err)
    shared = len(idx) > 1
    if held and all(bound == solver.min_density(i, shared) for i, bound in held):
        solver.held[idx] = held  # all at their lower bounds: tried first next time
    return iterations, error


def _rounds(solver: AllocationSolver, idx: tuple[int, ...], budget: float, beta: float,
            step: int, start: Held) -> tuple[Pending, Held, list[Each]] | None:
    """The held set, starting from ``start``: the free tensors' prepared hard masks (no soft
    threshold yet), the held tensors with their bounds, and their selections. None when a
    ``start`` set turns out not to be the bounded solution."""
    shared = len(idx) > 1

    def low(i: int) -> float:
        return solver.min_density(i, shared)

    held = list(start)
    taken = {i for i, _ in held}
    free = [i for i in idx if i not in taken]
    budget = max(budget - sum(bound * solver.cost(i) for i, bound in held), 0.0)
    selections = [solver.select_each([i for i, _ in held],
                                     [bound * solver.cost(i) for i, bound in held], beta)
                  ] if held else []
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
            d = k * m.block_numel / solver.refs[i].theta.numel()
            if d < low(i) - 1e-12:
                violators.append((i, low(i)))
            elif d > m.max_density + 1e-12:
                violators.append((i, m.max_density))
        if not violators:
            break
        selections.append(solver.select_each([i for i, _ in violators],
                                             [bound * solver.cost(i) for i, bound in violators],
                                             beta))
        for i, bound in violators:
            budget -= bound * solver.cost(i)
            free.remove(i)
        budget = max(budget, 0.0)
        held += violators
    if start and not _holds(solver, held, selections, pending, shared):
        return None
    return pending, held, selections


def _holds(solver: AllocationSolver, held: Held, selections: list[Each], pending: Pending,
           shared: bool) -> bool:
    """Whether every held tensor is at its lower bound with its own hard threshold strictly
    below the free tensors' (freed, it would keep fewer entries than its bound)."""
    if any(bound != solver.min_density(i, shared) for i, bound in held):
        return False
    t = pending.threshold
    if t is None:  # the free tensors keep all (nothing is below) or nothing
        t = -math.inf if any(bool(h.any()) for h in pending.hard_of.values()) else math.inf
    own = {i: h for each in selections for i, h in zip(each.ids, each.thresholds, strict=True)}
    filled = {i for each in selections for i, _ in each.fills}
    return all(i not in filled and own[i] < t for i, _ in held)


def _merged(selections: list[Each], idx: tuple[int, ...]) -> Each:
    """The selections of the held tensors as one, in the order of ``idx`` (piece ``k`` in
    segment ``k``), so that their thresholds are solved together the same way however many
    rounds found them."""
    position = {i: k for k, i in enumerate(idx)}
    rows = sorted(((i, each, k) for each in selections for k, i in enumerate(each.ids)),
                  key=lambda row: position[row[0]])
    out = Each(fills=sorted((f for each in selections for f in each.fills),
                            key=lambda f: position[f[0]]))
    umax = []
    for j, (i, each, k) in enumerate(rows):
        p = each.pieces[k]
        out.ids.append(i)
        out.budgets.append(each.budgets[k])
        out.refs.append(each.refs[k])
        out.pieces.append(Piece(p.units, p.beta, p.cost, j))
        out.grids.append(each.grids[k])
        out.thresholds.append(each.thresholds[k])
        if each.umax is not None:
            umax.append(each.umax[k])
    out.umax = torch.stack(umax) if umax else None
    return out
