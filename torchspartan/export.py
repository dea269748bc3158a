"""Deploying a finalized sparse model: :func:`to_sparse` swaps mostly-zero layers for sparse ones.

After training (``ts.sparsify`` + ``ts.DualAveraging``) and :func:`torchspartan.finalize`, a model
holds plain dense weights full of zeros: as large and as slow as the dense model.
:func:`to_sparse` turns those zeros into savings: it replaces ``nn.Linear`` and ``nn.Conv2d``
layers whose weights are mostly zero by :class:`~torchspartan.SparseLinear` /
:class:`~torchspartan.SparseConv2d` (``sparse_layers.py``), which compute with a PyTorch sparse
layout: CSR (unstructured zeros), BSR (block-sparse zeros, e.g. a ``block=(16, 16)`` mask) or
2:4 semi-structured (CUDA only). ``layout="auto"`` times every layer dense and sparse at the
shapes of an example input and keeps the faster one.

The other deployment steps have modules of their own: ``sparse_checkpoint.py``
(:func:`~torchspartan.save_sparse` / :func:`~torchspartan.load_sparse`, a compact checkpoint)
and ``cost_report.py`` (:func:`~torchspartan.export_report`, FLOPs and bytes per weight).

Whether a sparse kernel wins depends on the sparsity, the shapes and the hardware. Measured on a
CPU (MKL, benchmarks/inference.py): CSR beat a dense ``Linear(4096, 4096)`` at 90-98% zeros at
batch 1 and 64, and a ViT MLP block at 197 tokens, but lost for the same block at 12608 tokens
(BSR too) and for the early 3x3 convolutions of a ResNet-50. ``layout="auto"`` is the safe
default for a deployment; the explicit layouts are for measuring.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan.sparse_layers import (
    BLOCK_CANDIDATES,
    BLOCK_TOLERANCE,
    SparseConv2d,
    SparseLinear,
    as_pair,
    block_fit,
    detached_weight,
    detect_block,
    divides,
    first_non_2to4,
)

__all__ = [
    "ExportSummary",
    "LayerExport",
    "Layout",
    "check_finalized",
    "run_example",
    "to_sparse",
]

Layout = Literal["auto", "csr", "bsr", "semi_structured", "dense"]
_LAYOUTS = ("auto", "csr", "bsr", "semi_structured", "dense")


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


def check_finalized(model: nn.Module, where: str) -> None:
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
    w = detached_weight(dense)
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
        bad = first_non_2to4(w2 != 0)
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
            fit = detect_block(nonzero)
            if fit is None:
                raise ValueError(
                    f"to_sparse: layer {name!r}: weight {shape_txt} is not block-sparse for any "
                    f"block size in {BLOCK_CANDIDATES} that divides it (a block fits when the "
                    f"blocks holding a nonzero are at most {BLOCK_TOLERANCE:.0%} zeros); use "
                    f"layout='csr' (or 'auto'), or pass blocksize= explicitly")
            blocksize = fit.blocksize
        else:
            if not divides(shape2, blocksize):
                fitting = [b for b in BLOCK_CANDIDATES if divides(shape2, (b, b))]
                raise ValueError(
                    f"to_sparse: layer {name!r}: blocksize {blocksize} does not divide the weight "
                    f"{shape_txt}; pick a blocksize dividing both dimensions (e.g. one of "
                    f"{fitting}), blocksize=None to detect it, or exclude the layer")
            fit = block_fit(nonzero, blocksize)
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


def run_example(model: nn.Module, example_inputs: Any) -> None:
    """``model(example_inputs)``: a tensor, a tuple of positional or a dict of keyword arguments."""
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
            run_example(model, example_inputs)
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
    w = detached_weight(dense)
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
    bs = as_pair(blocksize)
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
    check_finalized(model, "to_sparse")
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
        w = detached_weight(module)
        zeros = 1.0 - int(torch.count_nonzero(w)) / w.numel() if w.numel() else 0.0
        kind = "Linear" if isinstance(module, nn.Linear) else "Conv2d"
        rows.append(LayerExport(name, kind, tuple(w.shape), zeros, "dense", None, {}, reason))
    return ExportSummary(tuple(rows))
