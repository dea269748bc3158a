"""``DualAveraging``: the Spartan training step as a ``torch.optim.Optimizer`` wrapper.

It wraps any base optimizer and shares its ``param_groups`` and ``state``, so LR schedulers,
``GradScaler`` and checkpoints of the base optimizer work unchanged. ``step()`` runs (design.md 3):

1. the base optimizer's step on the dense weights ``theta`` (the "dual" variables, whose
   gradients were taken at the sparse "primal" weights ``w``);
2. the mask update for the next step: density ``d_t`` and sharpness ``beta_t`` from the
   schedules, the allocation policy's problems, and for each problem the hard top-k masks ``h``
   and the threshold ``tau`` of the soft top-k ``m = sigmoid(beta * (u - tau))``, solved to the
   budget by a Newton iteration warm-started from the previous step;
3. at the start of fine-tuning (the last ``finetune_fraction`` of the steps), the mask freezes:
   ``theta <- theta * m * h`` once, then ordinary masked training.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan._select import select_top_budget
from torchspartan._solver import safeguarded_newton
from torchspartan.mask import (
    SpartanMask,
    _LayerSpec,
    _parametrized_masks,
    _SharedThreshold,
    block_mul,
    block_reduce,
    soft_mask,
)
from torchspartan.policies import (
    Allocation,
    AllocationPolicy,
    Global,
    LayerInfo,
    normalise_costs,
)
from torchspartan.schedules import Schedule, linear

__all__ = ["DualAveraging", "StepRecord"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class StepRecord:
    """What one mask update did, for logging (``DualAveraging.last_record``).

    Attributes:
        step: optimizer steps taken so far.
        density: kept fraction of the masked weights after this update (hard masks).
        target_density: the density the schedule asked of the masked tensors.
        beta: sharpness of the soft top-k at this step (before per-layer block scaling).
        iterations: Newton evaluations of the budget equation, summed over problems.
        budget_error: largest relative error of the soft budget over the problems.
        mask_change: fraction of masked weights whose hard mask changed at this update.
        frozen: whether the mask is frozen (fine-tuning phase).
    """

    step: int
    density: float
    target_density: float
    beta: float
    iterations: int
    budget_error: float
    mask_change: float
    frozen: bool


@dataclass
class _Layer:
    name: str
    module: nn.Module
    tensor_name: str
    mask: SpartanMask
    theta: torch.Tensor
    unit_cost: float = 1.0

    @property
    def entry_cost(self) -> float:
        """Cost of one block-grid entry (a block costs its size times the unit cost)."""
        return self.mask.block_numel * self.unit_cost


class _Problem:
    """Tensors sharing one soft top-k threshold ``tau`` at the current step."""

    def __init__(self, layers: list[_Layer], tau: float, total_slope: float) -> None:
        self.layers = layers
        self.tau = tau
        self.total_slope = total_slope  # S = sum_k c_k beta_k m_k (1 - m_k)
        self.iterations = 0
        self.budget_error = 0.0
        self._cache: tuple[Any, torch.Tensor] | None = None
        for layer in layers:
            layer.mask._problem = self

    @torch.compiler.disable
    def shared_threshold(self) -> torch.Tensor:
        """The autograd node carrying ``tau``; one per step, shared by all forward passes."""
        key = tuple(layer.theta._version for layer in self.layers) + tuple(
            layer.mask.threshold._version for layer in self.layers
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        specs: list[_LayerSpec] = [layer.mask.layer_spec() for layer in self.layers]
        tau = torch.tensor(self.tau, dtype=torch.float64, device=self.layers[0].theta.device)
        out = _SharedThreshold.apply(tau, self, specs, *[layer.theta for layer in self.layers])
        self._cache = (key, out)
        return out

    def release(self) -> None:
        self._cache = None
        for layer in self.layers:
            if layer.mask._problem is self:
                layer.mask._problem = None


def _check_fraction(name: str, value: float, *, closed_right: bool = False) -> float:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not (isinstance(value, (int, float)) and ok):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


class DualAveraging(torch.optim.Optimizer):
    """Spartan training around any optimizer: dense dual updates, sparse forward.

    Args:
        optimizer: the base optimizer (SGD, AdamW, ...) over the model's parameters, including
            every masked weight.
        model: the model holding the :class:`~torchspartan.SpartanMask` parametrizations.
        sparsity: target fraction of zeros, in ``[0, 1)``.
        total_steps: number of ``step()`` calls the run will make (schedules depend on it).
        policy: allocation policy (default :class:`~torchspartan.Global`).
        density: schedule ``step -> density`` of the masked tensors; default: linear from 1 to
            ``1 - sparsity`` over the first ``anneal_fraction`` of the steps.
        beta: schedule ``step -> beta``; default: linear from 1 to ``beta_target`` until the
            fine-tuning phase. Block masks multiply it by ``sqrt(block size)``.
        beta_target: final sharpness of the default beta schedule (paper: 10 for ResNet-50,
            20 for ViT-B/16).
        anneal_fraction: fraction of steps over which the default density schedule anneals.
        finetune_fraction: last fraction of steps trained with the mask frozen (0 disables).
        sparsity_of: ``"masked"`` (default) counts the sparsity over the masked tensors;
            ``"model"`` counts it over all model parameters, the masked tensors compensating for
            the unmasked ones (the paper's convention).
        check_finite: raise, naming the tensor, when a masked weight or its gradient holds
            NaN/Inf before the step (nothing is updated then).

    Raises:
        ValueError: sparsity outside ``[0, 1)``, ``total_steps < 1``, a model without
            SpartanMask, a masked weight missing from ``optimizer``, a SpartanMask that is not
            the first parametrization on its tensor, or an unreachable ``"model"`` sparsity.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 4))
        >>> _ = ts.sparsify(model)
        >>> opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model,
        ...                        sparsity=0.9, total_steps=10)
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 16)).square().mean().backward()
        ...     opt.step()
        >>> ts.finalize(model)
        >>> round(ts.sparsity_report(model).masked_sparsity, 3)
        0.9
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        sparsity: float,
        total_steps: int,
        *,
        policy: AllocationPolicy | None = None,
        density: Schedule | None = None,
        beta: Schedule | None = None,
        beta_target: float = 10.0,
        anneal_fraction: float = 0.2,
        finetune_fraction: float = 0.2,
        sparsity_of: Literal["masked", "model"] = "masked",
        check_finite: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.SGD(...)), got "
                f"{type(optimizer).__name__}"
            )
        sparsity = _check_fraction("sparsity", sparsity)
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        anneal_fraction = _check_fraction("anneal_fraction", anneal_fraction, closed_right=True)
        finetune_fraction = _check_fraction("finetune_fraction", finetune_fraction)
        if sparsity_of not in ("masked", "model"):
            raise ValueError(f"sparsity_of must be 'masked' or 'model', got {sparsity_of!r}")
        if not (beta_target > 0 and math.isfinite(beta_target)):
            raise ValueError(f"beta_target must be finite and > 0, got {beta_target!r}")

        # -- the torch.optim.Optimizer data model, shared with the base optimizer ---------
        self.optimizer = optimizer
        for attr in (
            "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, attr, OrderedDict())
        self._patch_step_function()

        self.model = model
        self.sparsity = sparsity
        self.total_steps = total_steps
        self.policy = policy if policy is not None else Global()
        self.sparsity_of = sparsity_of
        self.check_finite = check_finite
        self.finetune_start = (
            total_steps - int(round(finetune_fraction * total_steps))
            if finetune_fraction > 0 else total_steps + 1
        )
        anneal_end = max(1, int(round(anneal_fraction * total_steps)))

        self._layers = self._find_layers(model, optimizer)
        raw = self.policy.unit_costs(model, [(ly.name, ly.module) for ly in self._layers])
        costs = normalise_costs(raw, [ly.theta.numel() for ly in self._layers])
        for layer, c in zip(self._layers, costs, strict=True):
            layer.unit_cost = c
            layer.mask.cost.fill_(layer.entry_cost)
        self._alloc_idx = [i for i, ly in enumerate(self._layers) if ly.mask.method != "fixed"]
        self._infos = [
            LayerInfo(ly.name, tuple(ly.theta.shape), ly.theta.numel(), ly.unit_cost)
            for ly in (self._layers[i] for i in self._alloc_idx)
        ]
        self._masked_numel = sum(ly.theta.numel() for ly in self._layers)
        theta_ids = {id(ly.theta) for ly in self._layers}
        self._total_numel = sum(p.numel() for p in model.parameters())
        unmasked = sum(p.numel() for p in model.parameters() if id(p) not in theta_ids)
        self._fixed_kept = sum(
            float(ly.mask.hard_mask.sum()) * ly.mask.block_numel * ly.unit_cost
            for ly in self._layers if ly.mask.method == "fixed"
        )
        self._unmasked_numel = unmasked
        final = self._alloc_density(1.0 - sparsity)
        if not self._alloc_idx:
            raise ValueError("every SpartanMask of the model is method='fixed'; nothing to train")
        if final <= 0.0:
            raise ValueError(
                f"sparsity={sparsity} over the whole model ({self._total_numel} parameters, "
                f"{unmasked} of them unmasked) leaves no budget for the masked tensors; lower the "
                f"sparsity, mask more tensors, or use sparsity_of='masked'"
            )
        self.density_schedule: Schedule = (
            density if density is not None else linear(1.0, 1.0 - sparsity, 0, anneal_end)
        )
        self.beta_schedule: Schedule = (
            beta if beta is not None
            else linear(1.0, beta_target, 0, max(1, min(self.finetune_start, total_steps)))
        )
        self._step = 0
        self._frozen = False
        self._problems: list[_Problem] = []
        self._collapsed: set[str] = set()
        # the last two hard thresholds per problem: a linear extrapolation guesses the next one
        # (the selection is exact whatever the guess; a good one saves passes over the scores)
        self._hints: dict[tuple[int, ...], list[float]] = {}
        self.last_record: StepRecord  # written by every mask update, the first one just below
        self._update_masks()

    # param_groups, state and defaults are the base optimizer's own (also after it reloads)
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # -- discovery -------------------------------------------------------------------------
    @staticmethod
    def _find_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[_Layer]:
        found = _parametrized_masks(model)
        if not found:
            raise ValueError(
                "model has no SpartanMask; register one first, e.g. "
                "ts.sparsify(model) or parametrize.register_parametrization(layer, 'weight', "
                "ts.SpartanMask())"
            )
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        layers = []
        seen: set[int] = set()
        for qual, module, tensor_name, mask, pos in found:
            if pos != 0:
                raise ValueError(
                    f"{qual}: the SpartanMask is parametrization number {pos} on this tensor; it "
                    f"must be registered first (register other parametrizations after it)"
                )
            theta = module.parametrizations[tensor_name].original  # type: ignore[index,union-attr]
            if id(theta) not in in_opt:
                raise ValueError(
                    f"{qual} is masked but its parameter is not in the wrapped optimizer; build "
                    f"the optimizer from model.parameters() after registering the masks"
                )
            if id(mask) in seen:
                raise ValueError(f"{qual}: one SpartanMask instance is registered twice")
            seen.add(id(mask))
            layers.append(_Layer(qual, module, tensor_name, mask, theta))
        return layers

    def _alloc_density(self, density: float) -> float:
        """Density of the allocatable tensors (cost-weighted) giving ``density`` overall."""
        alloc_cost = sum(info.cost for info in self._infos)
        if self.sparsity_of == "model":
            kept = density * self._total_numel - self._unmasked_numel - self._fixed_kept
        else:
            kept = density * self._masked_numel - self._fixed_kept
        return kept / alloc_cost if alloc_cost > 0 else 1.0

    # -- the optimizer protocol ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Base optimizer step on the dense weights, then the mask update for the next step."""
        if self._layers and not parametrize.is_parametrized(
            self._layers[0].module, self._layers[0].tensor_name
        ):
            raise RuntimeError(
                "the model was finalized (ts.finalize); its masks are gone, so DualAveraging "
                "cannot step any more. Use a plain optimizer to keep training the sparse model."
            )
        if self.check_finite:
            self._check_finite()
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._step += 1
        self._update_masks()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def _check_finite(self) -> None:
        """One host sync: the sum of every masked weight and gradient is finite.

        A NaN/Inf entry makes its sum non-finite; a non-finite sum of finite entries (overflow)
        is told apart by the exact check that runs only then.
        """
        tensors = [ly.theta.detach() for ly in self._layers]
        tensors += [ly.theta.grad if ly.theta.grad is not None else ly.theta.detach()
                    for ly in self._layers]
        ok = torch.isfinite(torch.stack([t.sum() for t in tensors])).tolist()
        ok = [good or bool(torch.isfinite(t).all()) for good, t in zip(ok, tensors, strict=True)]
        n = len(self._layers)
        for i, layer in enumerate(self._layers):
            for what, good in (("weight", ok[i]), ("gradient", ok[n + i])):
                if not good:
                    raise ValueError(
                        f"{layer.name} has a non-finite {what} (NaN or Inf) before step "
                        f"{self._step + 1}; nothing was updated. Lower the learning rate, clip "
                        f"gradients, or use torch.amp.GradScaler, which skips such steps"
                    )

    # -- the mask update ---------------------------------------------------------------
    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Every sum over scores goes through here: the one place a sharded run all-reduces.

        Under DDP the weights are replicated, so local sums are already global.
        """
        return sums

    @torch.no_grad()
    def _update_masks(self) -> None:
        t = self._step
        if self._frozen:  # the masks no longer change: only the step and the schedules move
            self.last_record = replace(
                self.last_record, step=t, iterations=0, budget_error=0.0, mask_change=0.0,
                target_density=min(1.0, self._alloc_density(self.density_schedule(t))),
                beta=float(self.beta_schedule(t)),
            )
            return
        target = float(self.density_schedule(t))
        if not (0.0 < target <= 1.0):
            raise ValueError(
                f"the density schedule gave {target!r} at step {t}; densities must be in (0, 1]"
            )
        alloc_density = min(1.0, self._alloc_density(target))
        beta_t = float(self.beta_schedule(t))
        if not (beta_t > 0 and math.isfinite(beta_t)):
            raise ValueError(f"the beta schedule gave {beta_t!r} at step {t}; need beta > 0")
        old = [ly.mask.hard_mask for ly in self._layers]
        for p in self._problems:
            p.release()
        self._problems = []
        iterations, error = 0, 0.0
        if alloc_density >= 1.0:
            for i in self._alloc_idx:
                mask = self._layers[i].mask
                mask.hard_mask = torch.ones_like(mask.hard_mask)
                mask.set_soft(0.0)
        else:
            units = self._unit_values(self._alloc_idx)
            umax = self._largest_units(units, t)
            for alloc in self.policy.allocate(self._infos, alloc_density):
                idx = tuple(self._alloc_idx[j] for j in alloc.indices)
                it, err = self._solve_bounded(idx, alloc, units, umax, beta_t)
                iterations += it
                error = max(error, err)
        freeze = t >= self.finetune_start
        if freeze:
            self._fold()
        block = [ly.mask.block_numel for ly in self._layers]
        counts = torch.stack(
            [(ly.mask.hard_mask != o).sum() for ly, o in zip(self._layers, old, strict=True)]
            + [ly.mask.hard_mask.sum() for ly in self._layers]
        ).tolist()
        n = len(self._layers)
        changed = sum(c * b for c, b in zip(counts[:n], block, strict=True))
        kept = sum(c * b for c, b in zip(counts[n:], block, strict=True))
        for ly, c in zip(self._layers, counts[n:], strict=True):
            if c == 0 and ly.name not in self._collapsed:
                self._collapsed.add(ly.name)
                warnings.warn(
                    f"{ly.name}: every entry is pruned at step {t} (layer collapse), so the "
                    f"layer outputs only its bias; if that is not wanted, give its SpartanMask a "
                    f"min_density (e.g. ts.sparsify(..., min_density=0.01)) or use ts.ERK()",
                    stacklevel=3,
                )
        self.last_record = StepRecord(
            t, kept / self._masked_numel, alloc_density, beta_t, iterations, error,
            changed / self._masked_numel, self._frozen,
        )

    def _unit_values(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """``u = block_sum(|theta|) / entry_cost``, flattened, float32 (float64 for float64).

        Unstructured float32/float64 tensors go through one multi-tensor (foreach) call.
        """
        plain = [i for i in indices if self._layers[i].mask.block is None
                 and self._layers[i].theta.dtype in (torch.float32, torch.float64)]
        out: dict[int, torch.Tensor] = {}
        if plain:
            us = torch._foreach_abs([self._layers[i].theta.detach() for i in plain])
            torch._foreach_div_(us, [self._layers[i].entry_cost for i in plain])
            out.update({i: u.reshape(-1) for i, u in zip(plain, us, strict=True)})
        for i in indices:
            if i in out:
                continue
            layer = self._layers[i]
            v = block_reduce(layer.theta.detach().abs(), layer.mask.layer_spec().sizes)
            if v.dtype not in (torch.float32, torch.float64):
                v = v.float()
            out[i] = v.reshape(-1).div_(layer.entry_cost)
        return out

    def _largest_units(self, units: dict[int, torch.Tensor], t: int) -> dict[int, float]:
        """Largest unit value per tensor (one host sync); the one finiteness check of the
        weights the base step just wrote (NaN propagates through the maximum). A sharded run
        would all-reduce these with MAX, not through the sums of ``_reduce``."""
        order = list(units)
        umax = torch.stack([units[i].amax() for i in order]).double().tolist()
        for i, u in zip(order, umax, strict=True):
            if not math.isfinite(u):
                raise ValueError(
                    f"{self._layers[i].name} became non-finite (NaN or Inf) in the base "
                    f"optimizer's step {t}; lower the learning rate or clip gradients"
                )
        return dict(zip(order, umax, strict=True))

    def _solve_bounded(
        self, idx: tuple[int, ...], alloc: Allocation, units: dict[int, torch.Tensor],
        umax: dict[int, float], beta_t: float,
    ) -> tuple[int, float]:
        """Solve one allocation, fixing tensors that violate their density bounds."""
        free = list(idx)
        budget = alloc.density * sum(self._layers[i].theta.numel() * self._layers[i].unit_cost
                                     for i in idx)
        iterations, error = 0, 0.0
        for _ in range(len(idx) + 1):
            if len(free) == 1:
                layer = self._layers[free[0]]
                cap = layer.theta.numel() * layer.unit_cost
                lo, hi = layer.mask.min_density * cap, layer.mask.max_density * cap
                budget = min(max(budget, lo), hi)
            hard, its, err = self._solve(tuple(free), budget, units, umax, beta_t)
            iterations += its
            error = max(error, err)
            if all(self._layers[i].mask.min_density == 0.0
                   and self._layers[i].mask.max_density == 1.0 for i in free):
                break
            violators = []
            for i in free:
                layer = self._layers[i]
                d = float(hard[i].sum()) * layer.mask.block_numel / layer.theta.numel()
                if d < layer.mask.min_density - 1e-12:
                    violators.append((i, layer.mask.min_density))
                elif d > layer.mask.max_density + 1e-12:
                    violators.append((i, layer.mask.max_density))
            if not violators or len(free) == 1:
                break
            for i, bound in violators:
                layer = self._layers[i]
                cap = layer.theta.numel() * layer.unit_cost
                _, its, err = self._solve((i,), bound * cap, units, umax, beta_t)
                iterations += its
                error = max(error, err)
                budget -= bound * cap
                free.remove(i)
            budget = max(budget, 0.0)
        return iterations, error

    def _solve(
        self, idx: tuple[int, ...], budget: float, units: dict[int, torch.Tensor],
        umax: dict[int, float], beta_t: float,
    ) -> tuple[dict[int, torch.Tensor], int, float]:
        """Hard masks and soft threshold of one problem; writes the masks' buffers.

        Returns the hard masks by layer index, the Newton evaluations and the budget error.
        """
        layers = [self._layers[i] for i in idx]
        chunks = [units[i] for i in idx]
        costs = [ly.entry_cost for ly in layers]
        total = sum(c * u.numel() for c, u in zip(costs, chunks, strict=True))
        # drop problems solved earlier for these tensors (bounds re-solve)
        self._problems = [p for p in self._problems if not set(map(id, p.layers)) & set(
            map(id, layers))]
        if budget >= total * (1 - 1e-12) or budget <= 0:
            keep_all = budget > 0
            for ly in layers:
                ly.mask.hard_mask = torch.full_like(ly.mask.hard_mask, keep_all)
                ly.mask.set_soft(0.0)
            return {i: self._layers[i].mask.hard_mask for i in idx}, 0, 0.0
        past = self._hints.get(idx, [])
        hint = 2 * past[-1] - past[-2] if len(past) == 2 else (past[-1] if past else None)
        if hint is not None and not hint > 0:
            hint = past[-1]
        # unit values are >= 0 by construction and were checked finite by _largest_units
        masks, threshold = select_top_budget(chunks, costs, budget, hint, check=False)
        if math.isfinite(threshold):
            self._hints[idx] = (past + [threshold])[-2:]
        for ly, m in zip(layers, masks, strict=True):
            ly.mask.hard_mask = m.reshape(ly.mask.hard_mask.shape)
        betas = [beta_t * math.sqrt(ly.mask.block_numel) for ly in layers]
        if any(ly.mask.method == "spartan" for ly in layers):
            tau, slope, its, err = self._solve_soft(
                layers, chunks, [umax[i] for i in idx], costs, betas, budget, total)
            for ly, b in zip(layers, betas, strict=True):
                ly.mask.set_soft(b, tau)
            problem = _Problem(layers, tau, slope)
            problem.iterations, problem.budget_error = its, err
        else:
            for ly in layers:
                ly.mask.set_soft(0.0)
            problem = _Problem(layers, 0.0, 1.0)
            problem.iterations, problem.budget_error = 0, 0.0
        self._problems.append(problem)
        hard = {i: self._layers[i].mask.hard_mask for i in idx}
        return hard, problem.iterations, problem.budget_error

    def _solve_soft(
        self, layers: list[_Layer], chunks: list[torch.Tensor], umax: list[float],
        costs: list[float], betas: list[float], budget: float, total: float,
    ) -> tuple[float, float, int, float]:
        """Threshold ``tau`` with ``sum_l c_l sum sigmoid(beta_l (u - tau)) = budget``.

        Solved for ``x = -tau`` (increasing residual). Returns (tau, S, evaluations, error).
        """
        logit = math.log(budget / (total - budget))
        dev = chunks[0].device
        # u >= 0, so 0 bounds every minimum: a valid (slightly wider) bracket, one reduction less
        lo = min(logit / b - hi_ for b, hi_ in zip(betas, umax, strict=True))
        hi = max(logit / b for b in betas)
        prev = layers[0].mask  # warm start: last step's threshold, read from the buffers
        x0 = -float(prev.threshold) if prev.soft_active else 0.5 * (lo + hi)
        x0 = min(max(x0, lo), hi)
        cost_t = torch.tensor(costs, dtype=torch.float64, device=dev)
        slope_w = cost_t * torch.tensor(betas, dtype=torch.float64, device=dev)
        slope = [torch.zeros((), dtype=torch.float64, device=dev)]
        work: list[torch.Tensor] = []

        def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if dev.type == "cpu":  # float32 cascade sums and dot: the fastest passes on a CPU
                xf = float(x)
                parts = []
                if not work:  # one workspace per chunk, reused by every evaluation
                    work.extend(torch.empty_like(u) for u in chunks)
                for u, b, m in zip(chunks, betas, work, strict=True):
                    torch.sigmoid_(torch.add(u, xf, out=m).mul_(b))
                    parts.append(torch.stack([m.sum(), torch.dot(m, m)]))
                s1, s2 = torch.stack(parts).double().unbind(1)
            else:  # few kernel launches: multi-tensor ops
                zs = torch._foreach_add(chunks, x.to(chunks[0].dtype))
                torch._foreach_mul_(zs, betas)
                torch._foreach_sigmoid_(zs)
                s1 = torch.stack(torch._foreach_norm(zs, 1, dtype=torch.float64))  # sum m
                s2 = torch.stack(torch._foreach_norm(zs, 2, dtype=torch.float64)).square()
            sums = self._reduce(torch.stack([(cost_t * s1).sum(), (slope_w * (s1 - s2)).sum()]))
            slope[0] = sums[1]
            return sums[0] - budget, sums[1]

        x = torch.tensor(x0, dtype=torch.float64, device=dev)
        target = torch.tensor(budget, dtype=torch.float64, device=dev)
        x, f, evaluations = safeguarded_newton(
            evaluate, x, torch.tensor(lo, dtype=torch.float64, device=dev),
            torch.tensor(hi, dtype=torch.float64, device=dev), target, 1e-6, 100,
        )
        tau, s_total, err = torch.stack([-x, slope[0], f.abs() / budget]).tolist()
        return tau, s_total, evaluations, err

    def _fold(self) -> None:
        """Freeze the masks: ``theta <- theta * m * h`` once, then masked training."""
        for ly in self._layers:
            spec = ly.mask.layer_spec()
            if spec.method == "spartan" and spec.soft:
                factor = soft_mask(ly.theta, spec).mul_(spec.hard)
            else:
                factor = spec.hard
            ly.theta.copy_(block_mul(ly.theta, factor, spec.sizes))
            ly.mask.set_soft(0.0)
            ly.mask.frozen = True
        for p in self._problems:
            p.release()
        self._problems = []
        self._frozen = True

    # -- state ---------------------------------------------------------------------------
    def _fingerprint(self) -> list[list[Any]]:
        return [[ly.name, list(ly.theta.shape), ly.mask.method] for ly in self._layers]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"spartan"`` entry (plain numbers/strings).

        The masks themselves are buffers of the model (its ``state_dict``), so a run resumes
        exactly from ``model.state_dict()`` and this state dict together.
        """
        sd = self.optimizer.state_dict()
        index = {id(ly.mask): i for i, ly in enumerate(self._layers)}
        sd["spartan"] = {
            "version": _STATE_VERSION,
            "step": self._step,
            "frozen": self._frozen,
            "layers": self._fingerprint(),
            "problems": [
                {"layers": [index[id(ly.mask)] for ly in p.layers], "tau": p.tau,
                 "total_slope": p.total_slope}
                for p in self._problems
            ],
            "hints": [[list(k), v] for k, v in self._hints.items()],
            "last_record": asdict(self.last_record),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer and the Spartan step, frozen flag and thresholds.

        A state dict without a ``"spartan"`` entry (a plain base-optimizer checkpoint) loads the
        base optimizer and keeps the current mask state, with a warning.

        Raises:
            ValueError: the state dict comes from a model with other masked tensors.
        """
        state_dict = dict(state_dict)
        spartan = state_dict.pop("spartan", None)
        if spartan is None:
            warnings.warn(
                "state_dict has no 'spartan' entry (a base-optimizer checkpoint?); loaded the "
                "base optimizer only, the mask schedule restarts from the current step",
                stacklevel=2,
            )
            self.optimizer.load_state_dict(state_dict)
            return
        mine = self._fingerprint()
        theirs = [list(x) for x in spartan["layers"]]
        if theirs != mine:
            diff = next(
                (f"{a} vs {b}" for a, b in zip(theirs, mine, strict=False) if a != b),
                f"{len(theirs)} masked tensors vs {len(mine)}",
            )
            raise ValueError(
                f"this state_dict comes from a different model: its masked tensors differ "
                f"({diff}); load it into the model it was saved from"
            )
        self.optimizer.load_state_dict(state_dict)
        self._step = int(spartan["step"])
        self._frozen = bool(spartan["frozen"])
        for p in self._problems:
            p.release()
        self._problems = []
        for ly in self._layers:
            ly.mask.frozen = self._frozen
        for entry in spartan["problems"]:
            layers = [self._layers[i] for i in entry["layers"]]
            self._problems.append(_Problem(layers, float(entry["tau"]),
                                           float(entry["total_slope"])))
        self._hints = {
            tuple(k): [float(x) for x in (v if isinstance(v, list) else [v])]
            for k, v in spartan.get("hints", [])
        }
        if spartan.get("last_record"):
            self.last_record = StepRecord(**spartan["last_record"])

    def __repr__(self) -> str:
        return (
            f"DualAveraging({type(self.optimizer).__name__}, sparsity={self.sparsity}, "
            f"total_steps={self.total_steps}, policy={self.policy!r}, "
            f"masked tensors={len(self._layers)})"
        )

    @property
    def masked_names(self) -> list[str]:
        """Qualified names of the masked tensors, in the order the optimizer treats them."""
        return [ly.name for ly in self._layers]

