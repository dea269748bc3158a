"""Allocation policies: how a density turns the masked tensors into budgeted problems.

A policy is a small object with one job: given what it knows of the masked tensors
(:class:`MaskedTensor`) and the density of this step, return the :class:`Allocation` s, each a set
of tensors sharing one budget of ``density * their total cost`` (or, with ``group``, every row of
``group`` consecutive entries along the input dimension keeping ``density * group`` of them).
Every allocation is solved by the one engine (docs/design.md) as a soft and a hard top-k.

Costs are a separate choice, a :class:`CostModel` given to the policy: :class:`UnitCost`
(count weights) or :class:`FlopCost` (an entry costs the multiply-adds it causes per sample), so
for example ``ts.ERK(costs=ts.FlopCost(x))`` allocates ERK densities under a FLOP budget.

- :class:`Global`: one budget over all masked tensors (the paper's default).
- :class:`Uniform`: every tensor at the same density, each its own problem.
- :class:`ERK`: Erdos-Renyi-Kernel densities (Evci et al. 2020), capped at 1.
- :class:`NM`: N:M sparsity, ``n`` kept in every group of ``m`` consecutive input weights.

A custom policy subclasses :class:`AllocationPolicy` and overrides ``allocate``; the README shows
one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ERK",
    "NM",
    "Allocation",
    "AllocationPolicy",
    "CostModel",
    "CostSensitive",
    "FlopCost",
    "Global",
    "MaskedTensor",
    "Uniform",
    "UnitCost",
    "check_allocations",
    "normalise_costs",
]


@dataclass(frozen=True)
class MaskedTensor:
    """What a policy knows of one masked tensor.

    Attributes:
        name: qualified name, e.g. ``"layer1.0.conv1.weight"``.
        shape: the weight's shape.
        block: the mask's block shape, or ``None`` for an unstructured mask.
        unit_cost: cost of one weight entry under the policy's cost model (mean 1 over all
            masked weights).
        input_dim: the weight's input dimension: 1 for ``Linear``/``Conv`` (``out x in``), 0 for
            layers that store it ``in x out`` (transformers' ``Conv1D``, transposed convs).
    """

    name: str
    shape: tuple[int, ...]
    block: tuple[int, ...] | None = None
    unit_cost: float = 1.0
    input_dim: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cost(self) -> float:
        """Cost of the whole tensor: ``numel * unit_cost``."""
        return self.numel * self.unit_cost


@dataclass(frozen=True)
class Allocation:
    """One budgeted problem: ``tensors`` (indices into the policy's list) at ``density``.

    Without ``group`` the tensors share one budget of ``density * sum of their costs``; the most
    valuable entries anywhere among them are kept. With ``group = m``, every run of ``m``
    consecutive entries along dim 1 (the input dimension) of each tensor is its own problem with
    budget ``density * m`` (N:M sparsity).
    """

    tensors: tuple[int, ...]
    density: float
    group: int | None = None


class CostModel:
    """The cost of one weight entry of each masked tensor; the base class counts weights."""

    def unit_costs(self, model: nn.Module, modules: Sequence[nn.Module]) -> list[float]:
        """Raw cost of one entry of each masked tensor (``modules``: the owning modules)."""
        return [1.0] * len(modules)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UnitCost(CostModel):
    """Every weight costs 1: budgets count weights."""


@dataclass(eq=False)
class FlopCost(CostModel):
    """An entry costs the multiply-adds it causes per sample.

    Measured by one forward pass of ``example_input`` with hooks on the owning modules: a
    ``Conv{1,2,3}d`` weight entry costs the number of output positions (``H_out * W_out`` for 2-D),
    a ``ConvTranspose`` entry the number of input positions, a ``Linear`` (or transformers'
    ``Conv1D``) weight entry the number of tokens per sample (product of the output's middle
    dims, 1 for a ``(batch, features)`` output), anything else 1.

    Args:
        example_input: a tensor, or a tuple of positional arguments, with batch size >= 1.
    """

    example_input: torch.Tensor | tuple[Any, ...] = field(repr=False)

    def unit_costs(self, model: nn.Module, modules: Sequence[nn.Module]) -> list[float]:
        seen: dict[int, float] = {}

        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                seen[id(mod)] = float(math.prod(out.shape[2:]))
            elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else out
                seen[id(mod)] = float(math.prod(x.shape[2:]))
            elif isinstance(mod, nn.Linear) or "Conv1D" in {c.__name__ for c in type(mod).__mro__}:
                seen[id(mod)] = float(math.prod(out.shape[1:-1]))

        handles = [m.register_forward_hook(hook) for m in modules]
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
        return [seen.get(id(m), 1.0) for m in modules]

    def __repr__(self) -> str:
        return "FlopCost(...)"


class AllocationPolicy:
    """Base class of the policies: one budget over all tensors. Override :meth:`allocate`.

    Args:
        costs: the cost model (default :class:`UnitCost`).
    """

    def __init__(self, costs: CostModel | None = None) -> None:
        if costs is not None and not isinstance(costs, CostModel):
            raise TypeError(
                f"costs must be a ts.CostModel (ts.UnitCost() or ts.FlopCost(example_input)), "
                f"got {type(costs).__name__}"
            )
        self.costs: CostModel = costs if costs is not None else UnitCost()

    def allocate(self, tensors: Sequence[MaskedTensor], density: float) -> list[Allocation]:
        """The problems of one step: ``density`` is the kept fraction of the tensors' total cost."""
        return [Allocation(tuple(range(len(tensors))), density)]

    def check(self, tensors: Sequence[MaskedTensor], final_density: float) -> None:
        """Raise ``ValueError`` if the policy cannot serve these tensors at ``final_density``."""

    def __repr__(self) -> str:
        costs = "" if isinstance(self.costs, UnitCost) else f"costs={self.costs!r}"
        return f"{type(self).__name__}({costs})"


class Global(AllocationPolicy):
    """One budget over all masked tensors: the most valuable entries anywhere are kept."""


class CostSensitive(Global):
    """``Global`` under a FLOP budget: shorthand for ``ts.Global(costs=ts.FlopCost(x))``."""

    def __init__(self, example_input: torch.Tensor | tuple[Any, ...]) -> None:
        super().__init__(FlopCost(example_input))


class Uniform(AllocationPolicy):
    """Every masked tensor gets the same density, as independent problems."""

    def allocate(self, tensors: Sequence[MaskedTensor], density: float) -> list[Allocation]:
        return [Allocation((i,), density) for i in range(len(tensors))]


def capped_proportional(
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

    Scaled so that the kept cost matches the overall density (with :class:`FlopCost`, the kept
    FLOPs); tensors that would exceed density 1 stay dense and the rest is redistributed
    (Evci et al., "Rigging the Lottery", 2020).

    Args:
        power: exponent on the ERK score (1.0 is the original; 0 gives uniform).
        costs: the cost model (default :class:`UnitCost`).
    """

    def __init__(self, power: float = 1.0, *, costs: CostModel | None = None) -> None:
        super().__init__(costs)
        if isinstance(power, bool) or not (
                isinstance(power, (int, float, numbers.Real)) and power >= 0
                and math.isfinite(power)):
            raise ValueError(f"ERK power must be finite and >= 0, got {power!r}")
        self.power = float(power)

    def allocate(self, tensors: Sequence[MaskedTensor], density: float) -> list[Allocation]:
        scores = [(sum(t.shape) / math.prod(t.shape)) ** self.power for t in tensors]
        sizes = [t.cost for t in tensors]
        densities = capped_proportional(scores, sizes, density * sum(sizes))
        return [Allocation((i,), d) for i, d in enumerate(densities)]

    def __repr__(self) -> str:
        costs = "" if isinstance(self.costs, UnitCost) else f", costs={self.costs!r}"
        return f"ERK(power={self.power}{costs})"


class NM(AllocationPolicy):
    """N:M sparsity: ``n`` kept in every group of ``m`` consecutive weights along dim 1.

    Dim 1 is the input dimension of ``Linear`` (``out x in``) and ``Conv`` (``out x in x k...``)
    weights, the layout that 2:4 sparse kernels use. Every group is its own soft and hard top-k
    (solved together as one batched problem). While the density anneals from 1 to ``n / m`` each
    group keeps ``round(density * m)`` weights; at the target exactly ``n`` in every group, so
    ``ts.finalize`` leaves an exact N:M pattern.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group length (4 for 2:4 and 1:4).

    Raises:
        ValueError: bad ``n``/``m``; (when training) a tensor whose dim 1 is not a multiple of
            ``m``, a block mask, or a target density other than ``n / m``.
    """

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        ok = all(isinstance(x, (int, numbers.Integral)) and not isinstance(x, bool) for x in (n, m))
        if not (ok and 1 <= n < m):
            raise ValueError(f"NM(n, m) needs integers 1 <= n < m (e.g. NM(2, 4)), got {n!r}, "
                             f"{m!r}")
        self.n, self.m = int(n), int(m)

    def allocate(self, tensors: Sequence[MaskedTensor], density: float) -> list[Allocation]:
        return [Allocation((i,), density, group=self.m) for i in range(len(tensors))]

    def check(self, tensors: Sequence[MaskedTensor], final_density: float) -> None:
        for t in tensors:
            if t.input_dim != 1:
                raise ValueError(
                    f"{t.name} of shape {t.shape} stores its weight in x out (input along dim "
                    f"{t.input_dim}, e.g. transformers' Conv1D), but NM({self.n}, {self.m}) groups "
                    f"along dim 1, which would group outputs; exclude this tensor from the masks "
                    f"(or convert the layer to nn.Linear)"
                )
            if t.block is not None:
                raise ValueError(
                    f"{t.name}: NM({self.n}, {self.m}) groups single weights, but this mask has "
                    f"block={t.block}; register it without a block"
                )
            if len(t.shape) < 2 or t.shape[1] % self.m:
                raise ValueError(
                    f"{t.name} of shape {t.shape}: NM({self.n}, {self.m}) needs dim 1 (the input "
                    f"dimension) to be a multiple of {self.m}; exclude this tensor from the masks"
                )
        if abs(final_density - self.n / self.m) > 1e-9:
            raise ValueError(
                f"NM({self.n}, {self.m}) keeps {self.n} of every {self.m} weights, a density of "
                f"{self.n / self.m:g}, but the target density of the masked tensors is "
                f"{final_density:.6g}; use sparsity={1 - self.n / self.m:g} with "
                f"sparsity_of='masked'"
            )

    def __repr__(self) -> str:
        return f"NM({self.n}, {self.m})"


def normalise_costs(raw: Sequence[float], sizes: Sequence[int],
                    names: Sequence[str] | None = None) -> list[float]:
    """Scale costs so that their mean over all weight entries is 1.

    Raises:
        TypeError / ValueError: ``raw`` is not one finite number > 0 per tensor (the error names
            the tensor and the value, and says to fix the cost model).
    """
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(sizes))]
    fix = "fix the CostModel.unit_costs that produced them"
    try:
        raw = list(raw)
    except TypeError:
        raise TypeError(f"the cost model gave {raw!r}: unit_costs must return one number per "
                        f"masked tensor; {fix}") from None
    if len(raw) != len(sizes):
        raise ValueError(f"the cost model gave {len(raw)} costs for {len(sizes)} masked tensors; "
                         f"unit_costs must return one number per masked tensor; {fix}")
    costs: list[float] = []
    for name, c in zip(names, raw, strict=True):
        if isinstance(c, torch.Tensor) and c.numel() == 1:
            c = c.item()
        if isinstance(c, bool) or not isinstance(c, (int, float, numbers.Real)):
            raise TypeError(f"the cost model gave {c!r} for {name}: costs must be numbers; {fix}")
        if not (math.isfinite(c) and c > 0):
            raise ValueError(
                f"the cost model gave cost {c!r} for {name}: costs must be finite and > 0 (a zero "
                f"cost makes its weights free, so no budget could limit them); {fix}"
            )
        costs.append(float(c))
    total = math.fsum(c * n for c, n in zip(costs, sizes, strict=True))
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f"the cost model's costs {costs[:5]} overflow when summed over the "
                         f"weights; scale them down; {fix}")
    scale = sum(sizes) / total
    return [c * scale for c in costs]


def check_allocations(policy: AllocationPolicy, tensors: Sequence[MaskedTensor],
                      allocs: Any) -> list[Allocation]:
    """``policy.allocate``'s result for ``tensors``, checked and as plain Python numbers.

    Raises:
        TypeError / ValueError: not a list of :class:`Allocation`, a tensor index out of range or
            used twice, a tensor without a budget, a density outside ``[0, 1]``, or a group that
            the tensor's shape cannot take (each naming the policy and the allocation).
    """
    if isinstance(allocs, Allocation) or not isinstance(allocs, (list, tuple)):
        raise TypeError(f"{policy!r}.allocate must return a list of ts.Allocation, got "
                        f"{type(allocs).__name__}")
    n = len(tensors)
    seen: set[int] = set()
    for a in allocs:
        if not isinstance(a, Allocation):
            raise TypeError(f"{policy!r}.allocate must return ts.Allocation objects, "
                            f"got {type(a).__name__}")
        ok = isinstance(a.tensors, (list, tuple)) and all(
            isinstance(i, (int, numbers.Integral)) and not isinstance(i, bool)
            for i in a.tensors)
        bad = not ok or any(not (0 <= i < n) or i in seen for i in a.tensors)
        dens_ok = isinstance(a.density, (int, float, numbers.Real)) and 0.0 <= a.density <= 1.0
        if bad or not a.tensors or len(set(a.tensors)) < len(a.tensors) or not dens_ok:
            raise ValueError(
                f"{policy!r}.allocate returned {a!r}: tensor indices must be integers "
                f"in [0, {n}), each used once, density in [0, 1] (a number)"
            )
        if a.group is not None:
            _check_group(policy, tensors, a)
        seen.update(int(i) for i in a.tensors)
    if len(seen) != n:
        missing = [tensors[i].name for i in range(n) if i not in seen][:3]
        raise ValueError(f"{policy!r}.allocate left tensors without a budget: "
                         f"{missing}; every masked tensor needs one allocation")
    # plain Python numbers from here on (a policy may compute with numpy)
    return [Allocation(tuple(int(i) for i in a.tensors), float(a.density),
                       None if a.group is None else int(a.group)) for a in allocs]


def _check_group(policy: AllocationPolicy, tensors: Sequence[MaskedTensor], a: Allocation) -> None:
    g = a.group
    if isinstance(g, bool) or not isinstance(g, (int, numbers.Integral)) or g < 1:
        raise ValueError(f"{policy!r}.allocate returned {a!r}: group must be an integer "
                         f">= 1 (the N:M group length) or None")
    for i in a.tensors:
        t = tensors[i]
        if t.block is not None or len(t.shape) < 2 or t.shape[1] % g or t.input_dim != 1:
            raise ValueError(
                f"{policy!r}.allocate returned {a!r}, but {t.name} of shape {t.shape} "
                f"(block {t.block}, input dim {t.input_dim}) cannot be grouped by {g} along "
                f"dim 1: groups need an unstructured mask, input along dim 1, and dim 1 a "
                f"multiple of the group"
            )
