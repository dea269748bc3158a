"""Finishing a sparse model: ``finalize`` and the per-layer ``sparsity_report``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan.sparsify import find_masks

__all__ = ["SparsityReport", "SparsityRow", "finalize", "sparsity_report"]


def finalize(model: nn.Module) -> None:
    """Bake every :class:`~torchspartan.SpartanMask` into its weight and remove it.

    Each masked tensor becomes a plain ``nn.Parameter`` (the same Parameter object as during
    training) holding the weight the forward pass used (``theta * h`` after fine-tuning), so
    ``model.state_dict()`` has the original keys and loads into a fresh unmasked model. Other
    parametrizations on the same tensor are baked in too (``parametrize`` removes them together).

    Raises:
        ValueError: the model has no SpartanMask.

    Example:
        >>> import torch, torchspartan as ts
        >>> layer = torch.nn.Linear(4, 4)
        >>> weight = layer.weight
        >>> _ = ts.sparsify(layer)
        >>> ts.finalize(layer)
        >>> layer.weight is weight, list(layer.state_dict())
        (True, ['bias', 'weight'])
    """
    found = find_masks(model)
    if not found:
        raise ValueError("finalize: the model has no SpartanMask (already finalized?)")
    for r in found:
        r.mask.unbind()
        parametrize.remove_parametrizations(r.module, r.tensor_name, leave_parametrized=True)


@dataclass(frozen=True)
class SparsityRow:
    """One tensor of a :class:`SparsityReport`."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    masked: bool

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor zeros of a model; ``str()`` renders a table."""

    rows: tuple[SparsityRow, ...]

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all parameters of the model."""
        total = sum(r.numel for r in self.rows)
        return 1.0 - sum(r.nonzero for r in self.rows) / total if total else 0.0

    @property
    def masked_sparsity(self) -> float:
        """Fraction of zeros over the tensors with at least 2 dims (weights; biases and norms
        excluded); after ``finalize`` these are the masked ones."""
        rows = [r for r in self.rows if r.masked or len(r.shape) >= 2]
        total = sum(r.numel for r in rows)
        return 1.0 - sum(r.nonzero for r in rows) / total if total else 0.0

    def __str__(self) -> str:
        head = f"{'tensor':<40} {'shape':<22} {'numel':>10} {'nonzero':>10} {'sparsity':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            shape = "x".join(map(str, r.shape)) or "()"
            lines.append(
                f"{r.name:<40} {shape:<22} {r.numel:>10} {r.nonzero:>10} {r.sparsity:>9.2%}"
            )
        total = sum(r.numel for r in self.rows)
        nonzero = sum(r.nonzero for r in self.rows)
        lines.append("-" * len(head))
        lines.append(f"{'all parameters':<40} {'':<22} {total:>10} {nonzero:>10} "
                     f"{self.overall_sparsity:>9.2%}")
        lines.append(f"{'weights (dim >= 2)':<40} {'':<22} {'':>10} {'':>10} "
                     f"{self.masked_sparsity:>9.2%}")
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Zeros per parameter of any model; masked tensors are read through their mask.

    Example:
        >>> import torch, torchspartan as ts
        >>> print(ts.sparsity_report(torch.nn.Linear(2, 2)).overall_sparsity)
        0.0
    """
    masked = {r.name for r in find_masks(model)}
    rows = []
    for mod_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            qual = f"{mod_name}.{pname}" if mod_name else pname
            rows.append(SparsityRow(qual, tuple(param.shape), param.numel(),
                                    int(torch.count_nonzero(param)), False))
        if parametrize.is_parametrized(module):
            for tname in module.parametrizations:
                qual = f"{mod_name}.{tname}" if mod_name else tname
                value = getattr(module, tname)
                rows.append(SparsityRow(qual, tuple(value.shape), value.numel(),
                                        int(torch.count_nonzero(value)), qual in masked))
    rows = [r for r in rows if ".parametrizations." not in r.name]
    return SparsityReport(tuple(rows))
