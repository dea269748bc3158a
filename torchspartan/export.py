"""Deploying a finalized sparse model: sparse kernels, a compact checkpoint, a FLOP/size report.

After training (``ts.sparsify`` + ``ts.DualAveraging``) and :func:`torchspartan.finalize`, a model
holds plain dense weights full of zeros: as large and as slow as the dense model. This module
turns those zeros into savings:

- :func:`to_sparse` replaces ``nn.Linear`` and ``nn.Conv2d`` layers whose weights are mostly
  zero by :class:`SparseLinear` / :class:`SparseConv2d`, which compute with a PyTorch sparse
  layout: CSR (unstructured zeros), BSR (block-sparse zeros, e.g. a ``block=(16, 16)`` mask) or
  2:4 semi-structured (CUDA only). ``layout="auto"`` times every layer dense and sparse at the
  shapes of an example input and keeps the faster one.
- :func:`save_sparse` / :func:`load_sparse` write and read a compact checkpoint (nonzero values
  plus small indices or a bit mask) that loads back into the dense architecture.
- :func:`export_report` counts the FLOPs (dense and nonzero-only) and the bytes (dense, as held
  in memory, compact on disk) of every Linear/Conv/attention weight for one forward pass.

Whether a sparse kernel wins depends on the sparsity, the shapes and the hardware. Measured on a
CPU (MKL, benchmarks/inference.py): CSR beat a dense ``Linear(4096, 4096)`` at 90-98% zeros at
batch 1 and 64, and a ViT MLP block at 197 tokens, but lost for the same block at 12608 tokens
(BSR too) and for the early 3x3 convolutions of a ResNet-50. ``layout="auto"`` is the safe
default for a deployment; the explicit layouts are for measuring. The sparse layers are for
inference (their weights are buffers, not trainable parameters).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "CheckpointInfo",
    "ExportReport",
    "ExportSummary",
    "LayerExport",
    "Layout",
    "ReportRow",
    "SparseConv2d",
    "SparseLinear",
    "export_report",
    "load_sparse",
    "save_sparse",
    "to_sparse",
]

Layout = Literal["auto", "csr", "bsr", "semi_structured", "dense"]
_LAYOUTS = ("auto", "csr", "bsr", "semi_structured", "dense")
_SPARSE_LAYOUTS = ("csr", "bsr", "semi_structured")
#: square block sizes tried, largest first, when ``blocksize`` is not given
BLOCK_CANDIDATES = (64, 32, 16, 8, 4, 2)
#: zeros allowed inside the blocks that hold a nonzero, as a fraction of their entries, for a
#: weight to count as block-sparse (trained weights can be exactly zero in a kept block)
BLOCK_TOLERANCE = 0.05
_FORMAT = "torchspartan.sparse_checkpoint"
_FORMAT_VERSION = 1
_TORCH_LAYOUT_NAMES = {torch.sparse_csr: "csr", torch.sparse_bsr: "bsr", torch.strided: "dense"}


# -- weight inspection ------------------------------------------------------------------------


def _as_pair(blocksize: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``16`` or ``(16, 16)`` -> ``(16, 16)``; ``None`` stays ``None``."""
    if blocksize is None:
        return None
    if isinstance(blocksize, bool):
        raise TypeError(f"blocksize must be an int or a pair of ints, got {blocksize!r}")
    if isinstance(blocksize, int):
        pair: tuple[Any, ...] = (blocksize, blocksize)
    else:
        try:
            pair = tuple(blocksize)
        except TypeError:
            raise TypeError(
                f"blocksize must be an int or a pair of ints, got {blocksize!r}") from None
    if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
        raise TypeError(f"blocksize must be an int or a pair of ints, got {blocksize!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize!r}")
    return (int(pair[0]), int(pair[1]))


@dataclass(frozen=True)
class _BlockFit:
    """How well a weight's zeros fit a block mask of one block size."""

    blocksize: tuple[int, int]
    kept_blocks: int  # blocks holding at least one nonzero
    total_blocks: int
    zeros_in_kept: int  # zero entries inside the kept blocks

    @property
    def kept_fraction_zero(self) -> float:
        kept_entries = self.kept_blocks * self.blocksize[0] * self.blocksize[1]
        return self.zeros_in_kept / kept_entries if kept_entries else 0.0

    @property
    def fits(self) -> bool:
        return self.kept_fraction_zero <= BLOCK_TOLERANCE


