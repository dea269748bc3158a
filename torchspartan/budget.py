"""What a density counts (the masked weights, or all parameters), and what an update kept.

``sparsity_of="masked"`` counts the density over the masked tensors; ``"model"`` over every
parameter, the masked tensors compensating for the unmasked ones (the paper's convention).
``method="fixed"`` masks keep what they keep; the rest of the budget is the *allocatable*
density, a kept fraction of the allocatable masks' cost, which the policy then distributes.
"""

from __future__ import annotations

import itertools
import sys
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from torchspartan._chunks import count_true
from torchspartan._device import to_device
from torchspartan.sparsify import MaskRef
from torchspartan.state import StepRecord

__all__ = ["Budget", "Counts", "SparsityOf", "StepSkipped"]

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
        self._ends_cache: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        # a device flag read with the next counts (nonzero: the update is skipped, nothing
        # written; see :meth:`pass_gate`), set by the caller of one update
        self.gate: torch.Tensor | None = None
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
    def _ends(self, run: Sequence[int], device: torch.device) -> torch.Tensor:
        """The index of each mask's last entry in a flat tensor of the masks ``run``, cached."""
        key = (tuple(run), device)
        ends = self._ends_cache.get(key)
        if ends is None:
            sizes = [self.refs[i].mask.hard_mask.numel() for i in run]
            ends = to_device(list(itertools.accumulate(sizes)), device) - 1
            self._ends_cache[key] = ends
        return ends

    def counts(self, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor],
               packed: Sequence[tuple[Sequence[int], torch.Tensor, torch.Tensor | None]] = ()
               ) -> Counts:
        """Changed and kept entries of every mask, on the device (read with other values).

        ``packed``: runs of masks whose new hard masks are consecutive views of one flat
        tensor, with the flat tensor of their old ones when those were views of one too
        (``None`` otherwise): their counts take a few ops per run instead of three per mask.
        """
        n = len(self.refs)
        in_run = {i for run, _, _ in packed for i in run}
        changed: list[torch.Tensor] = []
        weights: list[int] = []
        kept_parts: list[torch.Tensor] = []
        order: list[int] = []
        for run, flat, flat_old in packed:
            b = self.refs[run[0]].mask.block_numel
            if flat_old is not None:
                changed.append(torch.count_nonzero(torch.ne(flat, flat_old)))
                weights.append(b)
            else:
                changed += [count_true(new[i] != old[i]) for i in run]
                weights += [self.refs[i].mask.block_numel for i in run]
            kept_parts.append(_segment_sums(flat, self._ends(run, flat.device)))
            order += list(run)
        rest = [i for i in range(n) if i not in in_run]
        changed += [count_true(new[i] != old[i]) for i in rest]
        weights += [self.refs[i].mask.block_numel for i in rest]
        if rest:
            kept_parts.append(torch.stack([count_true(new[i]) for i in rest]))
            order += rest
        kept = kept_parts[0] if len(kept_parts) == 1 else torch.cat(kept_parts)
        parts = [torch.stack(changed).to(kept.dtype), kept]
        if self.gate is not None:
            parts.append(self.gate.reshape(1).to(kept.dtype))
        values = torch.cat(parts).to(torch.float64)
        return Counts(values, weights, order, gated=self.gate is not None)

    def pass_gate(self, counts: Counts | None = None, values: Sequence[float] = ()) -> None:
        """Raise :class:`StepSkipped` when the gate is set (nothing may be written then); else
        clear it. With ``counts`` and their read ``values`` the flag is the one read with them
        (no host sync); without, it is read now (one sync; for routes that write before they
        read)."""
        gate = self.gate
        if gate is None:
            return
        flag = values[-1] if counts is not None and counts.gated else float(gate)
        self.gate = None
        if flag:
            raise StepSkipped()

    def record(self, old: Sequence[torch.Tensor], counted: tuple[float, list[float]] | None,
               step: int, target: float, beta: float, iterations: int, error: float,
               collapsed: set[str]) -> StepRecord:
        """The :class:`StepRecord` of an update from the masks before it (``old``) to the
        masks' current ones (``counted``: the changed entries and the kept ones per mask, from
        :meth:`Counts.read`, or None to count now).

        Warns once per tensor (remembered in ``collapsed``) when a mask keeps no entry.
        """
        if counted is None:
            counts = self.counts(old, [r.mask.hard_mask for r in self.refs])
            counted = counts.read(counts.values.tolist())
        changed, kept_each = counted
        kept = sum(c * r.mask.block_numel for c, r in zip(kept_each, self.refs, strict=True))
        for r, c in zip(self.refs, kept_each, strict=True):
            if c == 0 and r.name not in collapsed:
                collapsed.add(r.name)
                warnings.warn(
                    f"{r.name}: every entry is pruned at step {step} (layer collapse), so the "
                    f"layer outputs only its bias; if that is not wanted, leave its SpartanMask's "
                    f"min_density at None (the default floor), give it a min_density > 0 (e.g. "
                    f"ts.sparsify(..., min_density=0.01)) or use ts.ERK()",
                    stacklevel=_caller_level(),
                )
        return StepRecord(step, kept / self.masked_numel, target, beta, iterations, error,
                          changed / self.masked_numel, False)


@dataclass(frozen=True)
class Counts:
    """Changed and kept entries of the masks as one device vector, to be read with the other
    values of a step (one host sync for all); :meth:`read` makes host numbers of it.

    Attributes:
        values: float64 ``[changed, per group..., kept, per mask in order..., gate]`` (the
            gate's flag only when ``gated``: :meth:`Budget.pass_gate`).
        weights: the block size of each changed group (entries per hard-mask entry).
        order: the mask index of each kept entry.
        gated: whether the last value is the budget's gate flag.
    """

    values: torch.Tensor
    weights: list[int]
    order: list[int]
    gated: bool = False

    def read(self, values: Sequence[float]) -> tuple[float, list[float]]:
        """``(changed weight entries, kept hard-mask entries of every mask)`` from ``values``
        (this object's :attr:`values`, read on the host)."""
        g = len(self.weights)
        if self.gated:
            values = values[:-1]
        changed = sum(c * w for c, w in zip(values[:g], self.weights, strict=True))
        kept = [0.0] * len(self.order)
        for i, k in zip(self.order, values[g:], strict=True):
            kept[i] = k
        return changed, kept


class StepSkipped(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by :meth:`Budget.pass_gate`: the gate's flag was set, so the update wrote nothing
    (:meth:`~torchspartan.MaskUpdater.update` raises it on, after restoring its couplings;
    :class:`~torchspartan.DualAveraging` catches it and skips the step)."""


def _segment_sums(flat: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Kept entries of each consecutive segment of the bool ``flat`` (``ends``: the index of
    each segment's last entry): one cumulative sum and a gather at the ends, exact integers."""
    dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    at = flat.reshape(-1).cumsum(0, dtype=dtype).index_select(0, ends)
    return torch.diff(at, prepend=at.new_zeros(1)).to(torch.int64)

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
