"""The masked weight of one layer, forward and backward (docs/design.md, "One training step").

``w = theta * m * h`` with the soft mask ``m = sigmoid(beta * (u - tau))`` of the unit values
``u = block_sum(|theta|) / cost`` and the hard mask ``h``; the backward is straight-through ``h``
and exact through ``m``. What is exact depends on where the threshold's budget lives:

- ``scope="local"``: the mask's segments are its own (the whole tensor under Uniform/ERK, or every
  N:M row); the budget term ``-c Lambda`` is added here, per segment;
- ``scope="shared"``: the segment spans several tensors; the backward returns ``dL/dtau`` and the
  segment's coupling node (``coupling.py``) adds the cross-tensor term;
- ``scope="none"``: ``tau`` is treated as a constant (a mask not bound to an update).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchspartan._blocks import block_mul, block_reduce, from_rows, interleaved, to_rows

__all__ = ["MaskSpec", "MaskedWeight", "soft_mask"]

Scope = Literal["local", "shared", "none"]


@dataclass
class MaskSpec:
    """Everything the weight function needs for one layer at one step (no big tensors copied)."""

    method: str  # "spartan", "topkast", "rigl", "gmp" or "masked" (fine-tuning / fixed)
    sizes: tuple[int, ...]  # block sizes per dim (all 1: unstructured)
    hard: torch.Tensor  # bool, block-grid shape
    beta: torch.Tensor  # 0-dim float64
    cost: torch.Tensor  # 0-dim float64; cost of one block-grid entry
    soft: bool  # beta > 0, a Python flag (no host sync, a stable compile guard)
    tau: torch.Tensor  # float64 threshold: 0-dim, or one per row of ``group`` entries
    group: int | None  # N:M group length (rows of the problem view), or None
    scope: Scope = "none"
    backward: torch.Tensor | None = None  # Top-KAST: the backward set B (bool, block grid)
    grad_sink: Callable[[torch.Tensor], None] | None = None  # RigL: receives dL/dw

    @property
    def plain(self) -> bool:
        """Unstructured and one threshold: the fused in-place paths apply."""
        return self.group is None and all(s == 1 for s in self.sizes)


def _tau_view(spec: MaskSpec, tau: torch.Tensor) -> torch.Tensor:
    return tau.unsqueeze(-1) if spec.group is not None else tau


def _group_view(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """A contiguous grid ``x`` with its N:M groups along dim 1 as ``(d0, d1/g, g, d2, ...)``
    (``(n/g, g)`` in 1-D), a view, and the dim of a group's entries: the rows of
    :func:`to_rows` without a permuted copy."""
    if x.dim() == 1:
        return x.view(-1, group), 1
    return x.view(x.shape[0], x.shape[1] // group, group, *x.shape[2:]), 2


def _tau_groups(tau: torch.Tensor, shape: Sequence[int], group: int) -> torch.Tensor:
    """``tau``, one per row of :func:`to_rows` of a grid of ``shape``, as a view that
    broadcasts against :func:`_group_view` of that grid."""
    if len(shape) == 1:
        return tau.view(-1, 1)
    return tau.view(shape[0], *shape[2:], shape[1] // group).movedim(-1, 1).unsqueeze(2)


@torch.no_grad()
def soft_mask(theta: torch.Tensor, spec: MaskSpec, tau: torch.Tensor | None = None) -> torch.Tensor:
    """``sigmoid(beta * (block_sum|theta| / cost - tau))`` in float32/64, block-grid shape
    (no autograd history: computed without the ``detach`` op per call)."""
    tau = spec.tau if tau is None else tau
    v = block_reduce(theta.abs(), spec.sizes)
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    if spec.group is None:
        # the same rounding as the batched path of coupling.py: |theta| * (beta/c) - beta*tau
        z = torch.mul(v, (spec.beta / spec.cost).to(v.dtype), out=v)
        return torch.sigmoid_(z.add_((-spec.beta * tau).to(v.dtype)))
    if v.is_contiguous():  # the groups in the weight's own layout
        rows, tau_rows = _group_view(v, spec.group)[0], _tau_groups(tau, v.shape, spec.group)
    else:
        rows, tau_rows = to_rows(v, spec.group), _tau_view(spec, tau)
    z = torch.sigmoid_((rows / spec.cost - tau_rows).mul_(spec.beta).to(v.dtype))
    return z.view(v.shape) if v.is_contiguous() else from_rows(z, v.shape, spec.group)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den = 0``."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.zeros_like(num))


def _subtract_segment_mean(ga: torch.Tensor, a: torch.Tensor, spec: MaskSpec) -> None:
    """``ga -= a * Lambda`` in place, ``Lambda = sum(ga) / sum(a)`` per segment (0 where
    ``sum(a) = 0``): the whole tensor, or every N:M group (summed over one dim of a view when
    both are contiguous, else over the rows of a permuted copy)."""
    if spec.group is None:
        ga.sub_(a * _ratio(ga.sum(), a.sum()))
    elif ga.is_contiguous() and a.is_contiguous():
        (g, dim), a_g = _group_view(ga, spec.group), _group_view(a, spec.group)[0]
        g.sub_(a_g * _ratio(g.sum(dim, keepdim=True), a_g.sum(dim, keepdim=True)))
    else:
        lam = _ratio(to_rows(ga, spec.group).sum(-1, keepdim=True),
                     to_rows(a, spec.group).sum(-1, keepdim=True))
        ga.sub_(a * from_rows(lam.expand(-1, spec.group), list(a.shape), spec.group))


class MaskedWeight(torch.autograd.Function):
    """``w = theta * m * h`` with the backward of the method; returns ``dL/dtau`` too when the
    threshold is shared (``scope="shared"``)."""

    @staticmethod
    def forward(
        ctx: Any, theta: torch.Tensor, tau: torch.Tensor | None, spec: MaskSpec
    ) -> torch.Tensor:
        ctx.spec = spec
        ctx.save_for_backward(theta)
        if spec.method == "spartan" and spec.soft:
            m = soft_mask(theta, spec)
            if spec.plain and theta.dtype in (torch.float32, torch.float64):
                return m.mul_(spec.hard).mul_(theta)  # in place: 5 passes, no extra temporary
            return block_mul(theta, m.mul_(spec.hard), spec.sizes).to(theta.dtype)
        return block_mul(theta, spec.hard, spec.sizes)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (theta,) = ctx.saved_tensors
        spec: MaskSpec = ctx.spec
        if not (spec.method == "spartan" and spec.soft):
            if spec.grad_sink is not None:
                spec.grad_sink(grad)  # the dense gradient dL/d(theta * h), for RigL's growth
            if spec.method == "topkast":  # gradients reach the backward set B only
                if spec.backward is None:
                    return grad, None, None
                return block_mul(grad, spec.backward, spec.sizes), None, None
            return block_mul(grad, spec.hard, spec.sizes), None, None
        want_tau = ctx.needs_input_grad[1] and spec.scope == "shared"
        if spec.plain and theta.dtype in (torch.float32, torch.float64) and spec.scope != "local":
            # dL/dtheta = g m + (beta/c) a g |theta|,  dL/dtau = -beta sum(a g theta):
            # 10 passes and two allocations (one is the result).
            m = soft_mask(theta, spec)
            b = torch.addcmul(m, m, m, value=-1).mul_(grad).mul_(theta)  # a g theta
            grad_tau = (-spec.beta * b.sum()).reshape(()) if want_tau else None
            torch.copysign(b, grad, out=b)  # a g |theta|, as a >= 0
            return m.mul_(grad).addcmul_(b, spec.beta / spec.cost), grad_tau, None
        # general: blocks, N:M rows, low precision, or the budget term of local segments
        m = soft_mask(theta, spec)
        g_m = block_reduce(grad * theta, spec.sizes).to(m.dtype)  # dL/dm, block grid
        a = m * (1 - m)
        ga = a * g_m
        grad_tau = -(spec.beta * ga.sum(dtype=torch.float64)).reshape(()) if want_tau else None
        if spec.scope == "local":  # dL/dv = (beta/c) a (g_m - Lambda), Lambda the a-mean of g_m
            _subtract_segment_mean(ga, a, spec)
        dv = ga.mul_((spec.beta / spec.cost).to(ga.dtype))  # dL/dv, block grid
        inter, grid = interleaved(theta.shape, spec.sizes)
        grad_theta = (grad.reshape(inter) * m.reshape(grid)).addcmul_(
            torch.sign(theta).reshape(inter), dv.reshape(grid))
        return grad_theta.reshape(theta.shape).to(grad.dtype), grad_tau, None
