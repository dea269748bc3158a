"""``DualAveraging``: the Spartan training step as a ``torch.optim.Optimizer`` wrapper.

It wraps any base optimizer and shares its ``param_groups`` and ``state``, so LR schedulers,
``GradScaler`` and checkpoints of the base optimizer work unchanged. ``step()`` runs
(docs/design.md, "One training step"):

1. the checks (finite gradients and weights, the schedules' values), before anything changes;
2. the base optimizer's step on the dense weights ``theta`` (the "dual" variables, whose
   gradients were taken at the sparse "primal" weights ``w``);
3. the mask update for the next step by a :class:`~torchspartan.MaskUpdater` at the density and
   sharpness of the schedules; at the start of fine-tuning (the last ``finetune_fraction`` of the
   steps) the masks freeze instead (``theta <- theta * m * h`` once, then masked training).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan.policies import AllocationPolicy
from torchspartan.schedules import Schedule, linear
from torchspartan.update import MaskUpdater, StepRecord

__all__ = ["DualAveraging"]

_STATE_VERSION = 2


def _check_fraction(name: str, value: float, *, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0)
    if not ok:
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
        policy: allocation policy (default :class:`~torchspartan.Global`; also
            :class:`~torchspartan.Uniform`, :class:`~torchspartan.ERK`, :class:`~torchspartan.NM`).
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
            NaN/Inf before the step (nothing is updated then; a closure is evaluated first).

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
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        anneal_fraction = _check_fraction("anneal_fraction", anneal_fraction, closed_right=True)
        finetune_fraction = _check_fraction("finetune_fraction", finetune_fraction)
        if not (isinstance(beta_target, (int, float)) and beta_target > 0
                and math.isfinite(beta_target)):
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
        self.check_finite = check_finite
        self.updater = MaskUpdater(model, policy, sparsity_of=sparsity_of)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for r in self.updater.refs:
            if id(r.theta) not in in_opt:
                raise ValueError(
                    f"{r.name} is masked but its parameter is not in the wrapped optimizer; build "
                    f"the optimizer from model.parameters() after registering the masks"
                )
        self.updater.check_target(1.0 - sparsity)
        self.finetune_start = (
            total_steps - int(round(finetune_fraction * total_steps))
            if finetune_fraction > 0 else total_steps + 1
        )
        anneal_end = max(1, int(round(anneal_fraction * total_steps)))
        self.density_schedule: Schedule = (
            density if density is not None else linear(1.0, 1.0 - sparsity, 0, anneal_end)
        )
        self.beta_schedule: Schedule = (
            beta if beta is not None
            else linear(1.0, beta_target, 0, max(1, min(self.finetune_start, total_steps)))
        )
        self._step = 0
        density_0, beta_0 = self._schedules(0)
        self.last_record: StepRecord = self.updater.update(density_0, beta_0, 0)

    @property
    def policy(self) -> AllocationPolicy:
        return self.updater.policy

    @property
    def sparsity_of(self) -> str:
        return self.updater.sparsity_of

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

    # -- the optimizer protocol ------------------------------------------------------------
    def _schedules(self, t: int) -> tuple[float, float]:
        """The density and beta of step ``t``, validated."""
        density = self.density_schedule(t)
        if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
            raise ValueError(
                f"the density schedule gave {density!r} at step {t}; densities must be numbers "
                f"in (0, 1]"
            )
        beta = self.beta_schedule(t)
        if not (isinstance(beta, (int, float)) and float(beta) > 0 and math.isfinite(beta)):
            raise ValueError(f"the beta schedule gave {beta!r} at step {t}; need beta > 0")
        return float(density), float(beta)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Checks, the base optimizer step on the dense weights, then the mask update.

        A ``closure`` is evaluated (with gradients enabled) before the checks, so that nothing
        changes when it produces a non-finite gradient.
        """
        refs = self.updater.refs
        if refs and not parametrize.is_parametrized(refs[0].module, refs[0].tensor_name):
            raise RuntimeError(
                "the model was finalized (ts.finalize); its masks are gone, so DualAveraging "
                "cannot step any more. Use a plain optimizer to keep training the sparse model."
            )
        t = self._step + 1
        freeze = t >= self.finetune_start and not self.updater.frozen
        density, beta = self._schedules(t)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite:
            self._check_finite()
        self.optimizer.step()
        self._step = t
        if freeze:
            self.updater.freeze()
        if self.updater.frozen:  # the masks no longer change: only the step and schedules move
            self.last_record = replace(
                self.last_record, step=t, iterations=0, budget_error=0.0, mask_change=0.0,
                target_density=min(1.0, self.updater.allocatable_density(density)),
                beta=beta, frozen=True,
            )
        else:
            self.last_record = self.updater.update(density, beta, t)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def _check_finite(self) -> None:
        """One host sync: the largest magnitude of every masked weight and gradient is finite
        (one multi-tensor op; NaN propagates through the maximum, which cannot overflow)."""
        refs = self.updater.refs
        tensors = [r.theta.detach() for r in refs]
        tensors += [r.theta.grad if r.theta.grad is not None else r.theta.detach() for r in refs]
        ok = torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).tolist()
        n = len(refs)
        for i, r in enumerate(refs):
            for what, good in (("weight", ok[i]), ("gradient", ok[n + i])):
                if not good:
                    raise ValueError(
                        f"{r.name} has a non-finite {what} (NaN or Inf) before step "
                        f"{self._step + 1}; nothing was updated. Lower the learning rate, clip "
                        f"gradients, or use torch.amp.GradScaler, which skips such steps"
                    )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"spartan"`` entry (plain numbers/strings).

        The masks themselves are buffers of the model (its ``state_dict``), so a run resumes
        exactly from ``model.state_dict()`` and this state dict together.
        """
        sd = self.optimizer.state_dict()
        sd["spartan"] = {
            "version": _STATE_VERSION,
            "step": self._step,
            "updater": self.updater.state_dict(),
            "last_record": self.last_record.__dict__.copy(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer and the Spartan step (load the model's state first).

        A state dict without a ``"spartan"`` entry (a plain base-optimizer checkpoint) loads the
        base optimizer and keeps the current mask state, with a warning. Version 1 entries
        (release 0.1) load too.

        Raises:
            ValueError: the state dict comes from a model with other masked tensors, or from a
                newer release.
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
        version = spartan.get("version")
        if version == 1:
            spartan = _from_version_1(spartan)
        elif version != _STATE_VERSION:
            raise ValueError(
                f"the 'spartan' entry has state version {version!r}; this release reads versions "
                f"1 and {_STATE_VERSION}: load it with the torchspartan release that wrote it"
            )
        record = StepRecord(**spartan["last_record"])
        frozen = bool(spartan.get("frozen", record.frozen))
        self.updater.load_state_dict(spartan["updater"])  # validates before changing anything
        self.optimizer.load_state_dict(state_dict)
        self._step = int(spartan["step"])
        if frozen and not self.updater.frozen:  # a version-1 checkpoint: no 'frozen' buffers
            for r in self.updater.refs:
                r.mask.is_frozen = True
                r.mask.frozen.fill_(True)
        self.last_record = record

    def __repr__(self) -> str:
        return (
            f"DualAveraging({type(self.optimizer).__name__}, sparsity={self.sparsity}, "
            f"total_steps={self.total_steps}, policy={self.policy!r}, "
            f"masked tensors={len(self.updater.refs)})"
        )

    @property
    def masked_names(self) -> list[str]:
        """Qualified names of the masked tensors, in the order the optimizer treats them."""
        return self.updater.names


def _from_version_1(spartan: dict[str, Any]) -> dict[str, Any]:
    """A release-0.1 ``"spartan"`` entry in the current layout."""
    return {
        "step": spartan["step"],
        "frozen": spartan["frozen"],
        "last_record": spartan["last_record"],
        "updater": {
            "layers": spartan["layers"],
            "couplings": [{"layers": p["layers"], "slope": p["total_slope"]}
                          for p in spartan.get("problems", []) if len(p["layers"]) > 1],
            "hints": spartan.get("hints", []),
            "last_record": spartan["last_record"],
        },
    }
