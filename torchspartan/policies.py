"""Allocation policies: how a sparsity budget is split over the masked tensors (design.md 4).

A policy is a small object with one job: given the masked tensors and the overall density of
this step, say which tensors share one budget (an allocation problem, solved as one soft and
one hard top-k) and at which density. ``DualAveraging`` then enforces each mask's
``min_density``/``max_density`` by fixing violators at their bound and re-solving the rest.

- :class:`Global`: one budget over all masked tensors (the paper's default).
- :class:`Uniform`: every tensor at the same density, each its own problem.
- :class:`ERK`: Erdos-Renyi-Kernel densities (Evci et al. 2020), capped at 1.
- :class:`CostSensitive`: global, with entries costed by the multiply-adds they cause per
  sample (FLOPs), so the budget is on compute rather than on count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ERK", "AllocationPolicy", "CostSensitive", "Global", "LayerInfo", "Uniform"]


@dataclass(frozen=True)
class LayerInfo:
    """What a policy knows of one masked tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    unit_cost: float  # cost of one weight entry (1 unless cost-sensitive)

    @property
    def cost(self) -> float:
        return self.numel * self.unit_cost


@dataclass(frozen=True)
class Allocation:
    """One allocation problem: these tensors share a budget of ``density * sum(costs)``."""

    indices: tuple[int, ...]
    density: float


class AllocationPolicy:
    """Base class: global allocation with unit costs. Override ``allocate``/``unit_costs``."""

    def unit_costs(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> list[float]:
        """Cost of one weight entry of each masked tensor (``layers``: (name, owning module))."""
        return [1.0] * len(layers)

    def allocate(self, layers: Sequence[LayerInfo], density: float) -> list[Allocation]:
        return [Allocation(tuple(range(len(layers))), density)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Global(AllocationPolicy):
    """One budget over all masked tensors: the most important entries anywhere are kept."""


class Uniform(AllocationPolicy):
    """Every masked tensor gets the same density, as independent problems."""

    def allocate(self, layers: Sequence[LayerInfo], density: float) -> list[Allocation]:
        return [Allocation((i,), density) for i in range(len(layers))]


def _capped_proportional(
    weights: Sequence[float], sizes: Sequence[float], kept: float
) -> list[float]:
    """Densities ``min(1, eps * w_i)`` with ``sum(d_i n_i) = kept``, capping and redistributing."""
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in dense]
        rest = kept - sum(sizes[i] for i in dense)
        denom = sum(weights[i] * sizes[i] for i in free)
        eps = rest / denom if denom > 0 else 0.0
        over = [i for i in free if eps * weights[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * weights[i] for i in range(len(sizes))]
        dense.update(over)


class ERK(AllocationPolicy):
    """Erdos-Renyi-Kernel: density of a tensor proportional to ``sum(dims) / prod(dims)``.

    Scaled so the total matches the overall density; tensors that would exceed density 1 are
    kept dense and the remainder is redistributed (Evci et al., "Rigging the Lottery", 2020).

    Args:
        power: exponent on the ERK score (1.0 is the original; 0 gives uniform).
    """

    def __init__(self, power: float = 1.0) -> None:
        if not (power >= 0 and math.isfinite(power)):
            raise ValueError(f"ERK power must be finite and >= 0, got {power!r}")
        self.power = float(power)

    def allocate(self, layers: Sequence[LayerInfo], density: float) -> list[Allocation]:
        scores = [(sum(li.shape) / math.prod(li.shape)) ** self.power for li in layers]
        sizes = [float(li.numel) for li in layers]
        densities = _capped_proportional(scores, sizes, density * sum(sizes))
        return [Allocation((i,), d) for i, d in enumerate(densities)]

    def __repr__(self) -> str:
        return f"ERK(power={self.power})"


class CostSensitive(AllocationPolicy):
    """Global allocation with a FLOP budget: an entry costs the multiply-adds it causes.

    Costs come from one forward pass of ``example_input`` with hooks on the owning modules: a
    ``Conv{1,2,3}d`` weight entry costs the number of output positions (``H_out * W_out`` for 2-D),
    a ``Linear`` weight entry the number of tokens per sample (product of the output's middle
    dims, 1 for a ``(batch, features)`` output), anything else 1. Costs are normalised to mean 1
    per weight, and the density then means the kept fraction of those FLOPs.

    Args:
        example_input: a tensor, or a tuple of positional arguments, with batch size >= 1.
    """

    def __init__(self, example_input: torch.Tensor | tuple[Any, ...]) -> None:
        self.example_input = example_input

    def unit_costs(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> list[float]:
        seen: dict[int, float] = {}

        def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                seen[id(mod)] = float(math.prod(out.shape[2:]))
            elif isinstance(mod, nn.Linear):
                seen[id(mod)] = float(math.prod(out.shape[1:-1]))

        handles = [m.register_forward_hook(hook) for _, m in layers]
        was_training = model.training
        try:
            model.eval()
            args = self.example_input if isinstance(self.example_input, tuple) else (
                self.example_input,)
            with torch.no_grad():
                model(*args)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        raw = [seen.get(id(m), 1.0) for _, m in layers]
        return raw

    def __repr__(self) -> str:
        return "CostSensitive(...)"


def normalise_costs(raw: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Scale costs so that their mean over all weight entries is 1."""
    total = sum(c * n for c, n in zip(raw, sizes, strict=True))
    scale = sum(sizes) / total
    return [c * scale for c in raw]
