"""Sparse inference layers: ``nn.Linear``/``nn.Conv2d`` computing with a PyTorch sparse layout.

:class:`SparseLinear` and :class:`SparseConv2d` compute with a CSR (unstructured zeros), BSR
(block-sparse zeros, e.g. a ``block=(16, 16)`` mask) or 2:4 semi-structured (CUDA only) weight,
with the same inputs and outputs as the ``nn.Linear``/``nn.Conv2d`` they are made from
(``from_dense``; ``to_dense_module`` goes back). :func:`~torchspartan.to_sparse` puts them into a
model. The sparse layers are for inference (their weights are buffers, not trainable parameters).

The weight inspection that the export and the compact checkpoint share lives here too: whether a
weight's zeros fit a block mask (:func:`detect_block`, :data:`BLOCK_CANDIDATES`,
:data:`BLOCK_TOLERANCE`) or a 2:4 pattern, and the bytes a sparse weight holds in memory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BLOCK_CANDIDATES",
    "BLOCK_TOLERANCE",
    "BlockFit",
    "SparseConv2d",
    "SparseLinear",
    "as_pair",
    "block_fit",
    "detached_weight",
    "detect_block",
    "divides",
    "first_non_2to4",
    "layout_name",
    "sparse_bytes",
]

_SPARSE_LAYOUTS = ("csr", "bsr", "semi_structured")
#: square block sizes tried, largest first, when ``blocksize`` is not given
BLOCK_CANDIDATES = (64, 32, 16, 8, 4, 2)
#: zeros allowed inside the blocks that hold a nonzero, as a fraction of their entries, for a
#: weight to count as block-sparse (trained weights can be exactly zero in a kept block)
BLOCK_TOLERANCE = 0.05
_TORCH_LAYOUT_NAMES = {torch.sparse_csr: "csr", torch.sparse_bsr: "bsr", torch.strided: "dense"}


# -- weight inspection ------------------------------------------------------------------------


def as_pair(blocksize: int | Sequence[int] | None) -> tuple[int, int] | None:
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
class BlockFit:
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


def block_fit(nonzero: torch.Tensor, blocksize: tuple[int, int]) -> BlockFit:
    """Count the kept blocks of a 2-D bool ``nonzero`` pattern (blocksize divides its shape)."""
    rows, cols = nonzero.shape
    bh, bw = blocksize
    counts = nonzero.reshape(rows // bh, bh, cols // bw, bw).sum(dim=(1, 3), dtype=torch.int64)
    kept = counts > 0
    n_kept = int(kept.sum())
    zeros_in_kept = n_kept * bh * bw - int(counts.sum())
    return BlockFit(blocksize, n_kept, counts.numel(), zeros_in_kept)


def divides(shape: tuple[int, int], blocksize: tuple[int, int]) -> bool:
    """Whether ``blocksize`` divides both dimensions of ``shape``."""
    return shape[0] % blocksize[0] == 0 and shape[1] % blocksize[1] == 0


def detect_block(nonzero: torch.Tensor) -> BlockFit | None:
    """The largest square block of :data:`BLOCK_CANDIDATES` whose block mask explains the zeros."""
    shape = (nonzero.shape[0], nonzero.shape[1])
    for b in BLOCK_CANDIDATES:
        if divides(shape, (b, b)):
            fit = block_fit(nonzero, (b, b))
            if fit.fits:
                return fit
    return None


def first_non_2to4(nonzero: torch.Tensor) -> tuple[int, int, int] | None:
    """``(row, first column, nonzeros)`` of the first group of 4 inputs with more than 2
    nonzeros, or ``None`` when the pattern is 2:4 (needs ``cols % 4 == 0``)."""
    rows, cols = nonzero.shape
    counts = nonzero.reshape(rows, cols // 4, 4).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel() == 0:
        return None
    r, g = (int(v) for v in bad[0])
    return r, 4 * g, int(counts[r, g])


def detached_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, detached (typed for mypy)."""
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return w.detach()


# -- the sparse layers ------------------------------------------------------------------------


def layout_name(weight: torch.Tensor) -> str:
    """The layout of a weight by name: ``"csr"``, ``"bsr"``, ``"semi_structured"``, ``"dense"``."""
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


def sparse_bytes(weight: torch.Tensor) -> int:
    """Bytes a (sparse or dense) weight holds in memory: values plus indices."""
    if weight.layout in (torch.sparse_csr, torch.sparse_bsr):
        return sum(t.numel() * t.element_size()
                   for t in (weight.values(), weight.crow_indices(), weight.col_indices()))
    if weight.layout == torch.strided and not layout_name(weight) == "semi_structured":
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
        >>> from torchspartan.sparse_layers import SparseLinear
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
        >>> from torchspartan.sparse_layers import SparseConv2d
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