def _block_fit(nonzero: torch.Tensor, blocksize: tuple[int, int]) -> _BlockFit:
    """Count the kept blocks of a 2-D bool ``nonzero`` pattern (blocksize divides its shape)."""
    rows, cols = nonzero.shape
    bh, bw = blocksize
    counts = nonzero.reshape(rows // bh, bh, cols // bw, bw).sum(dim=(1, 3), dtype=torch.int64)
    kept = counts > 0
    n_kept = int(kept.sum())
    zeros_in_kept = n_kept * bh * bw - int(counts.sum())
    return _BlockFit(blocksize, n_kept, counts.numel(), zeros_in_kept)


def _divides(shape: tuple[int, int], blocksize: tuple[int, int]) -> bool:
    return shape[0] % blocksize[0] == 0 and shape[1] % blocksize[1] == 0


def _detect_block(nonzero: torch.Tensor) -> _BlockFit | None:
    """The largest square block of :data:`BLOCK_CANDIDATES` whose block mask explains the zeros."""
    shape = (nonzero.shape[0], nonzero.shape[1])
    for b in BLOCK_CANDIDATES:
        if _divides(shape, (b, b)):
            fit = _block_fit(nonzero, (b, b))
            if fit.fits:
                return fit
    return None


def _first_non_2to4(nonzero: torch.Tensor) -> tuple[int, int, int] | None:
    """``(row, first column, nonzeros)`` of the first group of 4 inputs with more than 2
    nonzeros, or ``None`` when the pattern is 2:4 (needs ``cols % 4 == 0``)."""
    rows, cols = nonzero.shape
    counts = nonzero.reshape(rows, cols // 4, 4).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel() == 0:
        return None
    r, g = (int(v) for v in bad[0])
    return r, 4 * g, int(counts[r, g])


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, detached (typed for mypy)."""
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return w.detach()


# -- the exported layers ----------------------------------------------------------------------


def _layout_name(weight: torch.Tensor) -> str:
    if weight.layout in _TORCH_LAYOUT_NAMES:
        return _TORCH_LAYOUT_NAMES[weight.layout]
    if type(weight).__name__.startswith("SparseSemiStructured"):
        return "semi_structured"
    return str(weight.layout)


def _compress(w2d: torch.Tensor, layout: str, blocksize: tuple[int, int] | None) -> torch.Tensor:
    """A 2-D dense weight in ``layout`` (int32 indices where they fit: half the memory)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": we know
        warnings.filterwarnings("ignore", "Sparse (CSR|BSR|Compressed)", UserWarning)
        return _compress_quiet(w2d, layout, blocksize)


def _compress_quiet(w2d: torch.Tensor, layout: str,
                    blocksize: tuple[int, int] | None) -> torch.Tensor:
    if layout == "semi_structured":
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(w2d.contiguous())
    if layout == "csr":
        s = w2d.to_sparse_csr()
        ctor = torch.sparse_csr_tensor
        values = s.values().clone()
    elif layout == "bsr":
        if blocksize is None:
            raise ValueError("bsr needs a blocksize")
        s = w2d.to_sparse_bsr(blocksize)
        ctor = torch.sparse_bsr_tensor
        values = s.values().clone()
    else:
        raise ValueError(f"unknown sparse layout {layout!r}")
    crow, col = s.crow_indices(), s.col_indices()
    if max(w2d.shape) < 2**31 and values.numel() < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return ctor(crow.clone(), col.clone(), values, tuple(w2d.shape), check_invariants=False)


def _sparse_bytes(weight: torch.Tensor) -> int:
    """Bytes a (sparse or dense) weight holds in memory: values plus indices."""
    if weight.layout in (torch.sparse_csr, torch.sparse_bsr):
        return sum(t.numel() * t.element_size()
                   for t in (weight.values(), weight.crow_indices(), weight.col_indices()))
    if weight.layout == torch.strided and not _layout_name(weight) == "semi_structured":
        return weight.numel() * weight.element_size()
    parts = [getattr(weight, a, None) for a in ("packed", "meta", "packed_t", "meta_t")]
    found = [p for p in parts if isinstance(p, torch.Tensor)]
    if found:
        return sum(p.numel() * p.element_size() for p in found)
    return weight.numel() * weight.element_size() // 2  # 2:4: half the values (+ metadata)


class _SparseBase(nn.Module):
    """Shared parts of :class:`SparseLinear` and :class:`SparseConv2d`."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: str
    blocksize: tuple[int, int] | None
    weight_shape: tuple[int, ...]

    def _init_weight(self, weight2d: torch.Tensor, bias: torch.Tensor | None, layout: str,
                     blocksize: tuple[int, int] | None) -> None:
        if layout not in _SPARSE_LAYOUTS:
            raise ValueError(f"layout must be one of {_SPARSE_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.blocksize = blocksize if layout == "bsr" else None
        self.register_buffer("weight", _compress(weight2d.detach(), layout, self.blocksize))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _matmul(self, cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``W @ cols + bias[:, None]`` for a 2-D dense ``cols`` (inputs as columns)."""
        if self.bias is None:
            return torch.mm(self.weight, cols, out=out)
        return torch.addmm(self.bias.unsqueeze(1), self.weight, cols, out=out)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor of the original layer's shape (zeros included)."""
        return self.weight.to_dense().reshape(self.weight_shape)

    @property
    def nnz(self) -> int:
        """Nonzero weights (blocks may also store explicit zeros; those are not counted)."""
        if self.weight.layout in (torch.sparse_csr, torch.sparse_bsr):
            return int(torch.count_nonzero(self.weight.values()))
        return int(torch.count_nonzero(self.dense_weight()))

    def _extra(self) -> str:
        s = f"layout={self.layout!r}"
        if self.blocksize is not None:
            s += f", blocksize={self.blocksize}"
        numel = math.prod(self.weight_shape)
        return s + f", density={self.nnz / numel if numel else 0.0:.3f}"


class SparseLinear(_SparseBase):
    """A ``nn.Linear`` that computes with a sparse weight (CSR, BSR or 2:4 semi-structured).

    Same interface as the ``nn.Linear`` it was made from: input ``(*, in_features)``, output
    ``(*, out_features)``, attributes ``in_features``, ``out_features``, ``weight`` (here a
    sparse tensor buffer) and ``bias``. On CPU (MKL) one input row uses the sparse
    matrix-vector product, several rows ``W @ x^T`` with the rows as columns (much faster than
    ``x @ W^T`` with a sparse right operand); float32/float64 only on CPU.

    Args:
        weight: the dense ``(out_features, in_features)`` weight, zeros included.
        bias: the bias or ``None``.
        layout: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        blocksize: the BSR block, e.g. ``(16, 16)`` (``"bsr"`` only).

    Raises:
        ValueError: an unknown layout, or one PyTorch cannot build from this weight.

    Example:
        >>> import torch
        >>> from torchspartan.export import SparseLinear
        >>> dense = torch.nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     dense.weight[:, 2:] = 0
        >>> sparse = SparseLinear.from_dense(dense, "csr")
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-6)
        True
        >>> sparse
        SparseLinear(in_features=8, out_features=4, bias=True, layout='csr', density=0.250)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str,
                 blocksize: tuple[int, int] | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.weight_shape = (self.out_features, self.in_features)
        self._init_weight(weight, bias, layout, blocksize)

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str,
                   blocksize: tuple[int, int] | None = None) -> SparseLinear:
        """The sparse copy of ``linear`` (same device and dtype)."""
        return cls(linear.weight, linear.bias, layout, blocksize)

    def to_dense_module(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (the inverse of :meth:`from_dense`)."""
        w = self.dense_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.layout == "semi_structured":
            y = F.linear(x2, self.weight, self.bias)
        elif x2.shape[0] == 1:  # (F.linear with a CSR weight fails under inference_mode)
            v = (torch.mv(self.weight, x2[0]) if self.bias is None
                 else torch.addmv(self.bias, self.weight, x2[0]))
            y = v.unsqueeze(0)
        else:
            y = self._matmul(x2.t()).t().contiguous()
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self._extra())


class SparseConv2d(_SparseBase):
    """A ``nn.Conv2d`` (``groups=1``, zero padding) computing with a sparse weight, by im2col.

    The weight is kept as a sparse ``(out_channels, in_channels * kh * kw)`` matrix; each sample
    is unfolded (``F.unfold``; a 1x1 convolution needs no unfold, only a strided view) and
    multiplied by it. Why im2col and not only 1x1 convolutions: it is one exact code path for every
    kernel, stride, padding and dilation, and whether it pays is a measurement, not a rule —
    on CPU at 95% zeros it beats the dense convolution for most 1x1 and late (7x7 feature map)
    3x3 layers of a ResNet-50 at batch 1, and loses for early 3x3 layers, whose unfolded input
    is 9x larger than the input (``to_sparse(layout="auto")`` keeps those dense). Samples are
    processed one by one, writing into the output (no transposed copy of a batch).

    Args:
        weight: the dense ``(out_channels, in_channels, kh, kw)`` weight, zeros included.
        bias: the bias or ``None``.
        layout: ``"csr"`` or ``"bsr"`` (blocks over the flattened ``in_channels * kh * kw``).
        stride, padding, dilation: as in ``nn.Conv2d`` (``padding`` may be ``"same"``/``"valid"``).
        blocksize: the BSR block (``"bsr"`` only).

    Raises:
        ValueError: an unknown layout or a weight that is not 4-D.

    Example:
        >>> import torch
        >>> from torchspartan.export import SparseConv2d
        >>> dense = torch.nn.Conv2d(4, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     dense.weight[:, :3] = 0
        >>> sparse = SparseConv2d.from_dense(dense, "csr")
        >>> x = torch.randn(2, 4, 5, 5)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-5)
        True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, *,
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1),
                 blocksize: tuple[int, int] | None = None) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"SparseConv2d needs a 4-D weight, got shape {tuple(weight.shape)}")
        if layout == "semi_structured":
            raise ValueError("SparseConv2d supports 'csr' and 'bsr' (2:4 is for Linear layers)")
        self.out_channels, self.in_channels = int(weight.shape[0]), int(weight.shape[1])
        self.kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.padding: tuple[int, ...] | str = padding if isinstance(padding, str) else tuple(
            padding)
        # explicit (left, right, top, bottom) pads, as nn.Conv2d computes them for "same"
        pads = [0, 0, 0, 0]
        if self.padding == "same":
            for i, (d, k) in enumerate(zip(self.dilation, self.kernel_size, strict=True)):
                total = d * (k - 1)
                pads[2 - 2 * i] = total // 2
                pads[3 - 2 * i] = total - total // 2
        elif not isinstance(self.padding, str):
            ph, pw = self.padding
            pads = [pw, pw, ph, ph]
        self._pads = tuple(pads)
        self.weight_shape = tuple(int(n) for n in weight.shape)
        self._init_weight(weight.reshape(weight.shape[0], -1), bias, layout, blocksize)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, layout: str,
                   blocksize: tuple[int, int] | None = None) -> SparseConv2d:
        """The sparse copy of ``conv`` (``groups=1`` and ``padding_mode="zeros"`` only)."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"SparseConv2d needs groups=1 and padding_mode='zeros', got groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, layout, stride=conv.stride,  # type: ignore[arg-type]
                   padding=conv.padding, dilation=conv.dilation,  # type: ignore[arg-type]
                   blocksize=blocksize)

    def to_dense_module(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (the inverse of :meth:`from_dense`)."""
        w = self.dense_weight()
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                        stride=self.stride, padding=self.padding,  # type: ignore[arg-type]
                        dilation=self.dilation,  # type: ignore[arg-type]
                        bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None and out.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self._pads
        ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        pointwise = kh == kw == 1 and not any(self._pads)
        if not pointwise and (top != bottom or left != right):  # asymmetric "same" padding
            x = F.pad(x, self._pads)
            top = left = 0
        out = torch.empty((n, self.out_channels, ho * wo), dtype=x.dtype, device=x.device)
        for i in range(n):
            xi = x[i]
            if pointwise:
                cols = xi[:, ::sh, ::sw].reshape(self.in_channels, ho * wo)
            else:
                cols = F.unfold(xi.unsqueeze(0), self.kernel_size, dilation=self.dilation,
                                padding=(top, left), stride=self.stride)[0]
            self._matmul(cols, out=out[i])
        y = out.reshape(n, self.out_channels, ho, wo)
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, " + self._extra())


# -- to_sparse ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerExport:
    """What :func:`to_sparse` did with one layer.

    Attributes:
        name: qualified module name.
        kind: ``"Linear"`` or ``"Conv2d"``.
        shape: the weight's shape.
        sparsity: fraction of zeros of the weight.
        layout: the layout the layer computes with now (``"dense"`` when left as it was).
        blocksize: the BSR block, or ``None``.
        times: ``layout="auto"`` only: median seconds of one forward of the layer at the
            example shapes, per candidate layout (``"dense"``, ``"csr"``, ``"bsr"``, ...).
        note: why this layout (or why the layer stayed dense).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    sparsity: float
    layout: str
    blocksize: tuple[int, int] | None = None
    times: Mapping[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def speedup(self) -> float | None:
        """Measured dense time / time of the chosen layout (``None`` without a measurement)."""
        if not self.times or self.layout not in self.times:
            return None
        return self.times["dense"] / self.times[self.layout]


@dataclass(frozen=True)
class ExportSummary:
    """The per-layer decisions of :func:`to_sparse`; ``str()`` renders a table."""

    layers: tuple[LayerExport, ...]

    @property
    def layouts(self) -> dict[str, str]:
        """``{layer name: layout}``."""
        return {r.name: r.layout for r in self.layers}

    def __str__(self) -> str:
        nw = max([len(r.name) for r in self.layers] + [20])
        head = (f"{'layer':<{nw}} {'weight':<16} {'zeros':>7} {'layout':<16} {'dense ms':>9} "
                f"{'chosen ms':>9} {'speedup':>7}  note")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            lay = r.layout + (f" {r.blocksize[0]}x{r.blocksize[1]}" if r.blocksize else "")
            dense = f"{r.times['dense'] * 1e3:.3f}" if "dense" in r.times else ""
            chosen = f"{r.times[r.layout] * 1e3:.3f}" if r.layout in r.times else ""
            speed = f"{r.speedup:.2f}x" if r.speedup is not None else ""
            lines.append(f"{r.name:<{nw}} {shape:<16} {r.sparsity:>7.1%} {lay:<16} {dense:>9} "
                         f"{chosen:>9} {speed:>7}  {r.note}")
        n_sparse = sum(r.layout != "dense" for r in self.layers)
        lines.append("-" * len(head))
        lines.append(f"{n_sparse} of {len(self.layers)} layers sparse")
        return "\n".join(lines)


def _check_finalized(model: nn.Module, where: str) -> None:
    """Refuse a model that still has parametrizations on the weights we would export."""
    from torchspartan.mask import SpartanMask

    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname, plist in module.parametrizations.items():
            spartan = any(isinstance(p, SpartanMask) for p in plist)
            if spartan or (tname == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))):
                kinds = ", ".join(type(p).__name__ for p in plist)
                raise ValueError(
                    f"{where}: layer {name or '<root>'!r} ({type(module).__name__}) still has the "
                    f"parametrization(s) [{kinds}] on {tname!r}: the model is not finalized. "
                    f"Call ts.finalize(model) first (it bakes the masks into plain weights), or "
                    f"torch.nn.utils.parametrize.remove_parametrizations(module, {tname!r}) for "
                    f"other parametrizations"
                )


