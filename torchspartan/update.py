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
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, cast

import torch
from torch import nn

from torchspartan.allocation import AllocationSolver
from torchspartan.coupling import Coupling
from torchspartan.mask import SpartanMask
from torchspartan.policies import (
    Allocation,
    AllocationPolicy,
    Global,
    MaskedTensor,
    normalise_costs,
)
from torchspartan.sparsify import MaskRef, allow_pickle, check_place, find_masks, input_dim

__all__ = ["MaskUpdater", "StepRecord", "finite_flags"]

SparsityOf = Literal["masked", "model"]

# The layout of MaskUpdater.state_dict(); entries without a version (release 0.2.0) read as 1.
STATE_VERSION = 2


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

    A Parameter shared by several modules (tied weights) is one masked tensor: one
    :class:`~torchspartan.SpartanMask` registered at every place that holds it (as
    :func:`~torchspartan.sparsify` does), counted once.

    Raises:
        ValueError: a model without masks; a mask that is not the first parametrization on its
            tensor, or followed by one that does not compose (``orthogonal``, ``weight_norm``);
            one mask instance on two different tensors, or two masks on one (tied) tensor; a
            tied tensor masked at one place and used unmasked at another; a masked tensor also
            pruned with ``torch.nn.utils.prune`` or of a ``sparse=True`` embedding; only
            ``method="fixed"`` masks; a cost model giving costs that are not finite and > 0.

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
        self.unit_costs = normalise_costs(raw, [r.theta.numel() for r in self.refs],
                                          [r.name for r in self.refs])
        self.alloc_index = [i for i, r in enumerate(self.refs) if r.mask.method != "fixed"]
        if not self.alloc_index:
            raise ValueError("every SpartanMask of the model is method='fixed'; nothing to train")
        self._places = [(r.module, r.tensor_name, r.mask, r.theta) for r in find_masks(model)]
        for place in self._places:
            allow_pickle(place[0])
        self._costs_written = False  # written by the first update (construction changes nothing)
        self.tensors = [
            MaskedTensor(r.name, tuple(r.theta.shape), r.mask.block, self.unit_costs[i],
                         input_dim(r.module, r.tensor_name))
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
        self._planned: tuple[float, float, float, list[Allocation]] | None = None

    def check_bindings(self) -> None:
        """Raise ``RuntimeError`` when a mask is no longer where it was at construction: removed
        (``parametrize.remove_parametrizations``, ``ts.finalize``), replaced, or over another
        Parameter. Cheap (no device work)."""
        gone = []
        for module, name, mask, theta in self._places:
            plist = getattr(module, "parametrizations", None)
            plist = plist[name] if plist is not None and name in plist else None
            if plist is None or len(plist) == 0 or plist[0] is not mask or (
                    getattr(plist, "original", None) is not theta):
                gone.append((module, name))
        if not gone:
            return
        if not find_masks(self.model):
            raise RuntimeError(
                "the model was finalized (ts.finalize); its masks are gone, so the masks cannot "
                "be updated any more. Use a plain optimizer to keep training the sparse model."
            )
        where = {id(m): q for q, m in self.model.named_modules()}
        shown = [f"{where[id(m)]}.{n}" if where.get(id(m)) else n for m, n in gone][:3]
        raise RuntimeError(
            f"{', '.join(shown)} lost its SpartanMask (or its Parameter) since the optimizer was "
            f"built (parametrize.remove_parametrizations?); nothing was updated. Register the "
            f"masks as they were, or build a new ts.DualAveraging/ts.MaskUpdater for the masks "
            f"the model has now"
        )

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
        density = _number("density", density)
        final = self._allocatable(density)
        self.policy.check(self.tensors, min(final, 1.0))
        return final

    def _allocatable(self, density: float) -> float:
        final = self.allocatable_density(density)
        if not final > 0.0:
            raise ValueError(
                f"density={density:.6g} over the {self.sparsity_of} parameters "
                f"({self.total_numel} parameters, {self.unmasked_numel} of them unmasked) leaves "
                f"no budget for the masked tensors; lower the sparsity, mask more tensors, or use "
                f"sparsity_of='masked'"
            )
        return final

    def validate(self, density: float, beta: float) -> tuple[float, float]:
        """Every check of :meth:`update` that needs no pass over the weights, without changing
        anything: the numbers, the budget, the policy's allocations (kept for the next update).

        Returns ``(density, beta)`` as floats.

        Raises:
            TypeError / ValueError: a density outside ``(0, 1]`` or leaving no budget, a beta
                that is not finite and > 0, or a policy returning bad allocations.
        """
        density = _number("density", density)
        beta = _number("beta", beta)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if not beta > 0.0:
            raise ValueError(f"beta must be finite and > 0, got {beta!r}")
        alloc_density = min(1.0, self._allocatable(density))
        allocs = self._allocations(alloc_density) if alloc_density < 1.0 else []
        self._planned = (density, beta, alloc_density, allocs)
        return density, beta

    # -- the update ----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, density: float, beta: float, step: int = 0) -> StepRecord:
        """Masks for ``density`` (as counted by ``sparsity_of``) and sharpness ``beta``.

        Everything is checked before the first mask is written (:meth:`validate`, then the
        weights); when it raises, the masks are as before the call.

        Raises:
            TypeError / ValueError: as :meth:`validate`, or a masked weight holding NaN/Inf
                (named).
        """
        self.check_bindings()
        density, beta = _number("density", density), _number("beta", beta)
        planned, self._planned = self._planned, None
        if planned is None or planned[:2] != (density, beta):
            self.validate(density, beta)
            planned, self._planned = self._planned, None
        if planned is None:
            raise RuntimeError("MaskUpdater.validate did not plan the update")
        _, _, alloc_density, allocs = planned
        one_solve = len(allocs) == 1 and allocs[0].group is None and (
            0.0 < allocs[0].density < 1.0)
        if not one_solve:
            # several problems, or none to solve: check every weight before the first mask is
            # written (one solved problem checks its own weights before it writes anything)
            self.check_weights(step)
        if not self._costs_written:
            for r, c in zip(self.refs, self.unit_costs, strict=True):
                r.mask.cost.fill_(c * r.mask.block_numel)
            self._costs_written = True
        old = [r.mask.hard_mask for r in self.refs]
        bound, hints = self.couplings, dict(self.solver.hints)
        self.release()
        iterations, error = 0, 0.0
        try:
            if alloc_density >= 1.0:
                for i in self.alloc_index:
                    mask = self.refs[i].mask
                    mask.update(torch.ones_like(mask.hard_mask), threshold=mask.threshold)
            if one_solve and not self._bounded(allocs[0]):
                # the common case: one shared budget, computed, then checked and counted with
                # one host read, then written (no sync on the way with a sync-free solver)
                record = self._update_one(allocs[0], beta, step, old, alloc_density)
                self.last_record = record
                return record
            for alloc in allocs:
                idx = tuple(self.alloc_index[j] for j in alloc.tensors)
                if alloc.group is not None:
                    its, err = self.solver.solve_rows(idx, alloc.density, alloc.group, beta)
                else:
                    its, err = self.solver.solve_bounded(idx, alloc.density, beta, step)
                self.couplings += self.solver.take_couplings()
                iterations += its
                error = max(error, err)
        except BaseException:
            # leave the masks bound as before this update (they were not written: a failing
            # problem raises before it writes, and several problems were checked up front)
            for made in self.couplings + self.solver.take_couplings():
                made.release()
            self.couplings = []
            self.solver.hints = hints
            for i, r in enumerate(self.refs):
                if r.mask.hard_mask is not old[i]:
                    break
            else:
                self._bind(bound)
            raise
        record = self._record(old, step, alloc_density, beta, iterations, error)
        self.last_record = record
        return record

    def _bounded(self, alloc: Allocation) -> bool:
        return any(self.refs[self.alloc_index[j]].mask.min_density > 0.0
                   or self.refs[self.alloc_index[j]].mask.max_density < 1.0
                   for j in alloc.tensors)

    def _update_one(self, alloc: Allocation, beta: float, step: int, old: list[torch.Tensor],
                    alloc_density: float) -> StepRecord:
        idx = tuple(self.alloc_index[j] for j in alloc.tensors)
        budget = alloc.density * sum(self.solver.cost(i) for i in idx)
        pending = self.solver.prepare(idx, budget, beta, step)
        new = [pending.hard_of.get(i, r.mask.hard_mask) for i, r in enumerate(self.refs)]
        counts = self._counts(old, new)
        n = len(pending.scalars)
        values = (torch.cat([torch.stack(pending.scalars), counts.to(torch.float64)]).tolist()
                  if n else counts.tolist())
        iterations, error = pending.commit(values[:n])
        self.couplings += self.solver.take_couplings()
        redone = any(r.mask.hard_mask is not h for r, h in zip(self.refs, new, strict=True))
        return self._record(old, step, alloc_density, beta, iterations, error,
                            None if redone else values[n:])

    def check_weights(self, step: int = 0) -> None:
        """Raise ``ValueError`` naming the first masked weight holding NaN/Inf (one host sync)."""
        ok = finite_flags([r.theta.detach() for r in self.refs])
        for r, good in zip(self.refs, ok, strict=True):
            if not good:
                raise ValueError(
                    f"{r.name} holds NaN or Inf at step {step}; the masks were not updated. "
                    f"Lower the learning rate or clip gradients"
                )

    def _bind(self, couplings: list[Coupling]) -> None:
        """Bind ``couplings`` (made for the masks' current state) to their masks again."""
        for c in couplings:
            for bound in c.masks:
                m = cast(SpartanMask, bound)
                m.update(m.hard_mask, threshold=m.threshold, beta=float(m.beta),
                         scope="shared", coupling=c)
            self.couplings.append(c)

    def _allocations(self, density: float) -> list[Allocation]:
        allocs = self.policy.allocate(self.tensors, density)
        if isinstance(allocs, Allocation) or not isinstance(allocs, (list, tuple)):
            raise TypeError(f"{self.policy!r}.allocate must return a list of ts.Allocation, got "
                            f"{type(allocs).__name__}")
        n = len(self.tensors)
        seen: set[int] = set()
        for a in allocs:
            if not isinstance(a, Allocation):
                raise TypeError(f"{self.policy!r}.allocate must return ts.Allocation objects, "
                                f"got {type(a).__name__}")
            ok = isinstance(a.tensors, (list, tuple)) and all(
                isinstance(i, (int, numbers.Integral)) and not isinstance(i, bool)
                for i in a.tensors)
            bad = not ok or any(not (0 <= i < n) or i in seen for i in a.tensors)
            dens_ok = isinstance(a.density, (int, float, numbers.Real)) and 0.0 <= a.density <= 1.0
            if bad or not a.tensors or len(set(a.tensors)) < len(a.tensors) or not dens_ok:
                raise ValueError(
                    f"{self.policy!r}.allocate returned {a!r}: tensor indices must be integers "
                    f"in [0, {n}), each used once, density in [0, 1] (a number)"
                )
            if a.group is not None:
                self._check_group(a)
            seen.update(int(i) for i in a.tensors)
        if len(seen) != n:
            missing = [self.tensors[i].name for i in range(n) if i not in seen][:3]
            raise ValueError(f"{self.policy!r}.allocate left tensors without a budget: "
                             f"{missing}; every masked tensor needs one allocation")
        # plain Python numbers from here on (a policy may compute with numpy)
        return [Allocation(tuple(int(i) for i in a.tensors), float(a.density),
                           None if a.group is None else int(a.group)) for a in allocs]

    def _check_group(self, a: Allocation) -> None:
        g = a.group
        if isinstance(g, bool) or not isinstance(g, (int, numbers.Integral)) or g < 1:
            raise ValueError(f"{self.policy!r}.allocate returned {a!r}: group must be an integer "
                             f">= 1 (the N:M group length) or None")
        for i in a.tensors:
            t = self.tensors[i]
            if t.block is not None or len(t.shape) < 2 or t.shape[1] % g or t.input_dim != 1:
                raise ValueError(
                    f"{self.policy!r}.allocate returned {a!r}, but {t.name} of shape {t.shape} "
                    f"(block {t.block}, input dim {t.input_dim}) cannot be grouped by {g} along "
                    f"dim 1: groups need an unstructured mask, input along dim 1, and dim 1 a "
                    f"multiple of the group"
                )

    def release(self) -> None:
        """Unbind every coupling (before new ones are made, or when training ends)."""
        for c in self.couplings:
            c.release()
        self.couplings = []

    def _counts(self, old: list[torch.Tensor], new: list[torch.Tensor]) -> torch.Tensor:
        """Changed and kept entries of every mask, on the device (read with other values)."""
        return torch.stack([(h != o).sum() for h, o in zip(new, old, strict=True)]
                           + [h.sum() for h in new])

    def _record(self, old: list[torch.Tensor], step: int, target: float, beta: float,
                iterations: int, error: float, counts: list[float] | None = None
                ) -> StepRecord:
        block = [r.mask.block_numel for r in self.refs]
        if counts is None:
            counts = self._counts(old, [r.mask.hard_mask for r in self.refs]).tolist()
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
        self.check_bindings()
        return [[r.name, list(r.theta.shape), r.mask.method] for r in self.refs]

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists: hints, couplings (their slopes), record. The masks' own
        state (hard masks, thresholds, betas, frozen) is in ``model.state_dict()``."""
        index = {id(r.mask): i for i, r in enumerate(self.refs)}
        return {
            "version": STATE_VERSION,
            "layers": self.fingerprint(),
            "couplings": [
                {"layers": [index[id(m)] for m in c.masks], "slope": float(c.slope)}
                for c in self.couplings
            ],
            "hints": [[list(k), list(v)] for k, v in self.solver.hints.items()],
            "collapsed": sorted(self.collapsed),
            "last_record": asdict(self.last_record) if self.last_record else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the model's masks must be loaded already).

        The whole entry is checked before anything changes.

        Raises:
            TypeError / ValueError: the state comes from a model with other masked tensors, from
                a newer release, or is malformed (nothing is changed then).
        """
        self.apply_state(self.check_state(state))

    def check_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a :meth:`state_dict` entry without changing anything; return it parsed."""
        if not isinstance(state, Mapping):
            raise TypeError(f"the updater state must be a dict (MaskUpdater.state_dict()), got "
                            f"{type(state).__name__}")
        version = state.get("version", 1)
        if version not in (1, STATE_VERSION):
            raise ValueError(
                f"the updater state has version {version!r}; this release reads versions 1 and "
                f"{STATE_VERSION}: load it with the torchspartan release that wrote it"
            )
        unknown = set(state) - {"version", "layers", "couplings", "hints", "collapsed",
                                "last_record"}
        if unknown:
            raise ValueError(f"the updater state has unknown keys {sorted(unknown)}; is it a "
                             f"MaskUpdater.state_dict()?")
        try:
            theirs = [list(x) for x in state.get("layers", [])]
        except TypeError:
            raise ValueError(f"malformed updater state: 'layers' must be a list of [name, shape, "
                             f"method], got {state.get('layers')!r}") from None
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
        couplings: list[tuple[list[int], float]] = []
        used: set[int] = set()
        for entry in _as_list("couplings", state.get("couplings", [])):
            try:
                layers = [_index(i, n) for i in entry["layers"]]
                slope = _number("slope", entry["slope"])
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"malformed coupling entry {entry!r}: layer indices must be "
                                 f"integers in [0, {n}), slope a finite number ({e})") from None
            if len(layers) < 2 or len(set(layers)) < len(layers) or used & set(layers) or (
                    slope < 0):
                raise ValueError(f"malformed coupling entry {entry!r}: a coupling joins 2 or more "
                                 f"distinct masks, each in one coupling, with a slope >= 0")
            used.update(layers)
            couplings.append((layers, slope))
        hints: dict[tuple[int, ...], list[float]] = {}
        for item in _as_list("hints", state.get("hints", [])):
            try:
                k, v = item
                key = tuple(_index(i, n) for i in k)
                vals = [_number("hint", x) for x in (v if isinstance(v, (list, tuple)) else [v])]
            except (TypeError, ValueError) as e:
                raise ValueError(f"malformed hint {item!r}: [mask indices, [1 or 2 finite "
                                 f"numbers]] ({e})") from None
            if not key or not 1 <= len(vals) <= 2:
                raise ValueError(f"malformed hint {item!r}: [mask indices, [1 or 2 finite "
                                 f"numbers]]")
            hints[key] = vals
        collapsed = _as_list("collapsed", state.get("collapsed", []))
        if any(c not in self.names for c in collapsed):
            raise ValueError(f"malformed updater state: 'collapsed' must name masked tensors, "
                             f"got {collapsed!r}")
        record = state.get("last_record")
        return {"couplings": couplings, "hints": hints, "collapsed": set(collapsed),
                "last_record": None if record is None else check_record(record)}

    def apply_state(self, parsed: dict[str, Any]) -> None:
        """Apply a state checked by :meth:`check_state`."""
        couplings = parsed["couplings"]
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
        self.solver.hints = parsed["hints"]
        self.collapsed = parsed["collapsed"]
        self.last_record = parsed["last_record"]
        self._planned = None

    # -- copies and pickles ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Without the couplings (autograd nodes) and the solver: rebuilt from the model and
        :meth:`state_dict` when loaded (``copy.deepcopy``, ``pickle``)."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("refs", "solver", "couplings", "_planned", "_places")}
        state["_updater_state"] = self.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_updater_state")
        self.__dict__.update(state)
        self.refs = _checked_refs(self.model)
        self._places = [(r.module, r.tensor_name, r.mask, r.theta)
                        for r in find_masks(self.model)]
        self.solver = AllocationSolver(self.refs, self.unit_costs, self.reduce)
        self.couplings = []
        self._planned = None
        self.load_state_dict(saved)


def check_record(record: Any) -> StepRecord:
    """A :class:`StepRecord` from its dict, every field checked (``ValueError`` naming it)."""
    if isinstance(record, StepRecord):
        record = asdict(record)
    if not isinstance(record, Mapping):
        raise ValueError(f"malformed step record {record!r}: expected a dict of StepRecord "
                         f"fields")
    names = [f.name for f in fields(StepRecord)]
    if set(record) != set(names):
        raise ValueError(f"malformed step record: fields {sorted(record)}, expected {names}")
    out: dict[str, Any] = {}
    for f in fields(StepRecord):
        v = record[f.name]
        if f.name == "frozen":
            ok = isinstance(v, (bool, numbers.Integral)) and v in (0, 1)
            v = bool(v)
        elif f.name in ("step", "iterations"):
            ok = isinstance(v, (int, numbers.Integral)) and not isinstance(v, bool) and int(v) >= 0
            v = int(v) if ok else v
        else:
            ok = isinstance(v, (int, float, numbers.Real)) and not isinstance(v, bool) and (
                math.isfinite(v))
            v = float(v) if ok else v
        if not ok:
            raise ValueError(f"malformed step record: {f.name}={record[f.name]!r}")
        out[f.name] = v
    return StepRecord(**out)


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float (Python or numpy numbers, one-element tensors)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _index(i: Any, n: int) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, numbers.Integral)) or not 0 <= int(i) < n:
        raise ValueError(f"index {i!r} not an integer in [0, {n})")
    return int(i)


def _as_list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"malformed updater state: {name!r} must be a list, got "
                         f"{type(value).__name__}")
    return list(value)


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is free of NaN and Inf, with one host sync.

    One multi-tensor 2-norm (NaN and Inf propagate into it; on a CPU it is as fast as a sum,
    where the max-norm is several times slower); a finite tensor whose norm overflows is told
    apart by an exact check that runs only then.
    """
    ok = torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2))).tolist()
    return [good or bool(torch.isfinite(t).all()) for good, t in zip(ok, tensors, strict=True)]


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


