"""``SpartanMask``: the sparsity mask as a ``torch.nn.utils.parametrize`` parametrization.

Registered on a weight ``theta``, the layer computes with (design.md section 3)::

    spartan:  w = theta * m * h   m = sigmoid(beta * (u - tau)) the soft top-k mask,
                                  h the hard top-k mask, straight-through h in the backward
    topkast:  w = theta * h       identity backward (dual averaging / Top-KAST)
    gmp:      w = theta * h       backward masked by h (gradual magnitude pruning)
    fixed:    w = theta * h       a mask given by the user that never changes

with ``u = |theta| / cost`` (block sums of ``|theta|`` over ``block`` for block masks). ``h``,
``tau`` and ``beta`` are buffers of the mask, updated by :class:`torchspartan.DualAveraging`
after each optimizer step, so a checkpoint of the model alone evaluates exactly. The Parameter
``theta`` stays the same object from registration to :func:`torchspartan.finalize`.

While bound to a :class:`~torchspartan.DualAveraging`, every mask of one allocation problem shares
``tau`` through one autograd node, so ``theta.grad`` after ``backward()`` is the exact gradient
through the global soft top-k (the cross-layer budget term included): gradient clipping,
accumulation over micro-batches and DDP need nothing special. An unbound mask treats ``tau`` as a
constant.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from torchspartan.optim import _Problem

__all__ = ["Method", "SpartanMask", "sparsify"]

Method = Literal["spartan", "topkast", "gmp", "fixed"]
_METHODS = ("spartan", "topkast", "gmp", "fixed")


def block_sizes(shape: Sequence[int], block: Sequence[int] | None) -> tuple[int, ...]:
    """Per-dimension block sizes for a tensor ``shape`` (missing trailing dims are 1)."""
    if block is None:
        return (1,) * len(shape)
    return tuple(block) + (1,) * (len(shape) - len(block))


def _interleaved(shape: Sequence[int], sizes: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Blocked view ``(n0/b0, b0, n1/b1, ...)`` of ``shape`` and its grid ``(n0/b0, 1, ...)``."""
    inter: list[int] = []
    grid: list[int] = []
    for n, s in zip(shape, sizes, strict=True):
        inter += [n // s, s]
        grid += [n // s, 1]
    return inter, grid


def block_reduce(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Sum ``x`` over each block; the result has the block-grid shape."""
    if all(s == 1 for s in sizes):
        return x
    inter, _ = _interleaved(x.shape, sizes)
    return x.reshape(inter).sum(dim=tuple(range(1, 2 * x.dim(), 2)))


def block_expand(y: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Repeat each block-grid entry of ``y`` over its block (inverse shape of block_reduce)."""
    if all(s == 1 for s in sizes):
        return y
    inter: list[int] = []
    full: list[int] = []
    out: list[int] = []
    for n, s in zip(y.shape, sizes, strict=True):
        inter += [n, 1]
        full += [n, s]
        out.append(n * s)
    return y.reshape(inter).expand(full).reshape(out)


def block_mul(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``x * block_expand(y)`` by broadcasting over a blocked view: no expanded copy of ``y``."""
    if all(s == 1 for s in sizes):
        return x * y
    inter, grid = _interleaved(x.shape, sizes)
    return (x.reshape(inter) * y.reshape(grid)).reshape(x.shape)


@dataclass
class _LayerSpec:
    """Everything the weight function needs for one layer at one step (no big tensors copied)."""

    method: str  # "spartan", "topkast", "gmp" or "masked" (fine-tuning / fixed)
    sizes: tuple[int, ...]
    hard: torch.Tensor  # bool, block-grid shape
    beta: torch.Tensor  # 0-dim; 0 disables the soft mask (m = 1)
    cost: torch.Tensor  # 0-dim; cost of one block entry
    soft: bool  # beta > 0, kept as a Python flag (no host sync, a stable compile guard)
    tau: torch.Tensor  # 0-dim; the threshold of the soft mask


def _is_plain(theta: torch.Tensor, spec: _LayerSpec) -> bool:
    """Unstructured float32/float64 weight: the fused in-place paths apply."""
    return theta.dtype in (torch.float32, torch.float64) and all(s == 1 for s in spec.sizes)


def soft_mask(theta: torch.Tensor, spec: _LayerSpec) -> torch.Tensor:
    """``sigmoid(beta * (block_sum|theta| / cost - tau))`` in float32/64, block-grid shape."""
    v = block_reduce(theta.detach().abs(), spec.sizes)
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    z = torch.addcmul(-spec.beta * spec.tau.detach(), v, spec.beta / spec.cost, out=v)
    return torch.sigmoid_(z)


class _MaskedWeight(torch.autograd.Function):
    """w = theta * m * h with the backward of the method; the gradient to tau is returned too."""

    @staticmethod
    def forward(
        ctx: Any, theta: torch.Tensor, tau: torch.Tensor | None, spec: _LayerSpec
    ) -> torch.Tensor:
        ctx.spec = spec
        ctx.save_for_backward(theta)
        if spec.method == "spartan" and spec.soft:
            m = soft_mask(theta, spec)
            if _is_plain(theta, spec):  # in place: 5 passes in all, no extra temporary
                return m.mul_(spec.hard).mul_(theta)
            return block_mul(theta, m.mul_(spec.hard), spec.sizes).to(theta.dtype)
        return block_mul(theta, spec.hard, spec.sizes)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (theta,) = ctx.saved_tensors
        spec: _LayerSpec = ctx.spec
        if spec.method == "spartan" and spec.soft and _is_plain(theta, spec):
            # dL/dtheta = g m + (beta/c) a g |theta|,  dL/dtau = -beta sum(a g theta), with
            # a = m (1 - m): 10 passes and two allocations (one is the result).
            m = soft_mask(theta, spec)
            b = torch.addcmul(m, m, m, value=-1).mul_(grad).mul_(theta)  # a g theta
            grad_tau = (-spec.beta * b.sum()).reshape(()) if ctx.needs_input_grad[1] else None
            torch.copysign(b, grad, out=b)  # a g |theta|, as a >= 0
            return m.mul_(grad).addcmul_(b, spec.beta / spec.cost), grad_tau, None
        if spec.method == "spartan" and spec.soft:  # blocks or low precision, block-grid m
            m = soft_mask(theta, spec)
            g_m = block_reduce(grad * theta, spec.sizes).to(m.dtype)  # dL/dm
            a = m * (1 - m)
            ba_gm = a.mul_(g_m).mul_(spec.beta)  # beta * a * g_m
            grad_tau = -ba_gm.sum(dtype=torch.float64)
            dv = ba_gm.div_(spec.cost)  # dL/dv, block grid
            inter, grid = _interleaved(theta.shape, spec.sizes)
            grad_theta = (grad.reshape(inter) * m.reshape(grid)).addcmul_(
                torch.sign(theta).reshape(inter), dv.reshape(grid))
            return (grad_theta.reshape(theta.shape).to(grad.dtype),
                    grad_tau.reshape(()) if ctx.needs_input_grad[1] else None, None)
        if spec.method == "topkast":
            return grad, None, None
        return block_mul(grad, spec.hard, spec.sizes), None, None


class _SharedThreshold(torch.autograd.Function):
    """The shared ``tau`` of one allocation problem as a function of all its weights.

    Its forward returns ``tau`` (computed by the mask update). Its backward receives
    ``G = dL/dtau`` summed over every layer of the problem by autograd and adds the cross-layer
    budget term ``dL/dv_j += G * beta_j a_j / S`` with ``S = sum_k c_k beta_k a_k`` (implicit
    differentiation of the budget equation). It saves no tensors, so one node serves every
    forward pass of a step (gradient accumulation).
    """

    @staticmethod
    def forward(
        ctx: Any, tau: torch.Tensor, problem: _Problem, specs: list[_LayerSpec],
        *thetas: torch.Tensor,
    ) -> torch.Tensor:
        ctx.total_slope = problem.total_slope
        ctx.specs = specs
        ctx.thetas = thetas  # Parameters; alive anyway, unchanged within a step
        return tau.clone()

    @staticmethod
    def backward(ctx: Any, grad_tau: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g = grad_tau / ctx.total_slope
        out: list[torch.Tensor | None] = [None, None, None]
        for theta, spec in zip(ctx.thetas, ctx.specs, strict=True):
            if not spec.soft:
                out.append(None)
                continue
            m = soft_mask(theta, spec)
            if _is_plain(theta, spec):  # beta G / S * m (1 - m) * sign(theta): 6 passes
                a = m.addcmul_(m, m, value=-1)
                out.append(torch.copysign(a, theta, out=a).mul_(g * spec.beta))
                continue
            dv = m.mul_(1 - m).mul_((g * spec.beta).to(m.dtype))
            out.append(block_mul(torch.sign(theta), dv, spec.sizes).to(theta.dtype))
        return tuple(out)


class SpartanMask(nn.Module):
    """Sparsity mask of one weight, as a parametrization (see the module docstring).

    Args:
        method: ``"spartan"`` (default), ``"topkast"``, ``"gmp"`` or ``"fixed"``.
        block: block shape over the leading dims of the weight, e.g. ``(16, 16)``; each block is
            kept or dropped whole, scored by the sum of ``|theta|`` in it, costing its size.
            Every block size must divide its dimension.
        mask: for ``method="fixed"``: the bool mask to keep (weight shape, or block-grid shape).
        min_density, max_density: bounds on this tensor's density under global allocation.

    Raises:
        ValueError: unknown method, a block that does not divide the weight (names both
            shapes), a fixed method without a mask, bounds outside ``0 <= min <= max <= 1``.

    Example:
        >>> import torch, torchspartan as ts
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(8, 4)
        >>> parametrize.register_parametrization(layer, "weight", ts.SpartanMask(block=(2, 2)))
        ParametrizedLinear(...)
        >>> layer.weight.shape
        torch.Size([4, 8])
    """

    hard_mask: torch.Tensor
    threshold: torch.Tensor
    beta: torch.Tensor
    cost: torch.Tensor

    def __init__(
        self,
        method: Method = "spartan",
        block: Sequence[int] | None = None,
        *,
        mask: torch.Tensor | None = None,
        min_density: float = 0.0,
        max_density: float = 1.0,
    ) -> None:
        super().__init__()
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if block is not None:
            block = tuple(int(b) for b in block)
            if len(block) == 0 or any(b < 1 for b in block):
                raise ValueError(f"block must be a tuple of positive sizes, got {block!r}")
        if method == "fixed" and mask is None:
            raise ValueError("method='fixed' needs mask=<bool tensor>; the mask it keeps forever")
        if method != "fixed" and mask is not None:
            raise ValueError(f"mask= is only for method='fixed', got method={method!r}")
        if not (0.0 <= min_density <= max_density <= 1.0):
            raise ValueError(
                "need 0 <= min_density <= max_density <= 1, got "
                f"min_density={min_density!r}, max_density={max_density!r}"
            )
        self.method: str = method
        self.block: tuple[int, ...] | None = block
        self.min_density = float(min_density)
        self.max_density = float(max_density)
        self._initial_mask = mask
        self._problem: _Problem | None = None
        self.frozen = False
        self.soft_active = False
        self.register_buffer("hard_mask", None)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("beta", torch.zeros((), dtype=torch.float64))
        self.register_buffer("cost", torch.ones((), dtype=torch.float64))
        self.register_load_state_dict_post_hook(self._refresh_soft_flag)

    # -- parametrization protocol -------------------------------------------------------
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Called once by ``register_parametrization``: checks the shape, creates the buffers."""
        if self.hard_mask is None or self.hard_mask.shape != self.grid_shape(weight.shape):
            sizes = self._sizes_for(weight.shape)
            grid = tuple(n // s for n, s in zip(weight.shape, sizes, strict=True))
            if self._initial_mask is not None:
                m = self._initial_mask.to(device=weight.device, dtype=torch.bool)
                if tuple(m.shape) == tuple(weight.shape) and grid != tuple(weight.shape):
                    m = block_reduce(m.float(), sizes) > 0
                if tuple(m.shape) != grid:
                    raise ValueError(
                        f"mask of shape {tuple(m.shape)} fits neither the weight shape "
                        f"{tuple(weight.shape)} nor its block grid {grid}"
                    )
                self.hard_mask = m.clone()
            else:
                self.hard_mask = torch.ones(grid, dtype=torch.bool, device=weight.device)
        return weight

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.hard_mask is None:
            self.right_inverse(theta)
        spec = self.layer_spec()
        problem = self._problem
        if (
            problem is not None
            and spec.soft
            and spec.method == "spartan"
            and torch.is_grad_enabled()
            and theta.requires_grad
        ):
            tau: torch.Tensor | None = problem.shared_threshold()  # compiler-disabled
        else:
            tau = None
        return _MaskedWeight.apply(theta, tau, spec)

    def _apply(self, fn: Any, recurse: bool = True) -> SpartanMask:
        """``model.half()``/``.to(dtype)`` must not round tau, beta and cost: keep them float64."""
        scalars = {n: getattr(self, n) for n in ("threshold", "beta", "cost")}
        super()._apply(fn, recurse)
        for name, before in scalars.items():
            after = getattr(self, name)
            if after.dtype != torch.float64:
                setattr(self, name, before.to(device=after.device))
        return self

    # -- helpers ------------------------------------------------------------------------
    def _sizes_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        if self.block is not None:
            if len(self.block) > len(shape) or any(
                n % b for n, b in zip(shape, self.block, strict=False)
            ):
                raise ValueError(
                    f"block {self.block} does not divide the weight of shape {tuple(shape)}: each "
                    f"block size must divide its dimension; pick a divisor or exclude this layer"
                )
        return block_sizes(shape, self.block)

    def grid_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        sizes = self._sizes_for(shape)
        return tuple(n // s for n, s in zip(shape, sizes, strict=True))

    @property
    def block_numel(self) -> int:
        return math.prod(self.block) if self.block is not None else 1

    def layer_spec(self) -> _LayerSpec:
        sizes = block_sizes(self.hard_mask.shape, self.block)
        method = "masked" if (self.frozen or self.method == "fixed") else self.method
        return _LayerSpec(method, sizes, self.hard_mask, self.beta, self.cost, self.soft_active,
                          self.threshold)

    def set_soft(self, beta: float, tau: float | None = None) -> None:
        """Set the soft mask's sharpness (0 turns it off) and, if given, its threshold."""
        self.beta.fill_(beta)
        if tau is not None:
            self.threshold.fill_(tau)
        self.soft_active = beta > 0

    def _refresh_soft_flag(self, *_: Any) -> None:
        self.soft_active = bool(self.beta > 0)

    def extra_repr(self) -> str:
        s = f"method={self.method!r}"
        if self.block is not None:
            s += f", block={self.block}"
        return s

    def __deepcopy__(self, memo: dict[int, Any]) -> SpartanMask:
        """Copies are unbound from the optimizer (same masks, same outputs)."""
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_problem":
                new.__dict__[k] = None
            else:
                import copy

                new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def _parametrized_masks(model: nn.Module) -> list[tuple[str, nn.Module, str, SpartanMask, int]]:
    """``(qualified name, module, tensor name, mask, position in its list)`` for every mask."""
    found = []
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for pos, p in enumerate(plist):
                if isinstance(p, SpartanMask):
                    qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                    found.append((qual, module, tensor_name, p, pos))
    return found


_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, nn.Embedding,
)


def sparsify(
    model: nn.Module,
    include: Iterable[type[nn.Module]] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d),
    *,
    names: str | None = None,
    exclude: Iterable[str] = (),
    method: Method = "spartan",
    block: Sequence[int] | None = None,
    min_density: float = 0.0,
    max_density: float = 1.0,
) -> list[str]:
    """Register a :class:`SpartanMask` on the weights of the chosen layers of ``model``.

    A layer is chosen when it is an instance of one of ``include``, its qualified name matches
    the regular expression ``names`` (if given, ``re.search``), and matches none of ``exclude``.
    For ``nn.MultiheadAttention`` the input projection ``in_proj_weight`` is masked (its output
    projection is an ``nn.Linear`` and chosen on its own). Layers whose weight a ``block`` does
    not divide raise an error naming the layer; exclude them explicitly.

    Returns:
        The qualified names of the masked tensors, e.g. ``["conv1.weight", "fc.weight"]``.

    Raises:
        ValueError: nothing matched, a bad pattern, or a block that does not divide a weight.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 2))
        >>> ts.sparsify(model, exclude=[r"^2$"])
        ['0.weight']
    """
    include = tuple(include)
    excl = [re.compile(p) for p in exclude]
    pattern = re.compile(names) if names is not None else None
    chosen: list[tuple[str, nn.Module, str]] = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, include):
            continue
        if pattern is not None and not pattern.search(mod_name):
            continue
        if any(p.search(mod_name) for p in excl):
            continue
        if isinstance(module, nn.MultiheadAttention):
            if getattr(module, "in_proj_weight", None) is None:
                continue
            chosen.append((mod_name, module, "in_proj_weight"))
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            chosen.append((mod_name, module, "weight"))
    if not chosen:
        raise ValueError(
            f"sparsify matched no layer (include={[t.__name__ for t in include]}, "
            f"names={names!r}, exclude={list(exclude)!r}); check the types and patterns against "
            f"[name for name, _ in model.named_modules()]"
        )
    out = []
    for mod_name, module, tensor_name in chosen:
        qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
        if parametrize.is_parametrized(module, tensor_name) and any(
            isinstance(p, SpartanMask)
            for p in module.parametrizations[tensor_name]  # type: ignore[index]
        ):
            raise ValueError(f"{qual} already has a SpartanMask; register it once")
        try:
            mask = SpartanMask(method, block, min_density=min_density, max_density=max_density)
            parametrize.register_parametrization(module, tensor_name, mask)
        except ValueError as e:
            raise ValueError(f"{qual}: {e}") from None
        out.append(qual)
    return out