@dataclass
class _Site:
    """One exportable layer and every place it is referenced from."""

    name: str
    module: nn.Module
    refs: list[tuple[nn.Module, str]]


def _sites(model: nn.Module, exclude: Sequence[re.Pattern[str]]
           ) -> tuple[list[_Site], dict[str, tuple[nn.Module, str]]]:
    """Exportable layers (in model order) and ``{name: (module, reason)}`` for those skipped."""
    by_id: dict[int, _Site] = {}
    skipped: dict[str, tuple[nn.Module, str]] = {}
    types = (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)
    for name, child in model.named_modules(remove_duplicate=False):
        if not name or not isinstance(child, types):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if id(child) in by_id:
            by_id[id(child)].refs.append((parent, attr))
            continue
        if any(p.search(name) for p in exclude):
            continue
        if isinstance(parent, nn.MultiheadAttention):
            skipped[name] = (child, "kept dense: nn.MultiheadAttention reads its weight directly")
            continue
        base = nn.Linear if isinstance(child, nn.Linear) else nn.Conv2d
        if isinstance(child, base) and type(child).forward is not base.forward:
            skipped[name] = (child, f"kept dense: {type(child).__name__} overrides forward")
            continue
        by_id[id(child)] = _Site(name, child, [(parent, attr)])
    return list(by_id.values()), skipped


