"""Elementwise chains of the mask work as one compiled kernel each on a GPU.

On a GPU each op is one kernel and one pass through memory. The chains below are pure
elementwise work (and their sums), which ``torch.compile`` turns into one kernel that reads its
inputs once:

- :func:`bin_index`: the histogram bin of every int32 key of the device selection
  (``_select.select_on_device``): eight int32 passes as separate ops;
- :func:`sigmoid_moments`: one Newton evaluation, ``sum m``, ``sum m^2`` (and ``sum m^3``) of
  ``m = sigmoid(beta u + shift)``: four to seven passes as separate ops;
- :func:`masked_weights`, :func:`weight_grad_sums`, :func:`weight_grads`: the batched masked
  weights of unstructured Spartan masks (``coupling.py``), one pass per weight in the forward
  (six multi-tensor passes as separate ops) and two in the backward (about twenty).

:class:`Compiled` compiles a function once, on first use, for CUDA tensors
(:data:`COMPILED_ON`). When compiling fails (no Triton, an unsupported setup, too many
recompiles) it warns once and the caller runs its eager ops, which compute the same values (the
bins exactly; sums and sigmoids up to rounding); under a ``TorchDispatchMode`` the eager ops run
without a try. ``TORCHSPARTAN_COMPILE=0`` in the environment keeps the eager ops everywhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchspartan._chunks import moments

__all__ = ["COMPILED_ON", "Compiled", "bin_index", "masked_weights", "sigmoid_moments",
           "weight_grad_sums", "weight_grads"]

# The device types whose tensors take the compiled kernels. A CPU keeps its eager routes: the
# chunked passes of ``_chunks`` (a chunk in the cache: faster there than a compiled kernel) and
# the multi-tensor ops (a compile of every model a process trains would cost seconds each).
COMPILED_ON = {"cuda"}


class Compiled:
    """``fn`` compiled on first use where its first argument (a tensor, or a list of them) is
    on a device of :data:`COMPILED_ON`; ``fn`` run eagerly else, and once compiling failed
    (warned once). ``dynamic``: shapes and numbers as inputs from the first compile (one
    kernel for every problem size and sharpness: a recompile costs seconds, mid-training);
    else one compile per set of shapes (the weights of one model). ``contiguous``: strided
    inputs are not compiled for (a strided sample would be a second compile)."""

    def __init__(self, fn: Callable[..., Any], *, dynamic: bool = True,
                 contiguous: bool = True) -> None:
        self.fn = fn
        self.dynamic, self.contiguous = dynamic, contiguous
        self.compiled: Callable[..., Any] | None = None
        self.failed = os.environ.get("TORCHSPARTAN_COMPILE", "1") == "0"

    def applies(self, first: torch.Tensor | Sequence[torch.Tensor]) -> bool:
        """Whether the compiled kernel runs for these inputs. Not under a ``TorchDispatchMode``
        (a user's ``FlopCounterMode``, a tracer's fake tensors): ``torch.compile`` refuses to
        compile there, which is no reason to give up on it for the rest of the run; the eager
        ops run inside the mode, the compiled kernel again after it."""
        x = first if isinstance(first, torch.Tensor) else first[0]
        return not self.failed and x.device.type in COMPILED_ON and (
            not self.contiguous or x.is_contiguous()) and (
            torch._C._len_torch_dispatch_stack() == 0)

    def try_call(self, *args: Any) -> Any:
        """The compiled function's result, or None where it does not apply or compiling
        failed (the caller then runs its eager ops)."""
        if not self.applies(args[0]):
            return None
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=self.dynamic)
        try:
            return self.compiled(*args)
        except Exception as exc:  # the eager ops compute the same values
            self.failed = True
            warnings.warn(f"torchspartan: compiling {self.fn.__name__} failed ({exc!r:.300}); "
                          f"the masks run their eager ops", stacklevel=3)
            return None

    def __call__(self, *args: Any) -> Any:
        """The compiled function's result, or ``fn``'s run eagerly."""
        out = self.try_call(*args)
        return self.fn(*args) if out is None else out


def _bin_index(keys: torch.Tensor, key_lo: torch.Tensor, bins: int, lanes: int
               ) -> torch.Tensor:
    rel = keys - (key_lo - 1)
    lane = keys.bitwise_and(lanes - 1)
    return torch.where(rel < 1, lane + (bins + 2),
                       torch.where(rel > bins, lane + (bins + 2 + lanes), rel))


def _moments2(units: torch.Tensor, beta: float, shift: torch.Tensor) -> torch.Tensor:
    m = torch.sigmoid(units * beta + shift)
    return torch.stack([m.sum(), (m * m).sum()]).double()


def _moments3(units: torch.Tensor, beta: float, shift: torch.Tensor) -> torch.Tensor:
    m = torch.sigmoid(units * beta + shift)
    sq = m * m
    return torch.stack([m.sum(), sq.sum(), (sq * m).sum()]).double()


# one compiled function per variant (a flag argument would be a guard: two compiles each)
_bin_index_compiled = Compiled(_bin_index)
_moments2_compiled = Compiled(_moments2)
_moments3_compiled = Compiled(_moments3)


def bin_index(keys: torch.Tensor, key_lo: torch.Tensor, bins: int, lanes: int
              ) -> torch.Tensor:
    """The histogram bin of every key (flat int32, ``>= 0``) for a window of ``bins`` keys
    from ``key_lo`` (0-dim int32, on the keys' device): ``1..bins`` one key each; the keys
    below the window in ``bins + 2 + lane``, those above in ``bins + 2 + lanes + lane``, with
    ``lane`` the key's low bits (``lanes``: a power of two), so that a GPU's atomic adds to the
    bins outside the window do not queue on one."""
    return _bin_index_compiled(keys, key_lo, bins, lanes)


def sigmoid_moments(units: torch.Tensor, beta: float, shift: torch.Tensor, cubes: bool,
                    out: torch.Tensor | None, keep: bool = False) -> torch.Tensor:
    """``[sum m, sum m^2]`` (with ``cubes`` also ``sum m^3``) of
    ``m = sigmoid(beta * units + shift)`` (``shift``: 0-dim), summed in the units' dtype,
    returned in float64. The eager ops write ``m`` into ``out``; ``keep``: ``m`` is wanted
    there, so they run (the compiled kernel writes nothing)."""
    if not keep:
        sums = (_moments3_compiled if cubes else _moments2_compiled).try_call(units, beta, shift)
        if sums is not None:
            return sums
    return moments(torch.add(shift, units, alpha=beta, out=out).sigmoid_(), cubes)


# -- the batched masked weights of unstructured Spartan masks (coupling.py) ------------------
# ``params``: the tensors' ``beta_k / c_k`` then their offsets ``-beta_k tau_k``, one vector in
# the weights' dtype; ``m_k = sigmoid(|theta_k| beta_k / c_k - beta_k tau_k)``.


def masked_weights(thetas: list[torch.Tensor], hards: list[torch.Tensor], params: torch.Tensor
                   ) -> list[torch.Tensor]:
    """``theta m h`` of every tensor, one pass each (the eager ops take six)."""
    k = len(thetas)
    return [t * torch.sigmoid(t.abs() * params[i] + params[k + i]) * h
            for i, (t, h) in enumerate(zip(thetas, hards, strict=True))]


def weight_grad_sums(thetas: list[torch.Tensor], grads: list[torch.Tensor],
                     params: torch.Tensor) -> torch.Tensor:
    """``sum a g theta`` of every tensor, then ``sum a`` of every tensor (``a = m (1 - m)``),
    float64: what the backward's cross terms need."""
    k = len(thetas)
    sums, dens = [], []
    for i, (t, g) in enumerate(zip(thetas, grads, strict=True)):
        m = torch.sigmoid(t.abs() * params[i] + params[k + i])
        a = m * (1 - m)
        sums.append((a * g * t).sum())
        dens.append(a.sum())
    return torch.stack(sums + dens).double()


def weight_grads(thetas: list[torch.Tensor], grads: list[torch.Tensor], params: torch.Tensor,
                 factors: torch.Tensor) -> list[torch.Tensor]:
    """``dL/dtheta = g m + sign(theta) a (beta/c g theta + K)`` of every tensor, one pass each
    (``factors``: each tensor's ``K``, its cross term over ``a``)."""
    k = len(thetas)
    out = []
    for i, (t, g) in enumerate(zip(thetas, grads, strict=True)):
        m = torch.sigmoid(t.abs() * params[i] + params[k + i])
        a = m * (1 - m)
        out.append(g * m + torch.sign(t) * a * (g * t * params[i] + factors[i]))
    return out
