"""The ImageNet recipe's command line: the flags, ``--preset`` defaults, and their checks."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from reference.common import add_sparsity_options
from reference.imagenet.model import MASK_TYPES
from reference.imagenet.presets import PRESETS

__all__ = ["build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    """The flags; ``--preset`` replaces their defaults, explicit flags win over the preset."""
    p = argparse.ArgumentParser(
        description="Spartan sparse training on ImageNet (torchrun, DDP, AMP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="a named recipe (reference/imagenet/presets.py); flags override it",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        default=None,
        help="ImageNet root with train/ and val/ ImageFolder directories",
    )
    g.add_argument(
        "--synthetic",
        action="store_true",
        help="torchvision FakeData instead of ImageNet (smoke tests)",
    )
    g.add_argument("--synthetic-train-size", type=int, default=256)
    g.add_argument("--synthetic-val-size", type=int, default=64)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--image-size", type=int, default=224, help="training crop and eval crop")
    g.add_argument(
        "--val-resize",
        type=int,
        default=None,
        help="eval resize before the center crop (default image_size * 256 / 224)",
    )
    g.add_argument("--workers", type=int, default=8, help="data loading processes per rank")
    g.add_argument(
        "--auto-augment",
        default="none",
        choices=("none", "ra"),
        help="'ra': RandAugment (2 ops, magnitude --ra-magnitude)",
    )
    g.add_argument("--ra-magnitude", type=int, default=9)
    g.add_argument("--random-erase", type=float, default=0.0, help="RandomErasing probability")
    g.add_argument("--mixup-alpha", type=float, default=0.0)
    g.add_argument("--cutmix-alpha", type=float, default=0.0)

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="resnet50",
        help="a torchvision.models name (resnet50, vit_b_16, resnet18, ...) or "
        "'vit_tiny' (2 layers, width 32; for tests)",
    )
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    g.add_argument(
        "--accum-steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (global batch = batch_size * "
        "world_size * accum_steps)",
    )
    g.add_argument("--opt", default="sgd", choices=("sgd", "adamw"))
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate at --lr-ref-batch")
    g.add_argument(
        "--lr-ref-batch",
        type=int,
        default=256,
        help="global batch at which --lr holds; the peak lr is scaled linearly to the "
        "actual global batch (0: use --lr as is)",
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="on weights only; biases and normalisation parameters get none",
    )
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=5.0,
        help="linear warm-up length (per step), then cosine decay to 0",
    )
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--clip-grad-norm", type=float, default=0.0, help="0 disables")
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="automatic mixed precision (autocast)",
    )
    g.add_argument(
        "--amp-dtype", default="bf16", choices=("bf16", "fp16"), help="fp16 adds a GradScaler"
    )

    g = p.add_argument_group("sparsity (torchspartan)")
    add_sparsity_options(g, sparsity=0.9)
    g.add_argument(
        "--mask-types",
        default="conv,linear",
        help="comma list of layer kinds to mask: conv, linear, mha",
    )
    g.add_argument(
        "--mask-names",
        default=None,
        help="regex a masked layer's qualified name must match (re.search)",
    )
    g.add_argument(
        "--mask-exclude",
        action="append",
        default=[],
        help="regex of layer names to leave dense (repeatable)",
    )

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/imagenet")
    g.add_argument(
        "--resume",
        default=None,
        help="checkpoint to resume from, or 'auto' (OUTPUT_DIR/checkpoint.pt if any)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="checkpoint every N epochs (and after the last one); 0: only the last",
    )
    g.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="also keep checkpoint_epochNNN.pt for every checkpoint",
    )
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and last)")
    g.add_argument(
        "--max-steps-per-epoch",
        type=int,
        default=0,
        help="cap optimizer steps per epoch (smoke tests); 0: the whole epoch",
    )
    g.add_argument(
        "--stop-after-epoch",
        type=int,
        default=0,
        help="exit after this epoch's checkpoint as if preempted (resume tests)",
    )
    g.add_argument(
        "--check-masks-identical",
        action="store_true",
        help="compare the mask hashes of all ranks after every optimizer step "
        "(always done at checkpoints and at the end)",
    )
    g.add_argument("--print-freq", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"))
    g.add_argument(
        "--result-json",
        default=None,
        help="write the final metrics here (default OUTPUT_DIR/result.json)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``: defaults, then the preset, then the explicit flags."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.preset is not None:
        parser.set_defaults(**PRESETS[first.preset])
    args = parser.parse_args(argv)
    if args.val_resize is None:
        args.val_resize = int(round(args.image_size * 256 / 224))
    if not args.list_presets and not args.synthetic and args.data_path is None:
        parser.error("give --data-path (ImageNet with train/ and val/) or --synthetic")
    if args.method != "dense" and not (0.0 < args.sparsity < 1.0):
        parser.error(
            f"--sparsity must be in (0, 1) for method {args.method!r}, got {args.sparsity}"
        )
    if args.accum_steps < 1:
        parser.error(f"--accum-steps must be >= 1, got {args.accum_steps}")
    for kind in args.mask_types.split(","):
        if kind not in MASK_TYPES:
            parser.error(f"--mask-types: unknown kind {kind!r}; use {sorted(MASK_TYPES)}")
    return args
