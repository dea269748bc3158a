"""Elementwise chains of the sync-free update as one compiled kernel each on a GPU.

On a GPU each op of the update is one kernel and one pass over the scores through memory. Two
chains of it are pure elementwise work (and their sums), which ``torch.compile`` turns into one
kernel that reads the scores once:

- :func:`bin_index`: the histogram bin of every int32 key of the device selection
  (``_select.select_on_device``): eight int32 passes as separate ops;
- :func:`sigmoid_moments`: one Newton evaluation, ``sum m``, ``sum m^2`` (and ``sum m^3``) of
  ``m = sigmoid(beta u + shift)``: four to seven passes as separate ops.

Each function is its eager ops, compiled on first use for CUDA tensors (:data:`COMPILED_ON`)
with ``beta`` and every shift as inputs, not constants (no recompile as they move). When
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
    """``fn`` compiled on first use for tensors of :data:`COMPILED_ON`; ``eager`` (default
    ``fn``) else, and after compiling failed."""

    def __init__(self, fn: Callable[..., Any], eager: Callable[..., Any] | None = None) -> None:
        self.fn = fn
        self.eager = eager if eager is not None else fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = os.environ.get("TORCHSPARTAN_COMPILE", "1") == "0"

    def __call__(self, x: torch.Tensor, *args: Any) -> Any:
        if self.failed or x.device.type not in COMPILED_ON:
            return self.eager(x, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True)
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


def _sigmoid_moments(units: torch.Tensor, beta: float, shift: torch.Tensor, cubes: bool,
                     out: torch.Tensor | None) -> torch.Tensor:
    m = torch.sigmoid(units * beta + shift)
    sq = m * m
    sums = [m.sum(), sq.sum()] + ([(sq * m).sum()] if cubes else [])
    return torch.stack(sums).double()


def _sigmoid_moments_eager(units: torch.Tensor, beta: float, shift: torch.Tensor, cubes: bool,
                           out: torch.Tensor | None) -> torch.Tensor:
    return moments(torch.add(shift, units, alpha=beta, out=out).sigmoid_(), cubes)


_bin_index_compiled = _Compiled(_bin_index)
_sigmoid_moments_compiled = _Compiled(_sigmoid_moments, _sigmoid_moments_eager)


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
    return _sigmoid_moments_compiled(units, beta, shift, cubes, out)
