"""What a density counts (the masked weights, or all parameters), and what an update kept.

``sparsity_of="masked"`` counts the density over the masked tensors; ``"model"`` over every
parameter, the masked tensors compensating for the unmasked ones (the paper's convention).
``method="fixed"`` masks keep what they keep; the rest of the budget is the *allocatable*
density, a kept fraction of the allocatable masks' cost, which the policy then distributes.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from torchspartan.sparsify import MaskRef
from torchspartan.state import StepRecord

__all__ = ["Budget", "SparsityOf"]

SparsityOf = Literal["masked", "model"]


class Budget:
    """The counts behind a density of ``model`` whose masks are ``refs``.

    Args:
        model: the model.
        refs: its masked tensors (one entry per tensor).
        unit_costs: the cost of one weight of each masked tensor.
        sparsity_of: ``"masked"`` or ``"model"`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, refs: Sequence[MaskRef], unit_costs: Sequence[float],
                 sparsity_of: SparsityOf) -> None:
        self.refs = refs
        self.unit_costs = unit_costs
        self.sparsity_of = sparsity_of
        self.masked_numel = sum(r.theta.numel() for r in refs)
        theta_ids = {id(r.theta) for r in refs}
        self.total_numel = sum(p.numel() for p in model.parameters())
        self.unmasked_numel = sum(p.numel() for p in model.parameters() if id(p) not in theta_ids)
        self.allocatable_cost = sum(
            r.theta.numel() * c for r, c in zip(refs, unit_costs, strict=True)
            if r.mask.method != "fixed"
        )

    def allocatable_density(self, density: float) -> float:
        """Kept fraction of the allocatable masks' cost that gives ``density`` as counted by
        ``sparsity_of`` (fixed masks keep what they keep)."""
        fixed_kept = sum(
            float(r.mask.hard_mask.sum()) * r.mask.block_numel * c
            for r, c in zip(self.refs, self.unit_costs, strict=True) if r.mask.method == "fixed"
        )
        if self.sparsity_of == "model":
            kept = density * self.total_numel - self.unmasked_numel - fixed_kept
        else:
            kept = density * self.masked_numel - fixed_kept
        return kept / self.allocatable_cost

    def allocatable(self, density: float) -> float:
        """:meth:`allocatable_density`, refusing a density that leaves no budget."""
        final = self.allocatable_density(density)
        if not final > 0.0:
            raise ValueError(
                f"density={density:.6g} over the {self.sparsity_of} parameters "
                f"({self.total_numel} parameters, {self.unmasked_numel} of them unmasked) leaves "
                f"no budget for the masked tensors; lower the sparsity, mask more tensors, or use "
                f"sparsity_of='masked'"
            )
        return final

    # -- what an update kept ---------------------------------------------------------------
    def counts(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> torch.Tensor:
        """Changed and kept entries of every mask, on the device (read with other values)."""
        return torch.stack([(h != o).sum() for h, o in zip(new, old, strict=True)]
                           + [h.sum() for h in new])

    def record(self, old: Sequence[torch.Tensor], counts: list[float] | None, step: int,
               target: float, beta: float, iterations: int, error: float,
               collapsed: set[str]) -> StepRecord:
        """The :class:`StepRecord` of an update from the masks before it (``old``) to the
        masks' current ones (``counts``: :meth:`counts` already read, or None to count now).

        Warns once per tensor (remembered in ``collapsed``) when a mask keeps no entry.
        """
        block = [r.mask.block_numel for r in self.refs]
        if counts is None:
            counts = self.counts(old, [r.mask.hard_mask for r in self.refs]).tolist()
        n = len(self.refs)
        changed = sum(c * b for c, b in zip(counts[:n], block, strict=True))
        kept = sum(c * b for c, b in zip(counts[n:], block, strict=True))
        for r, c in zip(self.refs, counts[n:], strict=True):
            if c == 0 and r.name not in collapsed:
                collapsed.add(r.name)
                warnings.warn(
                    f"{r.name}: every entry is pruned at step {step} (layer collapse), so the "
                    f"layer outputs only its bias; if that is not wanted, give its SpartanMask a "
                    f"min_density (e.g. ts.sparsify(..., min_density=0.01)) or use ts.ERK()",
                    stacklevel=_caller_level(),
                )
        return StepRecord(step, kept / self.masked_numel, target, beta, iterations, error,
                          changed / self.masked_numel, False)


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside torchspartan and torch (the user's call)."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("torchspartan") or name.startswith("torch")):
            return level
        frame, level = frame.f_back, level + 1
    return 1
