"""The ImageNet recipe's train and eval loop: one epoch of optimizer steps, top-1/top-5 eval.

A step accumulates ``--accum-steps`` micro-batches (DDP gradient sync on the last only) under
autocast, then clips, steps (through the GradScaler for fp16) and advances the LR schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from reference.imagenet.digests import digest, mask_digest
from reference.imagenet.distributed import (
    DistInfo,
    all_reduce_sum,
    average_norm_statistics,
    check_identical_across_ranks,
)

__all__ = ["Trainer"]


@dataclass
class Trainer:
    args: argparse.Namespace
    info: DistInfo
    model: nn.Module  # the DDP wrapper when distributed
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer  # DualAveraging, or the base optimizer when dense
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    steps_per_epoch: int
    global_step: int = 0
    mask_checks: int = 0
    last_mask_hashes: tuple[str, ...] = ()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.args.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.amp_dtype == "bf16" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype)

    def to_device(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.to(self.info.device, non_blocking=True)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(self.info.device, non_blocking=True)

    def check_masks(self, where: str) -> None:
        if self.args.method == "dense":
            return
        self.last_mask_hashes = tuple(
            check_identical_across_ranks(self.info, "masks", mask_digest(self.unwrapped), where)
        )
        self.mask_checks += 1

    def train_one_epoch(self, epoch: int, loader: DataLoader[Any]) -> float:
        args, info = self.args, self.info
        self.model.train()
        batches: Iterator[Any] = iter(loader)
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        seen = 0
        data_time = 0.0
        start = time.perf_counter()
        for i in range(self.steps_per_epoch):
            self.optimizer.zero_grad(set_to_none=True)
            for micro in range(args.accum_steps):
                t_data = time.perf_counter()
                batch = next(batches)
                data_time += time.perf_counter() - t_data
                images, target = self.to_device(*batch)
                last = micro == args.accum_steps - 1
                sync = (
                    self.model.no_sync()  # type: ignore[operator]
                    if info.distributed and not last
                    else contextlib.nullcontext()
                )
                with sync:
                    with self.autocast():
                        loss = self.criterion(self.model(images), target) / args.accum_steps
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                loss_sum += loss.detach().double()
                seen += images.shape[0]
            if args.clip_grad_norm > 0:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            if args.check_masks_identical:
                self.check_masks(f"after step {self.global_step}")
            if info.main and (i % args.print_freq == 0 or i == self.steps_per_epoch - 1):
                rate = seen * info.world_size / (time.perf_counter() - start)
                msg = (
                    f"epoch {epoch} step {i + 1}/{self.steps_per_epoch} "
                    f"(global {self.global_step}) loss {float(loss_sum) / (i + 1):.4f} "
                    f"lr {self.optimizer.param_groups[0]['lr']:.4g} {rate:.1f} img/s "
                    f"(data wait {data_time / (time.perf_counter() - start):.0%})"
                )
                rec = getattr(self.optimizer, "last_record", None)
                if rec is not None:
                    msg += (
                        f" density {rec.density:.4f} beta {rec.beta:.2f} "
                        f"mask_change {rec.mask_change:.2e}{' frozen' if rec.frozen else ''}"
                    )
                print(msg, flush=True)
        stats = all_reduce_sum(
            torch.stack([loss_sum, loss_sum.new_tensor(self.steps_per_epoch)]), info
        )
        return float(stats[0] / stats[1])

    @torch.no_grad()
    def evaluate(self, loader: DataLoader[Any]) -> dict[str, float]:
        """Top-1/top-5 accuracy and loss over the whole validation set (all ranks)."""
        average_norm_statistics(self.unwrapped, self.info)
        model = self.unwrapped
        model.eval()
        k = min(5, self.args.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.info.device)
        for images, target in loader:
            images, target = self.to_device(images, target)
            with self.autocast():
                output = model(images)
            sums[0] += nn.functional.cross_entropy(output.float(), target, reduction="sum")
            top = output.topk(k, dim=1).indices
            hit = top.eq(target[:, None])
            sums[1] += hit[:, 0].sum()
            sums[2] += hit.any(dim=1).sum()
            sums[3] += target.numel()
        sums = all_reduce_sum(sums, self.info)
        n = max(float(sums[3]), 1.0)
        return {
            "loss": float(sums[0]) / n,
            "acc1": 100 * float(sums[1]) / n,
            "acc5": 100 * float(sums[2]) / n,
            "images": int(sums[3]),
        }

    def state_digest(self) -> str:
        return digest(
            {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict()}
        )
