"""Budgets of their own (``ts.Uniform``, ``ts.ERK``) on the sync-free path, read once per step.

Every tensor has its own budget and threshold. On the sync-free path (the default on CUDA) they
are all computed on the device, then read with one host sync, then written:

- :class:`Segments`: the float32 Spartan masks of one entry cost, as consecutive segments of one
  flat buffer. The hard masks come from one stable sort of ``(segment, -unit value)`` keys (the
  first ``count_k`` entries of every segment: the host selection's order, ties to the lower
  position); the soft thresholds from one warm-started Newton iteration over all segments (a
  piece cut by ``lengths``, ``_engine.py``). A fixed number of ops, whatever the number of
  tensors.
- every other tensor (kept whole or emptied, another cost or dtype, a cold start) through its
  own :meth:`AllocationSolver.prepare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchspartan._checks import check_weights
from torchspartan._device import to_device
from torchspartan._engine import TOLERANCE, Piece, solve_soft
from torchspartan._select import select_segments_on_device
from torchspartan.allocation import (
    AllocationSolver,
    packed,
    shifted_start,
    split_views,
)
from torchspartan.budget import Budget
from torchspartan.mask import update_masks
from torchspartan.policies import Allocation
from torchspartan.state import StepRecord

__all__ = ["Segments", "own_budgets", "update_alone"]

# Above this many entries the sort's index buffers (about 40 bytes an entry) cost more memory
# than the per-tensor path's few ops each; such models take that path.
MAX_ENTRIES = 1 << 27


def own_budget(solver: AllocationSolver, alloc: Allocation, alloc_index: list[int]
               ) -> int | None:
    """The mask index of ``alloc`` when it is one tensor with a budget of its own and no
    density bounds (Uniform, ERK; not N:M), else None."""
    i = alloc_index[alloc.tensors[0]]
    if alloc.group is not None or len(alloc.tensors) != 1 or solver.min_density(i, False) > 0 or (
            solver.refs[i].mask.max_density < 1.0):
        return None
    return i


def own_budgets(solver: AllocationSolver, allocs: list[Allocation], alloc_index: list[int]
                ) -> list[tuple[int, float]]:
    """``(mask index, budget)`` of every allocation when all are tensors with budgets of their
    own (:func:`own_budget`) on the sync-free path of a plain solver (two or more of them);
    else empty."""
    if not solver.on_device or type(solver) is not AllocationSolver or len(allocs) < 2:
        return []
    ids = [own_budget(solver, a, alloc_index) for a in allocs]
    if any(i is None for i in ids):
        return []
    return [(i, a.density * solver.cost(i)) for i, a in zip(ids, allocs, strict=True)
            if i is not None]


class Segments:
    """The masks ``ids`` with budgets ``budgets`` (in cost units), computed together on the
    device; build with :meth:`make`. ``values`` are the device values to read: the hard
    thresholds, whether the weights are finite, the largest relative budget error, the soft
    thresholds."""

    def __init__(self, solver: AllocationSolver, ids: Sequence[int], budgets: Sequence[float],
                 beta: float) -> None:
        self.solver, self.ids, self.beta = solver, tuple(ids), beta
        refs = [solver.refs[i] for i in ids]
        units = solver.packed_units(self.ids)  # flat, every tensor a segment
        device = units.device
        cost = solver.unit_costs[ids[0]] * refs[0].mask.block_numel
        sizes = [r.mask.hard_mask.numel() for r in refs]
        counts = [math.floor(b / cost + 0.5) for b in budgets]
        lengths = to_device(sizes, device)
        self.flat, hard = select_segments_on_device(units, sizes, counts)
        self.hard_of = split_views(solver, self.ids, self.flat)
        self.betas = [beta * math.sqrt(r.mask.block_numel) for r in refs]
        self.piece = Piece(units.view(1, -1), self.betas[0], cost, 0, lengths=lengths)
        self.budgets = to_device(list(budgets), device, torch.float64)
        self.unit_max = torch.segment_reduce(units, "max", lengths=lengths).double()
        # the warm start of each: last step's tau moved with its hard threshold, its offset
        # beta (tau - h) moved on by its drift (AllocationSolver.warm_start, per segment)
        tau = torch.stack([r.mask.threshold for r in refs])
        past, drifts = to_device(
            [solver.hints.get((i,), [math.nan])[-1] for i in ids]
            + [solver.drift((i,)) for i in ids], tau.device, tau.dtype).split(len(ids))
        shifted = shifted_start(tau, torch.stack([r.mask.beta for r in refs]), past,
                                self.betas[0], hard, drifts)
        self.tau_init = torch.where(torch.isfinite(shifted), shifted, tau)  # no hint: tau
        self.solution = solve_soft([self.piece], self.budgets, unit_max=self.unit_max,
                                   tau_init=self.tau_init, reduce=solver.reduce,
                                   max_iter=max(solver.unchecked((i,)) for i in ids),
                                   check=False)
        # finite weights give finite unit maxima (NaN and Inf propagate into them)
        self.values = torch.cat([hard, torch.isfinite(self.unit_max).all().double().reshape(1),
                                 self.solution.error.max().reshape(1), self.solution.tau])

    @classmethod
    def make(cls, solver: AllocationSolver, alone: Sequence[tuple[int, float]], beta: float
             ) -> Segments | None:
        """The masks of ``alone`` (``(mask index, budget)``, each keeping some but not all of
        its entries) that can be computed together: warm float32 Spartan masks (unstructured
        or blocks), the largest group of one entry cost and block size; None unless there are
        two or more."""
        groups: dict[tuple[float, int], list[tuple[int, float]]] = {}
        for i, b in alone:
            m = solver.refs[i].mask
            if m.method == "spartan" and m.soft_active and m.threshold.dim() == 0 and (
                    solver.refs[i].theta.dtype == torch.float32):
                groups.setdefault((solver.unit_costs[i], m.block_numel), []).append((i, b))
        best = max(groups.values(), key=len, default=[])
        if len(best) < 2 or sum(solver.refs[i].mask.hard_mask.numel()
                                for i, _ in best) > MAX_ENTRIES:
            return None
        return cls(solver, [i for i, _ in best], [b for _, b in best], beta)

    def commit(self, values: Sequence[float]) -> tuple[int, float, dict[int, tuple[float, float]]]:
        """Write the masks from the read ``values`` (:attr:`values`'s); returns the Newton
        evaluations, the largest relative budget error and every mask's ``(tau, beta)``."""
        n = len(self.ids)
        solution, error = self.solution, values[n + 1]
        evaluations = solution.evaluations
        taus = list(values[n + 2:])
        if not error <= TOLERANCE:  # an unchecked solve that has not converged yet: go on
            solution = solve_soft([self.piece], self.budgets, unit_max=self.unit_max,
                                  tau_init=solution.tau, reduce=self.solver.reduce)
            evaluations += solution.evaluations
            read = torch.cat([solution.tau, solution.error.max().reshape(1)]).tolist()
            taus, error = read[:n], read[n]
        for i, h, tau, beta in zip(self.ids, values[:n], taus, self.betas, strict=True):
            self.solver.remember((i,), h)
            self.solver.remember_offset((i,), tau, h, beta)
        refs = [self.solver.refs[i] for i in self.ids]
        update_masks([r.mask for r in refs], [self.hard_of[i] for i in self.ids],
                     threshold=solution.tau, betas=self.betas, scope="local")
        self.solver.written[self.ids] = (self.flat, [self.hard_of[i] for i in self.ids])
        known = {i: (t, b) for i, t, b in zip(self.ids, taus, self.betas, strict=True)}
        return evaluations, error, known


def update_alone(solver: AllocationSolver, budget: Budget, alone: list[tuple[int, float]],
                 beta: float, step: int, old: list[torch.Tensor], target: float,
                 collapsed: set[str]) -> tuple[StepRecord, dict[int, tuple[float, float]]]:
    """Every budget of ``alone`` (:func:`own_budgets`) computed on the device without a host
    sync, then one read (their values, the weights' finiteness and the masks' counts), then
    written. Returns the step's record and the ``(threshold, beta)`` read of every soft mask
    (for ``batching.attach``)."""
    refs = solver.refs
    mixed = [(i, b) for i, b in alone if 0 < b < solver.cost(i) * (1 - 1e-12)]
    # kept whole, or emptied: one flat constant mask each, no solve
    fills = [(tuple(i for i, b in alone if (b > 0) == keep and (i, b) not in mixed), keep)
             for keep in (True, False)]
    fills = [(ids, keep) for ids, keep in fills if ids]
    flats = [(ids, torch.full((sum(refs[i].mask.hard_mask.numel() for i in ids),), keep,
                              dtype=torch.bool, device=refs[ids[0]].mask.hard_mask.device))
             for ids, keep in fills]
    together = Segments.make(solver, mixed, beta)
    joined = set(together.ids) if together is not None else set()
    apart = [(i, b) for i, b in mixed if i not in joined]  # each through its own prepare
    pendings = [solver.prepare((i,), b, beta, step) for i, b in apart]
    new = [r.mask.hard_mask for r in refs]
    for hard_of in [split_views(solver, ids, flat) for ids, flat in flats] + [
            p.hard_of for p in pendings] + ([together.hard_of] if together is not None else []):
        for i, h in hard_of.items():
            new[i] = h
    if together is not None:
        flats.append((together.ids, together.flat))
    counts = budget.counts(old, new, packed(solver, flats, old))
    # finiteness, read with the rest: the solved weights' from their unit maxima; the other
    # weights' (kept whole or emptied, not allocated) from one multi-tensor norm
    solved = {i for i, _ in apart} | set(together.ids if together is not None else ())
    others = [r.theta for i, r in enumerate(refs) if i not in solved]
    flags = [p.scalars[0] for p in pendings if p.scalars]
    flags += [together.values[len(together.ids)]] if together is not None else []
    if others:
        flags.append(torch.isfinite(torch.stack(torch._foreach_norm(others, 2))).all()
                     .double())
    scalars = [s for p in pendings for s in p.scalars]
    parts = [torch.stack(flags)] if flags else []
    parts += [torch.stack(scalars)] if scalars else []
    parts += [together.values] if together is not None else []
    values = torch.cat([*parts, counts.values]).tolist()
    budget.pass_gate(counts, values)
    if not all(values[:len(flags)]):
        check_weights(refs, step)  # raises, naming the tensor (nothing was written)
    start, iterations, error = len(flags), 0, 0.0
    known: dict[int, tuple[float, float]] = {}
    for (i, _), p in zip(apart, pendings, strict=True):
        its, err = p.commit(values[start:start + len(p.scalars)])
        start += len(p.scalars)
        iterations, error = iterations + its, max(error, err)
        if p.tau_host is not None:
            known[i] = (p.tau_host, beta * math.sqrt(refs[i].mask.block_numel))
    if together is not None:
        k = len(together.values)
        its, err, taus = together.commit(values[start:start + k])
        start += k
        iterations, error = iterations + its, max(error, err)
        known.update(taus)
    for ids, flat in flats[:len(fills)]:  # the constant masks, as prepare would write them
        masks = [refs[i].mask for i in ids]
        update_masks(masks, [new[i] for i in ids],
                     threshold=torch.stack([m.threshold for m in masks]).reshape(-1),
                     betas=[0.0] * len(ids))
        solver.written[ids] = (flat, [new[i] for i in ids])
    redone = any(r.mask.hard_mask is not h for r, h in zip(refs, new, strict=True))
    counted = None if redone else counts.read(values[start:])
    return (budget.record(old, counted, step, target, beta, iterations, error, collapsed),
            known)

