"""``MaskUpdater``: computes every mask of a model for a density and a sharpness.

The mask-update component of Spartan, usable alone (and unit-tested alone): it finds the
:class:`~torchspartan.SpartanMask` s of a model, asks the allocation policy for the budgeted
problems of the step, solves each with the one engine (``_engine.py``: hard top-k and soft top-k
thresholds, warm-started from the previous step) and writes the result into the masks through
:meth:`SpartanMask.update`. :class:`~torchspartan.DualAveraging` calls it after every base step.

Solving one allocation is the job of :class:`~torchspartan.allocation.AllocationSolver`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from torchspartan._checks import check_weights, finite_number
from torchspartan.allocation import AllocationSolver, bind
from torchspartan.batching import attach
from torchspartan.bindings import Places, checked_refs
from torchspartan.bounded import solve_bounded
from torchspartan.budget import Budget, SparsityOf
from torchspartan.coupling import Coupling
from torchspartan.floors import Floors
from torchspartan.held import HeldUpdate
from torchspartan.mask import SpartanMask
from torchspartan.own import own_budget, own_budgets, update_alone
from torchspartan.policies import (
    Allocation,
    AllocationPolicy,
    Global,
    MaskedTensor,
    check_allocations,
    normalise_costs,
)
from torchspartan.rows import rows_problem, update_rows
from torchspartan.sharded import make_solver
from torchspartan.sparsify import input_dim
from torchspartan.state import (
    StepRecord,
    UpdaterState,
    parse_updater_state,
    updater_entry,
)

__all__ = ["MaskUpdater", "StepRecord", "live_couplings", "solve_all"]


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
        self.reduce = reduce
        self.refs = checked_refs(model)
        raw = self.policy.costs.unit_costs(model, [r.module for r in self.refs])
        self.unit_costs = normalise_costs(raw, [r.theta.numel() for r in self.refs],
                                          [r.name for r in self.refs])
        self.budget = Budget(model, self.refs, self.unit_costs, sparsity_of)
        self.alloc_index = [i for i, r in enumerate(self.refs) if r.mask.method != "fixed"]
        if not self.alloc_index:
            raise ValueError("every SpartanMask of the model is method='fixed'; nothing to train")
        self.places = Places(model)
        self._costs_written = False  # written by the first update (construction changes nothing)
        self.tensors = [
            MaskedTensor(r.name, tuple(r.theta.shape), r.mask.block, self.unit_costs[i],
                         input_dim(r.module, r.tensor_name))
            for i, r in ((i, self.refs[i]) for i in self.alloc_index)
        ]
        self.collapsed: set[str] = set()
        self.last_record: StepRecord | None = None
        self._attach()

    def _attach(self) -> None:
        """What works on the masks found (rebuilt when a copy or a pickle is loaded)."""
        self.solver = make_solver(self.refs, self.unit_costs, self.reduce)
        self.floors = Floors(self.solver, self.tensors, self.alloc_index,
                             [self.refs[i].mask.auto_floor for i in self.alloc_index])
        self.couplings: list[Coupling] = []
        self._planned: tuple[float, float, float, list[Allocation]] | None = None

    def check_bindings(self) -> None:
        """Raise ``RuntimeError`` when a mask is no longer where it was at construction
        (:meth:`torchspartan.bindings.Places.check`)."""
        self.places.check()

    @property
    def sparsity_of(self) -> SparsityOf:
        return self.budget.sparsity_of

    @property
    def masked_numel(self) -> int:
        return self.budget.masked_numel

    @property
    def names(self) -> list[str]:
        """Qualified names of the masked tensors, in update order."""
        return [r.name for r in self.refs]

    # -- densities ---------------------------------------------------------------------
    def check_target(self, density: float) -> float:
        """Raise ``ValueError`` if ``density`` cannot be reached; return the allocatable one."""
        final = self.budget.allocatable(finite_number("density", density))
        self.policy.check(self.tensors, min(final, 1.0))
        if final < 1.0:
            try:
                allocs = check_allocations(self.policy, self.tensors,
                                           self.policy.allocate(self.tensors, final))
            except (TypeError, ValueError):
                allocs = None  # refused by validate() at the step that asks for them
            if allocs is not None:
                self.floors.check(allocs)
        return final

    def validate(self, density: float, beta: float) -> tuple[float, float]:
        """Every check of :meth:`update` that needs no pass over the weights, without changing
        anything: the numbers, the budget, the policy's allocations (kept for the next update).

        Returns ``(density, beta)`` as floats.

        Raises:
            TypeError / ValueError: a density outside ``(0, 1]`` or leaving no budget, a beta
                that is not finite and > 0, or a policy returning bad allocations.
        """
        density = finite_number("density", density)
        beta = finite_number("beta", beta)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if not beta > 0.0:
            raise ValueError(f"beta must be finite and > 0, got {beta!r}")
        alloc_density = min(1.0, self.budget.allocatable(density))
        allocs = (check_allocations(self.policy, self.tensors,
                                    self.policy.allocate(self.tensors, alloc_density))
                  if alloc_density < 1.0 else [])
        self.floors.check(allocs)
        self._planned = (density, beta, alloc_density, allocs)
        return density, beta

    # -- the update ----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, density: float, beta: float, step: int = 0,
               skip: torch.Tensor | None = None) -> StepRecord:
        """Masks for ``density`` (as counted by ``sparsity_of``) and sharpness ``beta``.

        Everything is checked before the first mask is written (:meth:`validate`, then the
        weights); when it raises, the masks are as before the call.

        ``skip``: a device flag (e.g. ``GradScaler``'s ``found_inf``), read with the update's
        own values in the same host sync; when it is nonzero nothing is written and
        :class:`~torchspartan.budget.StepSkipped` is raised.

        Raises:
            TypeError / ValueError: as :meth:`validate`, or a masked weight holding NaN/Inf
                (named).
            StepSkipped: ``skip`` was set (the masks are as before the call).
        """
        self.budget.gate = skip
        try:
            return self._update(density, beta, step)
        finally:
            self.budget.gate = None

    def _update(self, density: float, beta: float, step: int) -> StepRecord:
        self.check_bindings()
        density, beta = finite_number("density", density), finite_number("beta", beta)
        planned, self._planned = self._planned, None
        if planned is None or planned[:2] != (density, beta):
            self.validate(density, beta)
            planned, self._planned = self._planned, None
        if planned is None:
            raise RuntimeError("MaskUpdater.validate did not plan the update")
        _, _, alloc_density, allocs = planned
        one_solve = len(allocs) == 1 and allocs[0].group is None and (
            0.0 < allocs[0].density < 1.0)
        alone = own_budgets(self.solver, allocs, self.alloc_index)
        # N:M alone on the sync-free path: computed, then read once with its checks (rows.py)
        rows = rows_problem(allocs, self.alloc_index) if (
            self.solver.on_device and type(self.solver) is AllocationSolver) else None
        if not one_solve and not alone and rows is None:
            # several problems, or none to solve: check every weight before the first mask is
            # written (one solved problem checks its own weights before it writes anything;
            # update_alone reads its checks with its values); the gate first, the same way
            self.budget.pass_gate()
            check_weights(self.refs, step)
        if not self._costs_written:
            for r, c in zip(self.refs, self.unit_costs, strict=True):
                r.mask.cost.fill_(c * r.mask.block_numel)
            self._costs_written = True
        old = [r.mask.hard_mask for r in self.refs]
        bound, hints, offsets = self.couplings, dict(self.solver.hints), self.solver.offsets
        self.solver.new_update()
        self.release()
        try:
            if alloc_density >= 1.0:
                for i in self.alloc_index:
                    mask = self.refs[i].mask
                    mask.update(torch.ones_like(mask.hard_mask), threshold=mask.threshold)
            if one_solve and not self._bounded(allocs[0]):
                # the common case: one shared budget, computed, then checked and counted with
                # one host read, then written (no sync on the way with a sync-free solver)
                one = self._update_one(allocs[0], beta, step, old, alloc_density)
                if one is not None:
                    record, known = one
                    self.couplings += attach(self.solver, self.couplings, known)
                    self.last_record = record
                    return record
                # a default floor binds: the bounded solve below (nothing was written)
            if rows is not None:
                record = update_rows(self.refs, self.budget, *rows, beta, step, old,
                                     alloc_density, self.collapsed)
                self.couplings += attach(self.solver, self.couplings)
                self.last_record = record
                return record
            if alone:  # Uniform, ERK on the sync-free path: prepared, then one read
                record, known = update_alone(self.solver, self.budget, alone, beta, step,
                                             old, alloc_density, self.collapsed)
                self.couplings += attach(self.solver, self.couplings, known)
                self.last_record = record
                return record
            self.budget.pass_gate()  # read now, unless a route above read it with its values
            iterations, error = solve_all(self.solver, allocs, self.alloc_index, beta, step,
                                          self.couplings)
            self.couplings = live_couplings(self.couplings)
            self.couplings += attach(self.solver, self.couplings)
        except BaseException:
            # leave the masks bound as before this update (they were not written: a failing
            # problem raises before it writes, and several problems were checked up front)
            for made in self.couplings + self.solver.take_couplings():
                made.release()
            self.solver.hints, self.solver.offsets = hints, offsets
            unchanged = all(r.mask.hard_mask is o for r, o in zip(self.refs, old, strict=True))
            self.couplings = bound if unchanged else []
            for coupling in self.couplings:
                bind(coupling, [cast(SpartanMask, m) for m in coupling.masks])
                for m in coupling.locals:
                    m.join(coupling)
            raise
        record = self.budget.record(old, None, step, alloc_density, beta, iterations, error,
                                    self.collapsed)
        self.last_record = record
        return record

    def _bounded(self, alloc: Allocation) -> bool:
        return any(self.refs[self.alloc_index[j]].mask.min_density > 0.0
                   or self.refs[self.alloc_index[j]].mask.max_density < 1.0
                   for j in alloc.tensors)

    def _update_one(self, alloc: Allocation, beta: float, step: int, old: list[torch.Tensor],
                    alloc_density: float
                    ) -> tuple[StepRecord, dict[int, tuple[float, float]]] | None:
        """One shared budget: the step's record and the ``(threshold, beta)`` the held route
        read of its held masks (for ``attach``), or None when a default floor binds or bound at
        the last update off the held route (nothing written: the bounded solve takes over)."""
        idx = tuple(self.alloc_index[j] for j in alloc.tensors)
        budget = alloc.density * sum(self.solver.cost(i) for i in idx)
        floors = self.floors.bind(alloc)
        route = HeldUpdate.make(self.solver, idx, budget, beta, step) if floors else None
        if route is not None:  # the floors held last time: that set first, with one read
            record = route.apply(self.budget, self.floors.counts, old, step, alloc_density,
                                 self.collapsed)
            self.couplings += self.solver.take_couplings()
            return None if record is None else (record, route.known)
        if floors and idx in self.solver.held:  # the bounded solve tries that set first
            return None
        pending = self.solver.prepare(idx, budget, beta, step)
        new = [pending.hard_of.get(i, r.mask.hard_mask) for i, r in enumerate(self.refs)]
        counts = self.budget.counts(old, new, pending.packed(old))
        n = len(pending.scalars)
        values = (torch.cat([torch.stack(pending.scalars), counts.values]).tolist()
                  if n else counts.values.tolist())
        self.budget.pass_gate(counts, values)
        if floors and self.floors.below(counts.read(values[n:])[1]) and (
                not pending.scalars or values[0]):
            return None  # a default floor binds
        iterations, error = pending.commit(values[:n])
        self.couplings += self.solver.take_couplings()
        redone = any(r.mask.buffer("hard_mask") is not h
                     for r, h in zip(self.refs, new, strict=True))
        if redone and floors and self.floors.below(
                [float(r.mask.hard_mask.sum()) for r in self.refs]):
            self.release()
            return None
        return self.budget.record(old, None if redone else counts.read(values[n:]), step,
                                  alloc_density, beta, iterations, error, self.collapsed), {}

    def release(self) -> None:
        """Unbind every coupling (before new ones are made, or when training ends)."""
        for c in self.couplings:
            c.release()
        self.couplings = []

    # -- fine-tuning ---------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self) -> None:
        """Fold ``theta <- theta * m * h`` once in every mask; the masks never change again."""
        self.release()
        for i in range(len(self.refs)):
            self.solver.freeze(i)
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
        """Plain numbers and lists: hints, offsets, couplings (their slopes), record. The masks' own
        state (hard masks, thresholds, betas, frozen) is in ``model.state_dict()``."""
        index = {id(r.mask): i for i, r in enumerate(self.refs)}
        return updater_entry(
            self.fingerprint(),
            [([index[id(m)] for m in c.masks], float(c.slope)) for c in self.couplings
             if c.masks],  # a node of masks with budgets of their own: rebuilt when loaded
            self.solver.hints, self.solver.offsets, self.collapsed, self.last_record)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the model's masks must be loaded already).

        The whole entry is checked before anything changes.

        Raises:
            TypeError / ValueError: the state comes from a model with other masked tensors, from
                a newer release, or is malformed (nothing is changed then).
        """
        self.apply_state(self.check_state(state))

    def check_state(self, state: Mapping[str, Any]) -> UpdaterState:
        """Validate a :meth:`state_dict` entry without changing anything; return it parsed."""
        return parse_updater_state(state, self.fingerprint())

    def apply_state(self, parsed: UpdaterState) -> None:
        """Apply a state checked by :meth:`check_state`."""
        couplings = parsed.couplings
        self.release()
        self.couplings = [self.solver.restore(layers, slope) for layers, slope in couplings]
        coupled = {i for layers, _ in couplings for i in layers}
        for i, r in enumerate(self.refs):  # the other soft masks own their budgets
            if i not in coupled and r.mask.soft_active and r.mask.method == "spartan":
                r.mask.update(r.mask.hard_mask, threshold=r.mask.threshold,
                              beta=float(r.mask.beta), scope="local")
        self.couplings += attach(self.solver, self.couplings)
        self.solver.hints, self.solver.offsets = parsed.hints, parsed.offsets
        self.collapsed = parsed.collapsed
        self.last_record = parsed.last_record
        self._planned = None

    # -- copies and pickles ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Without the couplings (autograd nodes) and the solver: rebuilt from the model and
        :meth:`state_dict` when loaded (``copy.deepcopy``, ``pickle``)."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("refs", "solver", "couplings", "_planned", "places", "floors")}
        state["_updater_state"] = self.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_updater_state")
        self.__dict__.update(state)
        self.refs = checked_refs(self.model)
        self.places = Places(self.model)
        self._attach()
        self.load_state_dict(saved)


def live_couplings(couplings: list[Coupling]) -> list[Coupling]:
    """The couplings still bound to all their masks; the others are released. A bounded solve
    re-solves tensors that missed their bounds, which leaves its earlier passes' couplings
    unbound: kept, they would be saved in the checkpoint next to the new ones."""
    live = []
    for c in couplings:
        if all(cast(SpartanMask, m).coupling is c for m in c.masks):
            live.append(c)
        else:
            c.release()
    return live


def solve_all(solver: AllocationSolver, allocs: list[Allocation], alloc_index: list[int],
              beta: float, step: int, couplings: list[Coupling]) -> tuple[int, float]:
    """Solve every allocation with ``solver`` (N:M rows, or a bounded shared budget), adding the
    couplings made to ``couplings``; returns the Newton evaluations and the budget error."""
    iterations, error = 0, 0.0
    # tensors with a budget of their own and no density bounds (Uniform, ERK): one problem of
    # a segment each, one selection call and one Newton solve for all of them (the host and
    # sharded paths; the sync-free path has its own, own.py, and solves here one by one only
    # the allocations that come mixed with others)
    batch = not solver.on_device or type(solver) is not AllocationSolver
    alone = [(i, a.density) for a in allocs if batch
             for i in [own_budget(solver, a, alloc_index)] if i is not None]
    if len(alone) > 1:
        iterations, error = solver.solve_each([i for i, _ in alone],
                                              [d * solver.cost(i) for i, d in alone], beta)
        done = {i for i, _ in alone}
        allocs = [a for a in allocs if a.group is not None or len(a.tensors) > 1
                  or alloc_index[a.tensors[0]] not in done]
    # N:M: the rows of every tensor with one (group, density), one problem
    rows: dict[tuple[int, float], list[int]] = {}
    for alloc in allocs:
        if alloc.group is not None:
            rows.setdefault((alloc.group, alloc.density), []).extend(
                alloc_index[j] for j in alloc.tensors)
    for (group, density), ids in rows.items():
        its, err = solver.solve_rows(tuple(ids), density, group, beta)
        iterations += its
        error = max(error, err)
    for alloc in allocs:
        if alloc.group is None:
            its, err = solve_bounded(solver, tuple(alloc_index[j] for j in alloc.tensors),
                                     alloc.density, beta, step)
            couplings += solver.take_couplings()
            iterations += its
            error = max(error, err)
    return iterations, error
