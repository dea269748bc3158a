"""Smoke tests of the ImageNet reference (reference/imagenet/train.py) without ImageNet or a GPU.

Two CPU processes are launched with ``torchrun --nproc_per_node=2 --standalone`` (gloo) on
``torchvision.datasets.FakeData``:

* ResNet-18 at 32 px, 90% sparsity over the whole model: an uninterrupted run of 2 epochs, and a
  run stopped after epoch 1 (its checkpoint) then resumed with ``--resume auto``. Both end with
  the same bits (model, masks, optimizer and Spartan state), the same training loss, masks equal
  on both ranks, and 90% of all parameters zero after ``ts.finalize``.
* A tiny ViT through the ViT-B/16 block preset (16x16 blocks, AdamW, RandAugment, mixup/cutmix,
  gradient clipping, fp16 autocast with a GradScaler): succeeds, masks equal on both ranks, the
  saved final model is block sparse.

Each launch takes 15-35 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from reference.imagenet.presets import PRESETS  # noqa: E402
from reference.imagenet.train import parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300

RESNET = (
    "--synthetic --model resnet18 --image-size 32 --num-classes 10 --batch-size 8 --epochs 2 "
    "--max-steps-per-epoch 3 --workers 0 --method spartan --sparsity 0.9 --sparsity-of model "
    "--lr 0.4 --warmup-epochs 0.5 --anneal-fraction 0.5 --finetune-fraction 0.2 "
    "--print-freq 100 --device cpu"
).split()
VIT = (
    "--preset vit_b16_block16_s90 --synthetic --model vit_tiny --image-size 32 --num-classes 10 "
    "--batch-size 8 --epochs 2 --max-steps-per-epoch 2 --workers 1 --sparsity 0.5 "
    "--sparsity-of masked --amp-dtype fp16 --check-masks-identical --device cpu"
).split()


def launch(args: list[str], out: Path) -> tuple[dict, str]:
    """``torchrun --nproc_per_node=2`` of the training script; returns (result.json, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "reference.imagenet.train",
        *args,
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
    return json.loads((out / "result.json").read_text()), output


def assert_masks_identical(result: dict) -> None:
    assert result["mask_checks"] >= 1
    hashes = result["mask_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], hashes


def test_presets_and_flags_override() -> None:
    args = parse_args(["--preset", "resnet50_s95", "--synthetic"])
    for key, value in PRESETS["resnet50_s95"].items():
        assert getattr(args, key) == value, key
    args = parse_args(
        [
            "--preset",
            "vit_b16_block16_s90",
            "--synthetic",
            "--lr",
            "1e-3",
            "--block",
            "none",
            "--epochs",
            "3",
        ]
    )
    assert (args.lr, args.block, args.epochs) == (1e-3, None, 3)
    assert args.beta_target == 20.0 and args.mixup_alpha == 0.2 and args.cutmix_alpha == 1.0
    assert parse_args(["--synthetic", "--block", "16x16"]).block == [16, 16]


def test_resnet_two_ranks_checkpoint_resume_is_exact(tmp_path: Path) -> None:
    full, _ = launch(RESNET, tmp_path / "full")
    stopped, _ = launch([*RESNET, "--stop-after-epoch", "1"], tmp_path / "resumed")
    assert stopped["stopped_after_epoch"] == 1 and stopped["global_step"] == 3
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed, output = launch([*RESNET, "--resume", "auto"], tmp_path / "resumed")
    assert "resumed from" in output and "epoch 1, step 3" in output

    for result in (full, stopped, resumed):
        assert_masks_identical(result)
    assert resumed["global_step"] == full["global_step"] == 6
    # Bitwise: model weights and masks, optimizer + Spartan state, then the finalized model.
    assert resumed["state_digest"] == full["state_digest"]
    assert resumed["final_model_digest"] == full["final_model_digest"]
    assert resumed["train_loss"] == full["train_loss"]
    assert resumed["acc1"] == full["acc1"]
    assert full["sparsity"] == pytest.approx(0.9, abs=1e-4)

    final = torch.load(tmp_path / "full" / "model_final.pt", weights_only=False)
    assert not any(".parametrizations." in k for k in final["model"])
    import torchvision

    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(final["model"])  # a finalized model loads into a plain one


def test_vit_block_preset_two_ranks(tmp_path: Path) -> None:
    result, _ = launch(VIT, tmp_path / "vit")
    assert_masks_identical(result)
    assert result["mask_checks"] >= 4 + 1  # every step and at the checkpoints
    assert result["weight_sparsity"] > 0.3
    state = torch.load(tmp_path / "vit" / "model_final.pt", weights_only=False)["model"]
    masked = [
        k
        for k in state
        if k.startswith("encoder.layers.") and k.endswith("weight") and state[k].dim() == 2
    ]
    assert len(masked) == 8  # in_proj, out_proj, mlp.0, mlp.3 of 2 layers
    zero_blocks = 0
    for k in masked:
        w = state[k]
        blocks = w.reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).ne(0).sum(dim=(1, 3))
        assert bool(((blocks == 0) | (blocks == 256)).all()), f"{k} is not 16x16 block sparse"
        zero_blocks += int((blocks == 0).sum())
    assert zero_blocks > 0
