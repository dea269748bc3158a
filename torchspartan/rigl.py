"""``RigL``: Rigging the Lottery (Evci et al., ICML 2020) in the masks' frame.

For masks registered with ``method="rigl"`` (docs/design.md, "Top-KAST and RigL"):

- sparse from the start: at construction every tensor gets its count of entries from the policy
  at the target density (default :class:`~torchspartan.ERK`, default floors included), placed at
  random (``init="random"``, the paper's) or at the largest magnitudes (``init="magnitude"``);
- the layer computes ``theta * h`` and its gradient is masked by ``h``;
- every ``delta_t`` steps before ``T_end`` (``end_fraction`` of the steps), after the base step,
  each tensor drops the ``k = floor(f(t) * n_active)`` active entries of smallest magnitude and
  grows the ``k`` entries of largest dense-gradient magnitude ``|dL/dw|`` among those inactive
  after the drop, ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))``; a grown entry that was
  inactive before the update starts from ``theta = 0`` (and zero optimizer state); the count
  of every tensor, hence the budget, stays exact;
- from ``T_end`` on the masks are frozen (the fine-tuning phase of ``DualAveraging``).

The dense gradient comes from the masks' own backward (``SpartanMask.dense_grad``, armed only for
the backward passes of update steps, micro-batches summed; all-reduced over ranks when
``torch.distributed`` is initialised): no second forward. Block masks score blocks by the sums of
``|theta|`` and ``|dL/dw|`` over each block.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from torchspartan._blocks import block_mul, block_reduce
from torchspartan.optim import DualAveraging
from torchspartan.policies import ERK, NM, AllocationPolicy
from torchspartan.schedules import constant
from torchspartan.update import StepRecord

__all__ = ["RigL", "drop_grow"]


def drop_grow(active: torch.Tensor, magnitude: torch.Tensor, gradient: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One RigL update of one mask.

    Args:
        active: bool mask before the update.
        magnitude: drop scores (``|theta|``), same shape.
        gradient: grow scores (``|dL/dw|``), same shape.
        k: entries to drop and to grow.

    Returns:
        ``(new, dropped, grown)`` bool tensors: the ``k`` active entries of smallest
        ``magnitude`` are dropped, then the ``k`` entries of largest ``gradient`` among the
        inactive ones (just-dropped included) are grown; ties go to the lower position. ``new``
        keeps as many entries as ``active``.
    """
    flat = active.reshape(-1)
    on = flat.nonzero().squeeze(1)
    k = min(int(k), on.numel())
    after = flat.clone()
    dropped = torch.zeros_like(flat)
    grown = torch.zeros_like(flat)
    if k > 0:
        order = torch.argsort(magnitude.reshape(-1)[on], stable=True)
        dropped[on[order[:k]]] = True
        after[dropped] = False
        off = (~after).nonzero().squeeze(1)
        order = torch.argsort(gradient.reshape(-1)[off], descending=True, stable=True)
        grown[off[order[:k]]] = True
        after[grown] = True
    shape = active.shape
    return after.view(shape), dropped.view(shape), grown.view(shape)


