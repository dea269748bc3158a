"""Distributed helpers of the ImageNet recipe: torchrun set-up, DDP, cross-rank checks.

The masks are computed independently on every rank from the replicated weights (the library's
mask update is deterministic), so DDP is told not to re-broadcast buffers at every forward
(``forward_sync_buffers=False``): that would send every mask (one byte per weight) each step and
would hide a divergence. Instead the masks are hashed and compared across ranks at every
checkpoint and at the end (every step with ``--check-masks-identical``), the weights too at
checkpoints, and a mismatch stops the run (:func:`check_identical_across_ranks`). BatchNorm
running statistics, which would then drift apart, are averaged over ranks before each evaluation
and checkpoint (:func:`average_norm_statistics`).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "average_norm_statistics",
    "check_identical_across_ranks",
    "init_distributed",
    "log",
    "wrap_ddp",
]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(args: argparse.Namespace) -> DistInfo:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_flush_denormal(True)
    if world > 1:
        backend = (
            args.dist_backend if args.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
        )
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if backend == "nccl" else None,
        )
    return DistInfo(rank, world, local_rank, device)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward buffer broadcast (renamed in torch 2.13)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}  # older torch; every rank starts from the same seed


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` in DistributedDataParallel without per-forward buffer sync; as is on one rank."""
    if not info.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[info.local_rank] if info.device.type == "cuda" else None,
        **_no_forward_buffer_sync(),
    )


def log(info: DistInfo, *parts: Any) -> None:
    """Print on rank 0 only."""
    if info.main:
        print(*parts, flush=True)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t)
    return t


def check_identical_across_ranks(info: DistInfo, what: str, value: str, where: str) -> list[str]:
    """All-gather ``value`` (a hash) and raise if any rank's differs."""
    if not info.distributed:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    if len(set(values)) != 1:
        table = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise RuntimeError(
            f"{what} differ across ranks {where} ({table}); the replicas have "
            f"diverged, stop and check determinism of the mask update"
        )
    return values


def average_norm_statistics(model: nn.Module, info: DistInfo) -> None:
    """Average BatchNorm running statistics over ranks (buffers are not synced every step)."""
    if not info.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf.div_(info.world_size)
