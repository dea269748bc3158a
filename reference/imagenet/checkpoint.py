"""Checkpoints and exact resume of the ImageNet recipe.

A checkpoint holds the unwrapped model's ``state_dict`` (weights and masks), the DualAveraging
state (base optimizer + Spartan step), the LR scheduler, the GradScaler, the epoch, the global
step and every rank's RNG states; it is written after the epoch's evaluation, so a run resumed
from it draws the same random numbers as one that never stopped. Checkpoints are taken at epoch
boundaries; ``--resume auto`` picks ``OUTPUT_DIR/checkpoint.pt`` when it exists. Before writing,
the masks and the weights of all ranks are compared (a mismatch stops the run).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reference.imagenet.digests import digest
from reference.imagenet.distributed import DistInfo, check_identical_across_ranks, log
from reference.imagenet.engine import Trainer

__all__ = [
    "load_checkpoint",
    "resume_path",
    "rng_state",
    "save_atomically",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]


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


def save_atomically(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume_path(resume: str | None, out: Path) -> Path | None:
    """``--resume``: a path, or ``auto`` for ``out/checkpoint.pt`` if it exists; None: none."""
    if resume == "auto":
        return out / "checkpoint.pt" if (out / "checkpoint.pt").exists() else None
    return Path(resume) if resume else None


def save_checkpoint(trainer: Trainer, epoch: int, out: Path) -> None:
    """All ranks: compare masks and weights; rank 0 writes. ``epoch`` = epochs completed."""
    info = trainer.info
    trainer.check_masks(f"at the checkpoint after epoch {epoch}")
    weights = digest({n: p for n, p in trainer.unwrapped.named_parameters()})
    check_identical_across_ranks(info, "weights", weights, f"at the checkpoint after epoch {epoch}")
    rng = [rng_state(info)]
    if info.distributed:
        rng = [None] * info.world_size
        dist.all_gather_object(rng, rng_state(info))
    if info.main:
        ckpt = {
            "model": trainer.unwrapped.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "epoch": epoch,
            "global_step": trainer.global_step,
            "world_size": info.world_size,
            "rng": rng,
            "args": vars(trainer.args),
        }
        save_atomically(ckpt, out / "checkpoint.pt")
        if trainer.args.keep_checkpoints:
            save_atomically(ckpt, out / f"checkpoint_epoch{epoch:03d}.pt")
        print(
            f"saved {out / 'checkpoint.pt'} (epoch {epoch}, step {trainer.global_step})",
            flush=True,
        )
    if info.distributed:
        dist.barrier()


def load_checkpoint(trainer: Trainer, path: Path) -> int:
    """Restore everything; returns the number of epochs already completed."""
    info = trainer.info
    ckpt = torch.load(path, map_location=info.device, weights_only=False)
    trainer.unwrapped.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["lr_scheduler"])
    if trainer.scaler is not None and ckpt.get("scaler") is not None:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.global_step = int(ckpt["global_step"])
    if ckpt["world_size"] == info.world_size:
        state = ckpt["rng"][info.rank]
        state["torch"] = state["torch"].cpu()
        if "cuda" in state:
            state["cuda"] = state["cuda"].cpu()
        set_rng_state(state, info)
    else:
        log(
            info,
            f"warning: checkpoint from {ckpt['world_size']} ranks, now "
            f"{info.world_size}; RNG streams reseeded (not bitwise resume)",
        )
        seed_everything(trainer.args.seed + 7919 * (info.rank + 1) + ckpt["epoch"])
    log(info, f"resumed from {path}: epoch {ckpt['epoch']}, step {trainer.global_step}")
    return int(ckpt["epoch"])
