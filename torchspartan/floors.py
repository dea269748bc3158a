"""Floors: the least a masked tensor keeps, so that the default never empties a layer.

A budget shared by several tensors (``ts.Global``) ranks entries of different layers against each
other; when layers differ in weight scale (BatchNorm nets, small models, a straight-through
backward) a whole layer can fall below the threshold and be pruned away (layer collapse). The
default floor of a mask (``SpartanMask(min_density=None)``) keeps, in a shared budget, at least
one entry per output unit of the tensor (one block per block row for block masks): the fewest
entries with which every output still depends on the input. It is enforced by the updater's
bounded solve (tensors below their floor are fixed at it, the rest share what is left), so the
budget stays exact. A tensor alone in its budget (``ts.Uniform``, ``ts.ERK``) keeps what its policy
gives it; a policy density that rounds to no entry at all is refused. ``docs/design.md``
("Floors") argues the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torchspartan.allocation import AllocationSolver
from torchspartan.policies import Allocation, MaskedTensor

__all__ = ["Floors", "check_floors", "floor_density", "grid_numel", "output_units"]

_ALLOW = ("or allow empty layers explicitly with min_density=0.0 (ts.sparsify(..., "
          "min_density=0.0))")


def grid_shape(t: MaskedTensor) -> tuple[int, ...]:
    """The block grid of ``t`` (its shape when unstructured)."""
    block = tuple(t.block or ()) + (1,) * (len(t.shape) - len(t.block or ()))
    return tuple(n // b for n, b in zip(t.shape, block, strict=True))


def grid_numel(t: MaskedTensor) -> int:
    """Entries of ``t``'s mask (blocks for a block mask)."""
    return math.prod(grid_shape(t))


def output_units(t: MaskedTensor) -> int:
    """Output units of ``t``'s mask: block rows along the output dimension (dim 0, or dim 1 for
    weights stored ``in x out``); a 1-D tensor counts as one unit."""
    grid = grid_shape(t)
    if len(grid) < 2:
        return 1
    return grid[1] if t.input_dim == 0 else grid[0]


def floor_density(t: MaskedTensor) -> float:
    """The default floor of ``t`` as a density: one entry per output unit."""
    return min(1.0, output_units(t) / grid_numel(t))


def check_floors(tensors: Sequence[MaskedTensor], floors: Sequence[float],
                 allocations: Sequence[Allocation], lows: Sequence[float] | None = None) -> None:
    """Raise ``ValueError`` when ``allocations`` cannot keep every floor, naming the tensors, the
    numbers and the fixes.

    ``floors[i]``: the default floor of ``tensors[i]`` (a density, 0 for none); ``lows[i]``: its
    lower bound in a shared budget (the larger of the floor and an explicit ``min_density``;
    default ``floors``). A tensor alone in its budget is refused only when its policy density
    rounds to no entry while it has a default floor.
    """
    lows = floors if lows is None else lows
    for a in allocations:
        if a.group is not None:
            continue  # N:M: every group keeps round(density * m) of its own
        if len(a.tensors) == 1:
            i = a.tensors[0]
            t = tensors[i]
            if floors[i] > 0 and math.floor(a.density * grid_numel(t) + 0.5) < 1:
                raise ValueError(
                    f"{t.name}: the policy gives it density {a.density:.6g}, less than one of "
                    f"its {grid_numel(t)} mask entries, so the layer would be emptied; lower the "
                    f"sparsity, use a policy that gives it more (ts.ERK()), exclude it from the "
                    f"masks, {_ALLOW}"
                )
            continue
        need = sum(lows[i] * tensors[i].cost for i in a.tensors)
        budget = a.density * sum(tensors[i].cost for i in a.tensors)
        if need > budget * (1 + 1e-9) + 1e-9:
            worst = sorted(a.tensors, key=lambda i: -lows[i] * tensors[i].cost)[:3]
            named = ", ".join(f"{tensors[i].name} ({round(lows[i] * tensors[i].numel)})"
                              for i in worst)
            raise ValueError(
                f"the shared budget of {budget:.6g} weights (density {a.density:.6g} of "
                f"{len(a.tensors)} masked tensors) cannot keep their lower bounds (one entry per "
                f"output unit by default, or min_density), which need {need:.6g} (largest: "
                f"{named}); lower the sparsity, count it over the masked tensors "
                f"(sparsity_of='masked'), exclude small layers from the masks, lower the "
                f"min_density you gave, {_ALLOW}"
            )


class Floors:
    """The default floors of an updater's masks, installed in its solver, and the checks.

    Args:
        solver: the updater's solver (its ``floors`` are set here; its bounded solve enforces
            them).
        tensors: the allocatable masked tensors, as the policy sees them.
        index: the mask index (in ``solver.refs``) of each of ``tensors``.
        auto: whether each of ``tensors``' masks was left at ``min_density=None``.
    """

    def __init__(self, solver: AllocationSolver, tensors: Sequence[MaskedTensor],
                 index: Sequence[int], auto: Sequence[bool]) -> None:
        self.solver, self.tensors, self.index = solver, list(tensors), list(index)
        solver.floors = {i: floor_density(t)
                         for i, t, a in zip(index, tensors, auto, strict=True) if a}
        self.counts = {i: round(solver.floors[i] * grid_numel(t))
                       for i, t in zip(index, tensors, strict=True) if i in solver.floors}

    def check(self, allocations: Sequence[Allocation]) -> None:
        """:func:`check_floors` for these masks (explicit ``min_density`` values included)."""
        floors = self.solver.floors
        check_floors(self.tensors, [floors.get(i, 0.0) for i in self.index], allocations,
                     [self.solver.min_density(i, True) for i in self.index])

    def below(self, kept: Sequence[float]) -> bool:
        """Whether a mask keeps fewer entries than its floor (``kept``: per mask index)."""
        return any(kept[i] < k for i, k in self.counts.items())

    def bind(self, allocation: Allocation) -> bool:
        """Whether the floors can bind in ``allocation`` (a budget shared by several tensors)."""
        return len(allocation.tensors) > 1 and bool(self.counts)
