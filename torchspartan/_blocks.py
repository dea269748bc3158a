"""Shapes of a mask: blocks of a weight, and the grouped view that N:M masks are solved in.

A block mask keeps or drops whole blocks of a weight; its hard mask, scores and soft mask live on
the *block grid* (one entry per block). An N:M mask groups ``m`` consecutive entries along the
input dimension (dim 1) of a weight; its scores are solved as rows of length ``m``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "BlockedViews",
    "block_mul",
    "block_reduce",
    "block_sizes",
    "from_rows",
    "to_rows",
]


def block_sizes(shape: Sequence[int], block: Sequence[int] | None) -> tuple[int, ...]:
    """Per-dimension block sizes for a tensor ``shape`` (missing trailing dims are 1)."""
    if block is None:
        return (1,) * len(shape)
    return tuple(block) + (1,) * (len(shape) - len(block))


def interleaved(shape: Sequence[int], sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Blocked view ``(n0/b0, b0, n1/b1, ...)`` of ``shape`` and its grid ``(n0/b0, 1, ...)``."""
    inter: list[int] = []
    grid: list[int] = []
    for n, s in zip(shape, sizes, strict=True):
        inter += [n // s, s]
        grid += [n // s, 1]
    return inter, grid


def block_reduce(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Sum ``x`` over each block; the result has the block-grid shape."""
    if all(s == 1 for s in sizes):
        return x
    inter, _ = interleaved(x.shape, sizes)
    return x.reshape(inter).sum(dim=tuple(range(1, 2 * x.dim(), 2)))


def block_mul(x: torch.Tensor, y: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``x * block_expand(y)`` by broadcasting over a blocked view: no expanded copy of ``y``."""
    if all(s == 1 for s in sizes):
        return x * y
    inter, grid = interleaved(x.shape, sizes)
    return (x.reshape(inter) * y.reshape(grid)).reshape(x.shape)


def to_rows(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """The problem view of a grid tensor: ``(1, numel)``, or ``(numel / group, group)`` rows of
    ``group`` consecutive entries along dim 1 (the input dimension) for N:M masks."""
    if group is None:
        return x.reshape(1, -1)
    if x.dim() > 1:
        x = x.movedim(1, -1)
    return x.reshape(-1, group)


def from_rows(rows: torch.Tensor, shape: Sequence[int], group: int | None) -> torch.Tensor:
    """Inverse of :func:`to_rows`: back to the grid ``shape``."""
    if group is None or len(shape) < 2:
        return rows.reshape(shape)
    moved = [shape[0], *shape[2:], shape[1]]
    return rows.reshape(moved).movedim(-1, 1)


class BlockedViews:
    """Blocked views ``(n0/b0, b0, n1/b1, ...)`` of weights, made once and kept between steps
    (each view is a dispatched op; the batched masks use them every forward, backward and
    update). A view is made again when its weight's storage or shape changed
    (``module.to(...)``); a weight that is not contiguous gets a fresh reshape each time."""

    def __init__(self) -> None:
        self._views: dict[int, tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = {}

    def of(self, theta: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        sizes = tuple(sizes)
        entry = self._views.get(id(theta))
        if entry is not None and entry[0] is theta and entry[1] == sizes and (
                entry[2].data_ptr() == theta.data_ptr()) and theta.is_contiguous():
            return entry[2]
        with torch.no_grad():
            view = theta.reshape(interleaved(theta.shape, sizes)[0])
        if theta.is_contiguous():
            self._views[id(theta)] = (theta, sizes, view)
        return view
