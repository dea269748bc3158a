"""What the reference scripts share: the sparsity flags, parameter groups, the LR schedule, and
the Spartan optimizer built from the flags.

Used by ``reference/fashion_mnist.py`` and the ImageNet recipe (``reference/imagenet/``).
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torchspartan as ts

__all__ = [
    "METHODS",
    "NORM_TYPES",
    "POLICIES",
    "add_sparsity_options",
    "build_policy",
    "nm_sparsity_error",
    "param_groups",
    "parse_block",
    "spartan_optimizer",
    "warmup_cosine",
]

METHODS: tuple[str, ...] = ("dense", "spartan", "topkast", "rigl", "gmp")
"""``--method`` values: ``"dense"`` (no mask) or a ``ts.sparsify`` method (``topkast``: trained
by ``ts.TopKAST``, ``rigl``: by ``ts.RigL``, the others by ``ts.DualAveraging``)."""

POLICIES: dict[str, Callable[[], ts.AllocationPolicy]] = {
    "global": ts.Global,
    "uniform": ts.Uniform,
    "erk": ts.ERK,
    "nm24": functools.partial(ts.NM, 2, 4),
    "nm14": functools.partial(ts.NM, 1, 4),
}
"""``--policy`` values and a factory (called with no arguments) of the policy each one builds.

``nm24``/``nm14`` are N:M patterns (``ts.NM(2, 4)``, ``ts.NM(1, 4)``): their sparsity is fixed
by the pattern and counts the masked tensors (``--sparsity 0.5``/``0.75 --sparsity-of masked``,
see :func:`nm_sparsity_error`), and every masked tensor's dim 1 must be a multiple of 4.
"""

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""Normalisation layers, whose parameters get no weight decay."""


def build_policy(name: str) -> ts.AllocationPolicy:
    """The policy of ``--policy name`` (a key of :data:`POLICIES`), a new object each call.

    Raises:
        ValueError: ``name`` is not a key of :data:`POLICIES`.
    """
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {tuple(POLICIES)}, got {name!r}")
    return POLICIES[name]()


def nm_sparsity_error(policy: str, sparsity: float, sparsity_of: str) -> str | None:
    """Why ``--sparsity``/``--sparsity-of`` do not fit an N:M ``--policy``; None if they fit.

    An N:M pattern keeps ``n`` of every ``m`` weights of the masked tensors, so the only target
    is ``sparsity = 1 - n/m`` counted over the masked tensors (``sparsity_of="masked"``). The
    library refuses anything else when the optimizer is built (``ts.NM.check``); this says so
    before any data is loaded, in terms of the flags. None for the other policies.
    """
    built = build_policy(policy)
    if not isinstance(built, ts.NM):
        return None
    fixed = 1.0 - built.n / built.m
    if sparsity_of == "masked" and math.isclose(sparsity, fixed, rel_tol=0.0, abs_tol=1e-9):
        return None
    return (
        f"--policy {policy} ({built!r}) keeps {built.n} of every {built.m} weights of the masked "
        f"tensors, a sparsity of {fixed:g} fixed by the pattern; got --sparsity {sparsity:g} "
        f"--sparsity-of {sparsity_of}. Use --sparsity {fixed:g} --sparsity-of masked"
    )


def parse_block(text: str) -> list[int] | None:
    """``--block``: ``"4x4"`` or ``"4,4"`` -> ``[4, 4]``; ``"none"``, ``"0"`` or ``""`` -> None.

    The sizes apply to the weights' leading dims (``ts.sparsify(block=...)``).
    """
    if text.strip().lower() in ("none", "0", ""):
        return None
    try:
        sizes = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"--block must look like 4x4 (rows x columns) or 'none', got {text!r}"
        )
    return sizes


