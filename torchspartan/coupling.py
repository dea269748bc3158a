"""``Coupling``: the exact cross-tensor gradient of a budget shared by several masks.

When several tensors share one budget (``ts.Global``), their soft masks share one threshold
``tau``, and ``tau`` depends on every weight of the segment (implicit differentiation of the
budget equation, docs/design.md)::

    d tau / d theta_i = beta_i m_i (1 - m_i) sign(theta_i) / S,   S = sum_k c_k beta_k a_k.

A ``Coupling`` makes ``tau`` one autograd node over all the segment's weights. Every bound mask's
forward uses it, autograd sums ``G = dL/dtau`` over all of them (and over micro-batches), and the
node's backward adds ``G * d tau / d theta_i`` to each weight's gradient, so ``theta.grad`` is
complete after ``backward()``: gradient clipping, accumulation and DDP need nothing special.

When every mask of the segment is a Spartan mask (unstructured or blocks) of one dtype, the
coupling computes all the masked weights at once instead (``batched``): one autograd node whose
forward and backward are a fixed number of multi-tensor (``torch._foreach_*``) ops, whatever the
number of tensors, with the cross-tensor term folded in. The first masked forward of a step
computes every weight of the segment; the others take theirs from the cache.

The tensors of the same budget held at a density bound (floors) have budgets of their own: a
batched coupling computes their weights in the same node too (:meth:`Coupling.attach`), each
with its own threshold and its own budget term (``G_k / S_k`` of its tensor alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch

from torchspartan._blocks import BlockedViews, block_mul, interleaved
from torchspartan._device import to_device
from torchspartan._fused import Compiled, masked_weights, weight_grad_sums, weight_grads
from torchspartan._kernels import MaskSpec, soft_mask

__all__ = ["Batched", "Coupling"]


class BoundMask(Protocol):
    """What a coupling needs of a mask (``ts.SpartanMask`` provides it)."""

    threshold: torch.Tensor
    hard_mask: torch.Tensor

    def spec(self) -> MaskSpec: ...

    def buffer(self, name: str) -> torch.Tensor: ...

    def unbind(self, coupling: Coupling) -> None: ...

    def join(self, coupling: Coupling) -> None: ...


class Coupling:
    """The shared threshold of one budget segment over several masked weights.

    Args:
        masks: the segment's masks (their ``threshold`` buffers hold the same ``tau``).
        thetas: the masked Parameters, in the same order.
        slope: ``S = sum_k c_k beta_k m_k (1 - m_k)`` at ``tau``, a float64 0-dim tensor.
    """

    def __init__(self, masks: Sequence[BoundMask], thetas: Sequence[torch.Tensor],
                 slope: torch.Tensor, *, batched: Batched | None = None,
                 views: BlockedViews | None = None) -> None:
        self.views = views if views is not None else BlockedViews()
        self.masks = list(masks)
        self.thetas = list(thetas)
        self.slope = slope
        self.batched = batched
        # masks of the budget held at a bound: in the batched node, with budgets of their own
        self.locals: list[BoundMask] = []
        self.local_thetas: list[torch.Tensor] = []
        self._index = {id(m): k for k, m in enumerate(self.masks)}
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None
        # the batched node's outputs: what each was computed from (``_stamp``), the grad mode
        self._weights: tuple[tuple[tuple[int, int], ...], bool, tuple[torch.Tensor, ...]] | None \
            = None

    def _key(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.thetas + self.local_thetas) + tuple(
            m.threshold._version for m in self.masks + self.locals)

    def owns(self, mask: BoundMask, theta: torch.Tensor) -> bool:
        """Whether ``theta`` is the weight this coupling holds for ``mask``."""
        k = self._index.get(id(mask))
        return k is not None and self._member(k)[1] is theta

    def _member(self, k: int) -> tuple[BoundMask, torch.Tensor]:
        """The ``k``-th mask and weight (the segment's, then the attached ones)."""
        n = len(self.masks)
        return (self.masks[k], self.thetas[k]) if k < n else (
            self.locals[k - n], self.local_thetas[k - n])

    def _stamp(self, k: int) -> tuple[int, int]:
        """What the ``k``-th masked weight is computed from, as it is now: the weight's version
        and the hard mask (identity). The thresholds are the node's own numbers
        (``Batched.offsets``), fixed when the node was made."""
        mask, theta = self._member(k)
        return (theta._version, id(mask.buffer("hard_mask")))

    def attach(self, masks: Sequence[BoundMask], thetas: Sequence[torch.Tensor],
               betas: Sequence[float], costs: Sequence[float], taus: Sequence[float],
               sizes: Sequence[tuple[int, ...]]) -> None:
        """Compute the weights of ``masks`` in this (batched) coupling's node too, each with
        its own threshold ``taus[k]`` and budget (a tensor held at its density bound): sharpness
        ``betas[k]``, cost ``costs[k]`` per block-grid entry, block sizes ``sizes[k]``."""
        b = self.batched
        if b is None:
            raise RuntimeError("Coupling.attach needs a batched coupling")
        scales = [x / c for x, c in zip(betas, costs, strict=True)]
        self.batched = Batched(b.betas + list(betas), b.scales + scales,
                               b.offsets + [-(x * t) for x, t in zip(betas, taus, strict=True)],
                               b.sizes + list(sizes), len(self.masks))
        start = len(self.masks) + len(self.locals)
        self.locals += masks
        self.local_thetas += thetas
        self._index.update({id(m): start + k for k, m in enumerate(masks)})
        self._weights = None
        for m in masks:
            m.join(self)

    @torch.compiler.disable
    def weight(self, mask: BoundMask) -> torch.Tensor:
        """``mask``'s masked weight ``theta * m * h``, from one batched node over the segment.

        The node is computed again when what this mask's weight depends on changed since (its
        weight or hard mask; checked per mask, so that the layers of a forward pass do not each
        check every tensor of the segment) or the grad mode did."""
        k, grad = self._index[id(mask)], torch.is_grad_enabled()
        cached = self._weights
        if cached is None or cached[1] != grad or cached[0][k] != self._stamp(k):
            if self.batched is None:
                raise RuntimeError("Coupling.weight needs a batched coupling; use threshold()")
            thetas = self.thetas + self.local_thetas
            b = self.batched
            views = [self.views.of(t, s) for t, s in zip(thetas, b.sizes, strict=True)] if (
                b.blocked) else None
            kernels = _Kernels.make(b, thetas) if (
                not b.blocked and _WEIGHTS.applies(thetas)) else None
            hards = [m.buffer("hard_mask") for m in self.masks + self.locals]
            info = _Info(b, self.slope, hards, views, kernels)
            self._weights = None  # the last ones are freed before the new ones are made
            if grad:
                ws = _BatchedWeights.apply(info, *thetas)
            else:
                with torch.no_grad():
                    ws = _batched_forward(info, thetas)
            stamps = tuple(self._stamp(j) for j in range(len(thetas)))
            self._weights = cached = (stamps, grad, tuple(ws))
        return cached[2][k]

    @torch.compiler.disable
    def threshold(self) -> torch.Tensor:
        """``tau`` as an autograd node over all the segment's weights; one per step, shared by
        every forward pass until a weight or the threshold changes (gradient accumulation)."""
        key = self._key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        specs = [m.spec() for m in self.masks]
        out = _SharedThreshold.apply(self.masks[0].threshold, self.slope, specs, *self.thetas)
        self._cache = (key, out)
        return out

    def release(self) -> None:
        """Unbind every mask of the segment (they then treat ``tau`` as a constant) and every
        attached one (they then compute their weights alone)."""
        self._cache = None
        self._weights = None
        for m in self.masks + self.locals:
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


@dataclass(frozen=True)
class Batched:
    """Host numbers of a batched segment, per tensor: the sharpness ``beta_k``, ``beta_k / c_k``
    and the offset ``-beta_k * tau`` (read once per step with the solve's other results, so the
    forward and backward make no host synchronisation), and the block sizes (all 1:
    unstructured). The first ``shared`` tensors share the segment's threshold (all of them
    when ``None``); each later one has its own (:meth:`Coupling.attach`)."""

    betas: list[float]
    scales: list[float]
    offsets: list[float]
    sizes: list[tuple[int, ...]]
    shared: int | None = None

    @cached_property
    def blocked(self) -> bool:
        return any(any(b != 1 for b in s) for s in self.sizes)

    @property
    def split(self) -> int:
        """The number of tensors that share the threshold (the rest have their own)."""
        return len(self.betas) if self.shared is None else self.shared


@dataclass(frozen=True)
class _Info:
    batched: Batched
    slope: torch.Tensor
    hards: list[torch.Tensor]
    views: list[torch.Tensor] | None = None  # blocked views of the weights (blocks only)
    kernels: _Kernels | None = None  # where the compiled kernels apply


@dataclass(frozen=True)
class _Kernels:
    """A batched node's numbers for the compiled kernels (``_fused.py``), its tensors in one
    fixed order (by identity: which tensors share the budget and which are held can change
    between steps, the shapes a kernel was compiled for do not): ``params`` their
    ``beta_k / c_k`` then ``-beta_k tau_k`` (the weights' dtype), ``shared`` 1 for the tensors
    of the shared budget, ``own`` ``-beta_k / c_k`` of the others (float64)."""

    order: list[int]
    params: torch.Tensor
    shared: torch.Tensor
    own: torch.Tensor

    @staticmethod
    def make(b: Batched, thetas: Sequence[torch.Tensor]) -> _Kernels:
        order = sorted(range(len(thetas)), key=lambda j: id(thetas[j]))
        device, dtype = thetas[0].device, thetas[0].dtype
        return _Kernels(
            order,
            to_device([b.scales[j] for j in order] + [b.offsets[j] for j in order], device,
                      dtype),
            to_device([float(j < b.split) for j in order], device, torch.float64),
            to_device([-b.scales[j] for j in order], device, torch.float64))

    def take(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [xs[j] for j in self.order]

    def put(self, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = list(ys)
        for i, j in enumerate(self.order):
            out[j] = ys[i]
        return out


@torch.no_grad()
def _soft_masks(info: _Info, thetas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``m = sigmoid(beta * block_sum|theta| / c - beta * tau)`` of every tensor: four
    multi-tensor ops, plus a block sum per tensor for block masks, whose ``thetas`` come in
    their blocked view (:func:`_blocked_views`) and whose ``m`` keep the blocked grid's shape
    (no autograd history, without a ``detach`` op per tensor)."""
    b = info.batched
    m = list(torch._foreach_abs(list(thetas)))
    if b.blocked:
        m = [x.sum(dim=_BLOCK_DIMS[x.dim()], keepdim=True) for x in m]
    torch._foreach_mul_(m, b.scales)
    torch._foreach_add_(m, b.offsets)
    torch._foreach_sigmoid_(m)
    return m


_BLOCK_DIMS = {2 * n: tuple(range(1, 2 * n, 2)) for n in range(1, 9)}


def _blocked_views(info: _Info, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor as ``(n0/b0, b0, n1/b1, b1, ...)``: a block is the odd dims of a grid entry."""
    return [t.reshape(interleaved(t.shape, s)[0]) for t, s in zip(tensors, info.batched.sizes,
                                                                 strict=True)]


@torch.no_grad()
def _batched_forward(info: _Info, thetas: Sequence[torch.Tensor], keep: list[torch.Tensor] | None
                     = None) -> list[torch.Tensor]:
    """``theta * m * h`` of every tensor; block masks put their soft masks (grid-sized) in
    ``keep`` when given, for the backward."""
    if info.batched.blocked:
        views = info.views if info.views is not None else _blocked_views(info, thetas)
        m = _soft_masks(info, views)
        if keep is not None:
            keep += [*m, *views]
        hards = [h.view(x.shape) for h, x in zip(info.hards, m, strict=True)]
        mh = torch._foreach_mul(m, hards)
        return [torch.mul(v, x).view(t.shape) for v, x, t in zip(views, mh, thetas, strict=True)]
    kn = info.kernels
    if kn is not None:
        fused = _WEIGHTS.try_call(kn.take(thetas), kn.take(info.hards), kn.params)
        if fused is not None:
            return kn.put(fused)
    m = _soft_masks(info, thetas)
    torch._foreach_mul_(m, info.hards)
    torch._foreach_mul_(m, list(thetas))
    return m


# one pass over each weight (and gradient) instead of six in the forward and about twenty in
# the backward, where compiled (CUDA): one compile per model, its shapes static
_WEIGHTS = Compiled(masked_weights, dynamic=False, contiguous=False)
_GRAD_SUMS = Compiled(weight_grad_sums, dynamic=False, contiguous=False)
_GRADS = Compiled(weight_grads, dynamic=False, contiguous=False)


class _BatchedWeights(torch.autograd.Function):
    """All masked weights of a segment of Spartan masks, with the exact gradient::

        dL/dtheta = g E(m) + sign(theta) E(dL/dv),   a = m (1 - m),
        dL/dv = (beta/c) a g_m + beta a G / S,       g_m = block_sum(g theta),
        G = dL/dtau = -sum_k beta_k sum(a_k g_m,k),

    (E: block expansion; blocks of 1 for unstructured masks) in multi-tensor ops. It saves no
    tensors (the weights are Parameters, kept on ``ctx``), so one node serves every forward
    pass of a step.
    """

    @staticmethod
    def forward(ctx: Any, info: _Info, *thetas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.info = info
        ctx.thetas = thetas
        ctx.m = []  # block masks: their soft masks (grid-sized) and blocked views of theta
        return tuple(_batched_forward(info, thetas, ctx.m))

    @staticmethod
    @torch.no_grad()
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        info: _Info = ctx.info
        thetas = list(ctx.thetas)
        grads = tuple(g.to(t.dtype) for g, t in zip(grads, thetas, strict=True))
        if info.batched.blocked:
            n = len(thetas)
            return (None, *_blocked_backward(info, thetas, list(grads), ctx.m[:n], ctx.m[n:]))
        if info.kernels is not None:
            fused = _fused_backward(info, info.kernels, thetas, list(grads))
            if fused is not None:
                return (None, *fused)
        scales, slope, n = info.batched.scales, info.slope, info.batched.split
        beta = info.batched.betas[0]
        # two lists of temporaries besides the result: a, then t; sign(theta) reuses a's memory
        a = _soft_masks(info, thetas)
        out = list(torch._foreach_mul(grads, a))  # g m
        torch._foreach_addcmul_(a, a, a, value=-1)  # a = m (1 - m)
        t = list(torch._foreach_mul(a, grads))
        torch._foreach_mul_(t, thetas)  # a g theta
        # summed in the weights' dtype, then in float64 (a float64 sum of float32 terms would
        # first copy every tensor to float64 on a GPU: two extra passes and 2n launches)
        each = torch.stack([x.sum() for x in t]).double()
        # sign(theta) a ((beta/c) g theta + G beta / S)  ==  (beta/c) a g |theta| + the cross term
        local = _local_terms(info, a[n:], each[n:], [-s for s in scales[n:]])
        torch._foreach_mul_(t, scales)
        if n:
            g_tau = -beta * each[:n].sum()  # dL/dtau, summed over the segment
            torch._foreach_mul_(a[:n], (_over_slope(g_tau, slope) * beta).to(a[0].dtype))
        if local:
            torch._foreach_mul_(a[n:], local)
        torch._foreach_add_(t, a)
        torch._foreach_copy_(a, thetas)
        torch._foreach_sign_(a)
        torch._foreach_mul_(t, a)
        torch._foreach_add_(out, t)
        return (None, *out)


def _fused_backward(info: _Info, kn: _Kernels, thetas: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The backward in two compiled passes over each weight and gradient: the sums the cross
    terms need, then the gradients (None where they do not apply: the eager ops then)."""
    th, gr = kn.take(thetas), kn.take(grads)
    sums = _GRAD_SUMS.try_call(th, gr, kn.params)
    if sums is None:
        return None
    each, den = sums[:len(th)], sums[len(th):]
    beta = info.batched.betas[0]
    g_tau = -beta * (each * kn.shared).sum()  # dL/dtau of the shared budget
    # own budgets: -(beta/c) sum(a g theta) / sum(a), 0 where saturated (a = 0 everywhere)
    own = kn.own * each / den.clamp_min(torch.finfo(den.dtype).tiny)
    factors = torch.where(kn.shared > 0, _over_slope(g_tau, info.slope) * beta, own)
    out = _GRADS.try_call(th, gr, kn.params, factors.to(th[0].dtype))
    return None if out is None else kn.put(out)


def _local_terms(info: _Info, a: list[torch.Tensor], sums: torch.Tensor, factors: list[float]
                 ) -> list[torch.Tensor]:
    """``factor_k * sums_k / sum(a_k)`` of every attached tensor (its own budget: ``G_k / S_k``
    up to the factor), as 0-dim tensors in ``a``'s dtype. A saturated tensor (``a_k = 0``
    everywhere) has ``sums_k = 0`` exactly, so 0, not a NaN."""
    if not a:
        return []
    den = torch.stack(torch._foreach_norm(a, 1, dtype=torch.float64))  # a >= 0: its sum
    num = sums * to_device(factors, sums.device, sums.dtype)
    return list(num.div_(den.clamp_min_(torch.finfo(den.dtype).tiny)).to(a[0].dtype).unbind())


def _over_slope(g_tau: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``G / S``; 0 for a saturated segment (``S = 0``: no cross term, not a NaN)."""
    return torch.where(slope > 0, g_tau / slope.clamp_min(torch.finfo(slope.dtype).tiny),
                       torch.zeros_like(g_tau))


def _blocked_backward(info: _Info, thetas: list[torch.Tensor], grads: list[torch.Tensor],
                      m: list[torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The backward of :class:`_BatchedWeights` for block masks, in the blocked views, from
    the forward's soft masks ``m`` and blocked ``views`` of the weights (grid-sized
    temporaries, a few ops per tensor)."""
    b = info.batched
    gv = _blocked_views(info, grads)
    gt = torch._foreach_mul(gv, views)
    g_m = [x.sum(dim=_BLOCK_DIMS[x.dim()], keepdim=True) for x in gt]  # dL/dm
    del gt
    a = list(torch._foreach_addcmul(m, m, m, value=-1))  # m (1 - m)
    ga = list(torch._foreach_mul(a, g_m))  # a g_m
    # sum(x) = 2 sum(max(x, 0)) - sum(|x|), each a multi-tensor 1-norm accumulated in float64:
    # a few ops for all tensors (the grids are small), as exact as a float64 sum of each
    absolute = torch.stack(torch._foreach_norm(ga, 1, dtype=torch.float64))
    positive = torch.stack(torch._foreach_norm(torch._foreach_clamp_min(ga, 0.0), 1,
                                               dtype=torch.float64))
    sums = positive.mul_(2).sub_(absolute)
    n = b.split
    # attached tensors: G_k / S_k = -sums_k / (c_k sum(a_k)), their own budgets
    local = _local_terms(info, a[n:], sums[n:], [-s / x for s, x in zip(
        b.scales[n:], b.betas[n:], strict=True)])
    torch._foreach_mul_(ga, b.scales)  # (beta/c) a g_m
    torch._foreach_mul_(a, b.betas)
    if n:
        g_tau = -(sums[:n] * to_device(b.betas[:n], sums.device, sums.dtype)).sum()  # dL/dtau
        torch._foreach_mul_(a[:n], _over_slope(g_tau, info.slope).to(a[0].dtype))
    if local:
        torch._foreach_mul_(a[n:], local)
    torch._foreach_add_(ga, a)  # dL/dv
    signs = torch._foreach_sign(views)
    return [torch.mul(g, mk).addcmul_(sg, dv).view(t.shape)
            for g, mk, sg, dv, t in zip(gv, m, signs, ga, thetas, strict=True)]
