"""``SpartanMask``: the sparsity mask as a ``torch.nn.utils.parametrize`` parametrization.

Registered on a weight ``theta``, the layer computes with (docs/design.md, "One training step")::

    spartan:  w = theta * m * h   m = sigmoid(beta * (u - tau)) the soft top-k mask,
                                  h the hard top-k mask, straight-through h in the backward
    topkast:  w = theta * h       backward masked by the larger backward set B (Top-KAST,
                                  ``backward_mask``, written by :class:`torchspartan.TopKAST`)
    rigl:     w = theta * h       backward masked by h; while ``dense_grad`` is armed the
                                  backward also hands dL/dw to :class:`torchspartan.RigL`
    gmp:      w = theta * h       backward masked by h (gradual magnitude pruning)
    fixed:    w = theta * h       a mask given by the user that never changes

with ``u = |theta| / cost`` (block sums of ``|theta|`` for block masks). The mask holds everything
needed to evaluate the model, as buffers in ``model.state_dict()``: the hard mask ``h``, the
threshold ``tau`` (one, or one per N:M group), ``beta``, the entry ``cost`` and ``frozen``. They are
written through :meth:`SpartanMask.update` (by :class:`torchspartan.MaskUpdater` during training).
The Parameter ``theta`` stays the same object from registration to :func:`torchspartan.finalize`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchspartan._blocks import block_mul, block_reduce, block_sizes
from torchspartan._kernels import MaskedWeight, MaskSpec, Scope, soft_mask
from torchspartan.coupling import Coupling

__all__ = ["DenseGrad", "Method", "SpartanMask", "entry_problems", "update_masks"]

Method = Literal["spartan", "topkast", "rigl", "gmp", "fixed"]
_METHODS = ("spartan", "topkast", "rigl", "gmp", "fixed")


class SpartanMask(nn.Module):
    """Sparsity mask of one weight, as a parametrization (see the module docstring).

    Args:
        method: ``"spartan"`` (default), ``"topkast"``, ``"rigl"``, ``"gmp"`` or ``"fixed"``.
        block: block shape over the leading dims of the weight, e.g. ``(16, 16)``; each block is
            kept or dropped whole, scored by the sum of ``|theta|`` in it, costing its size.
            Every block size must divide its dimension.
        mask: for ``method="fixed"``: the bool mask to keep (weight shape, or block-grid shape).
        min_density, max_density: bounds on this tensor's density when it shares a budget.
            ``min_density=None`` (the default) is the automatic floor: in a budget shared with
            other tensors this one keeps at least one entry per output unit (one block per block
            row), so no layer is emptied (docs/design.md, "Floors"); ``0.0`` allows an empty
            layer.

    Raises:
        ValueError: unknown method, a block that does not divide the weight (names both
            shapes), a fixed method without a mask, bounds outside ``0 <= min <= max <= 1``.

    Example:
        >>> import torch, torchspartan as ts
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(8, 4)
        >>> parametrize.register_parametrization(layer, "weight", ts.SpartanMask(block=(2, 2)))
        ParametrizedLinear(...)
        >>> layer.parametrizations.weight[0].hard_mask.shape
        torch.Size([2, 4])
    """

    hard_mask: torch.Tensor
    threshold: torch.Tensor
    beta: torch.Tensor
    cost: torch.Tensor
    frozen: torch.Tensor
    backward_mask: torch.Tensor  # method="topkast" only

    def __init__(
        self,
        method: Method = "spartan",
        block: Sequence[int] | None = None,
        *,
        mask: torch.Tensor | None = None,
        min_density: float | None = None,
        max_density: float = 1.0,
    ) -> None:
        super().__init__()
        self.auto_floor = min_density is None  # the default floor (floors.py)
        if min_density is None:
            min_density = 0.0
        block = _check_args(method, block, mask, min_density, max_density)
        self.method: str = method
        self.block: tuple[int, ...] | None = block
        self.min_density = float(min_density)
        self.max_density = float(max_density)
        self._initial_mask = mask
        self._coupling: Coupling | None = None
        self._scope: Scope = "none"
        # Python mirrors of buffers the forward branches on (no host sync, stable compile guards)
        self.soft_active = False
        self.is_frozen = False
        self.register_buffer("hard_mask", None)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("beta", torch.zeros((), dtype=torch.float64))
        self.register_buffer("cost", torch.ones((), dtype=torch.float64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        if method == "topkast":  # the backward set B of Top-KAST (all ones until first written)
            self.register_buffer("backward_mask", None)
        self.dense_grad = DenseGrad()  # RigL: dL/dw of the backward passes while armed
        self.register_load_state_dict_post_hook(self._refresh_flags)

    # -- parametrization protocol -------------------------------------------------------
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Called once by ``register_parametrization``: checks the tensor, creates the buffers
        (all on the weight's device: a threshold on the host would cost a sync per update)."""
        self.check_tensor(weight)
        for name in ("threshold", "beta", "cost", "frozen"):  # .to: itself where it is
            setattr(self, name, getattr(self, name).to(weight.device))
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
        if self.method == "topkast" and (self.backward_mask is None
                                         or self.backward_mask.shape != self.hard_mask.shape):
            self.backward_mask = torch.ones_like(self.hard_mask)
        return weight

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.hard_mask is None:
            self.right_inverse(theta)
        coupling = self._coupling
        # a soft Spartan mask in a batched node: its weight, computed with the segment's
        # (checked before spec(), which every layer of every forward pass would pay)
        if (coupling is not None and coupling.batched and self._scope != "none"
                and self.soft_active and self.method == "spartan" and not self.is_frozen
                and coupling.owns(self, theta)):
            return coupling.weight(self)  # compiler-disabled
        spec = self.spec()
        tau: torch.Tensor | None = None
        if coupling is not None and spec.scope == "shared" and spec.soft and (
                spec.method == "spartan") and torch.is_grad_enabled() and theta.requires_grad:
            tau = coupling.threshold()  # compiler-disabled
        return MaskedWeight.apply(theta, tau, spec)

    # -- state, written through update / freeze ---------------------------------------
    def update(
        self,
        hard_mask: torch.Tensor,
        *,
        threshold: torch.Tensor | float = 0.0,
        beta: float = 0.0,
        cost: float | None = None,
        scope: Scope = "none",
        coupling: Coupling | None = None,
    ) -> None:
        """Write the mask state of the next step.

        Args:
            hard_mask: bool, the block-grid shape of the weight.
            threshold: ``tau``: a number, a 0-dim tensor, or one per N:M group (a 1-D tensor of
                ``numel / m`` entries; groups of ``m`` along dim 1).
            beta: the soft mask's sharpness; ``0`` turns the soft mask off (``w = theta * h``).
            cost: the cost of one block-grid entry (unchanged when ``None``).
            scope: where the threshold's budget lives (``"local"``: the mask's own segments;
                ``"shared"``: with ``coupling``; ``"none"``: ``tau`` treated as a constant).
            coupling: the :class:`~torchspartan.coupling.Coupling` of a shared budget.
        """
        self._check_hard(hard_mask)
        tau = torch.as_tensor(threshold, dtype=torch.float64)
        tau = tau.to(self.threshold.device, non_blocking=tau.device.type == "cpu")  # no wait
        if tau.shape == self.threshold.shape:
            self.threshold.copy_(tau)
        else:
            self.threshold = tau.clone()
        self.beta.fill_(beta)
        if cost is not None:
            self.cost.fill_(cost)
        self._bind_state(hard_mask, beta, scope, coupling)

    def _check_hard(self, hard_mask: torch.Tensor) -> None:
        shape = self.buffer("hard_mask").shape
        if hard_mask.shape != shape or hard_mask.dtype != torch.bool:
            raise ValueError(
                f"hard_mask must be a bool tensor of shape {tuple(shape)}, got "
                f"{hard_mask.dtype} {tuple(hard_mask.shape)}"
            )

    def buffer(self, name: str) -> torch.Tensor:
        """The buffer ``name``: ``self.<name>`` without ``nn.Module.__getattr__``'s slow path
        (every mask's buffers are read at every update, after the step's host read, while a GPU
        waits)."""
        return self._buffers[name]  # type: ignore[return-value]

    def _bind_state(self, hard_mask: torch.Tensor, beta: float, scope: Scope,
                    coupling: Coupling | None) -> None:
        # the buffer's slot itself: nn.Module.__setattr__ re-registers the buffer, which every
        # mask pays at every update (the tensor's shape and dtype were checked: _check_hard)
        self._buffers["hard_mask"] = hard_mask
        if self._coupling is not None and self._coupling is not coupling:
            self._coupling._cache = None
        self._set_plain(soft_active=beta > 0, _coupling=coupling,
                        _scope=scope if beta > 0 else "none")

    def _set_plain(self, **values: Any) -> None:
        """Set plain Python attributes (no tensor, module or parameter among them) without
        ``nn.Module.__setattr__``'s registration checks: every mask pays them at every update."""
        self.__dict__.update(values)

    def join(self, coupling: Coupling) -> None:
        """Have ``coupling``'s batched node compute this mask's weight (its own threshold and
        budget: ``scope="local"``, as it is); see :meth:`Coupling.attach`."""
        if self._scope != "local":
            raise ValueError(f"only a mask with a budget of its own joins a coupling, this one "
                             f"has scope={self._scope!r}")
        self._coupling = coupling

    @property
    def scope(self) -> Scope:
        """Where the threshold's budget lives: ``"shared"``, ``"local"`` or ``"none"``."""
        return self._scope

    def unbind(self, coupling: Coupling | None = None) -> None:
        """Drop the shared threshold (``tau`` becomes a constant); only ``coupling``'s if given."""
        if coupling is None or self._coupling is coupling:
            self._set_plain(_coupling=None,
                            _scope="none" if self._scope == "shared" else self._scope)

    def factor(self, theta: torch.Tensor) -> torch.Tensor:
        """``m * h`` (``h`` alone with the soft mask off), block-grid shape, for ``theta``."""
        spec = self.spec()
        if spec.method == "spartan" and spec.soft:
            return soft_mask(theta, spec).mul_(spec.hard)
        return spec.hard

    @torch.no_grad()
    def freeze(self, theta: torch.Tensor, *, fold: bool = True) -> None:
        """Fine-tuning: fold ``theta <- theta * m * h`` once; then ``w = theta * h`` for good.
        ``fold=False``: the caller has folded ``theta`` (a sharded weight, shard by shard)."""
        if fold:
            theta.copy_(block_mul(theta, self.factor(theta), self.sizes))
        self.update(self.hard_mask, threshold=self.threshold, beta=0.0)
        self.frozen.fill_(True)
        self.is_frozen = True

    def thaw(self) -> None:
        """Undo the frozen flag (a resumed checkpoint taken before the freeze)."""
        self.frozen.fill_(False)
        self.is_frozen = False

    @property
    def sizes(self) -> tuple[int, ...]:
        """The block size along every dimension of the weight (1 where it is not blocked)."""
        return block_sizes(self.buffer("hard_mask").shape, self.block)

    def spec(self) -> MaskSpec:
        """The per-step description the weight function computes with."""
        sizes = self.sizes
        method = "masked" if (self.is_frozen or self.method == "fixed") else self.method
        group = None
        if self.threshold.dim() == 1:
            group = self.hard_mask.numel() // self.threshold.numel()
        backward = self.backward_mask if method == "topkast" else None
        sink = self.dense_grad.add if self.dense_grad.armed else None
        return MaskSpec(method, sizes, self.hard_mask, self.beta, self.cost, self.soft_active,
                        self.threshold, group, self._scope, backward, sink)

    # -- the extra state of Top-KAST and RigL ----------------------------------------------
    @property
    def coupling(self) -> Coupling | None:
        """The coupling this mask's threshold is bound to (``None``: none)."""
        return self._coupling

    def set_backward_mask(self, backward: torch.Tensor) -> None:
        """Top-KAST: the backward set ``B`` (bool, block-grid shape); gradients reach ``B`` only."""
        if self.method != "topkast":
            raise ValueError(f"set_backward_mask is for method='topkast' masks, this one is "
                             f"method={self.method!r}")
        if backward.shape != self.hard_mask.shape or backward.dtype != torch.bool:
            raise ValueError(f"backward must be a bool tensor of shape "
                             f"{tuple(self.hard_mask.shape)}, got {backward.dtype} "
                             f"{tuple(backward.shape)}")
        self.backward_mask = backward

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

    def check_tensor(self, weight: torch.Tensor) -> None:
        """Raise ``ValueError`` for a tensor a mask cannot serve: not floating point, empty,
        on the meta device, or not a dense (strided) tensor."""
        if weight.layout != torch.strided:
            raise ValueError(f"a SpartanMask needs a dense weight, got layout {weight.layout}; "
                             f"exclude this tensor")
        if not weight.is_floating_point():
            raise ValueError(f"a SpartanMask needs a floating-point weight, got {weight.dtype}; "
                             f"exclude this tensor")
        if weight.numel() == 0:
            raise ValueError(f"a SpartanMask needs a non-empty weight, got shape "
                             f"{tuple(weight.shape)}; exclude this tensor")
        if weight.is_meta:
            raise ValueError("a SpartanMask needs a weight with values, got one on the meta "
                             "device (model.to_empty() would leave the mask's buffers "
                             "uninitialised); materialise and initialise the model first, then "
                             "sparsify it")

    def grid_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the hard mask for a weight of ``shape`` (one entry per block)."""
        sizes = self._sizes_for(shape)
        return tuple(n // s for n, s in zip(shape, sizes, strict=True))

    @property
    def block_numel(self) -> int:
        return math.prod(self.block) if self.block is not None else 1

    def _apply(self, fn: Any, recurse: bool = True) -> SpartanMask:
        """``model.half()``/``.to(dtype)`` must not round tau, beta and cost: keep them float64."""
        scalars = {n: getattr(self, n) for n in ("threshold", "beta", "cost")}
        super()._apply(fn, recurse)
        for name, before in scalars.items():
            after = getattr(self, name)
            if after.dtype != torch.float64:
                setattr(self, name, before.to(device=after.device))
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checked whole before anything is copied: a bad entry leaves this mask as it was (and
        # load_state_dict raises, naming it). An N:M threshold has one entry per group; a
        # checkpoint of release 0.1 has no 'frozen'.
        problems = entry_problems(state_dict, prefix, self.hard_mask)
        if problems:
            error_msgs = args[-1]
            error_msgs.extend(f"{prefix[:-1] or 'mask'}: {p}" for p in problems)
            return
        tau = state_dict.get(prefix + "threshold")
        if isinstance(tau, torch.Tensor) and tau.shape != self.threshold.shape:
            self.threshold = torch.empty_like(tau, dtype=torch.float64,
                                              device=self.threshold.device)
        if prefix + "frozen" not in state_dict:
            state_dict[prefix + "frozen"] = self.frozen.clone()
        if self.method == "topkast" and prefix + "backward_mask" not in state_dict:
            # written before Top-KAST had a backward set (identity backward): B = everything
            hard = state_dict.get(prefix + "hard_mask", self.hard_mask)
            if isinstance(hard, torch.Tensor):
                state_dict[prefix + "backward_mask"] = torch.ones_like(hard, dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _refresh_flags(self, *_: Any) -> None:
        self.soft_active = bool(self.beta > 0)
        self.is_frozen = bool(self.frozen)

    def extra_repr(self) -> str:
        s = f"method={self.method!r}"
        if self.block is not None:
            s += f", block={self.block}"
        return s

    def __getstate__(self) -> dict[str, Any]:
        """Pickled masks are unbound from any coupling, as copies are (same masks, same outputs;
        a pickled ``DualAveraging`` or ``MaskUpdater`` binds them again when loaded)."""
        state = self.__dict__.copy()
        state["_coupling"] = None
        if state.get("_scope") == "shared":
            state["_scope"] = "none"
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> SpartanMask:
        """Copies are unbound from any coupling (same masks, same outputs)."""
        import copy

        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k == "_coupling" else copy.deepcopy(v, memo)
        if new._scope == "shared":
            new._scope = "none"
        return new


def _check_block(block: Any) -> tuple[int, ...]:
    """``block`` as a tuple of positive integer sizes."""
    if isinstance(block, (numbers.Integral, torch.Tensor)) or not isinstance(block, Sequence):
        raise TypeError(f"block must be a tuple of sizes, one per leading dim (e.g. block=(16, "
                        f"16)), got {block!r}")
    ok = all(isinstance(b, (int, numbers.Integral)) and not isinstance(b, bool) for b in block)
    if not ok or len(block) == 0 or any(b < 1 for b in block):
        raise ValueError(f"block must be a tuple of positive integer sizes, got {block!r}")
    return tuple(int(b) for b in block)


def update_masks(masks: Sequence[SpartanMask], hard_masks: Sequence[torch.Tensor], *,
                 threshold: torch.Tensor, betas: Sequence[float], scope: Scope = "none",
                 coupling: Coupling | None = None) -> None:
    """:meth:`SpartanMask.update` of several masks with one 0-dim ``threshold`` (on their
    device), or one each (a 1-D ``threshold``), each with its beta: the buffer writes are three
    multi-tensor ops, not two per mask. Every hard mask is checked before anything is written."""
    for m, h in zip(masks, hard_masks, strict=True):
        m._check_hard(h)
    taus = [m.buffer("threshold") for m in masks]
    each = list(threshold.unbind()) if threshold.dim() == 1 else [threshold] * len(taus)
    if any(t.shape != () or t.device != threshold.device for t in taus):
        for m, h, b, t in zip(masks, hard_masks, betas, each, strict=True):
            m.update(h, threshold=t, beta=b, scope=scope, coupling=coupling)
        return
    torch._foreach_copy_(taus, each)
    beta_buffers = [m.buffer("beta") for m in masks]
    torch._foreach_zero_(beta_buffers)
    torch._foreach_add_(beta_buffers, [float(b) for b in betas])
    for m, h, b in zip(masks, hard_masks, betas, strict=True):
        m._bind_state(h, b, scope, coupling)


class DenseGrad:
    """RigL's dense gradient ``dL/dw`` of one mask: while ``armed``, the mask's backward adds
    the gradient of each pass (micro-batches sum up); :meth:`take` hands it over and forgets it."""

    def __init__(self) -> None:
        self.armed = False
        self.grad: torch.Tensor | None = None

    def add(self, grad: torch.Tensor) -> None:
        if self.grad is None:
            self.grad = grad.detach().clone()
        else:
            self.grad.add_(grad.detach())

    def take(self) -> torch.Tensor | None:
        """The accumulated gradient (``None`` if no backward ran since the last take)."""
        out, self.grad = self.grad, None
        return out


def entry_problems(state_dict: dict[str, Any], prefix: str,
                   hard_mask: torch.Tensor | None) -> list[str]:
    """What is wrong with a mask's entries (under ``prefix``) of a state dict, for a mask whose
    hard mask is ``hard_mask`` (None: not created yet); nothing wrong: ``[]``."""
    out = []

    def get(name: str) -> torch.Tensor | None:
        v = state_dict.get(prefix + name)
        if v is not None and not isinstance(v, torch.Tensor):
            out.append(f"{name} must be a tensor, got {type(v).__name__}")
            return None
        return v

    hard = get("hard_mask")
    if hard is not None:
        if hard.dtype != torch.bool:
            out.append(f"hard_mask must be a bool tensor, got {hard.dtype}")
        elif hard_mask is not None and hard.shape != hard_mask.shape:
            out.append(f"hard_mask of shape {tuple(hard.shape)} does not fit this mask's "
                       f"{tuple(hard_mask.shape)} (another model, or another block?)")
    grid = hard if hard is not None else hard_mask
    back = get("backward_mask")  # Top-KAST masks only
    if back is not None and (back.dtype != torch.bool or (
            grid is not None and back.shape != grid.shape)):
        out.append(f"backward_mask must be a bool tensor of the hard mask's shape, got "
                   f"{back.dtype} of shape {tuple(back.shape)}")
    tau = get("threshold")
    if tau is not None:
        if not tau.is_floating_point() or tau.dim() > 1:
            out.append(f"threshold must be a float tensor with 0 or 1 dims, got {tau.dtype} "
                       f"of shape {tuple(tau.shape)}")
        elif tau.dim() == 1 and (grid is None or tau.numel() == 0
                                 or grid.numel() % tau.numel()):
            out.append(f"threshold has {tau.numel()} entries (one per N:M group), which do "
                       f"not divide the mask's {None if grid is None else grid.numel()}")
        elif not bool(torch.isfinite(tau).all()):
            out.append("threshold holds NaN or Inf")
    for name, low in (("beta", 0.0), ("cost", None)):
        v = get(name)
        if v is None:
            continue
        if v.numel() != 1 or not v.is_floating_point() or not math.isfinite(float(v)) or (
                float(v) < 0 if low is not None else float(v) <= 0):
            need = ">= 0" if low is not None else "> 0"
            out.append(f"{name} must be one finite number {need}, got {v.tolist()}")
    frozen = get("frozen")
    if frozen is not None and (frozen.dtype != torch.bool or frozen.numel() != 1):
        out.append(f"frozen must be one bool, got {frozen.dtype} of shape "
                   f"{tuple(frozen.shape)}")
    return out


def _check_args(method: Any, block: Any, mask: Any, min_density: Any, max_density: Any
                ) -> tuple[int, ...] | None:
    """The checks of :class:`SpartanMask`'s arguments; ``block`` as a tuple (or None)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if block is not None:
        block = _check_block(block)
    if method == "fixed" and mask is None:
        raise ValueError("method='fixed' needs mask=<bool tensor>; the mask it keeps forever")
    if method != "fixed" and mask is not None:
        raise ValueError(f"mask= is only for method='fixed', got method={method!r}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    for name, value in (("min_density", min_density), ("max_density", max_density)):
        if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
            raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (0.0 <= min_density <= max_density <= 1.0):
        raise ValueError(
            "need 0 <= min_density <= max_density <= 1, got "
            f"min_density={min_density!r}, max_density={max_density!r}"
        )
    return block
