"""What the reference scripts share: building the Spartan optimizer from their CLI options."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torchspartan as ts

__all__ = ["POLICIES", "spartan_optimizer", "warmup_cosine"]

POLICIES: dict[str, type[ts.AllocationPolicy]] = {
    "global": ts.Global, "uniform": ts.Uniform, "erk": ts.ERK,
}


def spartan_optimizer(
    base: torch.optim.Optimizer, model: nn.Module, options: Any, total_steps: int
) -> torch.optim.Optimizer:
    """``base`` itself for ``options.method == "dense"``, else ``ts.DualAveraging`` around it.

    ``options`` carries ``method``, ``policy`` (a key of :data:`POLICIES`), ``sparsity``,
    ``sparsity_of``, ``beta_target``, ``anneal_fraction`` and ``finetune_fraction``.
    """
    if options.method == "dense":
        return base
    return ts.DualAveraging(
        base,
        model,
        sparsity=options.sparsity,
        total_steps=total_steps,
        policy=POLICIES[options.policy](),
        sparsity_of=options.sparsity_of,
        beta_target=options.beta_target,
        anneal_fraction=options.anneal_fraction,
        finetune_fraction=options.finetune_fraction,
    )


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up from 1/warmup to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
