"""Checks of numbers and of the masked weights, shared by the training-step modules.

Each raises an error that names the value and what it must be; none changes anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from torchspartan.distributed import is_sharded, sharded_finite_flags
from torchspartan.sparsify import MaskRef

__all__ = [
    "check_finite_before",
    "check_weights",
    "failed_after_base_step",
    "finite_flags",
    "finite_number",
    "fraction",
    "is_number",
    "schedule_value",
    "whole_number",
]


def is_number(value: Any) -> bool:
    """A real number: Python or numpy (``np.float32(0.9)``), not a bool."""
    return isinstance(value, (int, float, numbers.Real)) and not isinstance(value, bool)


def finite_number(name: str, value: Any) -> float:
    """``value`` as a finite float (Python or numpy numbers, one-element float tensors)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def fraction(name: str, value: Any, *, closed_right: bool = False) -> float:
    """``value`` as a float in ``[0, 1)`` (``[0, 1]`` with ``closed_right``)."""
    ok = is_number(value) and (0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def whole_number(name: str, value: Any, low: int) -> int:
    """``value`` as an int ``>= low`` (Python or numpy integers, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, numbers.Integral)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def schedule_value(what: str, value: Any, t: int) -> float:
    """A schedule's output as a float: Python or numpy numbers, or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if not is_number(value):
        raise TypeError(f"the {what} schedule gave {value!r} at step {t}; a schedule must return "
                        f"a number")
    return float(value)


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is free of NaN and Inf, with one host sync.

    One multi-tensor 2-norm (NaN and Inf propagate into it; on a CPU it is as fast as a sum,
    where the max-norm is several times slower); a finite tensor whose norm overflows is told
    apart by an exact check that runs only then.
    """
    if any(is_sharded(t) for t in tensors):  # FSDP2 shards: every rank gets the same flags
        return sharded_finite_flags(tensors)
    with torch.no_grad():
        ok = torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2))).tolist()
    return [good or bool(torch.isfinite(t).all()) for good, t in zip(ok, tensors, strict=True)]


# -- the masked weights and gradients --------------------------------------------------------
def check_weights(refs: Sequence[MaskRef], step: int = 0) -> None:
    """Raise ``ValueError`` naming the first masked weight holding NaN/Inf (one host sync)."""
    ok = finite_flags([r.theta for r in refs])
    for r, good in zip(refs, ok, strict=True):
        if not good:
            raise ValueError(
                f"{r.name} holds NaN or Inf at step {step}; the masks were not updated. "
                f"Lower the learning rate or clip gradients"
            )


def check_finite_before(refs: Sequence[MaskRef], t: int) -> None:
    """One host sync: every masked weight and gradient is free of NaN and Inf before step ``t``.

    Raises:
        ValueError: naming the first tensor with a sparse or non-finite gradient, or a
            non-finite weight.
    """
    tensors = [r.theta for r in refs]
    grads = [r.theta.grad for r in refs]
    for r, g in zip(refs, grads, strict=True):
        if g is not None and g.layout != torch.strided:
            raise ValueError(f"{r.name} has a sparse gradient ({g.layout}); a masked "
                             f"weight needs a dense one (e.g. nn.Embedding(sparse=False))")
    tensors += [g if g is not None else r.theta for r, g in zip(refs, grads, strict=True)]
    ok = finite_flags(tensors)
    n = len(refs)
    for i, r in enumerate(refs):
        for what, good in (("weight", ok[i]), ("gradient", ok[n + i])):
            if not good:
                raise ValueError(
                    f"{r.name} has a non-finite {what} (NaN or Inf) before step {t}; nothing "
                    f"was updated. Lower the learning rate, clip gradients, or use "
                    f"torch.amp.GradScaler, which skips such steps"
                )


def failed_after_base_step(refs: Sequence[MaskRef], optimizer: torch.optim.Optimizer, t: int,
                           error: Exception, checked: bool) -> Exception:
    """The error to raise when the mask update failed after the base step ``t``: ``error``,
    unless the base step made masked weights non-finite (then one that says so)."""
    with torch.no_grad():
        flags = finite_flags([r.theta for r in refs])  # sharded weights: the same on every rank
    bad = [r.name for r, good in zip(refs, flags, strict=True) if not good]
    if not bad:
        return error
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    before = ", from finite weights and gradients" if checked else ""
    return ValueError(
        f"{shown} became non-finite (NaN or Inf) in the base optimizer's step {t} "
        f"({type(optimizer).__name__}{before}). The masks and the step counter were left as "
        f"before step {t}, but the weights and the base optimizer's state of this step are not "
        f"usable: reload the last checkpoint (model.state_dict() and opt.state_dict()), then "
        f"lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_)"
    )
