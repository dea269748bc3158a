"""Shared builders for the training tests: tiny models, a masked model with its optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import torchspartan as ts


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, width: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
    ).to(dtype)


def convnet(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.Tanh(), nn.Linear(8, 4),
    ).to(dtype)


def batches(n: int, shape: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float64,
            batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((batch, *shape), generator=g, dtype=dtype),
         torch.randint(0, 3, (batch,), generator=g))
        for _ in range(n)
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer,
          data: list[tuple[torch.Tensor, torch.Tensor]],
          loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def masked_kept(model: nn.Module) -> dict[str, int]:
    """Kept entries (weight units) per masked tensor, read from the hard masks."""
    out = {}
    for name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for tname, params in plist.items():
            for p in params:
                if isinstance(p, ts.SpartanMask):
                    out[f"{name}.{tname}"] = int(p.hard_mask.sum()) * p.block_numel
    return out


# Reference block helpers for tests (independent of the library's own).
def block_sizes(shape: tuple[int, ...], block: tuple[int, ...] | None) -> tuple[int, ...]:
    return (1,) * len(shape) if block is None else tuple(block) + (1,) * (len(shape) - len(block))


def block_reduce(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Sum over every block (one reshape per dim, then sum the in-block axes)."""
    view: list[int] = []
    for n, s in zip(x.shape, sizes, strict=True):
        view += [n // s, s]
    return x.reshape(view).sum(dim=tuple(range(1, 2 * x.dim(), 2)))


def block_expand(y: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Repeat every block-grid entry over its block."""
    for dim, s in enumerate(sizes):
        y = y.repeat_interleave(s, dim=dim)
    return y


def floored_mlp() -> nn.Module:
    """An MLP whose default floors bind under a global budget: global magnitude would empty its
    last two layers, scaled down (the bounded solve and the held route)."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        model[4].weight.mul_(1e-2)
        model[6].weight.mul_(3e-2)
    return model
