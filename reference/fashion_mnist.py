"""Train a small ResNet on Fashion-MNIST to 95% sparsity with Spartan (``make demo``).

Run ``python -m reference.fashion_mnist --help`` for every knob. The default run (Spartan, global
allocation, 95% sparsity, 3 epochs of the 60k training images at batch 128) took 450 s and
reached 90.28% test accuracy on a (busy) 2-core CPU (``reference/results/demo.txt``); it prints
the test accuracy, the achieved sparsity and the per-layer sparsity table of the finalised model.

Training recipe: SGD with Nesterov momentum 0.9, learning rate ``--lr`` with a linear warm-up over
the first ``--warmup`` fraction of steps then cosine decay to zero, weight decay on conv/linear
weights only, random horizontal flips. With ``--method spartan`` or ``gmp`` the SGD optimizer is
wrapped in ``ts.DualAveraging`` with the library's default schedules: density 1 -> 1 - sparsity
over the first 20% of steps, beta 1 -> 10, mask frozen for the last 20% (fine-tuning). ``--method
topkast`` wraps it in ``ts.TopKAST`` (sparse from the start, backward set of twice the density,
exploration penalty ``--weight-decay`` in place of weight decay on the masked weights) and
``--method rigl`` in ``ts.RigL`` (sparse from the start, drop/grow every ``--rigl-delta-t`` steps
until 75% of the steps, frozen after; ``--policy erk`` is the paper's allocation).

``--out results.json`` saves the configuration, the final metrics, the per-layer table and the
per-step records (density, beta, mask-change fraction) for ``reference/compare.py``'s plots.

N:M patterns (``--policy nm24`` for 2:4, ``nm14`` for 1:4) group along the input channels, so
the stem conv (one input channel) must be left dense and the sparsity is the pattern's, counted
over the masked weights::

    python -m reference.fashion_mnist --policy nm24 --sparsity 0.5 --sparsity-of masked \\
        --exclude '^stem\\.'

The JSON of an N:M run records ``nm_pattern_exact``: whether every group of ``m`` consecutive
input weights of every masked tensor has at most ``n`` nonzeros after ``ts.finalize``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

# OpenMP threads that spin while waiting make a 2-thread run several times slower as soon as
# another process uses a core (measured on a shared 2-core machine: 5.3 s per step spinning,
# 0.9 s passive, 1.1 s with 1 thread). Only effective before torch loads OpenMP; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn
from torch.utils.data import TensorDataset

from reference.common import (
    METHODS,
    POLICIES,
    add_sparsity_options,
    build_policy,
    nm_sparsity_error,
    param_groups,
    spartan_optimizer,
    warmup_cosine,
)
from reference.data import (
    TensorBatches,
    load_digits_datasets,
    load_fashion_mnist,
    subset,
)
from reference.models import SmallResNet

__all__ = [
    "RunConfig",
    "SetupError",
    "build_parser",
    "config_from_args",
    "evaluate",
    "main",
    "nm_pattern_exact",
    "train",
]

MethodName = Literal["dense", "spartan", "topkast", "rigl", "gmp"]
PolicyName = Literal["global", "uniform", "erk", "nm24", "nm14"]


class SetupError(ValueError):
    """The library refused the model/optimizer setup of the flags (before any training step),
    e.g. an N:M policy on a tensor whose input dimension is not a multiple of ``m``."""


@dataclass
class RunConfig:
    """Every setting of one training run (the CLI flags, one field each).

    Attributes:
        method: ``"dense"`` (no mask) or a ``ts.sparsify`` method.
        sparsity: target fraction of zero weights over the whole model, in ``[0, 1)``.
        policy: allocation of the budget over layers (``ts.Global``, ``ts.Uniform``, ``ts.ERK``),
            or an N:M pattern (``"nm24"``: ``ts.NM(2, 4)``, ``"nm14"``: ``ts.NM(1, 4)``), which
            fixes the sparsity (``1 - n/m`` of the masked weights, ``sparsity_of="masked"``).
        block: block shape on the first two weight dims, e.g. ``(4, 4)``; None for unstructured.
        exclude: regexes on qualified module names left dense (e.g. ``"^stem"``).
        sparsity_of: ``"model"`` counts the sparsity over all parameters (BatchNorm included; the
            paper's convention), ``"masked"`` over the masked conv/linear weights only.
        beta_target: final sharpness of the soft top-k (Spartan).
        anneal_fraction: fraction of steps over which the density goes from 1 to the target.
        finetune_fraction: last fraction of steps trained with a frozen mask.
        rigl_delta_t: ``--method rigl``: steps between drop/grow updates.
        epochs: passes over the (sub)set of training images.
        batch_size: training mini-batch size.
        lr: peak learning rate (after warm-up).
        momentum: SGD (Nesterov) momentum.
        weight_decay: L2 penalty on conv/linear weights (not on BatchNorm or biases).
        warmup: fraction of steps of linear learning-rate warm-up before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        flip: random horizontal flips of training images.
        seed: seed of the model initialisation, the data order and the subset.
        threads: torch intra-op threads (None: torch's default).
        dataset: ``"fashion-mnist"`` or ``"digits"`` (sklearn's 8x8 digits, for tests).
        data_dir: explicit Fashion-MNIST directory (see ``reference.data.find_fashion_mnist``).
        train_subset: train on this many random training images (None: all).
        test_subset: evaluate on this many test images (None: the full test set).
        widths: channels of the three ResNet stages.
        blocks: residual blocks per stage.
        eval_batch_size: batch size of the evaluation.
    """

    method: MethodName = "spartan"
    sparsity: float = 0.95
    policy: PolicyName = "global"
    block: tuple[int, int] | None = None
    exclude: tuple[str, ...] = ()
    sparsity_of: Literal["model", "masked"] = "model"
    beta_target: float = 10.0
    anneal_fraction: float = 0.2
    finetune_fraction: float = 0.2
    rigl_delta_t: int = 100
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.03
    label_smoothing: float = 0.0
    flip: bool = True
    seed: int = 0
    threads: int | None = None
    dataset: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    widths: tuple[int, int, int] = (32, 64, 128)
    blocks: int = 1
    eval_batch_size: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check the settings; raise ``ValueError`` naming the bad value and the fix."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {tuple(POLICIES)}, got {self.policy!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"sparsity must be in [0, 1), got {self.sparsity}; e.g. 0.95 keeps 5% of weights"
            )
        if self.method != "dense" and self.sparsity == 0.0:
            raise ValueError(f"method {self.method!r} needs sparsity > 0; use --method dense")
        if self.method != "dense":
            problem = nm_sparsity_error(self.policy, self.sparsity, self.sparsity_of)
            if problem is not None:
                raise ValueError(problem)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}"
            )
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of steps in [0, 1), got {self.warmup}")
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise ValueError(f"block must be two positive sizes like (4, 4), got {self.block}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def make_lr_lambda(total_steps: int, warmup: float) -> Any:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to 0."""
    return warmup_cosine(max(1, round(warmup * total_steps)), total_steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 1000) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data`` (in eval mode)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for x, y in TensorBatches(data, batch_size, shuffle=False):
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = len(data)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def _count_zeros(model: nn.Module) -> dict[str, float]:
    """Zeros over all parameters and over conv/linear weights of a (finalised) model."""
    total = zeros = masked_total = masked_zeros = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            n, z = p.numel(), int((p == 0).sum())
            total, zeros = total + n, zeros + z
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
                masked_total, masked_zeros = masked_total + n, masked_zeros + z
    return {
        "sparsity_all_params": zeros / total,
        "sparsity_conv_linear_weights": masked_zeros / masked_total,
        "params": total,
        "nonzero_params": total - zeros,
    }


def nm_pattern_exact(model: nn.Module, names: Sequence[str], n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive entries along dim 1 (the input dimension) of
    every tensor ``names`` of ``model`` has at most ``n`` nonzeros (read from the tensors as they
    are, e.g. after ``ts.finalize``).

    Raises:
        ValueError: a tensor has fewer than 2 dims or a dim 1 that ``m`` does not divide.
    """
    for name in names:
        weight = model.get_parameter(name).detach()
        if weight.dim() < 2 or weight.shape[1] % m:
            raise ValueError(
                f"{name} of shape {tuple(weight.shape)} has no groups of {m} along dim 1"
            )
        groups = (weight.movedim(1, -1) != 0).reshape(-1, m)
        if int(groups.sum(-1).max()) > n:
            return False
    return True


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git_state() -> dict[str, Any] | None:
    """The commit the code ran from and the files of ``torchspartan/`` and ``reference/``
    (results excluded) that differed from it (uncommitted edits); None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # code only: results written by earlier runs are no uncommitted code
            [
                "git",
                "status",
                "--porcelain",
                "--",
                "torchspartan",
                "reference",
                ":(exclude)reference/results",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "uncommitted": sorted(line[3:] for line in dirty if line.strip())}


def _load_data(config: RunConfig) -> tuple[TensorDataset, TensorDataset, str]:
    if config.dataset == "digits":
        train, test = load_digits_datasets(seed=config.seed)
        where = "sklearn.datasets.load_digits"
    else:
        train, test, source = load_fashion_mnist(config.data_dir)
        # no absolute path in a results file: the package's name, or the directory's own name
        where = (f"{source.kind}: dataset-fashion-mnist package" if source.kind == "debian"
                 else f"{source.kind}: {Path(str(source.location)).name}")
    train = subset(train, config.train_subset, seed=config.seed)
    test = subset(test, config.test_subset, seed=0)
    return train, test, where


def train(config: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run one training job and return its results as a JSON-ready dict.

    Args:
        config: the settings (validated here).
        progress: show tqdm progress bars (on stderr).

    Returns:
        A dict with ``config``, ``test_accuracy``, ``test_loss``, achieved sparsities,
        ``sparsity_report`` (the per-layer table, a string), ``steps`` (per-step ``mask_change``,
        ``density``, ``beta``, ``loss``; empty lists for dense runs), timings and environment.

    Raises:
        ValueError: for invalid settings (see :meth:`RunConfig.validate`).
        reference.data.DatasetNotFoundError: if Fashion-MNIST cannot be found.
    """
    from tqdm.auto import tqdm

    config.validate()
    load_avg_start = _load_average()
    torch.set_flush_denormal(True)  # denormals make masked training 10-25x slower on CPU
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    train_data, test_data, data_source = _load_data(config)
    load_s = time.perf_counter() - start

    torch.manual_seed(config.seed)
    in_channels = train_data.tensors[0].shape[1]
    model = SmallResNet(in_channels, 10, widths=config.widths, blocks=config.blocks)
    batches = TensorBatches(
        train_data,
        config.batch_size,
        shuffle=True,
        drop_last=True,
        seed=config.seed,
        flip=config.flip and config.dataset == "fashion-mnist",
    )
    total_steps = config.epochs * len(batches)
    if total_steps < 1:
        raise ValueError(
            f"no training step: {len(train_data)} images give no full batch of "
            f"{config.batch_size}; lower --batch-size or raise --train-subset"
        )

    masked_names: list[str] = []
    try:
        if config.method != "dense":
            import torchspartan as ts

            masked_names = ts.sparsify(
                model,
                include=(nn.Conv2d, nn.Linear),
                exclude=config.exclude,
                method=config.method,
                block=config.block,
            )
        sgd = torch.optim.SGD(
            param_groups(model, config.weight_decay, masked_decay=config.method != "topkast"),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
        )
        optimizer: Any = spartan_optimizer(sgd, model, config, total_steps)
    except ValueError as exc:  # the library refusing these flags: say so as a usage error
        hint = ""
        if isinstance(build_policy(config.policy), ts.NM) and "exclude" in str(exc):
            hint = " (e.g. --exclude '^stem\\.' for the stem conv's single input channel)"
        raise SetupError(f"{exc}{hint}") from exc
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, make_lr_lambda(total_steps, config.warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    steps: dict[str, list[float]] = {"mask_change": [], "density": [], "beta": [], "loss": []}
    epochs_log: list[dict[str, float]] = []
    model.train()
    train_start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        desc=f"{config.method} {config.sparsity:.0%}",
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
    )
    for epoch in range(config.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_value = loss.detach().item()
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps["loss"].append(loss_value)
            if config.method != "dense":
                rec = optimizer.last_record
                steps["mask_change"].append(float(rec.mask_change))
                steps["density"].append(float(rec.density))
                steps["beta"].append(float(rec.beta))
                bar.set_postfix(
                    loss=f"{loss_value:.3f}",
                    density=f"{rec.density:.3f}",
                    change=f"{rec.mask_change:.1e}",
                    refresh=False,
                )
            else:
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            bar.update()
        epochs_log.append(
            {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        )
    bar.close()
    train_s = time.perf_counter() - train_start

    report_text, overall, masked_sparsity = "", 0.0, None
    pattern: dict[str, Any] = {}
    if config.method != "dense":
        ts.finalize(model)
        report = ts.sparsity_report(model)
        report_text, overall = str(report), float(report.overall_sparsity)
        masked_sparsity = float(report.masked_sparsity)
        policy = build_policy(config.policy)
        if isinstance(policy, ts.NM):
            pattern = {
                "nm_pattern": [policy.n, policy.m],
                "nm_pattern_exact": nm_pattern_exact(model, masked_names, policy.n, policy.m),
            }
    eval_start = time.perf_counter()
    metrics = evaluate(model, test_data, config.eval_batch_size)
    eval_s = time.perf_counter() - eval_start
    counts = _count_zeros(model)
    return {
        "config": asdict(config),
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "achieved_sparsity": overall if config.method != "dense" else counts["sparsity_all_params"],
        "achieved_sparsity_masked": masked_sparsity,
        **pattern,
        **counts,
        "masked_layers": masked_names,
        "sparsity_report": report_text,
        "epochs": epochs_log,
        "steps": steps,
        "total_steps": total_steps,
        "train_images": len(train_data),
        "test_images": len(test_data),
        "data_source": data_source,
        "time_s": {
            "load": load_s,
            "train": train_s,
            "eval": eval_s,
            "total": time.perf_counter() - start,
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load_avg_start,
            "load_average_end": _load_average(),
            "git": _git_state(),
        },
    }


def _widths(text: str) -> tuple[int, int, int]:
    try:
        a, b, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--widths must be three comma-separated channel counts like 32,64,128, got {text!r}"
        ) from None
    return a, b, c


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: one flag per :class:`RunConfig` field, plus output flags."""
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m reference.fashion_mnist",
        description="Train a small ResNet on Fashion-MNIST with Spartan sparse training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_sparsity_options(
        p,
        method=d.method,
        sparsity=d.sparsity,
        sparsity_of=d.sparsity_of,
        policy=d.policy,
        beta_target=d.beta_target,
        anneal_fraction=d.anneal_fraction,
        finetune_fraction=d.finetune_fraction,
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="regex on module names to keep dense (repeatable), e.g. '^stem'",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of warm-up steps")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default=d.dataset)
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with the Fashion-MNIST IDX files (default: Debian's, "
        "else torchvision download)",
    )
    p.add_argument("--train-subset", type=int, default=None, help="train on N random images")
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="evaluate on N test images (default: all 10000)",
    )
    p.add_argument("--widths", type=_widths, default=d.widths, help="stage widths, e.g. 32,64,128")
    p.add_argument("--blocks", type=int, default=d.blocks, help="residual blocks per stage")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--out", type=Path, default=None, help="write results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Turn parsed CLI arguments into a :class:`RunConfig`."""
    return RunConfig(
        method=args.method,
        sparsity=0.0 if args.method == "dense" else args.sparsity,
        policy=args.policy,
        block=tuple(args.block) if args.block else None,  # validate() checks: two sizes
        exclude=tuple(args.exclude),
        sparsity_of=args.sparsity_of,
        beta_target=args.beta_target,
        anneal_fraction=args.anneal_fraction,
        finetune_fraction=args.finetune_fraction,
        rigl_delta_t=args.rigl_delta_t,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        label_smoothing=args.label_smoothing,
        flip=not args.no_flip,
        seed=args.seed,
        threads=args.threads,
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        widths=args.widths,
        blocks=args.blocks,
        eval_batch_size=args.eval_batch_size,
    )


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` to ``path`` atomically (a killed run leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train, print the summary, optionally write the JSON; return the result."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = train(config, progress=not args.no_progress)
    except SetupError as exc:
        parser.error(str(exc))
    c = result["config"]
    print(
        f"\n{c['method']} ({c['policy']}"
        + (f", blocks {c['block'][0]}x{c['block'][1]}" if c["block"] else "")
        + f") target sparsity {c['sparsity']:.0%}, {c['epochs']} epochs on "
        f"{result['train_images']} images, seed {c['seed']}"
    )
    print(f"data: {result['data_source']}")
    print(
        f"test accuracy: {result['test_accuracy']:.2%} on {result['test_images']} test images "
        f"(loss {result['test_loss']:.4f})"
    )
    print(
        f"achieved sparsity: {result['achieved_sparsity']:.2%} of all {result['params']} "
        f"parameters ({result['nonzero_params']} nonzero); conv/linear weights: "
        f"{result['sparsity_conv_linear_weights']:.2%}"
        + (
            f"; masked weights: {result['achieved_sparsity_masked']:.2%}"
            if result["achieved_sparsity_masked"] is not None
            else ""
        )
    )
    if "nm_pattern_exact" in result:
        n, m = result["nm_pattern"]
        print(f"{n}:{m} pattern exact in every masked tensor: {result['nm_pattern_exact']}")
    t = result["time_s"]
    print(
        f"time: {t['total']:.0f} s (train {t['train']:.0f} s, eval {t['eval']:.1f} s) on "
        f"{result['environment']['threads']} threads"
    )
    if result["sparsity_report"]:
        print("\nper-layer sparsity (after ts.finalize):")
        print(result["sparsity_report"])
    if args.out is not None:
        write_json(result, args.out)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
