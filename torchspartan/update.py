"""``MaskUpdater``: computes every mask of a model for a density and a sharpness.

The mask-update component of Spartan, usable alone (and unit-tested alone): it finds the
:class:`~torchspartan.SpartanMask` s of a model, asks the allocation policy for the budgeted
problems of the step, solves each with the one engine (``_engine.py``: hard top-k and soft top-k
thresholds, warm-started from the previous step) and writes the result into the masks through
:meth:`SpartanMask.update`. :class:`~torchspartan.DualAveraging` calls it after every base step.

Solving one allocation is the job of :class:`~torchspartan.allocation.AllocationSolver`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from torchspartan.allocation import AllocationSolver
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
        self.solver = AllocationSolver(self.refs, self.unit_costs, reduce)
        self.couplings: list[Coupling] = []
        self.collapsed: set[str] = set()
        self.last_record: StepRecord | None = None

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
                    its, err = self.solver.solve_rows(idx, alloc.density, alloc.group, beta)
                else:
                    its, err = self.solver.solve_bounded(idx, alloc.density, beta, step)
                self.couplings += self.solver.take_couplings()
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
            if bad or len(set(a.tensors)) < len(a.tensors) or not (0.0 <= a.density <= 1.0):
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
            "hints": [[list(k), list(v)] for k, v in self.solver.hints.items()],
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
            beta = float(masks[0].beta) / math.sqrt(masks[0].block_numel)
            c = self.solver.coupling(layers, torch.tensor(
                slope, dtype=torch.float64, device=masks[0].threshold.device), beta,
                float(masks[0].threshold))
            for m in masks:
                m.update(m.hard_mask, threshold=m.threshold, beta=float(m.beta),
                         scope="shared", coupling=c)
            self.couplings.append(c)
        coupled = {i for layers, _ in couplings for i in layers}
        for i, r in enumerate(self.refs):  # the other soft masks own their budgets
            if i not in coupled and r.mask.soft_active and r.mask.method == "spartan":
                r.mask.update(r.mask.hard_mask, threshold=r.mask.threshold,
                              beta=float(r.mask.beta), scope="local")
        self.solver.hints = hints
        self.collapsed = set(state.get("collapsed", []))
        self.last_record = StepRecord(**record) if record else None


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside torchspartan and torch (the user's call)."""
    import sys
    import types

    frame: types.FrameType | None = sys._getframe(1)
    level = 1
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
