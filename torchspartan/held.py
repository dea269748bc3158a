"""A shared budget whose floors bound at the last update, recomputed on the device in one read.

When tensors of a shared budget sit at their lower density bound (a default floor, or an
explicit ``min_density``), the bounded solve (:func:`torchspartan.bounded.solve_bounded`) finds them
round by round, with host reads between the rounds. From one step to the next the set of such
*held* tensors rarely changes, so the sync-free path (the default on CUDA) tries the last step's
set first: the other tensors as one shared budget (a :class:`Pending`), each held tensor alone at
its bound (a stable sort each on the device, one Newton solve for all), everything read at once.
The set is still the bounded solution when (docs/design.md, "Floors"):

- every other tensor keeps at least its bound at the shared hard threshold ``t``, and
- every held tensor's own threshold (its bound-th largest unit value) lies strictly below ``t``
  (freed, it would keep fewer entries than its bound).

Then the masks are written as the bounded solve would write them; otherwise nothing is written
and the bounded solve runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchspartan._device import to_device
from torchspartan._engine import TOLERANCE, Piece, solve_soft
from torchspartan._select import select_segments_on_device
from torchspartan.allocation import NEWTON_UNCHECKED, AllocationSolver, Extra, Pending, packed
from torchspartan.budget import Budget
from torchspartan.mask import update_masks
from torchspartan.state import StepRecord

__all__ = ["HeldUpdate"]


class HeldUpdate:
    """The masks of budget ``idx`` with the tensors ``held`` (``(mask index, bound density)``)
    at their bounds, computed on the device; see the module docstring. Build with :meth:`make`.

    ``values`` are the device values to read (after ``free.scalars``), in order.
    """

    def __init__(self, solver: AllocationSolver, idx: tuple[int, ...],
                 held: Sequence[tuple[int, float]], budget: float, beta: float, step: int
                 ) -> None:
        self.solver, self.beta = solver, beta
        refs = solver.refs

        def kind(i: int) -> tuple[tuple[int, ...], tuple[int, ...], float]:  # rows of a piece
            r = refs[i]
            return (tuple(r.theta.shape), r.mask.sizes, solver.unit_costs[i])

        # one group per (weight shape, block sizes, cost), stacked as the rows of one buffer:
        # segment k is the k-th held tensor in this order
        groups: dict[tuple[tuple[int, ...], tuple[int, ...], float], list[tuple[int, float]]] = {}
        for i, bound in held:
            groups.setdefault(kind(i), []).append((i, bound))
        self.held = [h for members in groups.values() for h in members]
        self.betas = [beta * math.sqrt(refs[i].mask.block_numel) for i, _ in self.held]
        self.hard_of: dict[int, torch.Tensor] = {}
        self.runs: list[tuple[tuple[int, ...], torch.Tensor]] = []
        pieces: list[Piece] = []
        umax: list[torch.Tensor] = []
        thresholds: list[torch.Tensor] = []
        budgets: list[float] = []
        for members in groups.values():
            run = tuple(i for i, _ in members)
            shape = tuple(refs[run[0]].mask.hard_mask.shape)
            block = refs[run[0]].mask.block_numel
            units = solver.stacked_units(run)  # a row per tensor
            cost = solver.unit_costs[run[0]] * block
            counts = [math.floor(bound * solver.cost(i) / cost + 0.5) for i, bound in members]
            budgets += [bound * solver.cost(i) for i, bound in members]
            # a bound keeps few entries (one per output unit): selected on the device, ties
            # to the lower position as the host selection keeps them
            flat, kth = select_segments_on_device(units.reshape(-1), [units.shape[1]] * len(run),
                                                  counts)
            self.hard_of.update(zip(run, flat.view(len(run), *shape).unbind(0), strict=True))
            self.runs.append((run, flat))
            thresholds.append(kth)
            pieces.append(Piece(units, beta * math.sqrt(block), cost,
                                sum(p.segments for p in pieces), rowwise=True))
            umax.append(units.amax(1))
        unit_max = torch.cat(umax).double()
        extra = Extra(pieces, to_device(budgets, unit_max.device, torch.float64),
                      unit_max, torch.stack([refs[i].mask.threshold for i, _ in self.held]))
        # the other tensors: one shared budget, solved with the held ones' when it can be
        ids = {i for i, _ in held}
        rest = sum(bound * solver.cost(i) for i, bound in held)
        self.free: Pending = solver.prepare(tuple(i for i in idx if i not in ids),
                                            budget - rest, beta, step, extra)
        self.evaluations = 0
        if self.free.joint and self.free.solution is not None:
            tau = self.free.solution.tau[1:]
            error = self.free.solution.error[1:].max()
        else:
            solution = solve_soft(pieces, extra.budgets, unit_max=unit_max,
                                  tau_init=extra.tau_init, reduce=solver.reduce,
                                  max_iter=NEWTON_UNCHECKED, check=False,
                                  chunks=False)
            tau, error, self.evaluations = solution.tau, solution.error.max(), (
                solution.evaluations)
        self.tau = tau
        # read: the hard thresholds, finite, the budget error, the soft thresholds
        self.values = torch.cat([torch.cat(thresholds),
                                 torch.isfinite(unit_max).all().double().reshape(1),
                                 error.reshape(1), tau])
        self.known: dict[int, tuple[float, float]] = {}

    @classmethod
    def make(cls, solver: AllocationSolver, idx: tuple[int, ...], budget: float, beta: float,
             step: int) -> HeldUpdate | None:
        """The held route for budget ``idx``, or None where it does not apply: no held set
        remembered, a solver that is not the plain one, not the sync-free path, or a held mask
        that is not a warm unstructured-or-block Spartan mask of float32 weights."""
        held = solver.held.get(idx)
        if not held or type(solver) is not AllocationSolver:
            return None
        refs = [solver.refs[i] for i, _ in held]
        ok = solver.on_device and len(held) < len(idx) and all(
            r.mask.method == "spartan" and r.mask.soft_active and r.mask.threshold.dim() == 0
            and r.theta.dtype == torch.float32
            and 0 < bound * r.mask.hard_mask.numel() < r.mask.hard_mask.numel() - 0.5
            for r, (_, bound) in zip(refs, held, strict=True))
        return cls(solver, idx, held, budget, beta, step) if ok else None

    def holds(self, free_values: Sequence[float], values: Sequence[float],
              kept: Sequence[float], floors: dict[int, int]) -> bool:
        """Whether the held set is still the bounded solution (module docstring), from the read
        ``values`` (this object's :attr:`values`), ``free_values`` (the free budget's), and the
        kept hard-mask entries of every mask; ``floors``: the lower bound in entries by mask."""
        k = len(self.held)
        if not values[k] or not values[k + 1] <= TOLERANCE:
            return False
        free = self.free
        if free.threshold is not None:
            t = free.threshold
        elif len(free_values) >= 3 and free_values[0] and free_values[1]:
            t = free_values[2]  # [finite, ok, threshold, ...]: selected on the device
        else:
            return False
        if any(kept[i] < floors.get(i, 0) for i in free.idx):
            return False
        return all(threshold < t for threshold in values[:k])

    def commit(self, free_values: Sequence[float], values: Sequence[float]) -> tuple[int, float]:
        """Write every mask of the budget (the held ones each with its own threshold); returns
        the Newton evaluations and the largest relative budget error."""
        iterations, error = self.free.commit(free_values)
        k = len(self.held)
        masks = [self.solver.refs[i].mask for i, _ in self.held]
        update_masks(masks, [self.hard_of[i] for i, _ in self.held], threshold=self.tau,
                     betas=self.betas, scope="local")
        for run, flat in self.runs:
            self.solver.written[run] = (flat, [self.hard_of[i] for i in run])
        self.known = {i: (tau, b) for (i, _), tau, b in zip(self.held, values[k + 2:],
                                                             self.betas, strict=True)}
        return iterations + self.evaluations, max(error, float(values[k + 1]))

    def apply(self, budget: Budget, floors: dict[int, int], old: list[torch.Tensor], step: int,
              target: float, collapsed: set[str]) -> StepRecord | None:
        """The whole update along this route: one read (the device values and the masks'
        counts), the check, the writes; returns the step's record, or None when the held set
        no longer fits (nothing written: the bounded solve takes over). The couplings made are
        left in the solver (``take_couplings``)."""
        free, refs = self.free, self.solver.refs
        hard_of = {**free.hard_of, **self.hard_of}
        new = [hard_of.get(i, r.mask.hard_mask) for i, r in enumerate(refs)]
        counts = budget.counts(old, new, free.packed(old) + packed(self.solver, self.runs, old))
        n, k = len(free.scalars), len(self.values)
        values = torch.cat([torch.stack(free.scalars), self.values, counts.values]).tolist() \
            if n else torch.cat([self.values, counts.values]).tolist()
        budget.pass_gate(counts, values)
        counted: tuple[float, list[float]] | None = counts.read(values[n + k:])
        if counted is None or not self.holds(values[:n], values[n:n + k], counted[1], floors):
            return None
        iterations, error = self.commit(values[:n], values[n:n + k])
        if any(r.mask.hard_mask is not h for r, h in zip(refs, new, strict=True)):
            counted = None  # a selection redone at the commit: count again
        return budget.record(old, counted, step, target, self.beta, iterations, error, collapsed)
