"""The mask update of a model sharded with FSDP2: every rank solves on its own shards.

:class:`ShardedSolver` is the :class:`~torchspartan.allocation.AllocationSolver` of a model whose
masked weights are ``Shard(0)`` DTensors (docs/design.md, "Sharded training"):

- the unit values of a tensor are those of the local rows (``to_local``), one piece per tensor
  (empty on a rank that holds none of it), so every rank has the same pieces;
- the hard top-k of a shared budget is :func:`~torchspartan.sharded_select.select_sharded`
  (histograms and tie counts all-reduced; no rank holds all scores);
- the soft threshold is the engine's Newton solve with an all-reduce as its ``reduce`` hook:
  one vector of two float64 sums per segment per evaluation;
- the new hard masks (and N:M thresholds) are computed on the local rows and gathered into the
  masks' full, replicated buffers;
- a budget shared by several tensors gets a :class:`ShardedCoupling`, whose backward adds the
  cross-tensor gradient to the local shards, ``dL/dtau`` averaged over the ranks as FSDP2
  averages the gradients.

:func:`make_solver` picks this solver or the plain one, and refuses a model sharded in part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from torchspartan._blocks import block_mul, block_reduce, from_rows, to_rows
from torchspartan._engine import Piece, hard_select, solve_soft
from torchspartan._kernels import MaskSpec, soft_mask
from torchspartan.allocation import AllocationSolver, Each, Extra, Pending
from torchspartan.coupling import BoundMask, Coupling
from torchspartan.distributed import (
    ORDER,
    ShardGroup,
    ShardPart,
    is_sharded,
    local_spec,
    local_tensor,
    shard_part,
)
from torchspartan.sharded_select import select_segments, select_sharded
from torchspartan.sparsify import MaskRef

__all__ = ["ShardedCoupling", "ShardedSolver", "make_solver"]


def make_solver(refs: Sequence[MaskRef], unit_costs: Sequence[float],
                reduce: Any = None) -> AllocationSolver:
    """A :class:`ShardedSolver` when the masked weights are FSDP2 shards, else the plain solver.

    Raises:
        ValueError: some masked weights sharded and others not (names one of each).
    """
    sharded = [is_sharded(r.theta) for r in refs]
    if not any(sharded):
        return AllocationSolver(refs, unit_costs, reduce)
    if not all(sharded):
        plain = next(r.name for r, s in zip(refs, sharded, strict=True) if not s)
        other = next(r.name for r, s in zip(refs, sharded, strict=True) if s)
        raise ValueError(
            f"{plain} is not sharded but {other} is (FSDP2): the masks of one model are solved "
            f"together, so shard all masked weights: call fully_shard on the root module too "
            f"(it shards every parameter left), in the order {ORDER}"
        )
    return ShardedSolver(refs, unit_costs)


class ShardedSolver(AllocationSolver):
    """The allocation solver on local shards (see the module docstring).

    Args:
        refs: the masks; every masked weight a ``Shard(0)`` DTensor on one 1-D mesh.
        unit_costs: cost of one weight entry of each mask's tensor.
        group: the collectives (default: over the mesh of the masked weights).
    """

    def __init__(self, refs: Sequence[MaskRef], unit_costs: Sequence[float],
                 group: ShardGroup | None = None) -> None:
        if group is None:
            meshes = [r.theta.device_mesh for r in refs]  # type: ignore[attr-defined]
            odd = next((r.name for r, m in zip(refs, meshes, strict=True) if m != meshes[0]),
                       None)
            if odd is not None:
                raise ValueError(f"{odd} is sharded over another device mesh than {refs[0].name}; "
                                 f"shard the whole model over one mesh")
            group = ShardGroup(meshes[0].get_group())
        self.group = group
        super().__init__(refs, unit_costs, reduce=group.sum, sync_free=False)
        self.batches = False  # FSDP2 gathers one block at a time: no batched nodes
        self.parts: list[ShardPart] = [
            shard_part(r.name, r.theta, r.mask.hard_mask.shape,
                       (r.mask.block or (1,))[0], group.rank, group.size)
            for r in self.refs
        ]

    # -- local views -------------------------------------------------------------------
    def local_theta(self, i: int) -> torch.Tensor:
        """The local rows of mask ``i``'s weight (a view: writes reach the Parameter)."""
        with torch.no_grad():
            return local_tensor(self.refs[i].theta.detach())

    def units_and_max(self, run: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unit values of the local rows of one mask, flat (empty when it holds none); their
        maximum over all ranks comes from :meth:`global_max`."""
        i = run[0]
        local = self.local_theta(i)
        if local.shape[0] == 0:
            dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
            return torch.empty(0, dtype=dtype, device=local.device), None
        v = block_reduce(local.abs(), self.refs[i].mask.sizes)
        return self.per_cost(run, v.reshape(-1)), None

    def pieces(self, idx: Sequence[int], beta: float) -> tuple[list[Piece], list[list[int]]]:
        """One piece per tensor (the same pieces on every rank, empty where a rank holds none)."""
        pieces = []
        for i in idx:
            bn = self.refs[i].mask.block_numel
            pieces.append(Piece(self.units_and_max([i])[0].reshape(1, -1), beta * math.sqrt(bn),
                                self.unit_costs[i] * bn, 0))
        return pieces, [[i] for i in idx]

    def gather(self, idx: Sequence[int], local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full hard masks of the masks ``idx`` from every rank's local rows."""
        return self.group.gather_rows(local, [self.parts[i] for i in idx],
                                      [self.refs[i].mask.hard_mask.shape for i in idx])

    # -- one shared budget ---------------------------------------------------------------
    def prepare(self, idx: tuple[int, ...], budget: float, beta: float, step: int = 0,
                extra: Extra | None = None, *, soft: bool = True) -> Pending:
        # ``extra`` is never given here: the held route is the one-process sync-free path's
        masks = [self.refs[i].mask for i in idx]
        total = sum(self.cost(i) for i in idx)
        if budget >= total * (1 - 1e-12) or budget <= 0:
            return Pending(self, idx, step, {i: torch.full_like(m.hard_mask, budget > 0)
                                             for i, m in zip(idx, masks, strict=True)})
        pieces, runs = self.pieces(idx, beta)
        umax = self.global_max(idx, pieces, step)
        local, threshold = select_sharded([p.units.reshape(-1) for p in pieces],
                                          [float(p.cost) for p in pieces], budget,
                                          float(umax.max()), self.group,
                                          sum(self.refs[i].mask.hard_mask.numel() for i in idx))
        grids = [h.view(self.parts[i].rows, *self.refs[i].mask.hard_mask.shape[1:])
                 for i, h in zip(idx, local, strict=True)]
        hard_of = dict(zip(idx, self.gather(idx, grids), strict=True))
        pending = Pending(self, idx, step, hard_of, pieces=pieces, runs=runs, budget=budget,
                          beta=beta, umax=umax)
        pending.scalars.append(torch.ones((), dtype=torch.float64, device=umax.device))  # checked
        pending.threshold = pending.hard_threshold = threshold
        if soft:
            self.solve_pending(pending)
        return pending

    def select_each(self, idx: Sequence[int], budgets: Sequence[float], beta: float) -> Each:
        """Masks ``idx[k]``, each alone with its budget (tensors held at a density bound), as one
        problem of one segment per tensor: one sharded selection and one gather of their masks
        (:meth:`write_each` then solves them with one Newton solve); nothing written."""
        each = self.pieces_each(idx, budgets, beta)
        if not each.ids:
            return each
        each.umax = self.global_max(each.ids, each.pieces, 0)
        local, each.thresholds = select_segments(
            [p.units.reshape(-1) for p in each.pieces], [float(p.cost) for p in each.pieces],
            list(range(len(each.ids))), each.budgets, each.umax.tolist(), self.group,
            [r.mask.hard_mask.numel() for r in each.refs])
        grids = [h.view(self.parts[i].rows, *self.refs[i].mask.hard_mask.shape[1:])
                 for i, h in zip(each.ids, local, strict=True)]
        each.grids = self.gather(each.ids, grids)
        return each

    def global_max(self, idx: Sequence[int], pieces: Sequence[Piece], step: int
                   ) -> torch.Tensor:
        """The largest unit value of every piece over all ranks (float64); raises, naming the
        tensor, on every rank when one holds NaN or Inf."""
        device = self.refs[idx[0]].mask.hard_mask.device
        local_max = torch.stack([
            p.units.amax() if p.units.numel() else torch.zeros((), device=device) for p in pieces
        ]).double().nan_to_num(nan=math.inf)
        umax = self.group.max(local_max)
        bad = [self.refs[i].name for i, u in zip(idx, umax.tolist(), strict=True)
               if not math.isfinite(u)]
        if bad:
            raise ValueError(
                f"{bad[0]} became non-finite (NaN or Inf) in the base optimizer's step {step}; "
                f"lower the learning rate or clip gradients"
            )
        return umax

    def coupling(self, idx: Sequence[int], slope: torch.Tensor, betas: Sequence[float],
                 tau: float) -> Coupling:
        """A :class:`ShardedCoupling` (never batched: FSDP2 gathers one block at a time)."""
        return ShardedCoupling([self.refs[i].mask for i in idx],
                               [self.refs[i].theta for i in idx], slope,
                               [self.parts[i] for i in idx], self.group)

    # -- N:M rows: every group lies in one shard row ---------------------------------------
    def solve_rows(self, idx: tuple[int, ...], density: float, group: int, beta: float
                   ) -> tuple[int, float]:
        iterations, error = 0, 0.0
        budget = density * group
        if budget >= group * (1 - 1e-12):
            self.fill(idx, True)
            return 0, 0.0
        hards, taus, tau_parts = [], [], []
        for i in idx:
            r, part = self.refs[i], self.parts[i]
            local = self.local_theta(i)
            rows = to_rows(local.abs(), group)
            rows = rows.float() if rows.dtype not in (torch.float32, torch.float64) else rows
            grid_shape = (part.rows, *r.mask.hard_mask.shape[1:])
            per_row = r.mask.hard_mask.numel() // group // part.grid_rows
            tau_parts.append(ShardPart(part.name, part.grid_rows, part.chunk, part.start,
                                       part.stop, per_row))
            if rows.shape[0] == 0:
                hards.append(torch.zeros(grid_shape, dtype=torch.bool, device=local.device))
                taus.append(torch.zeros(0, dtype=torch.float64, device=local.device))
                continue
            piece = Piece(rows, beta, 1.0, 0, rowwise=True)
            hard, _ = hard_select([piece], [budget] * rows.shape[0])
            hards.append(from_rows(hard[0], grid_shape, group).contiguous())
            if r.mask.method != "spartan":
                taus.append(torch.zeros(rows.shape[0], dtype=torch.float64, device=local.device))
                continue
            full_groups = r.mask.hard_mask.numel() // group
            warm = r.mask.soft_active and r.mask.threshold.shape == (full_groups,)
            tau_init = r.mask.threshold.narrow(0, part.start * per_row, rows.shape[0]) if (
                warm) else None
            budgets = torch.full((rows.shape[0],), budget, dtype=torch.float64,
                                 device=rows.device)
            solution = solve_soft([piece], budgets, tau_init=tau_init)
            taus.append(solution.tau)
            iterations = max(iterations, solution.evaluations)
            error = max(error, float(solution.error.max()))
        full_hard = self.gather(idx, hards)
        full_tau = self.group.gather_rows(
            taus, tau_parts, [(self.refs[i].mask.hard_mask.numel() // group,) for i in idx])
        device = self.refs[idx[0]].mask.hard_mask.device
        stats = self.group.max(torch.tensor([float(iterations), error], dtype=torch.float64,
                                            device=device))
        for i, h, t in zip(idx, full_hard, full_tau, strict=True):
            m = self.refs[i].mask
            if m.method != "spartan":
                m.update(h)
            else:
                m.update(h, threshold=t, beta=beta, scope="local")
        return int(stats[0]), float(stats[1])

    # -- fine-tuning ---------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self, i: int) -> None:
        """Fold ``theta <- theta * m * h`` into the local rows, then freeze the mask."""
        r = self.refs[i]
        local = self.local_theta(i)
        spec = local_spec(r.mask.spec(), self.parts[i])
        if spec.method == "spartan" and spec.soft:
            factor = soft_mask(local, spec).mul_(spec.hard)
        else:
            factor = spec.hard
        local.copy_(block_mul(local, factor, spec.sizes))
        r.mask.freeze(r.theta, fold=False)


class ShardedCoupling(Coupling):
    """The shared threshold of a budget over sharded weights: its backward adds the
    cross-tensor term ``mean_r(G_r) beta_i a_i sign(theta_i) / S`` to each local shard (``G_r``
    the rank's ``dL/dtau``; FSDP2 averages the other gradient terms over the ranks)."""

    def __init__(self, masks: Sequence[BoundMask], thetas: Sequence[torch.Tensor],
                 slope: torch.Tensor, parts: Sequence[ShardPart], group: ShardGroup) -> None:
        super().__init__(masks, thetas, slope)
        self.parts = list(parts)
        self.group = group
        self._node: tuple[tuple[int, ...], torch.Tensor] | None = None

    def owns(self, mask: BoundMask, theta: torch.Tensor) -> bool:
        return False  # FSDP2 gathers one block at a time: no batched weights

    @torch.compiler.disable
    def threshold(self) -> torch.Tensor:
        key = tuple(local_tensor(t)._version for t in self.thetas) + tuple(
            m.threshold._version for m in self.masks)
        if self._node is not None and self._node[0] == key:
            return self._node[1]
        info = _Info([m.spec() for m in self.masks], self.parts, self.group, self.slope)
        out = _ShardedThreshold.apply(self.masks[0].threshold, info, *self.thetas)
        self._node = (key, out)
        return out

    def release(self) -> None:
        self._node = None
        super().release()


class _Info:
    def __init__(self, specs: list[MaskSpec], parts: list[ShardPart], group: ShardGroup,
                 slope: torch.Tensor) -> None:
        self.specs, self.parts, self.group, self.slope = specs, parts, group, slope


class _ShardedThreshold(torch.autograd.Function):
    """Forward: ``tau``. Backward: the cross-tensor term into every local shard (one scalar
    all-reduce of ``dL/dtau``). Saves no tensors."""

    @staticmethod
    def forward(ctx: Any, tau: torch.Tensor, info: _Info, *thetas: torch.Tensor
                ) -> torch.Tensor:
        ctx.info = info
        ctx.thetas = thetas
        return tau.clone()

    @staticmethod
    def backward(ctx: Any, grad_tau: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from torch.distributed.tensor import DTensor

        info: _Info = ctx.info
        slope = info.slope
        g_tau = info.group.sum(grad_tau.detach().reshape(1).to(torch.float64))[0] / (
            info.group.size)
        # a saturated segment (S = 0) has no cross term, not a NaN
        g = torch.where(slope > 0, g_tau / slope.clamp_min(torch.finfo(slope.dtype).tiny),
                        torch.zeros_like(g_tau))
        out: list[torch.Tensor | None] = [None, None]
        for theta, spec, part in zip(ctx.thetas, info.specs, info.parts, strict=True):
            if not spec.soft or spec.method != "spartan":
                out.append(None)
                continue
            local = local_tensor(theta.detach())
            ls = local_spec(spec, part)
            m = soft_mask(local, ls)
            if ls.plain and local.dtype in (torch.float32, torch.float64):
                a = m.addcmul_(m, m, value=-1)
                grad = torch.copysign(a, local, out=a).mul_(g * ls.beta)
            else:
                dv = m.mul_(1 - m).mul_((g * ls.beta).to(m.dtype))
                grad = block_mul(torch.sign(local), dv, ls.sizes).to(local.dtype)
            out.append(DTensor.from_local(grad, theta.device_mesh, theta.placements,
                                          run_check=False, shape=theta.shape,
                                          stride=theta.stride()))
        return tuple(out)
