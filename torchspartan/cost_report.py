"""The FLOP and size report of a model's weights for one forward pass: :func:`export_report`.

:func:`export_report` counts the FLOPs (dense and nonzero-only) and the bytes (dense, as held in
memory, compact on disk) of every Linear/Conv/attention weight for one forward pass, on a
finalized model or on one exported by :func:`~torchspartan.to_sparse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchspartan.export import run_example
from torchspartan.sparse_checkpoint import encoding_sizes
from torchspartan.sparse_layers import (
    SparseConv2d,
    SparseLinear,
    detached_weight,
    layout_name,
    sparse_bytes,
)

__all__ = ["ExportReport", "ReportRow", "export_report"]


@dataclass(frozen=True)
class ReportRow:
    """One weight of an :class:`ExportReport`.

    Attributes:
        name: qualified tensor name (e.g. ``"layer1.0.conv1.weight"``).
        kind: the module type (``"Conv2d"``, ``"SparseLinear"``, ``"MultiheadAttention"``...).
        shape: the dense weight shape.
        layout: how the weight is held now (``"dense"``, ``"csr"``, ``"bsr"``, ...).
        positions: output positions computed in the forward pass (rows of a Linear input,
            ``batch * H_out * W_out`` of a convolution, tokens of an attention projection),
            summed over calls; 0 when the layer was not called.
        numel, nonzero: entries and nonzero entries of the weight.
        dense_bytes: bytes of the weight and its bias dense.
        memory_bytes: bytes they hold in memory now (sparse layouts: values and indices).
        compact_bytes: bytes :func:`save_sparse` stores for them (estimated, without the
            file's fixed overhead).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    layout: str
    positions: int
    numel: int
    nonzero: int
    dense_bytes: int
    memory_bytes: int
    compact_bytes: int

    @property
    def dense_flops(self) -> int:
        """``2 * positions * numel``: a multiply and an add per weight and output position."""
        return 2 * self.positions * self.numel

    @property
    def sparse_flops(self) -> int:
        """``2 * positions * nonzero``: the same, skipping every zero weight."""
        return 2 * self.positions * self.nonzero


@dataclass(frozen=True)
class ExportReport:
    """FLOPs and bytes of a model's Linear/Conv/attention weights for one forward pass.

    ``str()`` renders a table with totals. FLOPs count the weight products only (biases,
    activations, normalisation and the attention scores are left out).
    """

    rows: tuple[ReportRow, ...]

    @property
    def dense_flops(self) -> int:
        return sum(r.dense_flops for r in self.rows)

    @property
    def sparse_flops(self) -> int:
        return sum(r.sparse_flops for r in self.rows)

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)

    @property
    def memory_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.rows)

    @property
    def compact_bytes(self) -> int:
        return sum(r.compact_bytes for r in self.rows)

    @property
    def flop_reduction(self) -> float:
        """dense FLOPs / sparse FLOPs."""
        return self.dense_flops / self.sparse_flops if self.sparse_flops else math.inf

    def __str__(self) -> str:
        nw = max([len(r.name) for r in self.rows] + [20])
        head = (f"{'weight':<{nw}} {'shape':<16} {'layout':<8} {'zeros':>7} {'MFLOP dense':>12} "
                f"{'MFLOP sparse':>12} {'KiB dense':>10} {'KiB mem':>10} {'KiB compact':>11}")
        lines = [head, "-" * len(head)]

        def line(name: str, shape: str, layout: str, zeros: str, r: Any) -> str:
            return (f"{name:<{nw}} {shape:<16} {layout:<8} {zeros:>7} {r.dense_flops / 1e6:>12.2f} "
                    f"{r.sparse_flops / 1e6:>12.2f} {r.dense_bytes / 1024:>10.1f} "
                    f"{r.memory_bytes / 1024:>10.1f} {r.compact_bytes / 1024:>11.1f}")

        for r in self.rows:
            zeros = 1.0 - r.nonzero / r.numel if r.numel else 0.0
            lines.append(line(r.name, "x".join(map(str, r.shape)), r.layout, f"{zeros:.1%}", r))
        numel = sum(r.numel for r in self.rows)
        zeros_all = 1.0 - sum(r.nonzero for r in self.rows) / numel if numel else 0.0
        lines.append("-" * len(head))
        lines.append(line("total", "", "", f"{zeros_all:.1%}", self))
        lines.append(
            f"sparse/dense: FLOPs {self.flop_reduction:.2f}x fewer, memory "
            f"{self.dense_bytes / max(self.memory_bytes, 1):.2f}x smaller, compact file "
            f"{self.dense_bytes / max(self.compact_bytes, 1):.2f}x smaller")
        return "\n".join(lines)