def _as_dense_module(module: nn.Module) -> nn.Module:
    if isinstance(module, (SparseLinear, SparseConv2d)):
        return module.to_dense_module()
    return module


def _build(name: str, dense: nn.Module, layout: str,
           blocksize: tuple[int, int] | None) -> nn.Module:
    """The sparse layer for ``dense`` in ``layout``; errors name the layer and the fix."""
    w = _weight(dense)
    w2 = w.reshape(w.shape[0], -1)
    shape_txt = f"{tuple(w.shape)}" + (f" (as a matrix {tuple(w2.shape)})" if w.dim() > 2 else "")
    if w.device.type == "cpu" and layout in ("csr", "bsr") and w.dtype not in (
            torch.float32, torch.float64):
        raise TypeError(
            f"to_sparse: layer {name!r}: weight dtype {w.dtype} has no CPU {layout} kernel "
            f"(MKL: float32/float64); call model.float() before exporting, or export on CUDA")
    if layout == "semi_structured":
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"to_sparse: layer {name!r}: semi_structured is for Linear layers")
        if w2.shape[1] % 4:
            raise ValueError(
                f"to_sparse: layer {name!r}: in_features={w2.shape[1]} is not a multiple of 4, "
                f"so the weight cannot be 2:4; use layout='csr' or exclude the layer")
        bad = _first_non_2to4(w2 != 0)
        if bad is not None:
            r, c, k = bad
            raise ValueError(
                f"to_sparse: layer {name!r}: the weight is not 2:4 sparse: row {r}, inputs "
                f"{c}..{c + 3} hold {k} nonzeros (at most 2 of every 4 consecutive inputs may be "
                f"nonzero); train with an N:M 2:4 mask or use layout='csr'")
        if w.device.type != "cuda":
            raise ValueError(
                f"to_sparse: layer {name!r}: layout='semi_structured' needs a CUDA weight (2:4 "
                f"kernels are CUDA only), the weight is on {w.device}; move the model to CUDA "
                f"(e.g. model.cuda().half()) or use layout='csr'")
        blocksize = None
    if layout == "bsr":
        shape2 = (int(w2.shape[0]), int(w2.shape[1]))
        nonzero = w2 != 0
        if blocksize is None:
            fit = _detect_block(nonzero)
            if fit is None:
                raise ValueError(
                    f"to_sparse: layer {name!r}: weight {shape_txt} is not block-sparse for any "
                    f"block size in {BLOCK_CANDIDATES} that divides it (a block fits when the "
                    f"blocks holding a nonzero are at most {BLOCK_TOLERANCE:.0%} zeros); use "
                    f"layout='csr' (or 'auto'), or pass blocksize= explicitly")
            blocksize = fit.blocksize
        else:
            if not _divides(shape2, blocksize):
                fitting = [b for b in BLOCK_CANDIDATES if _divides(shape2, (b, b))]
                raise ValueError(
                    f"to_sparse: layer {name!r}: blocksize {blocksize} does not divide the weight "
                    f"{shape_txt}; pick a blocksize dividing both dimensions (e.g. one of "
                    f"{fitting}), blocksize=None to detect it, or exclude the layer")
            fit = _block_fit(nonzero, blocksize)
            if not fit.fits:
                raise ValueError(
                    f"to_sparse: layer {name!r}: weight {shape_txt} is not {blocksize[0]}x"
                    f"{blocksize[1]} block-sparse: {fit.kept_fraction_zero:.1%} of the entries "
                    f"in the {fit.kept_blocks} blocks holding a nonzero are zero (at most "
                    f"{BLOCK_TOLERANCE:.0%} allowed), so the mask is not block-structured at "
                    f"this size; use layout='csr', a smaller blocksize, or blocksize=None")
    if layout != "bsr":
        blocksize = None
    try:
        new: SparseLinear | SparseConv2d
        if isinstance(dense, nn.Linear):
            new = SparseLinear.from_dense(dense, layout, blocksize)
        else:
            new = SparseConv2d.from_dense(dense, layout, blocksize)  # type: ignore[arg-type]
        probe = torch.zeros(w2.shape[1], 1, dtype=w.dtype, device=w.device)
        if layout != "semi_structured":  # the backend may refuse a combination: fail here
            new._matmul(probe)
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as e:
        extra = f" blocksize {blocksize}" if blocksize else ""
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"to_sparse: layer {name!r}: PyTorch cannot compute layout {layout!r}{extra} for a "
            f"{w.dtype} weight {shape_txt} on {w.device}: {why}; use layout='csr' or 'auto'"
        ) from e
    return new


