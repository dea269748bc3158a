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
from dataclasses import dataclass, field

import torch

from torchspartan._blocks import BlockedViews
from torchspartan._chunks import abs_max
from torchspartan._device import to_device
from torchspartan._engine import (
    TOLERANCE,
    Piece,
    SoftSolution,
    hard_select,
    solve_soft,
    unit_maxima,
)
from torchspartan._kernels import Scope
from torchspartan._select import HINT_WIDTH, MIN_HINT_WIDTH, Hint, select_on_device
from torchspartan.coupling import Batched, Coupling
from torchspartan.mask import SpartanMask, update_masks
from torchspartan.rows import Rows
from torchspartan.sparsify import MaskRef

__all__ = ["AllocationSolver", "bind"]


class AllocationSolver:
    """Solves allocations over the masks ``refs`` (see the module docstring).

    Args:
        refs: the masks, as found by :func:`~torchspartan.find_masks`.
        unit_costs: cost of one weight entry of each mask's tensor.
        reduce: hook for every vector of sums over scores (identity in one process).
        sync_free: select and solve on the device without host syncs, checked once per step
            (default ``None``: on CUDA only; on a CPU a sync costs nothing and the sampled
            selection makes fewer passes).

    Attributes:
        hints: the last two hard thresholds of every shared budget (keyed by its mask indices):
            their linear extrapolation narrows the next selection (exact whatever the guess).
        offsets: the offsets ``beta (tau - h)`` of the soft thresholds from the hard ones of
            the budgets solved by the last update, with their offset of the update before when
            they were solved then too (host numbers, read with the step's other values): their
            drift moves the next Newton start (:meth:`warm_start`). :meth:`new_update` starts
            an update's record.
    """

    def __init__(self, refs: Sequence[MaskRef], unit_costs: Sequence[float],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 sync_free: bool | None = None) -> None:
        self.refs = list(refs)
        self.unit_costs = list(unit_costs)
        # the masked Parameters (the updater's binding check refuses a replaced one) and their
        # sizes (of the whole tensors, also when sharded)
        self.thetas = [r.theta for r in self.refs]
        self.numels = [t.numel() for t in self.thetas]
        self.reduce = reduce
        self.sync_free = sync_free
        self.hints: dict[tuple[int, ...], list[float]] = {}
        # per budget: the relative half-width of the window around its next hint (speed only:
        # the selection is exact whatever the window)
        self.hint_widths: dict[tuple[int, ...], float] = {}
        self.offsets: dict[tuple[int, ...], list[float]] = {}
        self._offsets_before: dict[tuple[int, ...], list[float]] = {}
        # per packed run: the flat hard mask last written, and the views the masks got of it
        self.written: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        # default floors (a density per mask index) that hold in budgets shared with others
        self.floors: dict[int, float] = {}
        # per shared budget: the tensors its last bounded solve held at their lower bounds
        self.held: dict[tuple[int, ...], list[tuple[int, float]]] = {}
        self._new_couplings: list[Coupling] = []
        self.views = BlockedViews()  # of the block masks' weights, kept between steps
        self.batches = True  # masks computed in batched nodes (not with sharded weights)
        self._shapes_of: dict[tuple[int, ...], tuple[list[float], list[float],
                                                     list[tuple[int, ...]]]] = {}

    @property
    def on_device(self) -> bool:
        """Whether updates take the sync-free path: ``sync_free`` when set, else whether the
        masked weights are on CUDA."""
        if self.sync_free is not None:
            return self.sync_free
        return bool(self.refs) and self.refs[0].theta.is_cuda

    def coupling(self, idx: Sequence[int], slope: torch.Tensor, betas: Sequence[float],
                 tau: float) -> Coupling:
        """The coupling of a budget shared by the masks ``idx`` at threshold ``tau``, their
        sharpness ``betas`` (:meth:`betas`): batched when every mask is Spartan (unstructured
        or blocks) with one dtype (float32/float64) and one device."""
        masks = [self.refs[i].mask for i in idx]
        thetas = [self.thetas[i] for i in idx]
        batched = None
        if all(m.method == "spartan" and m.buffer("threshold").dim() == 0 for m in masks) and len(
                {(t.dtype, t.device) for t in thetas}) == 1 and thetas[0].dtype in (
                torch.float32, torch.float64):
            _, costs, sizes = self._shapes(tuple(idx))
            batched = Batched(list(betas), [b / c for b, c in zip(betas, costs, strict=True)],
                              [-(b * tau) for b in betas], list(sizes))
        return Coupling(masks, thetas, slope, batched=batched, views=self.views)

    def betas(self, idx: Sequence[int], beta: float) -> list[float]:
        """The sharpness of each mask of budget ``idx`` at ``beta``: ``beta sqrt(block size)``
        (a block's score sums its entries)."""
        return [beta * r for r in self._shapes(tuple(idx))[0]]

    def _shapes(self, idx: tuple[int, ...]
                ) -> tuple[list[float], list[float], list[tuple[int, ...]]]:
        """Per mask of budget ``idx``: ``sqrt(block size)`` (beta's factor), the cost of one
        block-grid entry, the block sizes. Fixed for the solver's life (the masks' shapes and
        blocks are), so worked out once: a budget's masks are written and its coupling made at
        every update, after the host read, while a GPU waits."""
        shapes = self._shapes_of.get(idx)
        if shapes is None:
            masks = [self.refs[i].mask for i in idx]
            shapes = ([math.sqrt(m.block_numel) for m in masks],
                      [self.unit_costs[i] * m.block_numel for i, m in zip(idx, masks, strict=True)],
                      [m.sizes for m in masks])
            self._shapes_of[idx] = shapes
        return shapes

    def restore(self, idx: Sequence[int], slope: float) -> Coupling:
        """The coupling of a checkpoint (its mask indices and slope), made for the masks'
        current state and bound to them."""
        masks = [self.refs[i].mask for i in idx]
        beta = float(masks[0].beta) / math.sqrt(masks[0].block_numel)
        c = self.coupling(idx, to_device(slope, masks[0].threshold.device, torch.float64),
                          self.betas(idx, beta), float(masks[0].threshold))
        bind(c, masks)
        return c

    def freeze(self, i: int) -> None:
        """Fine-tuning: fold ``theta <- theta * m * h`` into mask ``i``'s weight, freeze it."""
        self.refs[i].mask.freeze(self.refs[i].theta)

    def take_couplings(self) -> list[Coupling]:
        """The couplings made since the last call (the caller owns and releases them)."""
        out, self._new_couplings = self._new_couplings, []
        return out

    @torch.no_grad()
    def packed_units(self, run: Sequence[int]) -> torch.Tensor:
        """``block_sum(|theta|) / entry cost`` (float32; float64 stays) of masks with one entry
        cost, one after the other in one flat buffer:
        one multi-tensor ``abs``, a view per tensor, one copy, one division (no copy for one
        tensor)."""
        refs = [self.refs[i] for i in run]
        absolute = torch._foreach_abs([
            self.views.of(self.thetas[i], r.mask.sizes) if r.mask.block is not None
            else self.thetas[i] for i, r in zip(run, refs, strict=True)])
        flat = [a.sum(dim=tuple(range(1, a.dim(), 2))).reshape(-1) if r.mask.block is not None
                else a.reshape(-1) for a, r in zip(absolute, refs, strict=True)]
        return self.per_cost(run, flat[0] if len(flat) == 1 else torch.cat(flat))

    @torch.no_grad()
    def stacked_units(self, run: Sequence[int]) -> torch.Tensor:
        """:meth:`units` of masks of one weight shape, block and entry cost, as the rows of one
        ``(tensors, grid entries)`` buffer: one stack, one ``abs``, one block sum, one division
        (not a block sum and a view per tensor)."""
        x = torch.stack([self.views.of(self.thetas[i], self.refs[i].mask.sizes)
                         for i in run]).abs_()
        return self.per_cost(run, x.sum(dim=tuple(range(2, x.dim(), 2))).view(len(run), -1))

    def per_cost(self, run: Sequence[int], v: torch.Tensor) -> torch.Tensor:
        """Block sums ``v`` of masks ``run`` (one entry cost) as unit values: float32 or
        float64, divided by the cost of a block-grid entry."""
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        cost = self.unit_costs[run[0]] * self.refs[run[0]].mask.block_numel
        return v if cost == 1.0 else v.div_(cost)

    def pieces(self, idx: Sequence[int], beta: float) -> tuple[list[Piece], list[list[int]]]:
        """Runs of consecutive tensors with equal (entry cost, sharpness, dtype), each packed
        into one flat buffer: one piece per run. On a CPU without ``sync_free`` every tensor is
        its own piece: an op per tensor costs microseconds there, the packing copy does not."""
        runs: list[list[int]] = []
        keys: list[tuple[float, float, torch.dtype]] = []
        pack = self.sync_free if self.sync_free is not None else (
            self.thetas[idx[0]].device.type != "cpu")
        for i in idx:
            r = self.refs[i]
            dtype = torch.float64 if self.thetas[i].dtype == torch.float64 else torch.float32
            key = (self.unit_costs[i] * r.mask.block_numel, math.sqrt(r.mask.block_numel), dtype)
            if pack and keys and keys[-1] == key:
                runs[-1].append(i)
            else:
                runs.append([i])
                keys.append(key)
        pieces = []
        for run, (cost, scale, _) in zip(runs, keys, strict=True):
            flat, top = self.units_and_max(run)
            pieces.append(Piece(flat.reshape(1, -1), beta * scale, cost, 0, unit_max=top))
        return pieces, runs

    @torch.no_grad()
    def units_and_max(self, run: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`packed_units` of the masks ``run`` and, for one unstructured float32/float64
        tensor, its largest unit value, read with the units (``_chunks.abs_max``)."""
        theta = self.thetas[run[0]]
        if len(run) > 1 or self.refs[run[0]].mask.block is not None or theta.dtype not in (
                torch.float32, torch.float64):
            return self.packed_units(run), None
        units, top = abs_max(theta)
        cost = self.unit_costs[run[0]]
        # a division by a positive number keeps the order: the largest quotient is max / cost
        return self.per_cost(run, units), top if cost == 1.0 else top.div_(cost)

    def solve_each(self, idx: Sequence[int], budgets: Sequence[float], beta: float
                   ) -> tuple[int, float]:
        """Masks ``idx[k]``, each alone with its budget ``budgets[k]`` (tensors held at a density
        bound), as one problem of one segment per tensor: one selection call and one Newton
        solve for all of them (not one each); writes the masks, each with its own threshold."""
        return self.write_each(self.select_each(idx, budgets, beta), beta)

    def select_each(self, idx: Sequence[int], budgets: Sequence[float], beta: float) -> Each:
        """The hard masks of :meth:`solve_each`, nothing written."""
        each = self.pieces_each(idx, budgets, beta)
        if not each.ids:
            return each
        each.umax = unit_maxima(each.pieces)
        if not bool(torch.isfinite(each.umax).all()):
            Pending(self, tuple(each.ids), 0, {}, pieces=each.pieces,
                    runs=[[i] for i in each.ids]).raise_non_finite()
        hard, each.thresholds = hard_select(each.pieces, each.budgets,
                                            [self.hint((i,)) for i in each.ids])
        each.grids = [h.view(r.mask.hard_mask.shape) for h, r in zip(hard, each.refs,
                                                                       strict=True)]
        return each

    def pieces_each(self, idx: Sequence[int], budgets: Sequence[float], beta: float) -> Each:
        """The start of :meth:`select_each`: the tensors kept whole or emptied apart; for the
        rest, their budgets, refs and one piece each (segment ``k`` for the ``k``-th)."""
        each = Each()
        for i, b in zip(idx, budgets, strict=True):
            if b <= 0 or b >= self.cost(i) * (1 - 1e-12):
                each.fills.append((i, b > 0))
            else:
                each.ids.append(i)
                each.budgets.append(b)
        each.refs = [self.refs[i] for i in each.ids]
        for k, (i, r) in enumerate(zip(each.ids, each.refs, strict=True)):
            units, top = self.units_and_max([i])
            each.pieces.append(Piece(units.reshape(1, -1), beta * math.sqrt(r.mask.block_numel),
                                     self.unit_costs[i] * r.mask.block_numel, k, unit_max=top))
        return each

    def write_each(self, each: Each, beta: float) -> tuple[int, float]:
        """The end of :meth:`solve_each`: the soft thresholds of the Spartan masks of ``each``
        (one Newton solve, a segment each, warm-started from their thresholds), then every
        mask written with its hard mask."""
        for i, keep in each.fills:
            self.fill([i], keep)
        refs, pieces, grids = each.refs, each.pieces, each.grids
        soft = [k for k, r in enumerate(refs) if r.mask.method == "spartan"]
        # before this step's hard thresholds are remembered: a mask with a budget of its own
        # last step starts shifted with its hard threshold; one that shared a budget from its
        # tau as it is (its own last hard threshold may be old)
        starts = [self.warm_start((each.ids[k],), [refs[k].mask], beta, each.thresholds[k])
                  if refs[k].mask.scope == "local" else
                  refs[k].mask.threshold.reshape(1) if refs[k].mask.soft_active
                  and refs[k].mask.threshold.dim() == 0 else None for k in soft]
        for i, threshold in zip(each.ids, each.thresholds, strict=True):
            self.remember((i,), threshold)
        iterations, error = 0, 0.0
        if soft and each.umax is not None:
            sub = [Piece(pieces[k].units, pieces[k].beta, pieces[k].cost, j)
                   for j, k in enumerate(soft)]
            solution = solve_soft(
                sub, to_device([each.budgets[k] for k in soft], each.umax.device, torch.float64),
                unit_max=each.umax[soft], reduce=self.reduce,
                tau_init=None if any(t is None for t in starts) else torch.cat(
                    [t for t in starts if t is not None]))
            read = torch.cat([solution.error.max().reshape(1), solution.tau]).tolist()
            iterations, error = solution.evaluations, read[0]
            for j, k in enumerate(soft):
                beta_k = beta * math.sqrt(refs[k].mask.block_numel)
                refs[k].mask.update(grids[k], threshold=solution.tau[j], beta=beta_k,
                                    scope="local")
                self.remember_offset((each.ids[k],), read[1 + j], each.thresholds[k], beta_k)
        for k, r in enumerate(refs):
            if r.mask.method != "spartan":
                r.mask.update(grids[k], threshold=r.mask.threshold)
        return iterations, error

    def min_density(self, i: int, shared: bool) -> float:
        """Mask ``i``'s lower density bound: its ``min_density``, and in a budget ``shared``
        with other tensors its default floor (``floors``)."""
        low = self.refs[i].mask.min_density
        return max(low, self.floors.get(i, 0.0)) if shared else low

    def cost(self, i: int) -> float:
        return self.numels[i] * self.unit_costs[i]

    def solve(self, idx: tuple[int, ...], budget: float, beta: float, step: int = 0
              ) -> tuple[int, float]:
        """Hard masks and soft threshold of one shared budget; writes the masks."""
        pending = self.prepare(idx, budget, beta, step)
        values = torch.stack(pending.scalars).tolist() if pending.scalars else []
        return pending.commit(values)

    def prepare(self, idx: tuple[int, ...], budget: float, beta: float, step: int = 0,
                extra: Extra | None = None, *, soft: bool = True) -> Pending:
        """Compute one shared budget's masks without writing them; ``Pending.scalars`` are the
        device values its ``commit`` needs (read by the caller, with others, in one sync).

        With ``sync_free`` (default: on CUDA) the hard selection runs on the device
        (:func:`select_on_device`) and a warm-started Newton solve runs a fixed number of
        evaluations, both checked at the commit (and redone there on the rare failure), so
        that preparing makes no host synchronisation. ``extra``: more segments (tensors held
        at their bounds) solved by the same warm-started Newton iteration when it runs
        (``Pending.joint``; their thresholds follow the budget's in ``solution.tau``).
        ``soft=False``: the hard masks only, selected on the host (``Pending.threshold`` known;
        :meth:`solve_pending` adds the soft threshold).
        """
        masks = [self.refs[i].mask for i in idx]
        total = sum(self.cost(i) for i in idx)
        if budget >= total * (1 - 1e-12) or budget <= 0:
            return Pending(self, idx, step, {i: torch.full_like(m.hard_mask, budget > 0)
                                             for i, m in zip(idx, masks, strict=True)})
        pieces, runs = self.pieces(idx, beta)
        umax = unit_maxima(pieces)
        on_device = (soft and self.on_device and len(pieces) == 1
                     and pieces[0].units.dtype == torch.float32)
        pending = Pending(self, idx, step, {}, pieces=pieces, runs=runs, budget=budget,
                          beta=beta, umax=umax)
        pending.scalars.append(torch.isfinite(umax).all().to(torch.float64))
        if on_device:
            count = math.floor(budget / float(pieces[0].cost) + 0.5)
            mask, threshold, ok = select_on_device(pieces[0].units.reshape(-1), count)
            hard = [mask.view(1, -1)]
            pending.scalars += [ok.to(torch.float64), threshold]
            pending.hard_threshold = threshold
        else:
            pending.check_finite_now()
            hard, thresholds = hard_select(pieces, [budget], [self.hint(idx)])
            pending.threshold = pending.hard_threshold = thresholds[0]
        pending.set_hard(hard)
        if soft:
            self.solve_pending(pending, extra)
        return pending

    def solve_pending(self, pending: Pending, extra: Extra | None = None) -> None:
        """The soft threshold of a prepared budget with Spartan masks (see :meth:`prepare`)."""
        idx, pieces, umax, beta = pending.idx, pending.pieces, pending.umax, pending.beta
        masks = [self.refs[i].mask for i in idx]
        if not pieces or umax is None or not any(m.method == "spartan" for m in masks):
            return
        budgets = to_device([pending.budget], umax.device, torch.float64)
        tau_init = self.warm_start(idx, masks, beta, pending.hard_threshold)
        sync_free = self.on_device
        if sync_free and extra is not None and tau_init is not None:
            more = [Piece(p.units, p.beta, p.cost, p.segment + 1, p.rowwise)
                    for p in extra.pieces]
            solution = solve_soft(pieces + more, torch.cat([budgets, extra.budgets]),
                                  unit_max=torch.cat([umax, extra.unit_max]),
                                  tau_init=torch.cat([tau_init, extra.tau_init]),
                                  reduce=self.reduce, max_iter=self.unchecked(idx), check=False,
                                  chunks=False)
            pending.joint = True
        elif sync_free and tau_init is not None:
            solution = solve_soft(pieces, budgets, unit_max=umax, tau_init=tau_init,
                                  reduce=self.reduce, max_iter=self.unchecked(idx), check=False,
                                  chunks=False)
        else:
            solution = solve_soft(pieces, budgets, unit_max=umax, tau_init=tau_init,
                                  reduce=self.reduce)
        pending.solution = solution
        pending.scalars += [solution.tau[0], solution.error.max()]

    def warm_start(self, idx: tuple[int, ...], masks: Sequence[SpartanMask], beta: float,
                   hard: float | torch.Tensor) -> torch.Tensor | None:
        """The Newton start of budget ``idx``'s soft threshold (``(1,)``, on the masks' device)
        when its masks are warm, given this step's hard threshold ``hard``: last step's ``tau``
        moved with the hard threshold, its offset ``beta (tau - h)`` moved on by the offset's
        last drift (:func:`shifted_start`; hints and offsets are checkpointed, so a resumed run
        starts from the same); None when cold."""
        first = masks[0]
        if not (first.soft_active and first.threshold.dim() == 0
                and all(m.soft_active for m in masks)):
            return None
        tau = first.threshold.reshape(1)
        past = self.hints.get(idx)
        if not past:
            return tau
        return shifted_start(tau, first.beta, past[-1], beta * math.sqrt(first.block_numel),
                             hard, self.drift(idx))

    def unchecked(self, idx: tuple[int, ...]) -> int:
        """Newton evaluations of budget ``idx``'s sync-free solve: :data:`NEWTON_DRIFTING` when its
        start follows the drift of its offset (:meth:`drift`), else :data:`NEWTON_UNCHECKED`."""
        drifting = len(self._offsets_before.get(idx, [])) == 2
        return NEWTON_DRIFTING if drifting else NEWTON_UNCHECKED

    def new_update(self) -> None:
        """Start an update's record of offsets: a budget that this update does not solve has
        none after it (its next start has no drift)."""
        self._offsets_before, self.offsets = self.offsets, {}

    def drift(self, idx: tuple[int, ...]) -> float:
        """The change of budget ``idx``'s offset ``beta (tau - h)`` over the last two updates
        (0 unless both solved it)."""
        past = self._offsets_before.get(idx, [])
        return past[-1] - past[-2] if len(past) == 2 else 0.0

    def remember_offset(self, idx: tuple[int, ...], tau: float, hard: float, beta: float
                        ) -> None:
        """Record budget ``idx``'s offset ``beta (tau - hard)`` in this update, after its offset
        of the update before (not when it is not finite)."""
        offset = beta * (tau - hard)
        if math.isfinite(offset):
            self.offsets[idx] = self._offsets_before.get(idx, [])[-1:] + [offset]

    def hint(self, idx: tuple[int, ...]) -> Hint | None:
        """The next hard threshold of budget ``idx``, extrapolated from its last two, with the
        width of the window around it (:meth:`remember`)."""
        past = self.hints.get(idx, [])
        hint = 2 * past[-1] - past[-2] if len(past) == 2 else (past[-1] if past else None)
        if hint is not None and not hint > 0:
            hint = past[-1]
        return None if hint is None else Hint(hint, self.hint_widths.get(idx, HINT_WIDTH))

    def remember(self, idx: tuple[int, ...], threshold: float) -> None:
        """Keep budget ``idx``'s hard threshold of this step, and size the next window around
        its hint to 16 times this step's relative hint error (at most halving a step, between
        :data:`MIN_HINT_WIDTH` and :data:`HINT_WIDTH`: on a Fashion-MNIST run whose threshold
        jumps, 2 more windows of 147 missed; mid-anneal on ResNet-50, 15-40k candidates instead
        of 83k)."""
        if not math.isfinite(threshold):
            return
        guess = self.hint(idx)
        if guess is not None and threshold > 0:
            error = abs(guess.value - threshold) / threshold
            width = max(16 * error, guess.width / 2)
            self.hint_widths[idx] = min(max(width, MIN_HINT_WIDTH), HINT_WIDTH)
        self.hints[idx] = (self.hints.get(idx, []) + [threshold])[-2:]

    def fill(self, idx: Sequence[int], keep: bool) -> None:
        """Every entry of the masks ``idx`` kept (or dropped), their thresholds as they are."""
        for i in idx:
            m = self.refs[i].mask
            m.update(torch.full_like(m.hard_mask, keep), threshold=m.threshold)

    def solve_rows(self, idx: tuple[int, ...], density: float, group: int, beta: float
                   ) -> tuple[int, float]:
        """N:M: every row of ``group`` entries along dim 1 of the masks ``idx`` keeps
        ``density * group``; one problem for all of them (:class:`~torchspartan.rows.Rows`),
        checked as it goes, then written."""
        if density * group >= group * (1 - 1e-12):
            self.fill(idx, True)
            return 0, 0.0
        return Rows(self.refs, idx, density, group, beta).commit()


# Newton evaluations of a warm-started solve that makes no host sync (checked at the commit, and
# continued there on the rare failure); fewer when the start follows the offset's drift.
NEWTON_UNCHECKED = 4
NEWTON_DRIFTING = 2


@dataclass(frozen=True)
class Extra:
    """Segments that :meth:`AllocationSolver.prepare` solves with its budget (segment 0): their
    pieces (segments from 0), budgets, largest unit values (one per piece row sum) and warm
    starts, all float64 but the pieces."""

    pieces: list[Piece]
    budgets: torch.Tensor
    unit_max: torch.Tensor
    tau_init: torch.Tensor


@dataclass
class Each:
    """Tensors each alone with its budget (see :meth:`AllocationSolver.select_each`): those kept
    whole or emptied (``fills``), and for the others (``ids``) their budgets, refs, pieces,
    largest unit values, selected hard masks (``grids``, mask shape) and hard thresholds."""

    fills: list[tuple[int, bool]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    refs: list[MaskRef] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    umax: torch.Tensor | None = None
    grids: list[torch.Tensor] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)


class Pending:
    """One shared budget's masks, computed but not yet written (see ``prepare``).

    ``scalars`` are 0-dim device tensors, read by the caller (one host sync for all of them and
    for anything else it needs), then passed in that order to :meth:`commit`.
    """

    def __init__(self, solver: AllocationSolver, idx: tuple[int, ...], step: int,
                 hard_of: dict[int, torch.Tensor], *, pieces: list[Piece] | None = None,
                 runs: list[list[int]] | None = None, budget: float = 0.0, beta: float = 0.0,
                 umax: torch.Tensor | None = None) -> None:
        self.solver, self.idx, self.step, self.hard_of = solver, idx, step, hard_of
        self.pieces, self.runs, self.budget, self.beta, self.umax = (
            pieces or [], runs or [], budget, beta, umax)
        self.scalars: list[torch.Tensor] = []
        self.flats: list[tuple[tuple[int, ...], torch.Tensor]] = []
        self.threshold: float | None = None  # the hard threshold, when known on the host
        self.hard_threshold: float | torch.Tensor = math.nan  # on the host or the device
        self.solution: SoftSolution | None = None
        self.joint = False  # the solution holds the extra segments of ``prepare`` too
        self.tau_host: float | None = None  # a single tensor's soft threshold, once committed

    def set_hard(self, hard: list[torch.Tensor]) -> None:
        self.flats = []
        for run, h in zip(self.runs, hard, strict=True):
            self.hard_of.update(split_views(self.solver, run, h.reshape(-1)))
            if len(run) > 1:
                self.flats.append((tuple(run), h.reshape(-1)))

    def packed(self, old: Sequence[torch.Tensor]
               ) -> list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None]]:
        """The runs whose new hard masks are views of one flat tensor (see :func:`packed`)."""
        return packed(self.solver, self.flats, old)

    def check_finite_now(self) -> None:
        if self.umax is not None and not bool(torch.isfinite(self.umax).all()):
            self.raise_non_finite()

    def raise_non_finite(self) -> None:
        for run in self.runs:
            for i in run:
                r = self.solver.refs[i]
                if not bool(torch.isfinite(r.theta).all()):
                    raise ValueError(
                        f"{r.name} became non-finite (NaN or Inf) in the base optimizer's step "
                        f"{self.step}; lower the learning rate or clip gradients"
                    )

    def commit(self, values: Sequence[float]) -> tuple[int, float]:
        """Check what was computed on the device, redo what failed, write the masks.

        Returns the Newton evaluations and the relative budget error.
        """
        solver, idx = self.solver, self.idx
        masks = [solver.refs[i].mask for i in idx]
        if not self.pieces:  # keep all or nothing
            for i, m in zip(idx, masks, strict=True):
                m.update(self.hard_of[i], threshold=m.threshold)
            return 0, 0.0
        values = list(values)
        if not values.pop(0):
            self.raise_non_finite()
        if self.threshold is None:  # selected on the device
            ok, threshold = values.pop(0), values.pop(0)
            if not ok:
                hard, thresholds = hard_select(self.pieces, [self.budget], [solver.hint(idx)])
                self.set_hard(hard)
                threshold = thresholds[0]
            self.threshold = threshold
        solver.remember(idx, self.threshold)
        if self.solution is None:
            for i, m in zip(idx, masks, strict=True):
                m.update(self.hard_of[i], threshold=m.threshold)
            self.remember_written()
            return 0, 0.0
        solution = self.solution
        tau_host, err = values.pop(0), values.pop(0)
        evaluations = solution.evaluations
        if not err <= TOLERANCE:  # an unchecked solve that has not converged yet: go on
            budgets = to_device([self.budget], solution.tau.device, torch.float64)
            solution = solve_soft(self.pieces, budgets, unit_max=self.umax,
                                  tau_init=solution.tau, reduce=solver.reduce)
            tau_host, err = torch.stack([solution.tau[0], solution.error.max()]).tolist()
            evaluations += solution.evaluations
        betas = solver.betas(idx, self.beta)
        coupling = None
        if len(idx) > 1:
            coupling = solver.coupling(idx, solution.slope[0], betas, tau_host)
            solver._new_couplings.append(coupling)
        scope: Scope = "shared" if coupling is not None else "local"
        self.tau_host = tau_host if coupling is None else None
        solver.remember_offset(idx, tau_host, self.threshold, betas[0])
        update_masks(masks, [self.hard_of[i] for i in idx], threshold=solution.tau[0],
                     betas=betas, scope=scope, coupling=coupling)
        self.remember_written()
        return evaluations, err

    def remember_written(self) -> None:
        """Keep the flat tensors whose views the masks now hold (for the next :meth:`packed`)."""
        for run, flat in self.flats:
            self.solver.written[run] = (flat, [self.hard_of[i] for i in run])


def shifted_start(tau: torch.Tensor, last_beta: torch.Tensor, last_hard: float | torch.Tensor,
                  beta: float, hard: float | torch.Tensor, drift: float | torch.Tensor = 0.0
                  ) -> torch.Tensor:
    """A Newton start for a soft threshold: last step's ``tau`` (at sharpness ``last_beta``,
    hard threshold ``last_hard``) moved with this step's hard threshold ``hard`` so that the
    offset ``beta (tau - h)`` is what it was plus ``drift`` (its last change: during the anneal
    the offset moves nearly the same amount every step, and the linear extrapolation starts
    Newton's iteration about a thousand times closer than the offset kept)."""
    return ((tau - last_hard) * last_beta + drift) / beta + hard


def split_views(solver: AllocationSolver, run: Sequence[int], flat: torch.Tensor
                ) -> dict[int, torch.Tensor]:
    """The hard masks of the masks ``run``, stored one after the other in ``flat``: a view of
    it each, in its mask's shape."""
    refs = [solver.refs[i] for i in run]
    parts = flat.split([r.mask.hard_mask.numel() for r in refs])
    return {i: part.view(r.mask.hard_mask.shape)
            for i, r, part in zip(run, refs, parts, strict=True)}


def packed(solver: AllocationSolver, flats: Sequence[tuple[tuple[int, ...], torch.Tensor]],
           old: Sequence[torch.Tensor]
           ) -> list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None]]:
    """The runs of masks whose new hard masks are views of one flat tensor, each with that
    tensor and, when ``old`` (every mask's hard mask before the update) are still the views
    ``solver`` last wrote for the run, the flat tensor of those (else None)."""
    out = []
    for run, flat in flats:
        written = solver.written.get(run)
        same = written is not None and all(
            old[i] is view for i, view in zip(run, written[1], strict=True))
        out.append((run, flat, written[0] if same and written is not None else None))
    return out


def bind(coupling: Coupling, masks: Sequence[SpartanMask]) -> None:
    """Bind ``coupling`` to its ``masks`` (as they are: same hard masks, thresholds, betas)."""
    for m in masks:
        m.update(m.hard_mask, threshold=m.threshold, beta=float(m.beta), scope="shared",
                 coupling=coupling)