def _weights_of(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None, str]]:
    """``(tensor name, dense weight, bias, layout)`` of a reported module."""
    if isinstance(module, (SparseLinear, SparseConv2d)):
        return [("weight", module.dense_weight(), module.bias, layout_name(module.weight))]
    if isinstance(module, nn.MultiheadAttention):
        out: list[tuple[str, torch.Tensor, torch.Tensor | None, str]] = []
        if module.in_proj_weight is not None:  # the q, k, v thirds see different inputs
            w, b = module.in_proj_weight.detach(), module.in_proj_bias
            e = w.shape[0] // 3
            for i, part in enumerate("qkv"):
                out.append((f"in_proj_weight[{part}]", w[i * e:(i + 1) * e],
                            None if b is None else b.detach()[i * e:(i + 1) * e], "dense"))
        else:
            for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                out.append((n, getattr(module, n).detach(), None, "dense"))
        out.append(("out_proj.weight", module.out_proj.weight.detach(), module.out_proj.bias,
                    "dense"))
        return out
    return [("weight", detached_weight(module), getattr(module, "bias", None), "dense")]


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@torch.no_grad()
def export_report(model: nn.Module, example_input: Any) -> ExportReport:
    """Dense and sparse FLOPs and bytes of every Linear, Conv and attention weight.

    One forward pass of ``example_input`` (under ``torch.inference_mode``) records how many
    output positions each layer computes; FLOPs follow from the weight shapes and nonzeros
    (``2 * positions * numel`` dense, ``2 * positions * nonzero`` sparse). Works on finalized
    models and on models exported by :func:`to_sparse` (``memory_bytes`` then reflects the sparse
    layouts). ``nn.MultiheadAttention`` is reported by its input and output projections.

    Args:
        model: the model (finalized, or exported).
        example_input: a tensor, a tuple of positional arguments or a dict of keyword arguments.

    Returns:
        An :class:`ExportReport` (frozen; ``str()`` is a table with totals).

    Raises:
        TypeError: ``model`` is not a module or ``example_input`` has an unsupported type.

    Example:
        >>> import torch
        >>> from torchspartan.cost_report import export_report
        >>> model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.ReLU(),
        ...                             torch.nn.Linear(100, 10))
        >>> with torch.no_grad():
        ...     model[0].weight[:, 10:] = 0
        >>> report = export_report(model, torch.randn(4, 100))
        >>> report.dense_flops, report.sparse_flops
        (88000, 16000)
        >>> print(str(report).splitlines()[-1])
        sparse/dense: FLOPs 5.50x fewer, memory 1.00x smaller, compact file 4.86x smaller
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_report: model must be an nn.Module, got {type(model).__name__}")
    types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, SparseLinear, SparseConv2d,
             nn.MultiheadAttention)
    positions: dict[str, dict[str, int]] = {}
    handles = []
    modules: list[tuple[str, nn.Module]] = []
    inside_mha: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.add(id(module.out_proj))
    for name, module in model.named_modules():
        if not isinstance(module, types) or id(module) in inside_mha:
            continue
        modules.append((name, module))
        positions[name] = {}

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
                 name: str = name) -> None:
            pos = positions[name]
            if isinstance(mod, nn.MultiheadAttention):
                q = args[0] if args else kwargs["query"]
                k = args[1] if len(args) > 1 else kwargs.get("key", q)
                v = args[2] if len(args) > 2 else kwargs.get("value", k)
                tq = q.numel() // q.shape[-1]
                names = (("in_proj_weight[q]", "in_proj_weight[k]", "in_proj_weight[v]")
                         if mod.in_proj_weight is not None
                         else ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
                for n, t in zip(names, (q, k, v), strict=True):
                    pos[n] = pos.get(n, 0) + t.numel() // t.shape[-1]
                pos["out_proj.weight"] = pos.get("out_proj.weight", 0) + tq
                return
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(mod, (nn.Linear, SparseLinear)):
                count = output.numel() // output.shape[-1] if output.dim() else 1
            else:  # convolutions: output positions = numel / out_channels
                count = output.numel() // int(getattr(mod, "out_channels", 1))
            pos["weight"] = pos.get("weight", 0) + count

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            run_example(model, example_input)
    finally:
        for h in handles:
            h.remove()

    rows: list[ReportRow] = []
    for name, module in modules:
        pos = positions[name]
        for tname, w, bias, layout in _weights_of(module):
            qual = f"{name}.{tname}" if name else tname
            numel = w.numel()
            nonzero = int(torch.count_nonzero(w))
            rows.append(_row(qual, module, w, bias, layout, pos.get(tname, 0), numel, nonzero))
    return ExportReport(tuple(rows))


def _row(qual: str, module: nn.Module, w: torch.Tensor, bias: torch.Tensor | None,
         layout: str, positions: int, numel: int, nonzero: int) -> ReportRow:
    dense_bytes = _tensor_bytes(w) + _tensor_bytes(bias)
    if isinstance(module, (SparseLinear, SparseConv2d)):
        memory = sparse_bytes(module.weight) + _tensor_bytes(bias)
    else:
        memory = dense_bytes
    compact = min(encoding_sizes(w).values()) + (
        min(encoding_sizes(bias).values()) if bias is not None else 0)
    return ReportRow(qual, type(module).__name__, tuple(w.shape), layout, positions, numel,
                     nonzero, dense_bytes, memory, compact)
