"""``DualAveraging``: the Spartan training step as a ``torch.optim.Optimizer`` wrapper.

It wraps any base optimizer and shares its ``param_groups`` and ``state``, so LR schedulers,
``GradScaler`` and checkpoints of the base optimizer work unchanged. ``step()`` runs
(docs/design.md, "One training step"):

1. the checks, before anything changes: the masks are still registered where they were, the
   schedules' values are numbers in range, the budget is feasible and the policy's allocations
   valid, and (after a ``closure`` has run) every masked weight and gradient is finite;
2. the base optimizer's step on the dense weights ``theta`` (the "dual" variables, whose
   gradients were taken at the sparse "primal" weights ``w``);
3. the mask update for the next step by a :class:`~torchspartan.MaskUpdater` at the density and
   sharpness of the schedules; at the start of fine-tuning (the last ``finetune_fraction`` of the
   steps) the masks freeze instead (``theta <- theta * m * h`` once, then masked training).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from torchspartan.policies import AllocationPolicy
from torchspartan.schedules import Schedule, linear
from torchspartan.update import MaskUpdater, StepRecord, check_record, finite_flags

__all__ = ["DualAveraging"]

_STATE_VERSION = 2


def _is_number(value: Any) -> bool:
    """A real number: Python or numpy (``np.float32(0.9)``), not a bool."""
    return isinstance(value, (int, float, numbers.Real)) and not isinstance(value, bool)


def _check_fraction(name: str, value: float, *, closed_right: bool = False) -> float:
    ok = _is_number(value) and (0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _schedule_value(what: str, value: Any, t: int) -> float:
    """A schedule's output as a float: Python or numpy numbers, or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if not _is_number(value):
        raise TypeError(f"the {what} schedule gave {value!r} at step {t}; a schedule must return "
                        f"a number")
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
            The masks freeze at the start of fine-tuning, so the default schedule must reach
            its target by the last step before the freeze (``anneal_fraction +
            finetune_fraction < 1``, up to rounding to whole steps). Otherwise the final
            sparsity would be short of ``sparsity``, and construction refuses. A custom
            ``density`` schedule that has not reached ``1 - sparsity`` by then gets a warning
            (the final sparsity follows the schedule).
        finetune_fraction: last fraction of steps trained with the mask frozen (0 disables).
        sparsity_of: ``"masked"`` (default) counts the sparsity over the masked tensors;
            ``"model"`` counts it over all model parameters, the masked tensors compensating for
            the unmasked ones (the paper's convention).
        check_finite: raise, naming the tensor, when a masked weight or its gradient holds
            NaN/Inf before the step (nothing is updated then; a closure is evaluated first).

    Numbers may be Python or numpy scalars (``np.float32(0.9)``) wherever a number is taken.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, ``model`` not a module.
        ValueError: sparsity outside ``[0, 1)``, ``total_steps < 1``, a model without
            SpartanMask, a masked weight missing from ``optimizer``, a SpartanMask that is not
            the first parametrization on its tensor (see :class:`~torchspartan.MaskUpdater` for
            the other checks of the masks), an unreachable ``"model"`` sparsity, a default
            density schedule that would not reach its target before the freeze, schedules
            giving bad values at step 0, or masked weights holding NaN/Inf. Nothing is changed
            then.

    ``step()`` is all or nothing up to the base optimizer: every check (the masks' bindings,
    the schedules' values, the budget and the policy's allocations, finite gradients and
    weights, after a ``closure`` has run) comes before anything changes. When the base
    optimizer itself makes a masked weight non-finite, the masks and the step counter stay as
    they were and the error says so; the weights and the base optimizer's state of that step are
    not restored (that would need a copy of both every step): reload the last checkpoint.

    ``copy.deepcopy`` copies the optimizer with its model (masks included); ``pickle`` and
    ``torch.save`` work too (schedules must be picklable: the built-in ones are, lambdas are
    not).

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        sparsity = _check_fraction("sparsity", sparsity)
        if isinstance(total_steps, bool) or not isinstance(
                total_steps, (int, numbers.Integral)) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        total_steps = int(total_steps)
        anneal_fraction = _check_fraction("anneal_fraction", anneal_fraction, closed_right=True)
        finetune_fraction = _check_fraction("finetune_fraction", finetune_fraction)
        if not (_is_number(beta_target) and beta_target > 0 and math.isfinite(beta_target)):
            raise ValueError(f"beta_target must be finite and > 0, got {beta_target!r}")
        beta_target = float(beta_target)
        for name, sched in (("density", density), ("beta", beta)):
            if sched is not None and not callable(sched):
                raise TypeError(f"{name} must be a schedule (a callable step -> value, e.g. "
                                f"ts.linear(...)), got {sched!r}")

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
        # the masks of the last update before the freeze are the final ones
        last_update = min(self.finetune_start - 1, total_steps)
        anneal_end = max(1, int(round(anneal_fraction * total_steps)))
        if density is None and anneal_end > last_update:
            final = 1.0 - (1.0 - (1.0 - sparsity)) * last_update / anneal_end
            raise ValueError(
                f"the density reaches its target {1 - sparsity:g} at step {anneal_end} "
                f"(anneal_fraction={anneal_fraction:g}), but the masks freeze at step "
                f"{self.finetune_start} (finetune_fraction={finetune_fraction:g} of "
                f"total_steps={total_steps}), so the final sparsity would be "
                f"{1 - final:.3g} instead of {sparsity:g}; use a smaller anneal_fraction (at "
                f"most {max(0, last_update) / total_steps:.3g} here), finetune_fraction=0, or "
                f"more total_steps"
            )
        self.density_schedule: Schedule = (
            density if density is not None else linear(1.0, 1.0 - sparsity, 0, anneal_end)
        )
        self.beta_schedule: Schedule = (
            beta if beta is not None
            else linear(1.0, beta_target, 0, max(1, min(self.finetune_start, total_steps)))
        )
        density_0, beta_0 = self._schedules(0)
        if density is not None:
            final_density, _ = self._schedules(max(0, last_update))
            if abs(final_density - (1.0 - sparsity)) > 1e-6:
                warnings.warn(
                    f"the density schedule gives {final_density:.6g} at step {last_update}, the "
                    f"last mask update before the freeze, but sparsity={sparsity:g} asks for "
                    f"{1 - sparsity:.6g}; the final sparsity follows the schedule",
                    UserWarning, stacklevel=2,
                )
        self.updater.validate(density_0, beta_0)
        self.updater.check_weights(0)
        self._step = 0
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
        density = _schedule_value("density", self.density_schedule(t), t)
        if not 0.0 < density <= 1.0:
            raise ValueError(
                f"the density schedule gave {density!r} at step {t}; densities must be numbers "
                f"in (0, 1]"
            )
        beta = _schedule_value("beta", self.beta_schedule(t), t)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"the beta schedule gave {beta!r} at step {t}; need a finite "
                             f"beta > 0")
        return density, beta

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Checks, the base optimizer step on the dense weights, then the mask update.

        Every check runs before anything changes: the masks are still where they were
        registered, the schedules' values and the budget are valid, and (after a ``closure`` has
        been evaluated, with gradients enabled) every masked weight and gradient is finite.
        When a check fails, nothing changed (the closure's gradients excepted).

        Raises:
            RuntimeError: the model was finalized, or a mask was removed since construction.
            TypeError / ValueError: a schedule's value, the budget, a non-finite gradient or
                weight (named; nothing changed), or a weight made non-finite by the base
                optimizer (the masks and the step counter are unchanged; reload a checkpoint).
        """
        self.updater.check_bindings()
        t = self._step + 1
        density, beta = self._schedules(t)
        frozen = self.updater.frozen
        freeze = t >= self.finetune_start and not frozen
        if not (freeze or frozen):
            self.updater.validate(density, beta)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite:
            self._check_finite()
        self.optimizer.step()
        try:
            if freeze or frozen:  # the masks no longer change: only the step and schedules move
                if self.check_finite:
                    self.updater.check_weights(t)  # before the fold into the weights
                if freeze:
                    self.updater.freeze()
                record = replace(
                    self.last_record, step=t, iterations=0, budget_error=0.0, mask_change=0.0,
                    target_density=min(1.0, self.updater.allocatable_density(density)),
                    beta=beta, frozen=True,
                )
            else:
                record = self.updater.update(density, beta, t)
        except Exception as e:
            raise self._failed_after_base_step(t, e) from e
        self._step = t
        self.last_record = record
        return loss

    def _failed_after_base_step(self, t: int, error: Exception) -> Exception:
        """The error to raise when the mask update failed after the base step."""
        with torch.no_grad():
            bad = [r.name for r in self.updater.refs
                   if not bool(torch.isfinite(r.theta).all())]
        if not bad:
            return error
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        before = ", from finite weights and gradients" if self.check_finite else ""
        return ValueError(
            f"{shown} became non-finite (NaN or Inf) in the base optimizer's step {t} "
            f"({type(self.optimizer).__name__}{before}). The masks and the step counter were left "
            f"as before "
            f"step {t}, but the weights and the base optimizer's state of this step are not "
            f"usable: reload the last checkpoint (model.state_dict() and opt.state_dict()), then "
            f"lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def _check_finite(self) -> None:
        """One host sync: every masked weight and gradient is free of NaN and Inf."""
        refs = self.updater.refs
        tensors = [r.theta.detach() for r in refs]
        grads = [r.theta.grad for r in refs]
        for r, g in zip(refs, grads, strict=True):
            if g is not None and g.layout != torch.strided:
                raise ValueError(f"{r.name} has a sparse gradient ({g.layout}); a masked "
                                 f"weight needs a dense one (e.g. nn.Embedding(sparse=False))")
        tensors += [g if g is not None else r.theta.detach() for r, g in zip(refs, grads,
                                                                               strict=True)]
        ok = finite_flags(tensors)
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

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the base optimizer and the Spartan step (load the model's state first).

        The whole state dict is checked first (the ``"spartan"`` entry with its version, and the
        base optimizer's parameter groups against this optimizer's), so a refused state dict
        changes nothing. A state dict without a ``"spartan"`` entry (a plain base-optimizer
        checkpoint) loads the base optimizer and keeps the current mask state, with a warning.
        Version 1 entries (release 0.1) load too.

        Raises:
            TypeError / ValueError: the state dict comes from a model with other masked tensors,
                from a newer release, does not match the base optimizer's parameter groups, is
                malformed, or the model's masks are not those of the checkpoint (load
                ``model.state_dict()`` of the same checkpoint first).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict (DualAveraging.state_dict()), got "
                            f"{type(state_dict).__name__}")
        state_dict = dict(state_dict)
        spartan = state_dict.pop("spartan", None)
        _check_base_state(self.optimizer, state_dict)
        if spartan is None:
            self.optimizer.load_state_dict(state_dict)
            warnings.warn(
                "state_dict has no 'spartan' entry (a base-optimizer checkpoint?); loaded the "
                "base optimizer only, the mask schedule restarts from the current step",
                stacklevel=2,
            )
            return
        if not isinstance(spartan, Mapping):
            raise ValueError(f"the 'spartan' entry must be a dict, got {type(spartan).__name__}")
        version = spartan.get("version")
        if version == 1:
            try:
                spartan = _from_version_1(dict(spartan))
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"malformed version-1 'spartan' entry (missing {e})") from None
        elif version != _STATE_VERSION:
            raise ValueError(
                f"the 'spartan' entry has state version {version!r}; this release reads versions "
                f"1 and {_STATE_VERSION}: load it with the torchspartan release that wrote it"
            )
        missing = {"step", "updater", "last_record"} - set(spartan)
        if missing:
            raise ValueError(f"malformed 'spartan' entry: missing {sorted(missing)}")
        step = spartan["step"]
        if isinstance(step, bool) or not isinstance(step, (int, numbers.Integral)) or step < 0:
            raise ValueError(f"malformed 'spartan' entry: step must be an integer >= 0, got "
                             f"{step!r}")
        record = check_record(spartan["last_record"])
        frozen = spartan.get("frozen", record.frozen)
        if not isinstance(frozen, bool):
            raise ValueError(f"malformed 'spartan' entry: frozen must be a bool, got {frozen!r}")
        parsed = self.updater.check_state(spartan["updater"])
        self._check_model_matches(record, frozen, version)
        self.optimizer.load_state_dict(state_dict)
        self.updater.apply_state(parsed)
        self._step = int(step)
        if frozen and not self.updater.frozen:  # a version-1 checkpoint: no 'frozen' buffers
            for r in self.updater.refs:
                r.mask.is_frozen = True
                r.mask.frozen.fill_(True)
        self.last_record = record

    def _check_model_matches(self, record: StepRecord, frozen: bool, version: Any) -> None:
        """The model's masks must be those the checkpoint was taken with."""
        flags = {bool(r.mask.is_frozen) for r in self.updater.refs}
        if len(flags) > 1:
            raise ValueError("the model's masks are partly frozen (a partial model state dict?); "
                             "load model.state_dict() of the checkpoint first")
        if version != 1 and flags != {frozen}:
            raise ValueError(
                f"the checkpoint's masks are {'' if frozen else 'not '}frozen but the model's "
                f"are{'' if flags == {True} else ' not'}: load model.state_dict() of the same "
                f"checkpoint before opt.load_state_dict()"
            )
        refs = self.updater.refs
        kept = torch.stack([r.mask.hard_mask.sum() for r in refs]).tolist()
        density = sum(k * r.mask.block_numel for k, r in zip(kept, refs, strict=True)) / (
            self.updater.masked_numel)
        if abs(density - record.density) > 1e-9:
            raise ValueError(
                f"the model's masks keep a fraction {density:.6g} of the masked weights, but "
                f"the checkpoint's last step kept {record.density:.6g}: load model.state_dict() "
                f"of the same checkpoint before opt.load_state_dict()"
            )

    # -- copies and pickles ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Everything (``torch.optim.Optimizer`` keeps only the base state): the model, the base
        optimizer, the schedules and the updater (which rebuilds its couplings when loaded)."""
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

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


def _check_base_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """The checks ``torch.optim.Optimizer.load_state_dict`` makes, before anything changes."""
    if set(state_dict) != {"state", "param_groups"}:
        raise ValueError(
            f"the base optimizer's state dict must have the keys 'state' and 'param_groups', got "
            f"{sorted(state_dict)}; pass DualAveraging.state_dict() (or the base optimizer's)"
        )
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        raise ValueError("malformed optimizer state dict: 'param_groups' must be a list and "
                         "'state' a dict")
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        raise ValueError(f"the state dict has {len(groups)} parameter groups, the optimizer "
                         f"{len(ours)}: it comes from another optimizer setup")
    ids = set()
    for k, (g, mine) in enumerate(zip(groups, ours, strict=True)):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), (list, tuple)):
            raise ValueError(f"malformed optimizer state dict: parameter group {k} has no "
                             f"'params' list")
        if len(g["params"]) != len(mine["params"]):
            raise ValueError(
                f"parameter group {k} of the state dict has {len(g['params'])} parameters, the "
                f"optimizer's {len(mine['params'])}: it comes from another model or optimizer"
            )
        ids.update(g["params"])
    unknown = [k for k in state if k not in ids]
    if unknown:
        raise ValueError(f"the state dict has state for parameters {unknown[:3]} that are in no "
                         f"parameter group")
