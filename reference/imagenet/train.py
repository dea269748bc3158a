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

This module is the entry point: it puts the pieces together and runs the epochs.

- ``config.py``: the flags and ``--preset`` (``parse_args``);
- ``data.py``: datasets, augmentation (RandAugment, mixup/cutmix), per-rank loaders;
- ``model.py``: the torchvision model and its masks;
- ``optim.py``: optimizer, Spartan wrapper, LR schedule, GradScaler;
- ``engine.py``: one training epoch and the evaluation;
- ``checkpoint.py``: checkpoints, RNG states, exact resume;
- ``distributed.py``: torchrun/DDP set-up and the cross-rank checks (why masks are not
  broadcast);
- ``digests.py``: hashes of masks, weights and states.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import torchspartan as ts
from reference.imagenet.checkpoint import (
    load_checkpoint,
    resume_path,
    save_checkpoint,
    seed_everything,
)
from reference.imagenet.config import build_parser, parse_args
from reference.imagenet.data import build_datasets, build_loaders
from reference.imagenet.digests import digest
from reference.imagenet.distributed import (
    DistInfo,
    average_norm_statistics,
    init_distributed,
    log,
    wrap_ddp,
)
from reference.imagenet.engine import Trainer
from reference.imagenet.model import build_sparse_model
from reference.imagenet.optim import build_training, peak_lr, steps_per_epoch
from reference.imagenet.presets import describe_presets

__all__ = ["build_parser", "main", "parse_args"]


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
    unwrapped, masked = build_sparse_model(args, info.device, args.sync_bn and info.distributed)
    model = wrap_ddp(unwrapped, info)

    train_loader, sampler, val_loader = build_loaders(args, info, *build_datasets(args))
    steps = steps_per_epoch(args, len(train_loader))
    total_steps = steps * args.epochs
    global_batch = args.batch_size * info.world_size * args.accum_steps
    lr = peak_lr(args, global_batch)
    optimizer, scheduler, scaler = build_training(unwrapped, args, lr, steps, info.device)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    trainer = Trainer(args, info, model, unwrapped, optimizer, scheduler, scaler, criterion, steps)

    n_params = sum(p.numel() for p in unwrapped.parameters())
    log(
        info,
        f"{args.model}: {n_params} parameters, {len(masked)} masked tensors, method "
        f"{args.method}, world {info.world_size}, global batch {global_batch}, peak lr "
        f"{lr:.4g}, {steps} steps/epoch x {args.epochs} epochs = {total_steps}",
    )

    start_epoch = 0
    resume = resume_path(args.resume, out)
    if resume is not None:
        start_epoch = load_checkpoint(trainer, resume)
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
            save_checkpoint(trainer, done, out)
        if done == args.stop_after_epoch and done < args.epochs:
            log(info, f"stopping after epoch {done} (--stop-after-epoch)")
            result = {
                "stopped_after_epoch": done,
                "global_step": trainer.global_step,
                "train_loss": train_loss,
                "mask_checks": trainer.mask_checks,
                "mask_hashes": list(trainer.last_mask_hashes),
            }
            _finish(info, args.result_json, out, result)
            return result

    # The end: same masks on every rank, then bake them in and measure the sparse model.
    trainer.check_masks("at the end of training")
    result: dict[str, Any] = {
        "epochs": args.epochs,
        "global_step": trainer.global_step,
        "train_loss": train_loss,
        "acc1_before_finalize": metrics.get("acc1"),
        "state_digest": trainer.state_digest(),
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
        weight_sparsity=report.weight_sparsity,
        final_model_digest=digest(unwrapped.state_dict()),
    )
    log(info, str(report))
    log(
        info,
        f"final: top-1 {metrics['acc1']:.3f} top-5 {metrics['acc5']:.3f}, sparsity "
        f"{report.overall_sparsity:.4f} of all parameters ({report.weight_sparsity:.4f} "
        f"of the weights)",
    )
    if info.main:
        torch.save(
            {"model": unwrapped.state_dict(), "args": vars(args), "metrics": result},
            out / "model_final.pt",
        )
        (out / "sparsity_report.txt").write_text(str(report) + "\n")
    _finish(info, args.result_json, out, result)
    return result


def _finish(info: DistInfo, result_json: str | None, out: Path, result: dict[str, Any]) -> None:
    """Rank 0 writes the result JSON (``--result-json`` or OUTPUT_DIR/result.json) and prints
    it; then the process group is torn down."""
    if info.main:
        path = Path(result_json) if result_json else out / "result.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print("RESULT " + json.dumps(result), flush=True)
    if info.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
