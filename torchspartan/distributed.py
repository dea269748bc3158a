"""Sharded masks: where an FSDP2 shard sits in its tensor, and the collectives of a mask update.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores every parameter as a ``DTensor`` sharded
along dim 0 (``Shard(0)``): rank ``r`` holds rows ``[r C, (r + 1) C)`` of a tensor with ``n``
rows, ``C = ceil(n / world)`` (fewer, or none, on the last ranks). A row-major tensor's rows are a
contiguous range of its flat index, so the local shard is a contiguous piece of the tensor in the
order the hard top-k breaks ties by. The mask's state (hard mask, thresholds) stays full-size and
replicated on every rank (docs/design.md, "Sharded training"): the forward needs the whole hard
mask of a layer whenever FSDP2 has gathered its weight.

This module knows the geometry (:class:`ShardPart`: the local rows of one masked tensor on its
block grid) and the collectives (:class:`ShardGroup`: sums and maxima of small vectors, and the
gather of the local rows of the new masks). It imports nothing of the library but
``_kernels.MaskSpec``, so every module may use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from torchspartan._kernels import MaskSpec

__all__ = [
    "ORDER",
    "ShardGroup",
    "ShardPart",
    "is_sharded",
    "local_spec",
    "local_tensor",
    "shard_part",
    "sharded_finite_flags",
]

# The order that works, quoted by every error about it.
ORDER = ("ts.sparsify(model), then fully_shard on the blocks and the root, then the base "
         "optimizer over model.parameters(), then ts.DualAveraging(...)")


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor``; any other tensor itself."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardPart:
    """The local part of one masked tensor, in rows of its block grid.

    Attributes:
        name: the masked tensor's qualified name (for errors).
        grid_rows: rows of the block grid (the hard mask's dim 0).
        chunk: grid rows per rank (the last ranks hold fewer, possibly none).
        start, stop: the local grid rows ``[start, stop)``.
        row_numel: entries of the hard mask per grid row.
    """

    name: str
    grid_rows: int
    chunk: int
    start: int
    stop: int
    row_numel: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def shard_part(name: str, theta: torch.Tensor, grid: Sequence[int], block_rows: int,
               rank: int, world: int) -> ShardPart:
    """The local part of ``theta`` (a ``Shard(0)`` DTensor) on its block grid ``grid``.

    Raises:
        ValueError: a placement other than ``Shard(0)`` on a 1-D mesh, a local shard that is not
            the rows FSDP2 gives, or blocks cut by the shard boundaries (names the tensor, the
            rows per shard, the block, and the fix).
    """
    placements: tuple[Any, ...] = tuple(getattr(theta, "placements", ()))
    mesh = getattr(theta, "device_mesh", None)
    if mesh is None or mesh.ndim != 1 or len(placements) != 1 or getattr(
            placements[0], "dim", None) != 0 or not placements[0].is_shard():
        raise ValueError(
            f"{name} is sharded as {tuple(placements)} over a {getattr(mesh, 'ndim', '?')}-D "
            f"mesh; sharded masks need FSDP2's default, Shard(0) on a 1-D mesh: call fully_shard "
            f"without shard_placement_fn and with a 1-D mesh (HSDP is not supported)"
        )
    rows = int(theta.shape[0])
    chunk = -(-rows // world)
    lo, hi = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    local = local_tensor(theta)
    if local.shape[0] != hi - lo:
        raise ValueError(
            f"{name}: the local shard has {local.shape[0]} rows, FSDP2's Shard(0) gives rank "
            f"{rank} of {world} rows [{lo}, {hi}) of {rows}; shard it with fully_shard's default "
            f"placement"
        )
    if chunk % block_rows:
        raise ValueError(
            f"{name}: FSDP2 splits its {rows} rows into shards of {chunk} rows on {world} ranks, "
            f"which cuts its blocks of {block_rows} rows; a block must lie in one shard. Use a "
            f"block whose first size divides {chunk} (e.g. 1), a world size that makes the rows "
            f"per shard a multiple of {block_rows}, or exclude this tensor from the masks"
        )
    row_numel = math.prod(grid[1:]) if len(grid) > 1 else 1
    return ShardPart(name, int(grid[0]), chunk // block_rows, lo // block_rows,
                     hi // block_rows, row_numel)


def local_spec(spec: MaskSpec, part: ShardPart) -> MaskSpec:
    """``spec`` restricted to the local grid rows of ``part`` (hard mask; N:M thresholds)."""
    hard = spec.hard.narrow(0, part.start, part.rows)
    tau = spec.tau
    if spec.group is not None:
        per_row = tau.numel() // part.grid_rows
        tau = tau.narrow(0, part.start * per_row, part.rows * per_row)
    return replace(spec, hard=hard, tau=tau)


# Masks are gathered together up to this many entries (bytes) per collective: the masks are
# whole on every rank anyway, and every collective costs a round trip.
GATHER_BATCH = 1 << 24


class ShardGroup:
    """The collectives of a sharded mask update over one process group (the FSDP2 mesh's).

    Every method is a collective: all ranks call it, in the same order, with tensors of the
    same shape (except the local rows given to :meth:`gather_rows`).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` reduced over the ranks (a new tensor); ``op`` is ``"sum"`` or ``"max"``."""
        out = t.clone()
        dist.all_reduce(out, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=self.group)
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The engine's ``reduce`` hook: segment sums over all ranks."""
        return self.all_reduce(t, "sum")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t, "max")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``(world, *t.shape)``: every rank's ``t`` (small tensors)."""
        out = t.new_empty(self.size * t.numel())
        _all_gather(out, t.contiguous().reshape(-1), self.group)
        return out.view(self.size, *t.shape)

    def gather_rows(self, locals_: Sequence[torch.Tensor], parts: Sequence[ShardPart],
                    shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The full tensors (``shapes``, dim 0 the grid rows) from every rank's local rows.

        One collective per batch of tensors whose padded size stays within the largest tensor's
        or ``GATHER_BATCH`` entries, whichever is more (the buffer is never larger).
        """
        if not locals_:
            return []
        cap = max(GATHER_BATCH, *(max(1, p.chunk * p.row_numel) * self.size for p in parts))
        out: list[torch.Tensor] = []
        batch: list[int] = []
        size = 0
        for k, p in enumerate(parts):
            need = p.chunk * p.row_numel * self.size
            if batch and size + need > cap:
                out += self._gather_batch([locals_[j] for j in batch],
                                          [parts[j] for j in batch], [shapes[j] for j in batch])
                batch, size = [], 0
            batch.append(k)
            size += need
        out += self._gather_batch([locals_[j] for j in batch], [parts[j] for j in batch],
                                  [shapes[j] for j in batch])
        return out

    def _gather_batch(self, locals_: Sequence[torch.Tensor], parts: Sequence[ShardPart],
                      shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        dtype = locals_[0].dtype
        wire = torch.uint8 if dtype == torch.bool else dtype
        widths = [p.chunk * p.row_numel for p in parts]
        send = torch.zeros(sum(widths), dtype=wire, device=locals_[0].device)
        offset = 0
        for t, w in zip(locals_, widths, strict=True):
            flat = t.reshape(-1)
            send.narrow(0, offset, flat.numel()).copy_(
                flat.view(torch.uint8) if dtype == torch.bool else flat)
            offset += w
        recv = send.new_empty(self.size * send.numel())
        _all_gather(recv, send, self.group)
        recv = recv.view(self.size, send.numel())
        out = []
        offset = 0
        for p, w, shape in zip(parts, widths, shapes, strict=True):
            full = recv[:, offset:offset + w].reshape(-1)[:p.grid_rows * p.row_numel]
            full = full.view(torch.bool) if dtype == torch.bool else full
            out.append(full.reshape(shape).clone())
            offset += w
        return out


def _all_gather(out: torch.Tensor, t: torch.Tensor, group: Any) -> None:
    """Every rank's flat ``t``, rank after rank, into ``out``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


def sharded_finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each (sharded) tensor is free of NaN and Inf on every rank; one collective over
    the process group of the first DTensor."""
    flags = torch.tensor([0.0 if bool(torch.isfinite(local_tensor(t)).all()) else 1.0
                          for t in tensors], dtype=torch.float64,
                         device=local_tensor(tensors[0]).device)
    mesh = next(t.device_mesh for t in tensors if is_sharded(t))  # type: ignore[attr-defined]
    dist.all_reduce(flags, dist.ReduceOp.MAX, group=mesh.get_group())
    return [f == 0.0 for f in flags.tolist()]
