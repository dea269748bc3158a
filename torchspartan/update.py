"""``MaskUpdater``: computes every mask of a model for a density and a sharpness.

The mask-update component of Spartan, usable alone (and unit-tested alone): it finds the
:class:`~torchspartan.SpartanMask` s of a model, asks the allocation policy for the budgeted
problems of the step, solves each with the one engine (``_engine.py``: hard top-k and soft top-k
thresholds, warm-started from the previous step) and writes the result into the masks through
:meth:`SpartanMask.update`. :class:`~torchspartan.DualAveraging` calls it after every base step.

Per allocation the masked tensors are packed into one flat buffer of unit values per run of
tensors with equal (entry cost, sharpness), so every pass of the solve is one op per run, not per
tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from torchspartan._blocks import block_reduce, from_rows, to_rows
from torchspartan._engine import Piece, hard_select, solve_soft
from torchspartan.coupling import Coupling
from torchspartan.policies import (
    Allocation,
    AllocationPolicy,
    Global,
    MaskedTensor,
    normalise_costs,
)
from torchspartan.sparsify import MaskRef, find_masks

__all__ = ["MaskUpdater", "StepRecord"]

SparsityOf = Literal["masked", "model"]


@dataclass(frozen=True)
class StepRecord:
    """What one mask update did, for logging (``DualAveraging.last_record``).

    Attributes:
        step: optimizer steps taken so far.
        density: kept fraction of the masked weights after this update (hard masks).
        target_density: the density asked of the allocatable masked tensors (cost-weighted).
        beta: sharpness of the soft top-k at this step (before per-layer block scaling).
        iterations: Newton evaluations of the budget equation, summed over problems.
        budget_error: largest relative error of the soft budget over the problems.
        mask_change: fraction of masked weights whose hard mask changed at this update.
        frozen: whether the mask is frozen (fine-tuning phase).
    """

    step: int
    density: float
    target_density: float
    beta: float
    iterations: int
    budget_error: float
    mask_change: float
    frozen: bool


class MaskUpdater:
    """The masks of ``model`` as a function of (density, beta), with the state to warm-start.

    Args:
        model: the model holding the masks.
        policy: the allocation policy (default :class:`~torchspartan.Global`).
        sparsity_of: ``"masked"``: densities count the masked tensors; ``"model"``: all model
            parameters, the masked tensors compensating for the unmasked ones.
        reduce: hook applied to every vector of sums over scores (an all-reduce when the weights
            are sharded over ranks; identity by default).

    Raises:
        ValueError: a model without masks, a mask that is not the first parametrization on its
            tensor, a mask registered twice, or only ``method="fixed"`` masks.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> _ = ts.sparsify(model)
        >>> updater = ts.MaskUpdater(model)
        >>> record = updater.update(density=0.25, beta=5.0)
        >>> record.density
        0.25
    """

    def __init__(
        self,
        model: nn.Module,
        policy: AllocationPolicy | None = None,
        *,
        sparsity_of: SparsityOf = "masked",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if policy is not None and not isinstance(policy, AllocationPolicy):
            raise TypeError(
                f"policy must be a ts.AllocationPolicy (e.g. ts.Global(), ts.ERK(), "
                f"ts.NM(2, 4)), got {type(policy).__name__}"
            )
        if sparsity_of not in ("masked", "model"):
            raise ValueError(f"sparsity_of must be 'masked' or 'model', got {sparsity_of!r}")
        self.model = model
        self.policy = policy if policy is not None else Global()
        self.sparsity_of = sparsity_of
        self.reduce = reduce
        self.refs = _checked_refs(model)
        raw = self.policy.costs.unit_costs(model, [r.module for r in self.refs])
        self.unit_costs = normalise_costs(raw, [r.theta.numel() for r in self.refs])
        for r, c in zip(self.refs, self.unit_costs, strict=True):
            r.mask.cost.fill_(c * r.mask.block_numel)
        self.alloc_index = [i for i, r in enumerate(self.refs) if r.mask.method != "fixed"]
        if not self.alloc_index:
            raise ValueError("every SpartanMask of the model is method='fixed'; nothing to train")
        self.tensors = [
            MaskedTensor(r.name, tuple(r.theta.shape), r.mask.block, self.unit_costs[i])
            for i, r in ((i, self.refs[i]) for i in self.alloc_index)
        ]
        self.masked_numel = sum(r.theta.numel() for r in self.refs)
        theta_ids = {id(r.theta) for r in self.refs}
        self.total_numel = sum(p.numel() for p in model.parameters())
        self.unmasked_numel = sum(p.numel() for p in model.parameters() if id(p) not in theta_ids)
        self.hints: dict[tuple[int, ...], list[float]] = {}
        self.couplings: list[Coupling] = []
        self.collapsed: set[str] = set()
        self.last_record: StepRecord | None = None
        self.step = 0

    @property
    def names(self) -> list[str]:
        """Qualified names of the masked tensors, in update order."""
        return [r.name for r in self.refs]

    # -- densities ---------------------------------------------------------------------
    def allocatable_density(self, density: float) -> float:
        """Kept fraction of the allocatable masks' cost that gives ``density`` as counted by
        ``sparsity_of`` (fixed masks keep what they keep)."""
        fixed_kept = sum(
            float(r.mask.hard_mask.sum()) * r.mask.block_numel * self.unit_costs[i]
            for i, r in enumerate(self.refs) if r.mask.method == "fixed"
        )
        alloc_cost = sum(t.cost for t in self.tensors)
        if self.sparsity_of == "model":
            kept = density * self.total_numel - self.unmasked_numel - fixed_kept
        else:
            kept = density * self.masked_numel - fixed_kept
        return kept / alloc_cost

    def check_target(self, density: float) -> float:
        """Raise ``ValueError`` if ``density`` cannot be reached; return the allocatable one."""
        final = self.allocatable_density(density)
        if final <= 0.0:
            raise ValueError(
                f"density={density:.6g} over the {self.sparsity_of} parameters "
                f"({self.total_numel} parameters, {self.unmasked_numel} of them unmasked) leaves "
                f"no budget for the masked tensors; lower the sparsity, mask more tensors, or use "
                f"sparsity_of='masked'"
            )
        self.policy.check(self.tensors, min(final, 1.0))
        return final

    # -- the update ----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, density: float, beta: float, step: int = 0) -> StepRecord:
        """Masks for ``density`` (as counted by ``sparsity_of``) and sharpness ``beta``.

        Raises:
            ValueError: a masked weight holding NaN/Inf (named), or a policy returning bad
                allocations.
        """
        self.step = step
        alloc_density = min(1.0, self.allocatable_density(density))
        old = [r.mask.hard_mask for r in self.refs]
        self.release()
        iterations, error = 0, 0.0
        if alloc_density >= 1.0:
            for i in self.alloc_index:
                mask = self.refs[i].mask
                mask.update(torch.ones_like(mask.hard_mask), threshold=mask.threshold)
        else:
            for alloc in self._allocations(alloc_density):
                idx = tuple(self.alloc_index[j] for j in alloc.tensors)
                if alloc.group is not None:
                    its, err = self._solve_rows(idx, alloc.density, alloc.group, beta)
                else:
                    its, err = self._solve_bounded(idx, alloc.density, beta)
                iterations += its
                error = max(error, err)
        record = self._record(old, step, alloc_density, beta, iterations, error)
        self.last_record = record
        return record

    def _allocations(self, density: float) -> list[Allocation]:
        allocs = self.policy.allocate(self.tensors, density)
        n = len(self.tensors)
        seen: set[int] = set()
        for a in allocs:
            if not isinstance(a, Allocation):
                raise TypeError(f"{self.policy!r}.allocate must return ts.Allocation objects, "
                                f"got {type(a).__name__}")
            bad = [i for i in a.tensors if not (0 <= i < n) or i in seen]
            if bad or not (0.0 <= a.density <= 1.0):
                raise ValueError(
                    f"{self.policy!r}.allocate returned {a!r}: tensor indices must be in "
                    f"[0, {n}) and each used once, density in [0, 1]"
                )
            seen.update(a.tensors)
        if len(seen) != n:
            missing = [self.tensors[i].name for i in range(n) if i not in seen][:3]
            raise ValueError(f"{self.policy!r}.allocate left tensors without a budget: "
                             f"{missing}; every masked tensor needs one allocation")
        return allocs

    def _units(self, i: int) -> torch.Tensor:
        """``block_sum(|theta|) / entry cost`` of mask ``i``, flat, float32 (float64 stays)."""
        r = self.refs[i]
        v = block_reduce(r.theta.detach().abs(), r.mask.spec().sizes)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        cost = self.unit_costs[i] * r.mask.block_numel
        return v.reshape(-1) if cost == 1.0 else v.reshape(-1).div_(cost)

    def _pieces(self, idx: Sequence[int], beta: float) -> tuple[list[Piece], list[list[int]]]:
        """Runs of consecutive tensors with equal (entry cost, sharpness, dtype), each packed
        into one flat buffer: one piece per run."""
        runs: list[list[int]] = []
        keys: list[tuple[float, float, torch.dtype]] = []
        for i in idx:
            r = self.refs[i]
            dtype = torch.float64 if r.theta.dtype == torch.float64 else torch.float32
            key = (float(r.mask.cost), math.sqrt(r.mask.block_numel), dtype)
            if keys and keys[-1] == key:
                runs[-1].append(i)
            else:
                runs.append([i])
                keys.append(key)
        pieces = []
        for run, (cost, scale, _) in zip(runs, keys, strict=True):
            units = [self._units(i) for i in run]
            flat = units[0] if len(units) == 1 else torch.cat(units)
            pieces.append(Piece(flat.reshape(1, -1), beta * scale, cost, 0))
        return pieces, runs

    def _check_finite(self, pieces: list[Piece], runs: list[list[int]], step: int
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

    def _solve_bounded(self, idx: tuple[int, ...], density: float, beta: float
                       ) -> tuple[int, float]:
        """Solve one shared budget, fixing tensors that violate their density bounds."""
        free = list(idx)
        budget = density * sum(self._cost(i) for i in idx)
        iterations, error = 0, 0.0
        for _ in range(len(idx) + 1):
            if len(free) == 1:
                m = self.refs[free[0]].mask
                cap = self._cost(free[0])
                budget = min(max(budget, m.min_density * cap), m.max_density * cap)
            its, err = self._solve(tuple(free), budget, beta)
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
                its, err = self._solve((i,), bound * self._cost(i), beta)
                iterations += its
                error = max(error, err)
                budget -= bound * self._cost(i)
                free.remove(i)
            budget = max(budget, 0.0)
        return iterations, error

    def _cost(self, i: int) -> float:
        return self.refs[i].theta.numel() * self.unit_costs[i]

    def _solve(self, idx: tuple[int, ...], budget: float, beta: float) -> tuple[int, float]:
        """Hard masks and soft threshold of one shared budget; writes the masks."""
        masks = [self.refs[i].mask for i in idx]
        total = sum(self._cost(i) for i in idx)
        if budget >= total * (1 - 1e-12) or budget <= 0:
            for m in masks:
                m.update(torch.full_like(m.hard_mask, budget > 0), threshold=m.threshold)
            return 0, 0.0
        pieces, runs = self._pieces(idx, beta)
        umax = self._check_finite(pieces, runs, self.step)
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
        coupling = None
        if len(idx) > 1:
            coupling = Coupling(masks, [self.refs[i].theta for i in idx], solution.slope[0])
            self.couplings.append(coupling)
        scope = "shared" if coupling is not None else "local"
        for i, m in zip(idx, masks, strict=True):
            m.update(hard_of[i], threshold=tau, beta=beta * math.sqrt(m.block_numel),
                     scope=scope, coupling=coupling)
        err = float(solution.error.max())
        return solution.evaluations, err

    def _solve_rows(self, idx: tuple[int, ...], density: float, group: int, beta: float
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

    def release(self) -> None:
        """Unbind every coupling (before new ones are made, or when training ends)."""
        for c in self.couplings:
            c.release()
        self.couplings = []

    def _record(self, old: list[torch.Tensor], step: int, target: float, beta: float,
                iterations: int, error: float) -> StepRecord:
        block = [r.mask.block_numel for r in self.refs]
        counts = torch.stack(
            [(r.mask.hard_mask != o).sum() for r, o in zip(self.refs, old, strict=True)]
            + [r.mask.hard_mask.sum() for r in self.refs]
        ).tolist()
        n = len(self.refs)
        changed = sum(c * b for c, b in zip(counts[:n], block, strict=True))
        kept = sum(c * b for c, b in zip(counts[n:], block, strict=True))
        for r, c in zip(self.refs, counts[n:], strict=True):
            if c == 0 and r.name not in self.collapsed:
                self.collapsed.add(r.name)
                warnings.warn(
                    f"{r.name}: every entry is pruned at step {step} (layer collapse), so the "
                    f"layer outputs only its bias; if that is not wanted, give its SpartanMask a "
                    f"min_density (e.g. ts.sparsify(..., min_density=0.01)) or use ts.ERK()",
                    stacklevel=_caller_level(),
                )
        return StepRecord(step, kept / self.masked_numel, target, beta, iterations, error,
                          changed / self.masked_numel, False)

    # -- fine-tuning ---------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self) -> None:
        """Fold ``theta <- theta * m * h`` once in every mask; the masks never change again."""
        self.release()
        for r in self.refs:
            r.mask.freeze(r.theta)
        if self.last_record is not None:
            self.last_record = replace(self.last_record, frozen=True)

    @property
    def frozen(self) -> bool:
        return all(r.mask.is_frozen for r in self.refs)

    # -- state ---------------------------------------------------------------------------
    def fingerprint(self) -> list[list[Any]]:
        """What identifies the masked tensors: ``[name, shape, method]`` each."""
        return [[r.name, list(r.theta.shape), r.mask.method] for r in self.refs]

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists: hints, couplings (their slopes), record. The masks' own
        state (hard masks, thresholds, betas, frozen) is in ``model.state_dict()``."""
        index = {id(r.mask): i for i, r in enumerate(self.refs)}
        return {
            "layers": self.fingerprint(),
            "couplings": [
                {"layers": [index[id(m)] for m in c.masks], "slope": float(c.slope)}
                for c in self.couplings
            ],
            "hints": [[list(k), list(v)] for k, v in self.hints.items()],
            "collapsed": sorted(self.collapsed),
            "last_record": asdict(self.last_record) if self.last_record else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the model's masks must be loaded already).

        Raises:
            ValueError: the state comes from a model with other masked tensors, or is malformed
                (nothing is changed then).
        """
        theirs = [list(x) for x in state.get("layers", [])]
        if theirs != self.fingerprint():
            diff = next(
                (f"{a} vs {b}" for a, b in zip(theirs, self.fingerprint(), strict=False)
                 if a != b),
                f"{len(theirs)} masked tensors vs {len(self.refs)}",
            )
            raise ValueError(
                f"this state comes from a different model: its masked tensors differ ({diff}); "
                f"load it into the model it was saved from"
            )
        n = len(self.refs)
        couplings = []
        for entry in state.get("couplings", []):
            layers = [int(i) for i in entry["layers"]]
            if not layers or any(not 0 <= i < n for i in layers):
                raise ValueError(f"malformed coupling entry {entry!r}: layer indices must be in "
                                 f"[0, {n})")
            couplings.append((layers, float(entry["slope"])))
        hints = {tuple(int(i) for i in k): [float(x) for x in (v if isinstance(v, list) else [v])]
                 for k, v in state.get("hints", [])}
        record = state.get("last_record")
        self.release()
        for layers, slope in couplings:
            masks = [self.refs[i].mask for i in layers]
            c = Coupling(masks, [self.refs[i].theta for i in layers],
                         torch.tensor(slope, dtype=torch.float64,
                                      device=masks[0].threshold.device))
            for m in masks:
                m.update(m.hard_mask, threshold=m.threshold, beta=float(m.beta),
                         scope="shared", coupling=c)
            self.couplings.append(c)
        coupled = {i for layers, _ in couplings for i in layers}
        for i, r in enumerate(self.refs):  # the other soft masks own their budgets
            if i not in coupled and r.mask.soft_active and r.mask.method == "spartan":
                r.mask.update(r.mask.hard_mask, threshold=r.mask.threshold,
                              beta=float(r.mask.beta), scope="local")
        self.hints = hints
        self.collapsed = set(state.get("collapsed", []))
        self.last_record = StepRecord(**record) if record else None


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside torchspartan and torch (the user's call)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("torchspartan") or name.startswith("torch")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _checked_refs(model: nn.Module) -> list[MaskRef]:
    found = find_masks(model)
    if not found:
        raise ValueError(
            "model has no SpartanMask; register one first, e.g. ts.sparsify(model) or "
            "parametrize.register_parametrization(layer, 'weight', ts.SpartanMask())"
        )
    seen: set[int] = set()
    for r in found:
        if r.position != 0:
            raise ValueError(
                f"{r.name}: the SpartanMask is parametrization number {r.position} on this "
                f"tensor; it must be registered first (register other parametrizations after it)"
            )
        if id(r.mask) in seen:
            raise ValueError(f"{r.name}: one SpartanMask instance is registered twice")
        seen.add(id(r.mask))
    return found
