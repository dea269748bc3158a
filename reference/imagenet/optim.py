"""The ImageNet recipe's optimisation: steps per epoch, the peak LR, the optimizer, the LR
schedule and the GradScaler, from the flags.

SGD (Nesterov) or AdamW with weight decay on weights only, wrapped in ``ts.DualAveraging`` for a
sparse ``--method``; a per-step linear warm-up then cosine decay; the peak LR scaled linearly
with the global batch (``--lr-ref-batch``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from reference.common import param_groups, spartan_optimizer, warmup_cosine

__all__ = ["build_optimizer", "build_training", "peak_lr", "steps_per_epoch"]


def steps_per_epoch(args: argparse.Namespace, batches: int) -> int:
    """Optimizer steps per epoch from the loader's ``batches`` per rank (``--accum-steps``,
    ``--max-steps-per-epoch``)."""
    steps = batches // args.accum_steps
    if args.max_steps_per_epoch > 0:
        steps = min(steps, args.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(
            f"an epoch has no optimizer step: {batches} batches per rank "
            f"for accum_steps={args.accum_steps}; lower --batch-size"
        )
    return steps


def peak_lr(args: argparse.Namespace, global_batch: int) -> float:
    """``--lr`` scaled linearly from ``--lr-ref-batch`` to ``global_batch`` (as is for 0)."""
    return args.lr * global_batch / args.lr_ref_batch if args.lr_ref_batch > 0 else args.lr


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """The base optimizer (``--opt``); no weight decay on biases and normalisation layers.
    Fused on CUDA: it skips a step on the device, so neither the GradScaler nor
    ``ts.DualAveraging``'s finite check waits for the backward (docs/design.md)."""
    groups = param_groups(model, args.weight_decay, masked_decay=args.method != "topkast")
    fused = all(p.is_cuda for p in model.parameters())
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.nesterov,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def build_training(
    model: nn.Module,
    args: argparse.Namespace,
    lr: float,
    steps_per_epoch: int,
    device: torch.device,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler | None]:
    """The optimizer (DualAveraging around the base one unless dense), the warm-up + cosine
    scheduler over ``--epochs``, and a GradScaler for fp16 autocast (else None)."""
    total_steps = steps_per_epoch * args.epochs
    optimizer = spartan_optimizer(build_optimizer(model, args, lr), model, args, total_steps)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "fp16" else None
    return optimizer, scheduler, scaler
