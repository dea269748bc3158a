"""The ImageNet recipe's data: ImageFolder or FakeData, augmentation, per-rank loaders.

Training images get RandomResizedCrop, horizontal flips, optionally RandAugment
(``--auto-augment ra``) and RandomErasing; batches optionally mixup/cutmix
(:class:`MixupCutmixCollate`). Evaluation: resize, center crop. ``--synthetic`` swaps ImageNet for
``torchvision.datasets.FakeData`` so the whole path runs on a laptop.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.data.dataloader import default_collate
from torchvision.transforms import v2

from reference.imagenet.distributed import DistInfo

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MixupCutmixCollate",
    "build_datasets",
    "build_loaders",
    "eval_transform",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(args: argparse.Namespace) -> v2.Compose:
    ops: list[Callable[..., Any]] = [
        v2.RandomResizedCrop(args.image_size, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if args.auto_augment == "ra":
        ops.append(v2.RandAugment(num_ops=2, magnitude=args.ra_magnitude))
    ops += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    if args.random_erase > 0:
        ops.append(v2.RandomErasing(p=args.random_erase))
    return v2.Compose(ops)


def eval_transform(args: argparse.Namespace) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(args.val_resize, antialias=True),
            v2.CenterCrop(args.image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_datasets(args: argparse.Namespace) -> tuple[Dataset[Any], Dataset[Any]]:
    if args.synthetic:
        # Stored a bit larger than the crop so RandomResizedCrop and Resize do real work. FakeData
        # seeds each image from its index, so every rank and every run sees the same data.
        side = args.val_resize
        size = (3, side, side)
        train = torchvision.datasets.FakeData(
            args.synthetic_train_size, size, args.num_classes, train_transform(args)
        )
        val = torchvision.datasets.FakeData(
            args.synthetic_val_size,
            size,
            args.num_classes,
            eval_transform(args),
            random_offset=args.synthetic_train_size,
        )
        return train, val
    root = Path(args.data_path)
    train = torchvision.datasets.ImageFolder(str(root / "train"), train_transform(args))
    val = torchvision.datasets.ImageFolder(str(root / "val"), eval_transform(args))
    if len(train.classes) != args.num_classes:
        raise ValueError(
            f"{root / 'train'} has {len(train.classes)} classes but --num-classes is "
            f"{args.num_classes}; pass --num-classes {len(train.classes)}"
        )
    return train, val


class MixupCutmixCollate:
    """Batch collation that applies mixup or cutmix (one picked at random per batch).

    Targets become class probabilities, which ``nn.CrossEntropyLoss`` (with label smoothing)
    accepts. Runs in the data-loading workers, with their seeded RNG.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> None:
        ops: list[Callable[..., Any]] = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def __call__(self, batch: list[Any]) -> Any:
        return self.op(*default_collate(batch))


def build_loaders(
    args: argparse.Namespace, info: DistInfo, train: Dataset[Any], val: Dataset[Any]
) -> tuple[DataLoader[Any], DistributedSampler[Any], DataLoader[Any]]:
    # One sampler for one process too: its order depends only on (seed, epoch).
    sampler = DistributedSampler(
        train,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    collate = (
        MixupCutmixCollate(args.mixup_alpha, args.cutmix_alpha, args.num_classes)
        if args.mixup_alpha > 0 or args.cutmix_alpha > 0
        else None
    )
    pin = info.device.type == "cuda"
    train_loader = DataLoader(
        train,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        drop_last=True,
        collate_fn=collate,
    )
    # Evaluation sees every image exactly once: rank r takes images r, r + world, ...
    shard = Subset(val, range(info.rank, len(val), info.world_size))  # type: ignore[arg-type]
    val_loader = DataLoader(
        shard, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=pin
    )
    return train_loader, sampler, val_loader
