"""Named recipes for ``reference/imagenet/train.py`` (``--preset NAME``).

A preset is a dict of command-line defaults: ``--preset NAME`` replaces the script's defaults with
it, and any flag given explicitly on the command line still wins. ``python -m
reference.imagenet.train --list-presets`` prints them.

Where each value comes from (``docs/design.md``, "Paper anchors" and "One training step";
the paper's ImageNet-1K recipes):

ResNet-50 (all from docs/design.md): 100 epochs, SGD with Nesterov momentum 0.9, lr 1.0 at global
batch 4096 scaled linearly to the actual global batch, 5 warm-up epochs then cosine decay, weight
decay 1e-4 on weights only (none on biases and norms), label smoothing 0.1, mixed precision, global
allocation, density 1 -> target over the first 20% of steps, beta 1 -> 10, mask frozen for the
last 20% of steps, the sparsity counted over all model parameters (``--sparsity-of model``).
Every conv and linear weight is masked (the first conv and the classifier included).

ViT-B/16 (from docs/design.md): AdamW lr 3e-3, weight decay 0.3, 10 warm-up epochs, gradient
clipping at norm 1.0, mixup 0.2, cutmix 1.0, RandAugment, beta target 20 (multiplied by
sqrt(256) = 16 for 16x16 blocks by the library), 16x16 blocks on the encoder's linear layers.
ASSUMPTIONS, not given in docs/design.md (change them with flags): 300 epochs, label smoothing 0.11,
the 3e-3 learning rate used as is (not scaled with the batch: ``--lr-ref-batch 0``), the masked
layers being every linear map of the encoder blocks (attention in/out projections and both MLP
layers; patch embedding and classifier dense) and the sparsity counted over all parameters as for
ResNet-50. These follow torchvision's ViT-B/16 recipe where docs/design.md is silent.

Per-process batch sizes assume 80 GB GPUs with bf16; the learning rate of the ResNet-50 presets
follows the global batch (``batch_size * world_size * accum_steps``), whatever it is.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "describe_presets"]

_RESNET50: dict[str, Any] = {
    "model": "resnet50",
    "epochs": 100,
    "batch_size": 256,
    "opt": "sgd",
    "lr": 1.0,
    "lr_ref_batch": 4096,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 1e-4,
    "warmup_epochs": 5.0,
    "label_smoothing": 0.1,
    "clip_grad_norm": 0.0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "auto_augment": "none",
    "image_size": 224,
    "val_resize": 256,
    "amp": True,
    "amp_dtype": "bf16",
    "channels_last": True,
    "method": "spartan",
    "sparsity_of": "model",
    "policy": "global",
    "beta_target": 10.0,
    "anneal_fraction": 0.2,
    "finetune_fraction": 0.2,
    "block": None,
    "mask_types": "conv,linear",
    "mask_names": None,
}

_VIT_B16: dict[str, Any] = {
    "model": "vit_b_16",
    "epochs": 300,  # assumption (see the module docstring)
    "batch_size": 64,
    "opt": "adamw",
    "lr": 3e-3,
    "lr_ref_batch": 0,  # assumption: used as is
    "weight_decay": 0.3,
    "warmup_epochs": 10.0,
    "label_smoothing": 0.11,  # assumption
    "clip_grad_norm": 1.0,
    "mixup_alpha": 0.2,
    "cutmix_alpha": 1.0,
    "auto_augment": "ra",
    "image_size": 224,
    "val_resize": 256,
    "amp": True,
    "amp_dtype": "bf16",
    "channels_last": False,
    "method": "spartan",
    "sparsity_of": "model",
    "policy": "global",
    "beta_target": 20.0,
    "anneal_fraction": 0.2,
    "finetune_fraction": 0.2,
    "block": [16, 16],
    "mask_types": "linear,mha",
    "mask_names": r"^encoder\.layers\.",
}

PRESETS: dict[str, dict[str, Any]] = {
    "resnet50_dense": {**_RESNET50, "method": "dense", "sparsity": 0.0},
    **{f"resnet50_s{pct}": {**_RESNET50, "sparsity": pct / 100} for pct in (80, 90, 95, 98)},
    "vit_b16_dense": {**_VIT_B16, "method": "dense", "sparsity": 0.0, "block": None},
    "vit_b16_block16_s90": {**_VIT_B16, "sparsity": 0.9},
    "vit_b16_s90": {**_VIT_B16, "sparsity": 0.9, "block": None},
}
"""Preset name -> flag defaults (keys are the argparse ``dest`` names)."""


def describe_presets() -> str:
    """One line per preset: name, model, method, sparsity, block."""
    lines = []
    for name, p in PRESETS.items():
        block = "x".join(map(str, p["block"])) if p["block"] else "unstructured"
        what = (
            "dense"
            if p["method"] == "dense"
            else (f"{p['method']} {p['sparsity']:.0%} {block}, beta {p['beta_target']:g}")
        )
        lines.append(f"{name:<22} {p['model']:<9} {p['epochs']:>3} epochs, {p['opt']}, {what}")
    return "\n".join(lines)
