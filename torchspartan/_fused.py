"""Elementwise chains of the sync-free update as one compiled kernel each on a GPU.

On a GPU each op of the update is one kernel and one pass over the scores through memory. Two
chains of it are pure elementwise work (and their sums), which ``torch.compile`` turns into one
kernel that reads the scores once:

- :func:`bin_index`: the histogram bin of every int32 key of the device selection
  (``_select.select_on_device``): eight int32 passes as separate ops;
- :func:`sigmoid_moments`: one Newton evaluation, ``sum m``, ``sum m^2`` (and ``sum m^3``) of
  ``m = sigmoid(beta u + shift)``: four to seven passes as separate ops.

Each function is its eager ops, compiled once, on first use, for CUDA tensors
(:data:`COMPILED_ON`), with the sizes, ``beta`` and every shift as inputs, not constants: no
recompile as they move (a recompile costs seconds in the middle of training). When
compiling fails (no Triton, an unsupported setup) it warns once and runs the eager ops, which
compute the same values (the bins exactly; the sums up to the order of the additions).
``TORCHSPARTAN_COMPILE=0`` in the environment keeps the eager ops everywhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from torchspartan._chunks import moments

__all__ = ["COMPILED_ON", "bin_index", "sigmoid_moments"]

# The device types whose tensors take the compiled kernels (a CPU takes the chunked routes of
# ``_chunks``, which keep a chunk in the cache instead).
COMPILED_ON = {"cuda"}


class _Compiled:
    """``fn`` compiled on first use for contiguous tensors of :data:`COMPILED_ON`; ``eager``
    (default ``fn``) else, and after compiling failed."""

    def __init__(self, fn: Callable[..., Any], eager: Callable[..., Any] | None = None) -> None:
        self.fn = fn
        self.eager = eager if eager is not None else fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = os.environ.get("TORCHSPARTAN_COMPILE", "1") == "0"

    def __call__(self, x: torch.Tensor, *args: Any) -> Any:
        if self.failed or x.device.type not in COMPILED_ON or not x.is_contiguous():
            return self.eager(x, *args)  # (a strided sample would be a second compile)
        if self.compiled is None:
            # shapes and numbers as inputs from the first compile: one kernel for every
            # problem size and sharpness (a recompile costs seconds, mid-training)
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=True)
        try:
            return self.compiled(x, *args)
        except Exception as exc:  # the eager ops compute the same values
            self.failed = True
            warnings.warn(f"torchspartan: compiling {self.fn.__name__} failed ({exc!r:.300}); "
                          f"the mask update runs its eager ops", stacklevel=3)
            return self.eager(x, *args)


def _bin_index(keys: torch.Tensor, key_lo: torch.Tensor, bins: int, lanes: int
               ) -> torch.Tensor:
    rel = keys - (key_lo - 1)
    lane = keys.bitwise_and(lanes - 1)
    return torch.where(rel < 1, lane + (bins + 2),
                       torch.where(rel > bins, lane + (bins + 2 + lanes), rel))


def _moments2(units: torch.Tensor, beta: float, shift: torch.Tensor,
              out: torch.Tensor | None) -> torch.Tensor:
    m = torch.sigmoid(units * beta + shift)
    return torch.stack([m.sum(), (m * m).sum()]).double()


def _moments3(units: torch.Tensor, beta: float, shift: torch.Tensor,
              out: torch.Tensor | None) -> torch.Tensor:
    m = torch.sigmoid(units * beta + shift)
    sq = m * m
    return torch.stack([m.sum(), sq.sum(), (sq * m).sum()]).double()


def _moments2_eager(units: torch.Tensor, beta: float, shift: torch.Tensor,
                    out: torch.Tensor | None) -> torch.Tensor:
    return moments(torch.add(shift, units, alpha=beta, out=out).sigmoid_(), False)


def _moments3_eager(units: torch.Tensor, beta: float, shift: torch.Tensor,
                    out: torch.Tensor | None) -> torch.Tensor:
    return moments(torch.add(shift, units, alpha=beta, out=out).sigmoid_(), True)


# one compiled function per variant (a flag argument would be a guard: two compiles each)
_bin_index_compiled = _Compiled(_bin_index)
_moments2_compiled = _Compiled(_moments2, _moments2_eager)
_moments3_compiled = _Compiled(_moments3, _moments3_eager)


def bin_index(keys: torch.Tensor, key_lo: torch.Tensor, bins: int, lanes: int
              ) -> torch.Tensor:
    """The histogram bin of every key (flat int32, ``>= 0``) for a window of ``bins`` keys
    from ``key_lo`` (0-dim int32, on the keys' device): ``1..bins`` one key each; the keys
    below the window in ``bins + 2 + lane``, those above in ``bins + 2 + lanes + lane``, with
    ``lane`` the key's low bits (``lanes``: a power of two), so that a GPU's atomic adds to the
    bins outside the window do not queue on one."""
    return _bin_index_compiled(keys, key_lo, bins, lanes)


def sigmoid_moments(units: torch.Tensor, beta: float, shift: torch.Tensor, cubes: bool,
                    out: torch.Tensor | None) -> torch.Tensor:
    """``[sum m, sum m^2]`` (with ``cubes`` also ``sum m^3``) of
    ``m = sigmoid(beta * units + shift)`` (``shift``: 0-dim), summed in the units' dtype,
    returned in float64. The eager ops write ``m`` into ``out`` (the compiled kernel writes
    nothing)."""
    return (_moments3_compiled if cubes else _moments2_compiled)(units, beta, shift, out)
