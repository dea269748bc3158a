"""Hashes of tensors and state dicts: the mask and weight checks across ranks, resume checks."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

__all__ = ["MASK_BUFFERS", "digest", "mask_digest"]

MASK_BUFFERS = (".hard_mask", ".threshold", ".beta")
"""Name endings of the mask buffers a ``ts.sparsify`` parametrization holds."""


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