@dataclass(frozen=True)
class _InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    channels_last: bool

    def make(self) -> torch.Tensor:
        x = torch.randn(self.shape, dtype=self.dtype, device=self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _run_example(model: nn.Module, example_inputs: Any) -> None:
    if isinstance(example_inputs, torch.Tensor):
        model(example_inputs)
    elif isinstance(example_inputs, Mapping):
        model(**example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        model(*example_inputs)
    else:
        raise TypeError(
            f"example_inputs must be a tensor, a tuple of positional arguments or a dict of "
            f"keyword arguments for model(...), got {type(example_inputs).__name__}")


def _capture_inputs(model: nn.Module, sites: list[_Site],
                    example_inputs: Any) -> dict[str, _InputSpec]:
    """The first input each layer sees in one forward of ``example_inputs``."""
    specs: dict[str, _InputSpec] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if name not in specs and isinstance(x, torch.Tensor):
                cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
                    memory_format=torch.channels_last)
                specs[name] = _InputSpec(tuple(x.shape), x.dtype, x.device, cl)
        return hook

    for site in sites:
        handles.append(site.module.register_forward_pre_hook(hook_for(site.name)))
    try:
        with torch.inference_mode():
            _run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return specs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_layouts(modules: Mapping[str, nn.Module], spec: _InputSpec,
                  min_run_time: float) -> dict[str, float]:
    """Median seconds per forward of each module on one input, measured in interleaved rounds
    (dense, csr, ..., dense, csr, ...) so that a load change hits every candidate alike."""
    x = spec.make()
    with torch.inference_mode():
        single: dict[str, float] = {}
        for key, m in modules.items():  # warm-up (allocator, MKL's sparse analysis, CUDA
            _sync(spec.device)          # handles), its time an upper bound for calibration
            t0 = time.perf_counter()
            m(x)
            _sync(spec.device)
            single[key] = max(time.perf_counter() - t0, 1e-7)
        rounds = 5 if max(single.values()) * 5 <= min_run_time else 3
        block = min_run_time / rounds
        calls = {k: max(1, int(block / t)) for k, t in single.items()}
        samples: dict[str, list[float]] = {k: [] for k in modules}
        for _ in range(rounds):
            for key, m in modules.items():
                _sync(spec.device)
                t0 = time.perf_counter()
                for _ in range(calls[key]):
                    m(x)
                _sync(spec.device)
                samples[key].append((time.perf_counter() - t0) / calls[key])
    return {k: statistics.median(v) for k, v in samples.items()}


def _replace(site: _Site, new: nn.Module) -> None:
    for parent, attr in site.refs:
        setattr(parent, attr, new)


def _export_one(site: _Site, layout: str, bs: tuple[int, int] | None, spec: _InputSpec | None,
                min_sparsity: float, min_run_time: float) -> tuple[LayerExport, nn.Module]:
    """Decide and build the layout of one layer: its row of the summary and its new module."""
    dense = _as_dense_module(site.module)
    w = _weight(dense)
    kind = "Linear" if isinstance(dense, nn.Linear) else "Conv2d"
    sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0

    def install(module: nn.Module, chosen: str, times: Mapping[str, float], note: str
                ) -> tuple[LayerExport, nn.Module]:
        return LayerExport(site.name, kind, tuple(w.shape), sparsity, chosen,
                           getattr(module, "blocksize", None), dict(times), note), module

    if layout == "dense":
        return install(dense, "dense", {}, "layout='dense'")
    if isinstance(dense, nn.Conv2d) and (dense.groups != 1 or dense.padding_mode != "zeros"):
        return install(dense, "dense", {}, f"kept dense: Conv2d with groups={dense.groups}, "
                       f"padding_mode={dense.padding_mode!r} is not supported")
    if sparsity < min_sparsity:
        return install(dense, "dense", {},
                       f"kept dense: {sparsity:.1%} zeros < min_sparsity {min_sparsity:.0%}")
    if layout != "auto":
        if layout == "semi_structured" and kind == "Conv2d":
            return install(dense, "dense", {}, "kept dense: semi_structured is for Linear layers")
        return install(_build(site.name, dense, layout, bs), layout, {}, f"layout={layout!r}")
    # auto: the candidates that apply to this weight on this device, timed at the layer's input
    if spec is None:
        return install(dense, "dense", {},
                       "kept dense: not called by model(example_inputs), nothing to time")
    candidates: dict[str, nn.Module] = {"dense": dense}
    notes: list[str] = []
    if w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
        notes.append(f"no CPU sparse kernel for {w.dtype}")
    else:
        for cand, cand_bs, why in (("csr", None, "csr unavailable"),
                                   ("bsr", bs, "not block-sparse" if bs is None
                                    else f"not {bs[0]}x{bs[1]} block-sparse")):
            try:
                candidates[cand] = _build(site.name, dense, cand, cand_bs)
            except (ValueError, TypeError):
                notes.append(why)
    if kind == "Linear" and w.device.type == "cuda":
        try:
            candidates["semi_structured"] = _build(site.name, dense, "semi_structured", None)
        except (ValueError, TypeError):
            notes.append("not 2:4")
    times = _time_layouts(candidates, spec, min_run_time)
    best = min(times, key=lambda k: (times[k], k != "dense"))  # dense wins ties
    note = ("dense fastest" if best == "dense"
            else f"{times['dense'] / times[best]:.2f}x faster than dense")
    if notes:
        note += "; " + ", ".join(notes)
    return install(candidates[best], best, times, note)


def to_sparse(
    model: nn.Module,
    layout: Layout = "auto",
    *,
    blocksize: int | Sequence[int] | None = None,
    example_inputs: Any = None,
    min_sparsity: float = 0.5,
    exclude: Iterable[str] = (),
    min_run_time: float = 0.05,
) -> ExportSummary:
    """Make the mostly-zero Linear/Conv2d layers of a finalized model compute with sparse kernels.

    In place: each chosen ``nn.Linear`` becomes a :class:`SparseLinear` and each ``nn.Conv2d``
    (``groups=1``, zero padding) a :class:`SparseConv2d`, with the same inputs and outputs.
    Layers with fewer than ``min_sparsity`` zeros stay dense, and so do Linear layers owned by an
    ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` itself) and subclasses that override
    ``forward``. Already exported layers are exported again (``layout="dense"`` turns them back
    into ``nn.Linear``/``nn.Conv2d``). A layer referenced from several parents is replaced in
    all of them.

    Args:
        model: a model after :func:`torchspartan.finalize` (no parametrization on the weights).
        layout: ``"csr"`` (unstructured zeros), ``"bsr"`` (block-sparse zeros),
            ``"semi_structured"`` (2:4, CUDA only, Linear only), ``"dense"`` (nothing sparse) or
            ``"auto"``: per layer,
            time one forward dense and in every applicable sparse layout (CSR; BSR when the zeros
            are block-structured; 2:4 on CUDA when the pattern is 2:4) at the input shape the
            layer sees in ``model(example_inputs)``, and keep the fastest (dense wins ties). The
            times are in the returned summary, so the choice can be checked.
        blocksize: the BSR block, an int or a pair (CPU kernels need square blocks). ``None``
            detects it per layer: the largest of :data:`BLOCK_CANDIDATES` that divides the
            weight and whose blocks are either all zero or at most :data:`BLOCK_TOLERANCE` zeros.
            Only with ``"bsr"`` or ``"auto"``.
        example_inputs: for ``"auto"`` (required there): a tensor, a tuple of positional
            arguments or a dict of keyword arguments of ``model``; one forward pass records each
            layer's input shape, timings then use random inputs of that shape.
        min_sparsity: layers with a smaller fraction of zeros are left dense.
        exclude: regular expressions; layers whose qualified name matches one stay as they are.
        min_run_time: ``"auto"``: seconds of timing per candidate and layer (at least 3 calls).

    Returns:
        An :class:`ExportSummary`: one :class:`LayerExport` per Linear/Conv2d layer with its
        zeros, its layout now, the measured times (``"auto"``) and the reason.

    Raises:
        ValueError: an unknown layout; a model that is not finalized; ``"auto"`` without
            ``example_inputs``; ``blocksize`` with a layout other than ``"bsr"``/``"auto"``;
            ``"bsr"`` with a blocksize that does not divide a weight or zeros that are not
            block-structured; ``"semi_structured"`` on CPU or on a weight that is not 2:4. Each
            names the layer, the offending value and the fix.
        TypeError: a weight dtype without a sparse kernel on its device (float16 on CPU), or
            bad argument types.

    Example:
        >>> import torch
        >>> from torchspartan.export import to_sparse
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 10))
        >>> with torch.no_grad():
        ...     model[0].weight[torch.rand(64, 64) < 0.9] = 0
        >>> x = torch.randn(2, 64)
        >>> before = model(x)
        >>> summary = to_sparse(model, "csr")
        >>> summary.layouts
        {'0': 'csr', '2': 'dense'}
        >>> torch.allclose(model(x), before, atol=1e-5)
        True
        >>> auto = to_sparse(model, "auto", example_inputs=x, min_run_time=0.002)
        >>> all(r.times[r.layout] == min(r.times.values()) for r in auto.layers if r.times)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse: model must be an nn.Module, got {type(model).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(
            f"to_sparse: unknown layout {layout!r}; use one of {_LAYOUTS} ('auto' measures, "
            f"'csr' for unstructured zeros, 'bsr' for block-sparse, 'semi_structured' for 2:4)")
    bs = _as_pair(blocksize)
    if bs is not None and layout not in ("bsr", "auto"):
        raise ValueError(
            f"to_sparse: blocksize={blocksize!r} is only for layout='bsr' or 'auto', got "
            f"layout={layout!r}; drop blocksize or use layout='bsr'")
    if layout == "auto" and example_inputs is None:
        raise ValueError(
            "to_sparse: layout='auto' times each layer at the input shapes of a forward pass and "
            "needs example_inputs=<a batch like the ones you will serve>; or pick a layout "
            "explicitly ('csr', 'bsr', 'semi_structured')")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not (
            0.0 <= min_sparsity <= 1.0):
        raise ValueError(f"to_sparse: min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if not isinstance(min_run_time, (int, float)) or min_run_time <= 0:
        raise ValueError(f"to_sparse: min_run_time must be > 0 seconds, got {min_run_time!r}")
    _check_finalized(model, "to_sparse")
    if isinstance(model, (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)):
        raise ValueError(
            f"to_sparse: the model itself is a {type(model).__name__}, which cannot be replaced in "
            f"place; wrap it (model = nn.Sequential(layer)) or use "
            f"SparseLinear.from_dense/SparseConv2d.from_dense")
    patterns = [re.compile(p) for p in exclude]
    sites, skipped = _sites(model, patterns)
    specs = _capture_inputs(model, sites, example_inputs) if layout == "auto" else {}

    done = [_export_one(site, layout, bs, specs.get(site.name), float(min_sparsity),
                        float(min_run_time)) for site in sites]
    for site, (_, module) in zip(sites, done, strict=True):  # all built: nothing half-exported
        if module is not site.module:
            _replace(site, module)
    rows = [row for row, _ in done]
    for name, (module, reason) in skipped.items():
        w = _weight(module)
        zeros = 1.0 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0
        kind = "Linear" if isinstance(module, nn.Linear) else "Conv2d"
        rows.append(LayerExport(name, kind, tuple(w.shape), zeros, "dense", None, {}, reason))
    return ExportSummary(tuple(rows))


# -- the compact checkpoint --------------------------------------------------------------------


def _index_dtype(bound: int) -> torch.dtype:
    """The smallest integer dtype holding ``0 .. bound - 1``."""
    if bound <= 2**8:
        return torch.uint8
    if bound <= 2**15:
        return torch.int16
    return torch.int32 if bound <= 2**31 else torch.int64


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ENTRY_OVERHEAD = 200  # bytes a stored tensor adds to a torch.save zip beside its data (approx.)


def _encodings(t: torch.Tensor) -> dict[str, int]:
    """Estimated stored bytes of ``t`` per applicable encoding."""
    es = t.element_size()
    out = {"dense": t.numel() * es}
    if not t.is_floating_point() or t.numel() < 64:
        return out
    nnz = int(torch.count_nonzero(t))
    out["bitmask"] = -(-t.numel() // 8) + nnz * es + _ENTRY_OVERHEAD
    if t.dim() >= 2:
        rows, cols = int(t.shape[0]), t.numel() // int(t.shape[0])
        crow = (rows + 1) * _dtype_bytes(_index_dtype(nnz + 1))
        out["csr"] = nnz * (es + _dtype_bytes(_index_dtype(cols))) + crow + 2 * _ENTRY_OVERHEAD
        fit = _detect_block(t.reshape(rows, cols) != 0)
        if fit is not None and fit.blocksize[0] > 1:
            bh, bw = fit.blocksize
            out["bsr"] = (fit.kept_blocks * (bh * bw * es + _dtype_bytes(_index_dtype(cols // bw)))
                          + (rows // bh + 1) * _dtype_bytes(_index_dtype(fit.kept_blocks + 1))
                          + 2 * _ENTRY_OVERHEAD)
    return out


def _encode(t: torch.Tensor) -> dict[str, Any]:
    """The smallest encoding of a dense tensor, as a dict of tensors and plain values."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", "Sparse (CSR|BSR|Compressed)", UserWarning)
        return _encode_quiet(t)


