"""``Coupling``: the exact cross-tensor gradient of a budget shared by several masks.

When several tensors share one budget (``ts.Global``), their soft masks share one threshold
``tau``, and ``tau`` depends on every weight of the segment (implicit differentiation of the
budget equation, docs/design.md)::

    d tau / d theta_i = beta_i m_i (1 - m_i) sign(theta_i) / S,   S = sum_k c_k beta_k a_k.

A ``Coupling`` makes ``tau`` one autograd node over all the segment's weights. Every bound mask's
forward uses it, autograd sums ``G = dL/dtau`` over all of them (and over micro-batches), and the
node's backward adds ``G * d tau / d theta_i`` to each weight's gradient, so ``theta.grad`` is
complete after ``backward()``: gradient clipping, accumulation and DDP need nothing special.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from torchspartan._blocks import block_mul
from torchspartan._kernels import MaskSpec, soft_mask

__all__ = ["Coupling"]


class BoundMask(Protocol):
    """What a coupling needs of a mask (``ts.SpartanMask`` provides it)."""

    threshold: torch.Tensor

    def spec(self) -> MaskSpec: ...

    def unbind(self, coupling: Coupling) -> None: ...


class Coupling:
    """The shared threshold of one budget segment over several masked weights.

    Args:
        masks: the segment's masks (their ``threshold`` buffers hold the same ``tau``).
        thetas: the masked Parameters, in the same order.
        slope: ``S = sum_k c_k beta_k m_k (1 - m_k)`` at ``tau``, a float64 0-dim tensor.
    """

    def __init__(self, masks: Sequence[BoundMask], thetas: Sequence[torch.Tensor],
                 slope: torch.Tensor) -> None:
        self.masks = list(masks)
        self.thetas = list(thetas)
        self.slope = slope
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    @torch.compiler.disable
    def threshold(self) -> torch.Tensor:
        """``tau`` as an autograd node over all the segment's weights; one per step, shared by
        every forward pass until a weight or the threshold changes (gradient accumulation)."""
        key = tuple(t._version for t in self.thetas) + tuple(
            m.threshold._version for m in self.masks)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        specs = [m.spec() for m in self.masks]
        out = _SharedThreshold.apply(self.masks[0].threshold, self.slope, specs, *self.thetas)
        self._cache = (key, out)
        return out

    def release(self) -> None:
        """Unbind every mask of the segment (they then treat ``tau`` as a constant)."""
        self._cache = None
        for m in self.masks:
            m.unbind(self)


class _SharedThreshold(torch.autograd.Function):
    """Forward: ``tau``. Backward: ``G * beta_i a_i sign(theta_i) / S`` into every weight.

    It saves no tensors, so one node serves every forward pass of a step.
    """

    @staticmethod
    def forward(ctx: Any, tau: torch.Tensor, slope: torch.Tensor, specs: list[MaskSpec],
                *thetas: torch.Tensor) -> torch.Tensor:
        ctx.slope = slope
        ctx.specs = specs
        ctx.thetas = thetas  # Parameters; alive anyway, unchanged within a step
        return tau.clone()

    @staticmethod
    def backward(ctx: Any, grad_tau: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # a saturated segment (S = 0) has no cross term, not a NaN
        slope = ctx.slope
        g = torch.where(slope > 0, grad_tau / slope.clamp_min(torch.finfo(slope.dtype).tiny),
                        torch.zeros_like(grad_tau))
        out: list[torch.Tensor | None] = [None, None, None]
        for theta, spec in zip(ctx.thetas, ctx.specs, strict=True):
            if not spec.soft or spec.method != "spartan":
                out.append(None)
                continue
            m = soft_mask(theta, spec)
            if spec.plain and theta.dtype in (torch.float32, torch.float64):
                a = m.addcmul_(m, m, value=-1)  # beta G / S * a * sign(theta): 6 passes
                out.append(torch.copysign(a, theta, out=a).mul_(g * spec.beta))
                continue
            dv = m.mul_(1 - m).mul_((g * spec.beta).to(m.dtype))
            out.append(block_mul(torch.sign(theta), dv, spec.sizes).to(theta.dtype))
        return tuple(out)
