"""The ImageNet recipe's model: a torchvision network with Spartan masks on the chosen layers."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torchvision
from torch import nn

import torchspartan as ts

__all__ = ["MASK_TYPES", "build_model", "build_sparse_model", "register_masks"]

MASK_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "mha": (nn.MultiheadAttention,),
}
"""``--mask-types`` kinds and the layer types each one masks."""


def build_model(args: argparse.Namespace) -> nn.Module:
    """``--model``: a torchvision model by name, or ``vit_tiny`` (2 layers, width 32)."""
    if args.model == "vit_tiny":
        return torchvision.models.VisionTransformer(
            image_size=args.image_size,
            patch_size=args.image_size // 4,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=args.num_classes,
        )
    kwargs: dict[str, Any] = {"weights": None, "num_classes": args.num_classes}
    if args.model.startswith("vit_"):
        kwargs["image_size"] = args.image_size
    return torchvision.models.get_model(args.model, **kwargs)


def register_masks(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """``ts.sparsify`` on the layers the flags choose; returns the masked tensors' names."""
    include = tuple(t for kind in args.mask_types.split(",") for t in MASK_TYPES[kind])
    return ts.sparsify(
        model,
        include,
        names=args.mask_names,
        exclude=args.mask_exclude,
        method=args.method,
        block=args.block,
    )


def build_sparse_model(
    args: argparse.Namespace, device: torch.device, sync_bn: bool
) -> tuple[nn.Module, list[str]]:
    """The model with its masks (none for ``--method dense``), on ``device``, channels-last if
    asked; ``sync_bn``: SyncBatchNorm layers. Returns the model and the masked tensors' names.
    """
    model = build_model(args)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    masked: list[str] = [] if args.method == "dense" else register_masks(model, args)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, masked
