"""The compact checkpoint of a finalized sparse model: :func:`save_sparse` and :func:`load_sparse`.

:func:`save_sparse` writes the model's state dict with every floating-point tensor in its
smallest encoding (dense, or the nonzero values plus small indices or a bit mask);
:func:`load_sparse` reads it back into the dense architecture (zeros restored), ready for
:func:`~torchspartan.to_sparse` on the serving machine. The file is a ``torch.save`` of plain
dicts and tensors with a format name and version (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchspartan.export import check_finalized
from torchspartan.sparse_layers import SparseConv2d, SparseLinear, detect_block

__all__ = ["CheckpointInfo", "encoding_sizes", "load_sparse", "save_sparse"]

_FORMAT = "torchspartan.sparse_checkpoint"
_FORMAT_VERSION = 1


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


def encoding_sizes(t: torch.Tensor) -> dict[str, int]:
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
        fit = detect_block(t.reshape(rows, cols) != 0)
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
    sizes = encoding_sizes(t)
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
    fit = detect_block(t2 != 0)
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
        >>> from torchspartan.sparse_checkpoint import save_sparse, load_sparse
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
    check_finalized(model, "save_sparse")
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
        >>> from torchspartan.export import to_sparse
        >>> from torchspartan.sparse_checkpoint import save_sparse, load_sparse
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
    check_finalized(model, "load_sparse")
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
