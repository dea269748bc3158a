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
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchspartan._checks import (
    check_finite_before,
    check_weights,
    failed_after_base_step,
    fraction,
    is_number,
    whole_number,
)
from torchspartan.budget import StepSkipped
from torchspartan.distributed import ORDER, is_sharded
from torchspartan.policies import AllocationPolicy
from torchspartan.schedules import Phases, Schedule, values_at
from torchspartan.state import (
    OPTIMIZER_STATE_VERSION,
    StepRecord,
    check_base_state,
    check_masks_match,
    parse_optimizer_entry,
)
from torchspartan.update import MaskUpdater

__all__ = ["DualAveraging", "WrappedOptimizer"]


class WrappedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs around a base optimizer and shares its data model:
    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own (also after it
    reloads), so LR schedulers, ``GradScaler`` and the base optimizer's checkpoints work
    unchanged. Subclasses call :meth:`wrap` first and define ``step``."""

    optimizer: torch.optim.Optimizer

    def wrap(self, optimizer: torch.optim.Optimizer) -> None:
        """Share ``optimizer``'s data model; give this wrapper its own (empty) hook tables."""
        self.optimizer = optimizer
        for attr in (
            "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, attr, OrderedDict())
        self._patch_step_function()

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    # -- copies and pickles ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Everything (``torch.optim.Optimizer`` keeps only the base state): the subclass's
        objects travel with the base optimizer."""
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()


class DualAveraging(WrappedOptimizer):
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

    On a GPU, give it a base optimizer that can skip its step on the device (``fused=True``:
    SGD, Adam, AdamW, Adagrad). ``torch.amp.GradScaler`` and the ``check_finite`` check then make
    no host read before the base step: the step's flag is read with the mask update's values,
    once per step, and a flagged step changes nothing, as GradScaler's own skip does.

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

    # the mask methods this optimizer trains; ts.TopKAST and ts.RigL (subclasses) train theirs
    methods: tuple[str, ...] = ("spartan", "gmp", "fixed")
    # whether a fused base optimizer may skip its step on the device (``_gate``); the
    # subclasses decide on the host (their own steps read the gradients)
    skips_on_device: ClassVar[bool] = True

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
        sparsity = fraction("sparsity", sparsity)
        total_steps = whole_number("total_steps", total_steps, 1)
        anneal_fraction = fraction("anneal_fraction", anneal_fraction, closed_right=True)
        finetune_fraction = fraction("finetune_fraction", finetune_fraction)
        if not (is_number(beta_target) and beta_target > 0 and math.isfinite(beta_target)):
            raise ValueError(f"beta_target must be finite and > 0, got {beta_target!r}")
        for name, sched in (("density", density), ("beta", beta)):
            if sched is not None and not callable(sched):
                raise TypeError(f"{name} must be a schedule (a callable step -> value, e.g. "
                                f"ts.linear(...)), got {sched!r}")

        self.wrap(optimizer)
        # GradScaler hands such an optimizer its scale and found_inf instead of reading them
        # (a host sync) and skipping the call: the step skips on the device (``_gate``)
        self._step_supports_amp_scaling = self.skips_on_device and bool(
            getattr(optimizer, "_step_supports_amp_scaling", False))
        self.model = model
        self.sparsity = sparsity
        self.total_steps = total_steps
        self.check_finite = check_finite
        self.updater = MaskUpdater(model, policy, sparsity_of=sparsity_of)
        self._check_methods()
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for r in self.updater.refs:
            if id(r.theta) not in in_opt:
                raise ValueError(
                    f"{r.name} is masked but its parameter is not in the wrapped optimizer; build "
                    f"the optimizer from model.parameters() after registering the masks"
                    + (f" and sharding the model ({ORDER})" if is_sharded(r.theta) else "")
                )
        self.updater.check_target(1.0 - sparsity)
        phases = Phases.plan(sparsity, total_steps, density, beta, float(beta_target),
                             anneal_fraction, finetune_fraction)
        self.finetune_start = phases.finetune_start
        self.density_schedule: Schedule = phases.density
        self.beta_schedule: Schedule = phases.beta
        density_0, beta_0 = self._schedules(0)
        self.updater.validate(density_0, beta_0)
        check_weights(self.updater.refs, 0)
        self._step = 0
        self.last_record: StepRecord = self._update_masks(0, density_0, beta_0)

    def _check_methods(self) -> None:
        """Refuse masks of a method another optimizer trains (named, with the fix)."""
        owner = {"topkast": "ts.TopKAST", "rigl": "ts.RigL", "spartan": "ts.DualAveraging",
                 "gmp": "ts.DualAveraging"}
        for r in self.updater.refs:
            if r.mask.method not in self.methods:
                raise ValueError(
                    f"{r.name} has a SpartanMask(method={r.mask.method!r}), which "
                    f"{type(self).__name__} does not train; build "
                    f"{owner.get(r.mask.method, 'the optimizer of that method')}(...) instead, or "
                    f"register masks of a method it trains ({', '.join(self.methods)})"
                )

    # -- what a method changes in the step (ts.TopKAST and ts.RigL override these) ----------
    def _update_masks(self, t: int, density: float, beta: float,
                      skip: torch.Tensor | None = None) -> StepRecord:
        """The mask update after base step ``t`` (``t = 0``: at construction); ``skip``: the
        step's device flag (``_gate``)."""
        return self.updater.update(density, beta, t, skip=skip)

    def _before_base_step(self, t: int) -> None:
        """Called after the checks of step ``t``, right before the base optimizer's step."""

    @property
    def policy(self) -> AllocationPolicy:
        return self.updater.policy

    @property
    def sparsity_of(self) -> str:
        return self.updater.sparsity_of

    # -- the optimizer protocol ------------------------------------------------------------
    def _schedules(self, t: int) -> tuple[float, float]:
        """The density and beta of step ``t``, validated."""
        return values_at(self.density_schedule, self.beta_schedule, t)

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
        try:
            return self._checked_step(closure)
        except BaseException:
            # GradScaler removes the scale and flag it set here only after a step that returns
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _checked_step(self, closure: Callable[[], float] | None) -> float | None:
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
        gate = self._gate()
        if gate is None:
            found = getattr(self, "found_inf", None)  # GradScaler's, read on the host
            if found is not None and float(found):
                return loss  # its skip: nothing changes
            if self.check_finite:
                check_finite_before(self.updater.refs, t)
        self._before_base_step(t)
        self._base_step(gate)
        try:
            if freeze or frozen:  # the masks no longer change: only the step and schedules move
                if gate is not None and float(gate):
                    raise StepSkipped()
                if self.check_finite:
                    check_weights(self.updater.refs, t)  # before the fold into the weights
                if freeze:
                    self.updater.freeze()
                record = replace(
                    self.last_record, step=t, iterations=0, budget_error=0.0, mask_change=0.0,
                    target_density=min(1.0, self.updater.budget.allocatable_density(density)),
                    beta=beta, frozen=True,
                )
            else:
                record = self._update_masks(t, density, beta, gate)
        except StepSkipped:
            self._skipped(t)
            return loss
        except Exception as e:
            raise failed_after_base_step(self.updater.refs, self.optimizer, t, e,
                                         self.check_finite) from e
        self._step = t
        self.last_record = record
        return loss

    # -- a step skipped on the device --------------------------------------------------------
    def _gate(self) -> torch.Tensor | None:
        """The step's skip flag on the device, or None when the step decides on the host.

        With a base optimizer that skips on the device (``fused=True``: SGD, Adam, AdamW,
        Adagrad), the flag is ``GradScaler``'s ``found_inf`` (set on this optimizer by
        ``GradScaler.step``) and, with ``check_finite``, whether a masked weight (without a
        scaler: or its gradient) holds NaN or Inf, from one multi-tensor max-norm (exact: it
        cannot overflow). The base step and the mask update skip on it; the flag is read with the
        update's own values (:meth:`MaskUpdater.update`), so the step waits for the device
        once, after everything is queued, instead of before the base step.

        The host decides at the first step (a skipped first fused SGD step would leave its
        momentum buffers uninitialised), for weights sharded over ranks or spread over devices,
        and for sparse gradients (refused by the host check, naming the tensor).
        """
        if not self._step_supports_amp_scaling or self._step == 0:
            return None
        found: torch.Tensor | None = getattr(self, "found_inf", None)
        if not self.check_finite:
            return found
        tensors = list(self.updater.solver.thetas)
        if found is None:
            grads = [t.grad for t in tensors]
            if any(g is None or g.layout != torch.strided for g in grads):
                return None
            tensors += grads  # type: ignore[arg-type]
        if len({t.device for t in tensors}) > 1 or any(is_sharded(t) for t in tensors):
            return None
        norms = torch._foreach_norm(tensors, math.inf)  # max |x|: exact in any dtype
        flag = torch.isfinite(torch.stack(norms)).all().logical_not().to(torch.float32)
        return flag if found is None else torch.maximum(flag, found.to(flag.device))

    def _base_step(self, gate: torch.Tensor | None) -> None:
        """The base optimizer's step, given GradScaler's scale (the fused step divides it out:
        GradScaler does not unscale for an optimizer that skips on the device) and the gate
        (skipped on the device when it is set)."""
        scale = getattr(self, "grad_scale", None)
        if gate is None and scale is None:
            self.optimizer.step()
            return
        base = self.optimizer
        base.grad_scale = scale  # type: ignore[attr-defined]
        base.found_inf = gate  # type: ignore[attr-defined]
        try:
            base.step()
        finally:
            del base.grad_scale, base.found_inf  # type: ignore[attr-defined]

    def _skipped(self, t: int) -> None:
        """After the gate skipped step ``t`` (nothing changed): raise, naming the tensor, when
        a masked weight or (without GradScaler) a gradient is not finite; else it was
        GradScaler's skip of a step with inf or NaN in the scaled gradients, as a GradScaler
        that reads ``found_inf`` on the host does it."""
        if getattr(self, "found_inf", None) is not None:
            if self.check_finite:
                check_weights(self.updater.refs, t)
            return
        check_finite_before(self.updater.refs, t)
        raise RuntimeError(f"step {t} was skipped on the device, but every masked weight and "
                           f"gradient is finite now; please report this with the model")

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"spartan"`` entry (plain numbers/strings).

        The masks themselves are buffers of the model (its ``state_dict``), so a run resumes
        exactly from ``model.state_dict()`` and this state dict together.
        """
        sd = self.optimizer.state_dict()
        sd["spartan"] = {
            "version": OPTIMIZER_STATE_VERSION,
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
        check_base_state(self.optimizer, state_dict)
        if spartan is None:
            self.optimizer.load_state_dict(state_dict)
            warnings.warn(
                "state_dict has no 'spartan' entry (a base-optimizer checkpoint?); loaded the "
                "base optimizer only, the mask schedule restarts from the current step",
                stacklevel=2,
            )
            return
        entry = parse_optimizer_entry(spartan)
        parsed = self.updater.check_state(entry.updater)
        refs = self.updater.refs
        kept = torch.stack([r.mask.hard_mask.sum() for r in refs]).tolist()
        check_masks_match(
            sum(k * r.mask.block_numel for k, r in zip(kept, refs, strict=True))
            / self.updater.masked_numel,
            [bool(r.mask.is_frozen) for r in refs], entry)
        self.optimizer.load_state_dict(state_dict)
        self.updater.apply_state(parsed)
        self._step = entry.step
        if entry.frozen and not self.updater.frozen:  # version 1: no 'frozen' buffers
            for r in refs:
                r.mask.is_frozen = True
                r.mask.frozen.fill_(True)
        self.last_record = entry.last_record

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