def _encode_quiet(t: torch.Tensor) -> dict[str, Any]:
    sizes = _encodings(t)
    kind = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    t = t.detach()
    if kind == "dense":
        return {"encoding": "dense", "tensor": t.clone()}
    shape = list(t.shape)
    if kind == "bitmask":
        flat = t.reshape(-1)
        mask = flat != 0
        pad = (-mask.numel()) % 8
        bits = torch.cat([mask, mask.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=t.device)
        packed = (bits * weights).sum(1, dtype=torch.uint8)
        return {"encoding": "bitmask", "shape": shape, "bits": packed, "values": flat[mask]}
    rows = shape[0]
    t2 = t.reshape(rows, -1)
    if kind == "csr":
        s = t2.to_sparse_csr()
        nnz = s.values().numel()
        return {"encoding": "csr", "shape": shape,
                "crow": s.crow_indices().to(_index_dtype(nnz + 1)),
                "col": s.col_indices().to(_index_dtype(t2.shape[1])),
                "values": s.values().clone()}
    fit = _detect_block(t2 != 0)
    if fit is None:  # the caller picks "bsr" only for a block-structured tensor
        raise RuntimeError(f"no block structure to store as BSR in a tensor of shape "
                           f"{tuple(shape)}")
    s = t2.to_sparse_bsr(fit.blocksize)
    nblocks = s.values().shape[0]
    return {"encoding": "bsr", "shape": shape, "blocksize": list(fit.blocksize),
            "crow": s.crow_indices().to(_index_dtype(nblocks + 1)),
            "col": s.col_indices().to(_index_dtype(t2.shape[1] // fit.blocksize[1])),
            "values": s.values().clone()}


def _decode(key: str, entry: Mapping[str, Any]) -> torch.Tensor:
    kind = entry.get("encoding")
    if kind == "dense":
        return entry["tensor"]
    shape = tuple(entry["shape"])
    values: torch.Tensor = entry["values"]
    numel = math.prod(shape)
    if kind == "bitmask":
        shifts = torch.arange(8, dtype=torch.uint8, device=values.device)
        bits = (entry["bits"].unsqueeze(1) >> shifts) & 1
        mask = bits.reshape(-1)[:numel].bool()
        flat = values.new_zeros(numel)
        flat[mask] = values
        return flat.reshape(shape)
    rows = shape[0]
    cols = numel // rows if rows else 0
    crow = entry["crow"].long()
    col = entry["col"].long()
    if kind == "csr":
        row = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
        out = values.new_zeros(rows, cols)
        out[row, col] = values
        return out.reshape(shape)
    if kind == "bsr":
        bh, bw = entry["blocksize"]
        brow = torch.repeat_interleave(torch.arange(rows // bh, device=crow.device), crow.diff())
        out = values.new_zeros(rows // bh, cols // bw, bh, bw)
        out[brow, col] = values
        return out.permute(0, 2, 1, 3).reshape(shape)
    raise ValueError(f"load_sparse: entry {key!r} has an unknown encoding {kind!r}")


def _dense_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` with the exported layers' weights as dense tensors."""
    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            sd[f"{name}.weight" if name else "weight"] = module.dense_weight()
    return sd


class _ByteCounter:
    """A write-only file that counts bytes (``torch.save`` into it measures a checkpoint)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`save_sparse` wrote; ``str()`` summarises it.

    Attributes:
        file_bytes: size of the compact file written.
        dense_bytes: size ``torch.save(model.state_dict())`` of the dense (zeros included) model
            takes, measured by serializing it into a byte counter (a file differs by a few
            hundred bytes: its zip records carry the file's name).
        encodings: ``{state-dict key: encoding}``, encodings ``"dense"``, ``"csr"``, ``"bsr"``,
            ``"bitmask"`` (a bit per entry plus the nonzero values) or ``"alias"`` (a tensor
            shared with an earlier key).
    """

    file_bytes: int
    dense_bytes: int
    encodings: Mapping[str, str]

    @property
    def ratio(self) -> float:
        """dense bytes / compact bytes."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else math.inf

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for enc in self.encodings.values():
            counts[enc] = counts.get(enc, 0) + 1
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
        return (f"compact checkpoint {self.file_bytes / 2**20:.2f} MiB vs dense "
                f"{self.dense_bytes / 2**20:.2f} MiB ({self.ratio:.2f}x smaller); tensors by "
                f"encoding: {kinds}")


def save_sparse(model: nn.Module, path: str | os.PathLike[str]) -> CheckpointInfo:
    """Write the model's state dict compactly: nonzero values plus small indices or a bit mask.

    Every floating-point tensor is stored in whichever of these is smallest: dense; ``"bitmask"``
    (one bit per entry and the nonzero values, best from about 50% to 95% zeros); ``"csr"``
    (row offsets, uint8/int16/int32 column indices and values, best at very high sparsity);
    ``"bsr"`` (the same per block, for block-sparse weights). Values keep their dtype, so the
    model loads back bit for bit. Works on a finalized model and on one exported by
    :func:`to_sparse` (its sparse layers are stored by their dense weights, under the same keys).
    The file is a ``torch.save`` of plain dicts and tensors (loaded with ``weights_only=True``).

    Args:
        model: a finalized model, dense or exported.
        path: the file to write.

    Returns:
        A :class:`CheckpointInfo` with the bytes written and those of the dense checkpoint.

    Raises:
        ValueError: the model still has a SpartanMask or a parametrized Linear/Conv2d weight
            (call ``ts.finalize(model)`` first).

    Example:
        >>> import tempfile, os, torch
        >>> from torchspartan.export import save_sparse, load_sparse
        >>> model = torch.nn.Linear(256, 256)
        >>> with torch.no_grad():
        ...     model.weight[torch.rand(256, 256) < 0.95] = 0
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> info = save_sparse(model, path)
        >>> info.file_bytes < info.dense_bytes / 4
        True
        >>> restored = load_sparse(lambda: torch.nn.Linear(256, 256), path)
        >>> torch.equal(restored.weight, model.weight)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_sparse: model must be an nn.Module, got {type(model).__name__}")
    _check_finalized(model, "save_sparse")
    sd = _dense_state_dict(model)
    counter = _ByteCounter()
    torch.save(sd, counter)  # type: ignore[arg-type]
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            entries[key] = {"encoding": "object", "value": value}
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 value.stride(), value.dtype)
        if value.numel() and ident in seen:
            entries[key] = {"encoding": "alias", "of": seen[ident]}
            continue
        seen[ident] = key
        entries[key] = _encode(value)
    torch.save({"format": _FORMAT, "version": _FORMAT_VERSION, "entries": entries}, path)
    return CheckpointInfo(os.path.getsize(path), counter.n,
                          {k: e["encoding"] for k, e in entries.items()})


def load_sparse(
    model_or_factory: nn.Module | Callable[[], nn.Module],
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device | None = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Load a :func:`save_sparse` file into the dense architecture (zeros restored).

    To serve it sparse, call :func:`to_sparse` on the result: ``layout="auto"`` measures on the
    serving machine, where the choice should be made.

    Args:
        model_or_factory: the plain model (as built before ``ts.sparsify``) or a callable
            returning one.
        path: the file written by :func:`save_sparse`.
        map_location: as in ``torch.load`` (``load_state_dict`` then copies to the model's
            device).
        strict: as in ``load_state_dict``.

    Returns:
        The model, its state loaded.

    Raises:
        TypeError: not a module (or a factory returning one), or a model with exported layers.
        ValueError: not a torchspartan sparse checkpoint, or a model with masks (load into the
            plain architecture).

    Example:
        >>> import tempfile, os, torch
        >>> from torchspartan.export import save_sparse, load_sparse, to_sparse
        >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
        >>> model = make()
        >>> with torch.no_grad():
        ...     model[0].weight[torch.rand(64, 64) < 0.9] = 0
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> _ = save_sparse(model, path)
        >>> served = load_sparse(make, path)  # dense architecture, zeros restored
        >>> to_sparse(served, "csr").layouts
        {'0': 'csr'}
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(served(x), model(x), atol=1e-6)
        True
    """
    model = model_or_factory
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(
                f"load_sparse: expected an nn.Module or a callable returning one, got "
                f"{type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"load_sparse: the factory returned {type(model).__name__}, not an nn.Module")
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            raise TypeError(
                f"load_sparse: layer {name!r} is already exported ({type(module).__name__}); load "
                f"into the dense architecture, then call to_sparse(model, ...)")
    _check_finalized(model, "load_sparse")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"load_sparse: {os.fspath(path)!r} is not a torchspartan sparse checkpoint (write "
            f"one with save_sparse; a plain state dict loads with model.load_state_dict)")
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"load_sparse: checkpoint format version {payload.get('version')!r}, this "
            f"torchspartan reads version {_FORMAT_VERSION}")
    entries: dict[str, Mapping[str, Any]] = payload["entries"]
    sd: dict[str, Any] = {}
    for key, entry in entries.items():
        enc = entry.get("encoding")
        if enc == "alias":
            continue
        sd[key] = entry["value"] if enc == "object" else _decode(key, entry)
    for key, entry in entries.items():
        if entry.get("encoding") == "alias":
            sd[key] = sd[entry["of"]]
    model.load_state_dict(sd, strict=strict)
    return model


# -- the FLOP and size report -------------------------------------------------------------------


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
        return [("weight", module.dense_weight(), module.bias, _layout_name(module.weight))]
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
    return [("weight", _weight(module), getattr(module, "bias", None), "dense")]


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
        >>> from torchspartan.export import export_report
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
            _run_example(model, example_input)
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
        memory = _sparse_bytes(module.weight) + _tensor_bytes(bias)
    else:
        memory = dense_bytes
    compact = min(_encodings(w).values()) + (
        min(_encodings(bias).values()) if bias is not None else 0)
    return ReportRow(qual, type(module).__name__, tuple(w.shape), layout, positions, numel,
                     nonzero, dense_bytes, memory, compact)
