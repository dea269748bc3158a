"""Sparse ImageNet training with Spartan: ResNet-50 and ViT-B/16, one GPU to many nodes.

Laid out like torchvision's classification reference (``references/classification/train.py``):
one ``torchrun`` process per GPU, DistributedDataParallel, automatic mixed precision,
channels-last, label smoothing, mixup/cutmix, RandAugment, SGD (Nesterov) or AdamW, a per-step
linear warm-up then cosine decay, weight decay only on weights, gradient clipping, checkpoints
every few epochs with exact resume, top-1/top-5 evaluation. The sparse part is three calls::

    ts.sparsify(model, ...)                       # masks as parametrizations, before DDP
    opt = ts.DualAveraging(base_opt, model, ...)  # the unwrapped model
    ts.finalize(model)                            # at the end: plain sparse weights

Launch (see reference/imagenet/README.md)::

    torchrun --nproc_per_node=8 -m reference.imagenet.train --preset resnet50_s95 \\
        --data-path /datasets/imagenet --output-dir runs/resnet50_s95

``--synthetic`` swaps ImageNet for ``torchvision.datasets.FakeData`` so the whole path runs on a
laptop (``tests/test_imagenet_smoke.py`` runs it with two CPU processes over gloo).

Distributed details. The masks are computed independently on every rank from the replicated
weights (the library's mask update is deterministic), so DDP is told not to re-broadcast buffers
at every forward (``forward_sync_buffers=False``): that would send every mask (one byte per
weight) each step and would hide a divergence. Instead the masks are hashed and compared across
ranks at every checkpoint and at the end (every step with ``--check-masks-identical``), the
weights too at checkpoints, and a mismatch stops the run. BatchNorm running statistics, which
would then drift apart, are averaged over ranks before each evaluation and checkpoint.

Exact resume. A checkpoint holds the unwrapped model's ``state_dict`` (weights and masks), the
DualAveraging state (base optimizer + Spartan step), the LR scheduler, the GradScaler, the epoch,
the global step and every rank's RNG states; it is written after the epoch's evaluation, so a run
resumed from it draws the same random numbers as one that never stopped. Checkpoints are taken
at epoch boundaries; ``--resume auto`` picks ``OUTPUT_DIR/checkpoint.pt`` when it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import inspect
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.data.dataloader import default_collate
from torchvision.transforms import v2

import torchspartan as ts
from reference.common import spartan_optimizer, warmup_cosine
from reference.imagenet.presets import PRESETS, describe_presets

__all__ = ["build_parser", "main", "parse_args"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
MASK_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
    "mha": (nn.MultiheadAttention,),
}
MASK_BUFFERS = (".hard_mask", ".threshold", ".beta")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _block(text: str) -> list[int] | None:
    if text.lower() in ("none", "0", ""):
        return None
    return [int(x) for x in text.lower().replace("x", ",").split(",")]


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
    g.add_argument("--method", default="spartan", choices=("dense", "spartan", "topkast", "gmp"))
    g.add_argument("--sparsity", type=float, default=0.9)
    g.add_argument(
        "--sparsity-of",
        default="model",
        choices=("model", "masked"),
        help="count the sparsity over all parameters (paper) or the masked ones",
    )
    g.add_argument("--policy", default="global", choices=("global", "uniform", "erk"))
    g.add_argument(
        "--block",
        type=_block,
        default=None,
        help="block shape on the weights' first two dims, e.g. 16x16 ('none': unstructured)",
    )
    g.add_argument("--beta-target", type=float, default=10.0)
    g.add_argument("--anneal-fraction", type=float, default=0.2)
    g.add_argument("--finetune-fraction", type=float, default=0.2)
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


# --------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------
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


def log(info: DistInfo, *parts: Any) -> None:
    if info.main:
        print(*parts, flush=True)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Model, masks, optimizer
# --------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> nn.Module:
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights; none on biases and normalisation layers' parameters.

    Parameters are visited module by module, so a masked weight (held by the parametrization as
    ``parametrizations.weight.original``) is found as the weight it is.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, NORM_TYPES) or name.endswith("bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.nesterov)
    return torch.optim.AdamW(groups, lr=lr)


# --------------------------------------------------------------------------------------------
# Hashes: masks identical on every rank, state digests for resume checks
# --------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k!s}".encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _digest(x, h)
    else:
        h.update(f"V{obj!r}".encode())


def digest(obj: Any) -> str:
    """sha256 of nested dicts/lists of tensors and plain values (bitwise for tensors)."""
    h = hashlib.sha256()
    _digest(obj, h)
    return h.hexdigest()


def mask_digest(model: nn.Module) -> str:
    """Hash of every mask buffer (hard mask, soft threshold, beta) of the model."""
    return digest(
        {
            name: buf
            for name, buf in model.named_buffers()
            if ".parametrizations." in name and name.endswith(MASK_BUFFERS)
        }
    )


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


# --------------------------------------------------------------------------------------------
# Checkpoints and RNG
# --------------------------------------------------------------------------------------------
def rng_state(info: DistInfo) -> dict[str, Any]:
    # NumPy's global RNG is not used here (data-loading workers seed their own).
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if info.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(info.device)
    return state


def set_rng_state(state: dict[str, Any], info: DistInfo) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and info.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], info.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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


def save_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
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

    def save_checkpoint(self, epoch: int, out: Path) -> None:
        """All ranks: compare masks and weights; rank 0 writes. ``epoch`` = epochs completed."""
        self.check_masks(f"at the checkpoint after epoch {epoch}")
        weights = digest({n: p for n, p in self.unwrapped.named_parameters()})
        check_identical_across_ranks(
            self.info, "weights", weights, f"at the checkpoint after epoch {epoch}"
        )
        rng = [rng_state(self.info)]
        if self.info.distributed:
            rng = [None] * self.info.world_size
            dist.all_gather_object(rng, rng_state(self.info))
        if self.info.main:
            ckpt = {
                "model": self.unwrapped.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch,
                "global_step": self.global_step,
                "world_size": self.info.world_size,
                "rng": rng,
                "args": vars(self.args),
            }
            save_atomically(ckpt, out / "checkpoint.pt")
            if self.args.keep_checkpoints:
                save_atomically(ckpt, out / f"checkpoint_epoch{epoch:03d}.pt")
            print(
                f"saved {out / 'checkpoint.pt'} (epoch {epoch}, step {self.global_step})",
                flush=True,
            )
        if self.info.distributed:
            dist.barrier()

    def load_checkpoint(self, path: Path) -> int:
        """Restore everything; returns the number of epochs already completed."""
        ckpt = torch.load(path, map_location=self.info.device, weights_only=False)
        self.unwrapped.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        base = getattr(self.optimizer, "optimizer", None)
        if base is not None and self.optimizer.param_groups is not base.param_groups:
            # Workaround: torch's Optimizer.load_state_dict rebinds the base optimizer's
            # param_groups/state to new objects, and DualAveraging.load_state_dict does not
            # re-share them, so the LR scheduler would stop reaching the base optimizer.
            self.optimizer.param_groups = base.param_groups
            self.optimizer.state = base.state
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.global_step = int(ckpt["global_step"])
        if ckpt["world_size"] == self.info.world_size:
            state = ckpt["rng"][self.info.rank]
            state["torch"] = state["torch"].cpu()
            if "cuda" in state:
                state["cuda"] = state["cuda"].cpu()
            set_rng_state(state, self.info)
        else:
            log(
                self.info,
                f"warning: checkpoint from {ckpt['world_size']} ranks, now "
                f"{self.info.world_size}; RNG streams reseeded (not bitwise resume)",
            )
            seed_everything(self.args.seed + 7919 * (self.info.rank + 1) + ckpt["epoch"])
        log(self.info, f"resumed from {path}: epoch {ckpt['epoch']}, step {self.global_step}")
        return int(ckpt["epoch"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, finalize; returns (and on rank 0 writes) the final metrics."""
    args = parse_args(argv)
    if args.list_presets:
        print(describe_presets())
        return {}
    info = init_distributed(args)
    out = Path(args.output_dir)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)

    # Same seed everywhere for the model (DDP also broadcasts rank 0's weights).
    seed_everything(args.seed)
    model = build_model(args)
    if args.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    masked: list[str] = [] if args.method == "dense" else register_masks(model, args)
    model.to(info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    unwrapped = model
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            **_no_forward_buffer_sync(),
        )

    train_set, val_set = build_datasets(args)
    train_loader, sampler, val_loader = build_loaders(args, info, train_set, val_set)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if args.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has no optimizer step: {len(train_loader)} batches per rank "
            f"for accum_steps={args.accum_steps}; lower --batch-size"
        )
    total_steps = steps_per_epoch * args.epochs
    global_batch = args.batch_size * info.world_size * args.accum_steps
    lr = args.lr * global_batch / args.lr_ref_batch if args.lr_ref_batch > 0 else args.lr

    base = build_optimizer(unwrapped, args, lr)
    optimizer = spartan_optimizer(base, unwrapped, args, total_steps)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
    scaler = (
        torch.amp.GradScaler(info.device.type) if args.amp and args.amp_dtype == "fp16" else None
    )
    trainer = Trainer(
        args,
        info,
        model,
        unwrapped,
        optimizer,
        scheduler,
        scaler,
        nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
        steps_per_epoch,
    )

    n_params = sum(p.numel() for p in unwrapped.parameters())
    log(
        info,
        f"{args.model}: {n_params} parameters, {len(masked)} masked tensors, method "
        f"{args.method}, world {info.world_size}, global batch {global_batch}, peak lr "
        f"{lr:.4g}, {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps}",
    )

    start_epoch = 0
    resume = args.resume
    if resume == "auto":
        resume = str(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else None
    if resume:
        start_epoch = trainer.load_checkpoint(Path(resume))
    else:
        # Different augmentation streams per rank; restored from the checkpoint on resume.
        seed_everything(args.seed + 7919 * (info.rank + 1))

    metrics: dict[str, float] = {}
    train_loss = float("nan")
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss = trainer.train_one_epoch(epoch, train_loader)
        done = epoch + 1
        log(info, f"epoch {epoch} train loss {train_loss:.4f} ({time.perf_counter() - t0:.1f} s)")
        if (args.eval_every > 0 and done % args.eval_every == 0) or done == args.epochs:
            metrics = trainer.evaluate(val_loader)
            log(
                info,
                f"epoch {epoch} eval acc1 {metrics['acc1']:.3f} acc5 {metrics['acc5']:.3f}"
                f" loss {metrics['loss']:.4f}",
            )
        else:
            average_norm_statistics(unwrapped, info)
        if (
            (args.checkpoint_every > 0 and done % args.checkpoint_every == 0)
            or done == args.epochs
            or done == args.stop_after_epoch
        ):
            trainer.save_checkpoint(done, out)
        if done == args.stop_after_epoch and done < args.epochs:
            log(info, f"stopping after epoch {done} (--stop-after-epoch)")
            result = {
                "stopped_after_epoch": done,
                "global_step": trainer.global_step,
                "train_loss": train_loss,
                "mask_checks": trainer.mask_checks,
                "mask_hashes": list(trainer.last_mask_hashes),
            }
            _finish(info, args, out, result)
            return result

    # The end: same masks on every rank, then bake them in and measure the sparse model.
    trainer.check_masks("at the end of training")
    state_digest = trainer.state_digest()
    result: dict[str, Any] = {
        "epochs": args.epochs,
        "global_step": trainer.global_step,
        "train_loss": train_loss,
        "acc1_before_finalize": metrics.get("acc1"),
        "state_digest": state_digest,
        "mask_checks": trainer.mask_checks,
        "mask_hashes": list(trainer.last_mask_hashes),
        "world_size": info.world_size,
        "masked_tensors": len(masked),
    }
    if args.method != "dense":
        ts.finalize(unwrapped)
        metrics = trainer.evaluate(val_loader)
    report = ts.sparsity_report(unwrapped)
    result.update(
        acc1=metrics["acc1"],
        acc5=metrics["acc5"],
        eval_loss=metrics["loss"],
        sparsity=report.overall_sparsity,
        weight_sparsity=report.masked_sparsity,
        final_model_digest=digest(unwrapped.state_dict()),
    )
    log(info, str(report))
    log(
        info,
        f"final: top-1 {metrics['acc1']:.3f} top-5 {metrics['acc5']:.3f}, sparsity "
        f"{report.overall_sparsity:.4f} of all parameters ({report.masked_sparsity:.4f} "
        f"of the weights)",
    )
    if info.main:
        torch.save(
            {"model": unwrapped.state_dict(), "args": vars(args), "metrics": result},
            out / "model_final.pt",
        )
        (out / "sparsity_report.txt").write_text(str(report) + "\n")
    _finish(info, args, out, result)
    return result


def _finish(info: DistInfo, args: argparse.Namespace, out: Path, result: dict[str, Any]) -> None:
    if info.main:
        path = Path(args.result_json) if args.result_json else out / "result.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print("RESULT " + json.dumps(result), flush=True)
    if info.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
