"""N:M rows (``ts.NM``): every row of ``group`` entries along dim 1 keeps ``density * group``.

The rows of all N:M tensors (per dtype) are one problem: one batched selection (the rows sorted
in one call, ``_engine.hard_select``) and one Newton solve with a threshold per row, not one per
tensor. :class:`Rows` computes it without writing a mask; :meth:`Rows.commit` writes.

- The host path (``AllocationSolver.solve_rows``) checks Newton's convergence as it goes.
- The sync-free path (:func:`update_rows`, the default on CUDA) runs a fixed number of Newton
  evaluations with the certified last step, and reads everything the step needs once: the
  weights' finiteness, the solve's budget error, the masks' counts and the step's gate; then
  writes. A solve not yet within the tolerance at the read goes on there, checked (one more
  read, rare).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from torchspartan._blocks import from_rows, to_rows
from torchspartan._checks import check_weights
from torchspartan._engine import TOLERANCE, Piece, SoftSolution, hard_select, solve_soft
from torchspartan.budget import Budget
from torchspartan.policies import Allocation
from torchspartan.sparsify import MaskRef
from torchspartan.state import StepRecord

__all__ = ["Rows", "rows_problem", "update_rows"]

# Newton evaluations of the sync-free N:M solve (checked at the read): its start is last step's
# threshold of every row, with no drift to follow.
ROWS_UNCHECKED = 4


class _Part(NamedTuple):
    """The masks of one dtype: their indices (the Spartan ones first), the Spartan ones with
    their numbers of rows, and the soft problem of those rows (piece, budgets, largest unit
    value per row) with its solution (None without a Spartan mask)."""

    members: list[int]
    soft: list[tuple[int, int]]
    solve: tuple[Piece, torch.Tensor, torch.Tensor, SoftSolution] | None


class Rows:
    """The N:M masks ``idx`` of ``refs`` for ``density`` and sharpness ``beta``, computed and not
    written: their hard masks (:attr:`grids`, mask shape) and, for the Spartan ones, the soft
    thresholds of every row. ``unchecked``: a fixed number of Newton evaluations (the sync-free
    path; :attr:`scalars` are then the device values its :meth:`commit` needs, ``[finite,
    error]``); None checks convergence as it goes."""

    def __init__(self, refs: Sequence[MaskRef], idx: Sequence[int], density: float, group: int,
                 beta: float, unchecked: int | None = None) -> None:
        self.refs, self.beta = refs, beta
        budget = density * group
        by_dtype: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
        for i in sorted(idx, key=lambda i: refs[i].mask.method != "spartan"):
            rows = to_rows(refs[i].theta.abs(), group)
            rows = rows.float() if rows.dtype not in (torch.float32, torch.float64) else rows
            by_dtype.setdefault(rows.dtype, []).append((i, rows))
        self.grids: dict[int, torch.Tensor] = {}
        self.parts: list[_Part] = []
        finite, errors = [], []
        for members in by_dtype.values():  # the Spartan masks' rows first
            units = torch.cat([rows for _, rows in members])
            counts = [rows.shape[0] for _, rows in members]
            budgets = torch.full((units.shape[0],), budget, dtype=torch.float64,
                                 device=units.device)
            hard, _ = hard_select([Piece(units, beta, 1.0, 0, rowwise=True)], budgets)
            self.grids.update(
                (i, from_rows(h, refs[i].mask.hard_mask.shape, group).contiguous())
                for (i, _), h in zip(members, hard[0].split(counts), strict=True))
            soft = [(i, n) for (i, _), n in zip(members, counts, strict=True)
                    if refs[i].mask.method == "spartan"]
            n_soft = sum(n for _, n in soft)
            # the rows' largest unit values: Newton's bracket, and on the sync-free path also
            # the weights' finiteness (NaN and Inf propagate into them), in one pass
            row_max = units.amax(-1) if unchecked is not None else (
                units.narrow(0, 0, n_soft).amax(-1) if soft else None)
            if unchecked is not None and row_max is not None:
                finite.append(torch.isfinite(row_max).all())
            solve = None
            if soft and row_max is not None:
                masks = [refs[i].mask for i, _ in soft]
                warm = all(m.soft_active and m.threshold.shape == (n,)
                           for m, (_, n) in zip(masks, soft, strict=True))
                piece = Piece(units.narrow(0, 0, n_soft), beta, 1.0, 0, rowwise=True)
                soft_budgets, unit_max = budgets.narrow(0, 0, n_soft), row_max[:n_soft].double()
                solution = solve_soft(
                    [piece], soft_budgets, unit_max=unit_max,
                    tau_init=torch.cat([m.threshold for m in masks]) if warm else None,
                    max_iter=unchecked if unchecked is not None else 100,
                    check=unchecked is None)
                errors.append(solution.error.max())
                solve = (piece, soft_budgets, unit_max, solution)
            self.parts.append(_Part([i for i, _ in members], soft, solve))
        self.scalars: list[torch.Tensor] = []
        if unchecked is not None:
            self.scalars = [torch.stack(finite).all().double(),
                            torch.stack(errors).max() if errors else torch.zeros(
                                (), dtype=torch.float64, device=budgets.device)]

    def commit(self, error: float | None = None) -> tuple[int, float]:
        """Write the masks; ``error``: the solve's budget error as read with :attr:`scalars` (a
        solve not yet within the tolerance goes on, checked), None on the host path (every
        solve already checked). Returns the Newton evaluations and the budget error."""
        go_on = error is not None and not error <= TOLERANCE
        iterations, worst = 0, 0.0
        for part in self.parts:
            taus: list[torch.Tensor] = []
            if part.solve is not None:
                piece, budgets, unit_max, solution = part.solve
                iterations += solution.evaluations
                if go_on:
                    solution = solve_soft([piece], budgets, unit_max=unit_max,
                                          tau_init=solution.tau)
                    iterations += solution.evaluations
                if error is None or go_on:
                    worst = max(worst, float(solution.error.max()))
                taus = list(solution.tau.split([n for _, n in part.soft]))
            for (i, _), tau in zip(part.soft, taus, strict=True):
                self.refs[i].mask.update(self.grids[i], threshold=tau, beta=self.beta,
                                         scope="local")
            for i in part.members[len(part.soft):]:
                self.refs[i].mask.update(self.grids[i])
        return iterations, worst if error is None or go_on else error


def rows_problem(allocs: Sequence[Allocation], alloc_index: Sequence[int]
                 ) -> tuple[tuple[int, ...], float, int] | None:
    """``(mask indices, density, group)`` when the update is one N:M problem that keeps some but
    not all of every row (every allocation N:M, with one group and density); else None."""
    keys = {(a.group, a.density) for a in allocs}
    if len(keys) != 1:
        return None
    (group, density), = keys
    if group is None or not 0 < density * group < group * (1 - 1e-12):
        return None
    return tuple(alloc_index[j] for a in allocs for j in a.tensors), density, group


def update_rows(refs: Sequence[MaskRef], budget: Budget, idx: Sequence[int], density: float,
                group: int, beta: float, step: int, old: list[torch.Tensor], target: float,
                collapsed: set[str]) -> StepRecord:
    """One N:M problem on the sync-free path: computed on the device, read once (finiteness,
    budget error, counts, gate), then written. Returns the step's record.

    Raises:
        ValueError: a masked weight holds NaN or Inf (named; nothing written).
        StepSkipped: the step's gate was set (nothing written).
    """
    rows = Rows(refs, idx, density, group, beta, unchecked=ROWS_UNCHECKED)
    new = [rows.grids.get(i, r.mask.hard_mask) for i, r in enumerate(refs)]
    counts = budget.counts(old, new)
    values = torch.cat([torch.stack(rows.scalars), counts.values]).tolist()
    budget.pass_gate(counts, values)
    if not values[0]:
        check_weights(refs, step)  # raises, naming the tensor (nothing was written)
    iterations, error = rows.commit(values[1])
    return budget.record(old, counts.read(values[2:]), step, target, beta, iterations, error,
                         collapsed)