class RigL(DualAveraging):
    """RigL training around any optimizer, for masks of ``method="rigl"``.

    Args:
        optimizer, model, sparsity, total_steps, sparsity_of, check_finite: as for
            :class:`~torchspartan.DualAveraging`.
        policy: the allocation (default :class:`~torchspartan.ERK`, as in the paper).
        delta_t: steps between mask updates (the paper's ``Delta T``, default 100).
        alpha: initial drop fraction, cosine-decayed to 0 at ``T_end`` (default 0.3).
        end_fraction: ``T_end`` as a fraction of ``total_steps`` (default 0.75); the masks are
            frozen from then on.
        init: ``"random"`` (the paper) or ``"magnitude"`` placement of the initial entries.
        seed: seed of the random placement.

    Raises:
        ValueError: as :class:`~torchspartan.DualAveraging`; masks of another method than
            ``"rigl"`` (or ``"fixed"``); ``delta_t < 1``, ``alpha`` outside ``[0, 1]``,
            ``end_fraction`` outside ``(0, 1]``, an unknown ``init``; an N:M policy.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 4))
        >>> _ = ts.sparsify(model, method="rigl")
        >>> opt = ts.RigL(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.9,
        ...               total_steps=400)
        >>> opt.last_record.density  # sparse from the start
        0.1
    """

    skips_on_device = False  # its own steps read the gradients
    methods = ("rigl", "fixed")
    delta_t: int
    alpha: float
    init: str
    seed: int

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        sparsity: float,
        total_steps: int,
        *,
        policy: AllocationPolicy | None = None,
        delta_t: int = 100,
        alpha: float = 0.3,
        end_fraction: float = 0.75,
        init: Literal["random", "magnitude"] = "random",
        seed: int = 0,
        sparsity_of: Literal["masked", "model"] = "masked",
        check_finite: bool = True,
    ) -> None:
        if isinstance(delta_t, bool) or not isinstance(delta_t, numbers.Integral) or delta_t < 1:
            raise ValueError(f"delta_t must be an integer >= 1 (steps between mask updates, "
                             f"e.g. 100), got {delta_t!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (
                0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1] (the initial drop fraction, "
                             f"e.g. 0.3), got {alpha!r}")
        if isinstance(end_fraction, bool) or not isinstance(end_fraction, numbers.Real) or not (
                0.0 < end_fraction <= 1.0):
            raise ValueError(f"end_fraction must be a number in (0, 1] (when the updates stop, "
                             f"e.g. 0.75), got {end_fraction!r}")
        if init not in ("random", "magnitude"):
            raise ValueError(f"init must be 'random' or 'magnitude', got {init!r}")
        if isinstance(policy, NM):
            raise ValueError(f"RigL does not support {policy!r}: drop and grow move entries "
                             f"anywhere in a tensor; use ts.ERK(), ts.Uniform() or ts.Global()")
        self.delta_t, self.alpha, self.init, self.seed = int(delta_t), float(alpha), init, seed
        density = None
        if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
            density = constant(1.0 - float(sparsity))  # else DualAveraging refuses it
        super().__init__(optimizer, model, sparsity, total_steps,
                         policy=policy if policy is not None else ERK(), density=density,
                         finetune_fraction=1.0 - float(end_fraction), sparsity_of=sparsity_of,
                         check_finite=check_finite)

    @property
    def end_step(self) -> int:
        """``T_end``: the first step without a mask update (the masks freeze there)."""
        return min(self.finetune_start, self.total_steps + 1)

    def is_update_step(self, t: int) -> bool:
        """Whether step ``t`` drops and grows (``t`` a multiple of ``delta_t`` before
        ``T_end``)."""
        return t > 0 and t % self.delta_t == 0 and t < self.end_step

    def drop_fraction(self, t: int) -> float:
        """``alpha / 2 * (1 + cos(pi * t / T_end))``."""
        return self.alpha / 2 * (1 + math.cos(math.pi * min(t, self.end_step) / self.end_step))

    def _rigl_refs(self) -> list[Any]:
        return [r for r in self.updater.refs if r.mask.method == "rigl" and not r.mask.is_frozen]

    def _arm(self, t: int) -> None:
        """Record the dense gradient in the backward passes of step ``t`` only."""
        want = self.is_update_step(t)
        for r in self.updater.refs:
            if r.mask.method == "rigl":
                r.mask.dense_grad.armed = want
                if not want:
                    r.mask.dense_grad.take()

    # -- the mask updates ------------------------------------------------------------------
    @torch.no_grad()
    def _update_masks(self, t: int, density: float, beta: float,
                      skip: torch.Tensor | None = None) -> StepRecord:
        if t == 0:
            record = super()._update_masks(t, density, beta, skip)
            if self.init == "random":
                self._place_at_random()
        elif self.is_update_step(t):
            record = self._drop_and_grow(t, density, beta)
        else:
            record = replace(self.last_record, step=t, iterations=0, budget_error=0.0,
                             mask_change=0.0, beta=beta)
        self._arm(t + 1)
        return record

    def _place_at_random(self) -> None:
        """Keep each tensor's count of entries, at random places."""
        g = torch.Generator().manual_seed(int(self.seed))
        for r in self._rigl_refs():
            hard = r.mask.hard_mask
            k = int(hard.sum())
            chosen = torch.zeros(hard.numel(), dtype=torch.bool)
            chosen[torch.randperm(hard.numel(), generator=g)[:k]] = True
            r.mask.update(chosen.view(hard.shape).to(hard.device))

    def _drop_and_grow(self, t: int, density: float, beta: float) -> StepRecord:
        fraction = self.drop_fraction(t)
        changed = 0
        for r in self._rigl_refs():
            grad = r.mask.dense_grad.take()
            if grad is None:  # no backward reached this tensor: nothing to grow by
                continue
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(grad)
            sizes = r.mask.sizes
            hard = r.mask.hard_mask
            k = math.floor(fraction * int(hard.sum()))
            new, _, grown = drop_grow(hard, block_reduce(r.theta.detach().abs(), sizes),
                                      block_reduce(grad.abs(), sizes), k)
            fresh = grown & ~hard  # grown entries that were inactive: start from zero
            keep = (~fresh).to(r.theta.dtype)
            r.theta.copy_(block_mul(r.theta, keep, sizes))
            for value in self.optimizer.state.get(r.theta, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == r.theta.shape:
                    value.copy_(block_mul(value, keep.to(value.dtype), sizes))
            changed += int((new != hard).sum()) * r.mask.block_numel
            r.mask.update(new)
        return replace(self.last_record, step=t, iterations=0, budget_error=0.0,
                       mask_change=changed / self.updater.masked_numel, beta=beta)

    # -- the optimizer protocol --------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's, and the dense gradients recorded since the last step."""
        super().zero_grad(set_to_none)
        for r in self.updater.refs:
            if r.mask.method == "rigl":
                r.mask.dense_grad.take()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._arm(self._step + 1)

    def __repr__(self) -> str:
        return (f"RigL({type(self.optimizer).__name__}, sparsity={self.sparsity}, "
                f"total_steps={self.total_steps}, policy={self.policy!r}, "
                f"delta_t={self.delta_t}, alpha={self.alpha}, T_end={self.end_step})")
