"""``TopKAST``: Top-KAST (Jayakumar et al., NeurIPS 2020) in the masks' frame.

For masks registered with ``method="topkast"`` (docs/design.md, "Top-KAST and RigL"):

- forward set ``A``: the top-``D`` entries by magnitude (the hard mask ``h``, chosen by the policy
  exactly as for every other method, default floors included); the layer computes ``theta * h``;
- backward set ``B``: the top-``D_B`` entries under the same policy (``D_B > D``), united with
  ``A`` so that ``B`` contains ``A`` whatever the ties or floors; the mask's backward keeps the
  gradient on ``B`` and zeroes it elsewhere (``SpartanMask.backward_mask``);
- exploration penalty: ``R = (lambda / 2) * (sum_{i in A} theta_i^2 + (1 / D) sum_{i in B \\ A}
  theta_i^2)``; weights outside ``B`` are not penalised. Its gradient ``lambda * theta_i`` on
  ``A`` and ``lambda * theta_i / D`` on ``B \\ A`` is added to ``theta.grad`` right before the
  base optimizer's step, so the loss the user writes stays the task loss.

``D`` is the density of the masked tensors at the step; by default it is the target from the first
step on (Top-KAST is sparse from the start) and the masks are never frozen (no fine-tuning
phase). Everything else (policies, floors, schedules, records, checkpoints) is
:class:`~torchspartan.DualAveraging`'s.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Literal

import torch
from torch import nn

from torchspartan._blocks import block_mul
from torchspartan._engine import hard_select
from torchspartan.optim import DualAveraging
from torchspartan.policies import NM, AllocationPolicy
from torchspartan.schedules import Schedule, constant
from torchspartan.update import StepRecord

__all__ = ["TopKAST"]


class TopKAST(DualAveraging):
    """Top-KAST training around any optimizer, for masks of ``method="topkast"``.

    Args:
        optimizer, model, sparsity, total_steps, policy, sparsity_of, check_finite: as for
            :class:`~torchspartan.DualAveraging`.
        backward_sparsity: sparsity of the backward set ``B`` (``<= sparsity``). Default: twice
            the forward density, ``1 - min(1, 2 * (1 - sparsity))`` (90% forward, 80% backward:
            a setting of the paper).
        penalty: ``lambda`` of the exploration penalty (module docstring); ``0`` turns it off.
            It replaces weight decay on the masked weights: give those ``weight_decay=0`` in the
            base optimizer (a warning says when they have some).
        density: schedule ``step -> density``; default the target from step 0.
        finetune_fraction: last fraction of steps with frozen masks (default 0: none).

    Raises:
        ValueError: as :class:`~torchspartan.DualAveraging`; masks of another method than
            ``"topkast"`` (or ``"fixed"``); ``backward_sparsity`` outside ``[0, sparsity]``;
            a negative or non-finite ``penalty``; an N:M policy.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 4))
        >>> _ = ts.sparsify(model, method="topkast")
        >>> opt = ts.TopKAST(torch.optim.SGD(model.parameters(), lr=0.1), model,
        ...                  sparsity=0.9, total_steps=10)
        >>> mask = model[0].parametrizations.weight[0]
        >>> bool((mask.hard_mask & ~mask.backward_mask).any())  # A inside B
        False
        >>> round(opt.last_record.density, 3)  # sparse from the start
        0.1
    """

    skips_on_device = False  # its own steps read the gradients
    methods = ("topkast", "fixed")
    penalty: float
    backward_ratio: float
    backward_sparsity: float

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        sparsity: float,
        total_steps: int,
        *,
        backward_sparsity: float | None = None,
        penalty: float = 1e-4,
        policy: AllocationPolicy | None = None,
        density: Schedule | None = None,
        finetune_fraction: float = 0.0,
        sparsity_of: Literal["masked", "model"] = "masked",
        check_finite: bool = True,
    ) -> None:
        self.backward_ratio = 1.0
        if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and (
                0.0 <= sparsity < 1.0):  # else DualAveraging refuses it, naming it
            sparsity = float(sparsity)
            if backward_sparsity is None:
                backward_sparsity = 1.0 - min(1.0, 2.0 * (1.0 - sparsity))
            ok = isinstance(backward_sparsity, numbers.Real) and not isinstance(
                backward_sparsity, bool) and 0.0 <= backward_sparsity <= sparsity
            if not ok:
                raise ValueError(
                    f"backward_sparsity must be a number in [0, sparsity={sparsity:g}] (the "
                    f"backward set B holds the forward set A), got {backward_sparsity!r}; e.g. "
                    f"backward_sparsity={1.0 - min(1.0, 2.0 * (1.0 - sparsity)):g}"
                )
            # B's density relative to A's, kept along the density schedule
            self.backward_ratio = (1.0 - float(backward_sparsity)) / (1.0 - sparsity)
            self.backward_sparsity = float(backward_sparsity)
        if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not (
                math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"penalty must be a finite number >= 0 (lambda of the exploration "
                             f"penalty, e.g. 1e-4), got {penalty!r}")
        if isinstance(policy, NM):
            raise ValueError(f"TopKAST does not support {policy!r}: its backward set is chosen "
                             f"by magnitude over whole tensors; use ts.Global(), ts.Uniform() or "
                             f"ts.ERK()")
        self.penalty = float(penalty)
        if density is None and isinstance(sparsity, float):
            density = constant(1.0 - sparsity)
        super().__init__(optimizer, model, sparsity, total_steps, policy=policy,
                         density=density, finetune_fraction=finetune_fraction,
                         sparsity_of=sparsity_of, check_finite=check_finite)
        if self.penalty > 0:
            self._warn_weight_decay()

    def _warn_weight_decay(self) -> None:
        masked = {id(r.theta): r.name for r in self.updater.refs if r.mask.method == "topkast"}
        for group in self.optimizer.param_groups:
            hit = [masked[id(p)] for p in group["params"] if id(p) in masked]
            if hit and group.get("weight_decay", 0.0):
                warnings.warn(
                    f"{hit[0]} has weight_decay={group['weight_decay']:g} in the base optimizer "
                    f"besides Top-KAST's exploration penalty (penalty={self.penalty:g}), which "
                    f"shrinks weights outside the backward set too; give the masked weights "
                    f"weight_decay=0 (the penalty replaces it)",
                    UserWarning, stacklevel=3,
                )
                return

    # -- the two sets ----------------------------------------------------------------------
    def _update_masks(self, t: int, density: float, beta: float,
                      skip: torch.Tensor | None = None) -> StepRecord:
        record = super()._update_masks(t, density, beta, skip)
        self.update_backward_sets(min(1.0, density * self.backward_ratio))
        return record

    @torch.no_grad()
    def update_backward_sets(self, density: float) -> None:
        """Write every Top-KAST mask's backward set ``B``: the policy's top entries at
        ``density`` (counted as ``sparsity_of`` says), united with the forward set ``A``."""
        updater = self.updater
        solver = updater.solver
        alloc = min(1.0, updater.budget.allocatable_density(density))
        chosen: dict[int, torch.Tensor] = {}
        if alloc < 1.0:
            for a in updater.policy.allocate(updater.tensors, alloc):
                idx = tuple(updater.alloc_index[j] for j in a.tensors)
                budget = a.density * sum(solver.cost(i) for i in idx)
                pieces, runs = solver.pieces(idx, 1.0)
                hard, _ = hard_select(pieces, [budget])
                for run, h in zip(runs, hard, strict=True):
                    sizes = [updater.refs[i].mask.hard_mask.numel() for i in run]
                    for i, part in zip(run, h.reshape(-1).split(sizes), strict=True):
                        chosen[i] = part
        for i, r in enumerate(updater.refs):
            if r.mask.method != "topkast":
                continue
            a_set = r.mask.hard_mask
            b_set = chosen.get(i)
            b_set = torch.ones_like(a_set) if b_set is None else b_set.view(a_set.shape) | a_set
            r.mask.set_backward_mask(b_set)

    # -- the exploration penalty -----------------------------------------------------------
    def _coefficients(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
        """``(theta, c, block sizes)`` per Top-KAST mask: ``c`` 1 on A, 1/D on B \\ A, else 0."""
        d = self.last_record.target_density
        out = []
        for r in self.updater.refs:
            m = r.mask
            if m.method != "topkast" or m.is_frozen:
                continue
            a_set, b_set = m.hard_mask, m.backward_mask
            c = a_set.to(r.theta.dtype) + (b_set & ~a_set).to(r.theta.dtype) / d
            out.append((r.theta, c, m.sizes))
        return out

    def exploration_penalty(self) -> torch.Tensor:
        """``R`` of the module docstring at the current sets (a 0-dim tensor, differentiable in
        the dense weights); its gradient is what ``step()`` adds to ``theta.grad``."""
        parts = [block_mul(theta.square(), c, sizes).sum(dtype=torch.float64)
                 for theta, c, sizes in self._coefficients()]
        if not parts:
            return torch.zeros((), dtype=torch.float64)
        return 0.5 * self.penalty * torch.stack([p.to(parts[0].device) for p in parts]).sum()

    @torch.no_grad()
    def _before_base_step(self, t: int) -> None:
        if self.penalty == 0.0:
            return
        for theta, c, sizes in self._coefficients():
            g = block_mul(theta.detach(), c, sizes).mul_(self.penalty)
            if theta.grad is None:
                theta.grad = g
            else:
                theta.grad.add_(g)

    def __repr__(self) -> str:
        return (f"TopKAST({type(self.optimizer).__name__}, sparsity={self.sparsity}, "
                f"backward_sparsity={self.backward_sparsity:g}, penalty={self.penalty:g}, "
                f"total_steps={self.total_steps}, policy={self.policy!r})")