_NOT_AFTER = {
    "_Orthogonal": "orthogonal makes the weight dense again (it maps the masked weight to an "
                   "orthogonal matrix), which defeats the mask",
    "_WeightNorm": "weight_norm splits the weight in two (magnitude and direction), which only "
                   "the first parametrization of a tensor may do",
}


def _checked_refs(model: nn.Module) -> list[MaskRef]:
    """The masks of ``model``, one entry per masked tensor (tied places: the first), checked."""
    found = find_masks(model)
    if not found:
        raise ValueError(
            "model has no SpartanMask; register one first, e.g. ts.sparsify(model) or "
            "parametrize.register_parametrization(layer, 'weight', ts.SpartanMask())"
        )
    by_mask: dict[int, MaskRef] = {}
    by_theta: dict[int, MaskRef] = {}
    refs = []
    for r in found:
        if r.position != 0:
            raise ValueError(
                f"{r.name}: the SpartanMask is parametrization number {r.position} on this "
                f"tensor; it must be registered first (register other parametrizations after it)"
            )
        plist = r.module.parametrizations[r.tensor_name]  # type: ignore[index]
        for p in list(plist)[1:]:
            why = _NOT_AFTER.get(type(p).__name__)
            if why is not None or isinstance(p, type(r.mask)):
                raise ValueError(
                    f"{r.name}: {type(p).__name__} after the SpartanMask does not compose "
                    f"({why or 'a second mask'}); remove it "
                    f"(parametrize.remove_parametrizations) or exclude this tensor from the masks"
                )
        check_place(r.module, r.tensor_name, r.name)
        first = by_mask.get(id(r.mask))
        if first is not None:  # a tied tensor: the same mask at another place
            if first.theta is not r.theta:
                raise ValueError(f"{r.name}: one SpartanMask instance is registered on two "
                                 f"different tensors ({first.name} and {r.name}); give each "
                                 f"tensor its own")
            other = first.module.parametrizations[first.tensor_name]  # type: ignore[index]
            if [id(p) for p in other] != [id(p) for p in plist]:
                raise ValueError(f"{r.name} and {first.name} share one weight (tied) but carry "
                                 f"different parametrizations; give both places the same ones")
            continue
        twin = by_theta.get(id(r.theta))
        if twin is not None:
            raise ValueError(
                f"{twin.name} and {r.name} are one Parameter (tied weights) with two different "
                f"SpartanMasks; a tensor takes one mask: register the same SpartanMask instance "
                f"at both places (ts.sparsify does this for tied weights)"
            )
        by_mask[id(r.mask)] = by_theta[id(r.theta)] = r
        refs.append(r)
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied = by_theta.get(id(p))
        if tied is not None and not pname.endswith(".original") and pname != "original":
            raise ValueError(
                f"{tied.name} is tied to {pname} (one Parameter), which is used without its mask; "
                f"register the same SpartanMask at both places (ts.sparsify does this for tied "
                f"weights) or untie them"
            )
    return refs
