"""Finishing a sparse model: ``finalize`` and the per-layer ``sparsity_report``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan.cost_report import ExportReport, export_report
from torchspartan.sparsify import MaskRef, find_masks

__all__ = ["SparsityReport", "SparsityRow", "finalize", "sparsity_report"]


# Set by ``finalize`` on the model it finalized: the qualified names (relative to that model) of
# the tensors that were masked, so that ``sparsity_report`` can still tell them apart. A plain
# attribute: it follows the model through deepcopy and pickle, not through ``state_dict``.
MASKED_NAMES_ATTR = "_torchspartan_masked"


def finalize(model: nn.Module) -> None:
    """Bake every :class:`~torchspartan.SpartanMask` into its weight and remove it.

    Each masked tensor becomes a plain ``nn.Parameter`` (the same Parameter object as during
    training) holding the weight the forward pass used (``theta * h`` after fine-tuning), so
    ``model.state_dict()`` has the original keys and loads into a fresh unmasked model. Other
    parametrizations on the same tensor are baked in too (``parametrize`` removes them together).
    A tied tensor (one mask at several places) is baked once and stays shared.

    The names of the tensors that were masked are kept on ``model`` (a plain attribute), so
    that :func:`sparsity_report`'s ``masked_sparsity`` still counts them.

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
    groups: dict[int, list[MaskRef]] = {}
    for r in found:
        groups.setdefault(id(r.mask), []).append(r)
    names = list(getattr(model, MASKED_NAMES_ATTR, ()))
    with torch.no_grad():
        values = {k: getattr(g[0].module, g[0].tensor_name).detach().clone()
                  for k, g in groups.items() if len(g) > 1}
    for r in found:
        r.mask.unbind()
    for key, group in groups.items():
        names.append(group[0].name)
        if len(group) == 1:
            r = group[0]
            parametrize.remove_parametrizations(r.module, r.tensor_name, leave_parametrized=True)
            continue
        theta = group[0].theta  # one Parameter at every place: write the masked value once
        for r in group:
            parametrize.remove_parametrizations(r.module, r.tensor_name,
                                                leave_parametrized=False)
        with torch.no_grad():
            theta.copy_(values[key])
    setattr(model, MASKED_NAMES_ATTR, tuple(dict.fromkeys(names)))


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
    """Per-tensor zeros of a model; ``str()`` renders a table.

    Attributes:
        rows: one per parameter.
        cost: dense vs sparse FLOPs and bytes of the Linear/Conv/attention weights
            (:func:`~torchspartan.export_report`), when the report was given an example input.
    """

    rows: tuple[SparsityRow, ...]
    cost: ExportReport | None = None

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all parameters of the model."""
        total = sum(r.numel for r in self.rows)
        return 1.0 - sum(r.nonzero for r in self.rows) / total if total else 0.0

    @property
    def masked_sparsity(self) -> float:
        """Fraction of zeros over the masked tensors: those under a mask now, or masked before
        :func:`finalize` (it keeps their names on the model). ``nan`` when the report knows of
        none (e.g. a finalized model's state dict loaded into a fresh model: use
        :attr:`weight_sparsity` there)."""
        rows = [r for r in self.rows if r.masked]
        total = sum(r.numel for r in rows)
        return 1.0 - sum(r.nonzero for r in rows) / total if total else math.nan

    @property
    def weight_sparsity(self) -> float:
        """Fraction of zeros over every tensor with at least 2 dims (the weights: biases and
        norms excluded), masked or not."""
        rows = [r for r in self.rows if len(r.shape) >= 2]
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
        masked = [r for r in self.rows if r.masked]
        if masked:
            lines.append(f"{'masked tensors':<40} {'':<22} {sum(r.numel for r in masked):>10} "
                         f"{sum(r.nonzero for r in masked):>10} {self.masked_sparsity:>9.2%}")
        weights = [r for r in self.rows if len(r.shape) >= 2]
        lines.append(f"{'weights (dim >= 2)':<40} {'':<22} {sum(r.numel for r in weights):>10} "
                     f"{sum(r.nonzero for r in weights):>10} {self.weight_sparsity:>9.2%}")
        if self.cost is not None:
            lines += ["", str(self.cost)]
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module, example_input: Any = None) -> SparsityReport:
    """Zeros per parameter of any model; masked tensors are read through their mask.

    With ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) the report also holds the FLOPs and bytes of the weights, dense vs sparse
    (``report.cost``, from one forward pass; see :func:`~torchspartan.export_report`).

    Every tensor is counted once: a Parameter shared by several modules (tied weights) is one
    row, under its first name. Rows are ``masked`` when a SpartanMask is on them, or when
    :func:`finalize` recorded them as masked.

    Example:
        >>> import torch, torchspartan as ts
        >>> print(ts.sparsity_report(torch.nn.Linear(2, 2)).overall_sparsity)
        0.0
    """
    masked = {r.name for r in find_masks(model)}
    for mod_name, module in model.named_modules():
        for name in getattr(module, MASKED_NAMES_ATTR, ()):
            masked.add(f"{mod_name}.{name}" if mod_name else name)
    rows = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        values: list[tuple[str, torch.Tensor, int]] = []
        for pname, param in module.named_parameters(recurse=False):
            values.append((pname, param, id(param)))
        if parametrize.is_parametrized(module):
            for tname, plist in module.parametrizations.items():
                key = id(getattr(plist, "original", plist))
                values.append((tname, getattr(module, tname), key))
        for pname, value, key in values:
            qual = f"{mod_name}.{pname}" if mod_name else pname
            if ".parametrizations." in qual or key in seen:
                continue
            seen.add(key)
            rows.append(SparsityRow(qual, tuple(value.shape), value.numel(),
                                    int(torch.count_nonzero(value)), qual in masked))
    cost = export_report(model, example_input) if example_input is not None else None
    return SparsityReport(tuple(rows), cost)
