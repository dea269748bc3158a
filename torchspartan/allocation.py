"""``AllocationSolver``: one allocation's masks, computed with the engine and written back.

For one :class:`~torchspartan.Allocation` of the policy it packs the masked tensors into the
engine's pieces (one flat buffer of unit values per run of tensors with equal entry cost,
sharpness and dtype, so every pass is one op per run, not per tensor), selects the hard masks,
solves the soft threshold warm-started from the masks' own thresholds, enforces the per-mask
density bounds, and writes each mask through :meth:`SpartanMask.update`. A budget shared by
several tensors gets a :class:`~torchspartan.coupling.Coupling` for the exact gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from torchspartan._blocks import block_reduce, from_rows, to_rows
from torchspartan._engine import Piece, hard_select, solve_soft
from torchspartan._kernels import Scope
from torchspartan.coupling import Batched, Coupling
from torchspartan.sparsify import MaskRef

__all__ = ["AllocationSolver"]


class AllocationSolver:
    """Solves allocations over the masks ``refs`` (see the module docstring).

    Args:
        refs: the masks, as found by :func:`~torchspartan.find_masks`.
        unit_costs: cost of one weight entry of each mask's tensor.
        reduce: hook for every vector of sums over scores (identity in one process).

    Attributes:
        hints: the last two hard thresholds of every shared budget (keyed by its mask indices):
            their linear extrapolation narrows the next selection (exact whatever the guess).
    """

    def __init__(self, refs: Sequence[MaskRef], unit_costs: Sequence[float],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.refs = list(refs)
        self.unit_costs = list(unit_costs)
        self.reduce = reduce
        self.hints: dict[tuple[int, ...], list[float]] = {}
        self._new_couplings: list[Coupling] = []

    def coupling(self, idx: Sequence[int], slope: torch.Tensor, beta: float, tau: float
                 ) -> Coupling:
        """The coupling of a budget shared by the masks ``idx`` at threshold ``tau``: batched
        when every mask is unstructured Spartan with one dtype (float32/float64)."""
        masks = [self.refs[i].mask for i in idx]
        thetas = [self.refs[i].theta for i in idx]
        batched = None
        if all(m.method == "spartan" and m.block is None for m in masks) and len(
                {(t.dtype, t.device) for t in thetas}) == 1 and thetas[0].dtype in (
                torch.float32, torch.float64):
            scales = [beta / (self.unit_costs[i] * self.refs[i].mask.block_numel) for i in idx]
            batched = Batched(beta, scales, -(beta * tau))
        return Coupling(masks, thetas, slope, batched=batched)

    def take_couplings(self) -> list[Coupling]:
        """The couplings made since the last call (the caller owns and releases them)."""
        out, self._new_couplings = self._new_couplings, []
        return out

    def units(self, i: int) -> torch.Tensor:
        """``block_sum(|theta|) / entry cost`` of mask ``i``, flat, float32 (float64 stays)."""
        r = self.refs[i]
        v = block_reduce(r.theta.detach().abs(), r.mask.spec().sizes)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        cost = self.unit_costs[i] * r.mask.block_numel
        return v.reshape(-1) if cost == 1.0 else v.reshape(-1).div_(cost)

    def pieces(self, idx: Sequence[int], beta: float) -> tuple[list[Piece], list[list[int]]]:
        """Runs of consecutive tensors with equal (entry cost, sharpness, dtype), each packed
        into one flat buffer: one piece per run."""
        runs: list[list[int]] = []
        keys: list[tuple[float, float, torch.dtype]] = []
        for i in idx:
            r = self.refs[i]
            dtype = torch.float64 if r.theta.dtype == torch.float64 else torch.float32
            key = (self.unit_costs[i] * r.mask.block_numel, math.sqrt(r.mask.block_numel), dtype)
            if keys and keys[-1] == key:
                runs[-1].append(i)
            else:
                runs.append([i])
                keys.append(key)
        pieces = []
        for run, (cost, scale, _) in zip(runs, keys, strict=True):
            units = [self.units(i) for i in run]
            flat = units[0] if len(units) == 1 else torch.cat(units)
            pieces.append(Piece(flat.reshape(1, -1), beta * scale, cost, 0))
        return pieces, runs

    def check_finite(self, pieces: list[Piece], runs: list[list[int]], step: int
                      ) -> torch.Tensor:
        """Largest unit value per piece (one host sync), and the finiteness check of the
        weights the base step just wrote (NaN propagates through the maximum)."""
        umax = torch.stack([p.units.amax() for p in pieces]).double()
        if not bool(torch.isfinite(umax).all()):
            for run in runs:
                for i in run:
                    if not bool(torch.isfinite(self.refs[i].theta).all()):
                        raise ValueError(
                            f"{self.refs[i].name} became non-finite (NaN or Inf) in the base "
                            f"optimizer's step {step}; lower the learning rate or clip gradients"
                        )
        return umax

    def solve_bounded(self, idx: tuple[int, ...], density: float, beta: float, step: int = 0
                      ) -> tuple[int, float]:
        """Solve one shared budget, fixing tensors that violate their density bounds."""
        free = list(idx)
        budget = density * sum(self.cost(i) for i in idx)
        iterations, error = 0, 0.0
        for _ in range(len(idx) + 1):
            if len(free) == 1:
                m = self.refs[free[0]].mask
                cap = self.cost(free[0])
                budget = min(max(budget, m.min_density * cap), m.max_density * cap)
            its, err = self.solve(tuple(free), budget, beta, step)
            iterations += its
            error = max(error, err)
            if all(self.refs[i].mask.min_density == 0.0 and self.refs[i].mask.max_density == 1.0
                   for i in free) or len(free) == 1:
                break
            kept = torch.stack([self.refs[i].mask.hard_mask.sum() for i in free]).tolist()
            violators = []
            for i, k in zip(free, kept, strict=True):
                m = self.refs[i].mask
                d = k * m.block_numel / self.refs[i].theta.numel()
                if d < m.min_density - 1e-12:
                    violators.append((i, m.min_density))
                elif d > m.max_density + 1e-12:
                    violators.append((i, m.max_density))
            if not violators:
                break
            for i, bound in violators:
                its, err = self.solve((i,), bound * self.cost(i), beta, step)
                iterations += its
                error = max(error, err)
                budget -= bound * self.cost(i)
                free.remove(i)
            budget = max(budget, 0.0)
        return iterations, error

    def cost(self, i: int) -> float:
        return self.refs[i].theta.numel() * self.unit_costs[i]

    def solve(self, idx: tuple[int, ...], budget: float, beta: float, step: int = 0
              ) -> tuple[int, float]:
        """Hard masks and soft threshold of one shared budget; writes the masks."""
        masks = [self.refs[i].mask for i in idx]
        total = sum(self.cost(i) for i in idx)
        if budget >= total * (1 - 1e-12) or budget <= 0:
            for m in masks:
                m.update(torch.full_like(m.hard_mask, budget > 0), threshold=m.threshold)
            return 0, 0.0
        pieces, runs = self.pieces(idx, beta)
        umax = self.check_finite(pieces, runs, step)
        past = self.hints.get(idx, [])
        hint = 2 * past[-1] - past[-2] if len(past) == 2 else (past[-1] if past else None)
        if hint is not None and not hint > 0:
            hint = past[-1]
        hard, thresholds = hard_select(pieces, [budget], [hint])
        if math.isfinite(thresholds[0]):
            self.hints[idx] = (past + [thresholds[0]])[-2:]
        hard_of = {}
        for run, h in zip(runs, hard, strict=True):
            sizes = [self.refs[i].mask.hard_mask.numel() for i in run]
            for i, part in zip(run, h.reshape(-1).split(sizes), strict=True):
                hard_of[i] = part.view(self.refs[i].mask.hard_mask.shape)
        if not any(m.method == "spartan" for m in masks):
            for i, m in zip(idx, masks, strict=True):
                m.update(hard_of[i], threshold=m.threshold)
            return 0, 0.0
        first = masks[0]
        warm = first.soft_active and first.threshold.dim() == 0 and all(
            m.soft_active for m in masks)
        budgets = torch.tensor([budget], dtype=torch.float64, device=umax.device)
        solution = solve_soft(pieces, budgets, unit_max=umax,
                              tau_init=first.threshold.reshape(1) if warm else None,
                              reduce=self.reduce)
        tau = solution.tau[0]
        tau_host, err = torch.stack([tau, solution.error.max()]).tolist()  # the one read
        coupling = None
        if len(idx) > 1:
            coupling = self.coupling(idx, solution.slope[0], beta, tau_host)
            self._new_couplings.append(coupling)
        scope: Scope = "shared" if coupling is not None else "local"
        for i, m in zip(idx, masks, strict=True):
            m.update(hard_of[i], threshold=tau, beta=beta * math.sqrt(m.block_numel),
                     scope=scope, coupling=coupling)
        return solution.evaluations, err

    def solve_rows(self, idx: tuple[int, ...], density: float, group: int, beta: float
                    ) -> tuple[int, float]:
        """N:M: every row of ``group`` entries along dim 1 keeps ``density * group``."""
        iterations, error = 0, 0.0
        for i in idx:
            r = self.refs[i]
            rows = to_rows(r.theta.detach().abs(), group)
            rows = rows.float() if rows.dtype not in (torch.float32, torch.float64) else rows
            piece = Piece(rows, beta, 1.0, 0, rowwise=True)
            budget = density * group
            if budget >= group * (1 - 1e-12):
                r.mask.update(torch.ones_like(r.mask.hard_mask), threshold=r.mask.threshold)
                continue
            hard, _ = hard_select([piece], [budget] * rows.shape[0])
            hard_grid = from_rows(hard[0], r.mask.hard_mask.shape, group).contiguous()
            if r.mask.method != "spartan":
                r.mask.update(hard_grid)
                continue
            warm = r.mask.soft_active and r.mask.threshold.shape == (rows.shape[0],)
            budgets = torch.full((rows.shape[0],), budget, dtype=torch.float64,
                                 device=rows.device)
            solution = solve_soft([piece], budgets,
                                  tau_init=r.mask.threshold if warm else None)
            r.mask.update(hard_grid, threshold=solution.tau, beta=beta, scope="local")
            iterations += solution.evaluations
            error = max(error, float(solution.error.max()))
        return iterations, error