def add_sparsity_options(
    parser: Any,
    *,
    method: str = "spartan",
    sparsity: float = 0.9,
    sparsity_of: str = "model",
    policy: str = "global",
    beta_target: float = 10.0,
    anneal_fraction: float = 0.2,
    finetune_fraction: float = 0.2,
) -> None:
    """Add the flags :func:`spartan_optimizer` and ``ts.sparsify`` read to ``parser``.

    ``parser`` is an ``argparse.ArgumentParser`` or one of its argument groups; the keywords are
    the defaults. Adds ``--method``, ``--sparsity``, ``--sparsity-of``, ``--policy``, ``--block``
    (parsed by :func:`parse_block`), ``--beta-target``, ``--anneal-fraction`` and
    ``--finetune-fraction``.
    """
    parser.add_argument(
        "--method",
        default=method,
        choices=METHODS,
        help="dense (no mask), spartan, topkast (Top-KAST: ts.TopKAST, sparse from the start, "
        "backward set of twice the density, exploration penalty = --weight-decay), rigl (RigL: "
        "ts.RigL, sparse from the start, drop/grow every 100 steps until 75%% of them; use "
        "--policy erk as in the paper), gmp; topkast and rigl ignore --anneal-fraction, "
        "--finetune-fraction and --beta-target",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        default=sparsity,
        help="target fraction of zero parameters (ignored by --method dense)",
    )
    parser.add_argument(
        "--sparsity-of",
        default=sparsity_of,
        choices=("model", "masked"),
        help="count the sparsity over all parameters (paper) or over the masked weights only",
    )
    parser.add_argument(
        "--policy",
        default=policy,
        choices=tuple(POLICIES),
        help="layer-wise allocation; nm24/nm14: 2:4 / 1:4 patterns along the input dim "
        "(need --sparsity 0.5/0.75 --sparsity-of masked)",
    )
    parser.add_argument(
        "--block",
        type=parse_block,
        default=None,
        help="block shape on the weights' first two dims, e.g. 4x4 or 16x16 ('none': unstructured)",
    )
    parser.add_argument("--beta-target", type=float, default=beta_target, help="final beta")
    parser.add_argument(
        "--rigl-delta-t",
        type=int,
        default=100,
        help="--method rigl: steps between drop/grow updates (the paper's Delta T)",
    )
    parser.add_argument(
        "--anneal-fraction",
        type=float,
        default=anneal_fraction,
        help="fraction of steps to ramp the density from 1 to the target",
    )
    parser.add_argument(
        "--finetune-fraction",
        type=float,
        default=finetune_fraction,
        help="last fraction of steps with a frozen mask",
    )


def param_groups(
    model: nn.Module, weight_decay: float, *, masked_decay: bool = True
) -> list[dict[str, Any]]:
    """Weight decay on weights; none on biases and normalisation layers' parameters, nor, with
    ``masked_decay=False``, on masked weights (Top-KAST's exploration penalty replaces it).

    Parameters are visited module by module, so a masked weight (held by the parametrization as
    ``parametrizations.weight.original``) is found as the weight it is; works before and after
    ``ts.sparsify``.
    """
    masked = set() if masked_decay else {id(r.theta) for r in ts.find_masks(model)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, NORM_TYPES) or name.endswith("bias") or id(param) in masked:
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def spartan_optimizer(
    base: torch.optim.Optimizer, model: nn.Module, options: Any, total_steps: int
) -> torch.optim.Optimizer:
    """``base`` itself for ``options.method == "dense"``; ``ts.TopKAST`` (exploration penalty
    ``options.weight_decay``: build ``base`` with :func:`param_groups` and
    ``masked_decay=False``) or ``ts.RigL`` (their defaults otherwise) for those methods; else
    ``ts.DualAveraging`` around it.

    ``options`` carries ``method``, ``policy`` (a key of :data:`POLICIES`), ``sparsity``,
    ``sparsity_of``, ``beta_target``, ``anneal_fraction``, ``finetune_fraction`` (the flags
    of :func:`add_sparsity_options`) and ``weight_decay``.
    """
    if options.method == "dense":
        return base
    if options.method == "topkast":
        return ts.TopKAST(
            base,
            model,
            sparsity=options.sparsity,
            total_steps=total_steps,
            penalty=options.weight_decay,
            policy=build_policy(options.policy),
            sparsity_of=options.sparsity_of,
        )
    if options.method == "rigl":
        return ts.RigL(
            base,
            model,
            sparsity=options.sparsity,
            total_steps=total_steps,
            policy=build_policy(options.policy),
            sparsity_of=options.sparsity_of,
            delta_t=getattr(options, "rigl_delta_t", 100),
        )
    return ts.DualAveraging(
        base,
        model,
        sparsity=options.sparsity,
        total_steps=total_steps,
        policy=build_policy(options.policy),
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
