"""How many aten ops does a training step dispatch, and how many host syncs does it make?

Dense against Spartan, by phase of the step. One question, one script.

Method
------
A ``torch.utils._python_dispatch.TorchDispatchMode`` (:class:`StepCounter`) counts every ``func``
that reaches its ``__torch_dispatch__`` during one full training step (``zero_grad``, forward,
loss, backward, ``opt.step()``), labelled with the phase it ran in:

- ``forward``: ``zero_grad`` (no op with ``set_to_none=True``), the model's forward and the loss;
- ``backward``: ``loss.backward()``;
- ``optimizer``: the base optimizer's own step, delimited by its step pre/post hooks
  (``register_step_pre_hook`` / ``register_step_post_hook``);
- ``mask_update``: everything else ``opt.step()`` runs (for ``ts.DualAveraging``: its checks before
  the base step and the mask update after it; zero for the plain optimizer).

The ops are the aten operator overloads as seen at the Python dispatch key: a
CompositeImplicitAutograd op appears as the ops it decomposes into, and the ops a kernel calls
from inside itself are not seen (one op each). Ops of other namespaces (the ``profiler``
markers ``Optimizer.step`` records) are kept apart (``non_aten_ops``), not counted. The count
is what an accelerator would receive as separate operator calls (kernel launches, roughly),
independent of the batch size.

Dense baseline: the same model (same initial weights) without masks, stepped by the plain base
optimizer. Spartan: ``ts.sparsify`` + ``ts.DualAveraging`` around the same base optimizer,
measured in the middle of the annealing phase: ``total_steps=1000`` and the default schedule
shapes (density linear from 1 to ``1 - sparsity`` over the first 20% of the steps, beta linear
from 1 to its target until the fine-tuning phase at 80%), both shifted by ``--start-step`` (100),
so that density and beta are strictly between their endpoints and the hard masks change at every
step. Each configuration takes ``--warmup`` steps (2) uncounted, then one counted step.

What counts as a host synchronisation
-------------------------------------
A host sync is a point where the host has to wait for the device: the host reads a value that
the device computes. The counts are taken on CPU, where everything is on the host and nothing
waits, so the detector counts what WOULD synchronise if the model, its data and its optimizer
state lived on an accelerator (CUDA semantics). A tensor is *device-side* unless it is
*host-side* (below); each of the following is one sync:

1. ``aten._local_scalar_dense`` of a device-side tensor: what ``.item()``, ``float(t)``,
   ``int(t)``, ``bool(t)`` (so ``if t:``, ``while t:``, ``t and ...``) and formatting a 0-dim
   tensor lower to.
2. Ops whose output shape depends on the values of a device-side input: the host must read the
   size before it can allocate the output. ``aten.nonzero``, ``aten.masked_select``,
   ``aten._unique``/``_unique2``/``unique_dim``/``unique_consecutive``/``unique_dim_consecutive``,
   ``aten.bincount``, ``aten.repeat_interleave`` without ``output_size``, ``aten.index.Tensor``
   and ``aten.index_put(_)``/``_index_put_impl_`` with a boolean (or uint8) index (``t[mask]``,
   ``t[mask] = v``); also ``aten.equal`` (returns a Python bool).
3. Device-to-host copies: on CPU, ``Tensor.tolist()``, ``Tensor.numpy()``, ``Tensor.cpu()`` and
   ``Tensor.to("cpu")`` (the literal string) of a device-side tensor; none of them dispatches an
   op on a CPU tensor, so they are caught by wrapping those ``torch.Tensor`` methods during the
   counted step. ``.cpu()``/``.to("cpu")`` then return a fresh copy (as on an accelerator),
   which is host-side. ``.to(device)`` with a ``torch.device`` is read as a move to the device
   (item 4); its result is device-side. Also ``aten.copy_`` from a device-side tensor into a
   host-side one. On a real accelerator (``--device cuda``) the copies are caught at dispatch
   instead: ``aten._to_copy`` to ``cpu`` and ``aten.copy_`` into a CPU tensor from an
   accelerator tensor.
4. Host-to-device copies that wait: PyTorch copies from pageable host memory and then waits for
   the stream unless ``non_blocking=True``, so ``torch.tensor(data, device=d)``,
   ``t.new_tensor(data)`` of a device-side ``t`` and ``.to(device)`` of a host-side tensor are
   each a sync (``.to(device, non_blocking=True)`` is not). On a real accelerator they are
   caught at dispatch: ``aten._to_copy`` from a CPU tensor to the device without
   ``non_blocking``.

Host-side tensors (reading them is no sync, even on an accelerator): the results of a counted
device-to-host copy (3.); tensors made by a factory (``torch.tensor``, ``as_tensor``, ``zeros``,
``ones``, ``empty``, ``full``, ``arange``, ``linspace``, ``scalar_tensor``, ``rand*``, ...) called
with no tensor argument and no ``device=`` (or ``device="cpu"``), which stay on the host in an
accelerator run too; and the outputs of any op whose tensor inputs are all host-side (views
included). Everything else, parameters, buffers, gradients, optimizer state, the batch and all
that derives from them, is device-side. On an accelerator, host-side simply means on the CPU.
Reads of host-side tensors are recorded separately (``host_reads``), not counted as syncs.

Caveats: the library takes device-specific code paths (``if device.type == "cpu"``), so the
counts are those of the path a CPU run takes; on CUDA the compiled kernels (``_fused.py``) give
way to their eager ops under a dispatch mode, so ``--device cuda`` counts the eager route; ops
of other kinds that synchronise on an accelerator (e.g. the error checks of some ``linalg``
ops, printing a tensor) are not in the list above and were not expected in a training step.

Targets written into the results: the ops a Spartan step adds over the dense step are at most
0.5x the dense step's ops, and a Spartan step makes at most 2 host syncs, for ResNet-50 and for
ViT-B/16 with 16x16 blocks.

Usage::

    python benchmarks/dispatch.py                              # ResNet-50 and ViT-B/16, print
    python benchmarks/dispatch.py --quick                      # small stand-ins, seconds
    python benchmarks/dispatch.py --out benchmarks/results/dispatch_before
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from machine import cpu_name
from step_runner import SPECS, build_model, make_dual, record_of, sparsify_model, sparsify_nm
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

import torchspartan as ts

PHASES = ("forward", "backward", "optimizer", "mask_update")
OPS_RATIO_TARGET = 0.5  # ops a Spartan step adds, as a multiple of the dense step's ops
SYNC_TARGET = 2  # host syncs per Spartan step

_LIB_DIR = Path(ts.__file__).resolve().parent
_THIS_FILE = str(Path(__file__).resolve())
_ATEN = torch.ops.aten

# ops whose output shape depends on input values (rule 2 of the module docstring)
_DATA_DEPENDENT = {
    _ATEN.nonzero.default, _ATEN.nonzero.out, _ATEN.masked_select.default,
    _ATEN.masked_select.out, _ATEN._unique.default, _ATEN._unique2.default,
    _ATEN.unique_dim.default, _ATEN.unique_consecutive.default,
    _ATEN.unique_dim_consecutive.default, _ATEN.bincount.default, _ATEN.equal.default,
}
_REPEAT_INTERLEAVE = {_ATEN.repeat_interleave.Tensor, _ATEN.repeat_interleave.self_Tensor}
_MOVES = {_ATEN.copy_.default, _ATEN.copy.default, _ATEN._to_copy.default}
_BOOL_INDEXED = {
    _ATEN.index.Tensor: 1, _ATEN.index_put.default: 1, _ATEN.index_put_.default: 1,
    _ATEN._index_put_impl_.default: 1,
}
_FACTORIES = ("tensor", "as_tensor", "asarray", "scalar_tensor", "zeros", "ones", "empty",
              "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn",
              "randint", "randperm", "from_numpy")


# -- the counter --------------------------------------------------------------------------
def _call_site(line: bool = False) -> str:
    """``torchspartan/<file>:<function>`` of the innermost library frame on the stack (with
    ``:<line>`` when ``line``)."""
    f = sys._getframe(2)
    first_outside: str | None = None
    while f is not None:
        path = Path(f.f_code.co_filename)
        if path.is_relative_to(_LIB_DIR):
            name = f.f_code.co_name
            if name.startswith("<") and f.f_back is not None \
                    and f.f_back.f_code.co_filename == f.f_code.co_filename:
                name = f"{f.f_back.f_code.co_name}.{name}"  # a comprehension: say where
            where = f"torchspartan/{path.relative_to(_LIB_DIR).as_posix()}:{name}"
            return f"{where}:{f.f_lineno}" if line else where
        if first_outside is None and f.f_code.co_filename == _THIS_FILE:
            first_outside = f"benchmark:{f.f_code.co_name}"
        f = f.f_back
    return first_outside or "outside torchspartan"


def _foreach_fallback(func: Any, args: Any) -> int:
    """For a ``_foreach_*`` op that an accelerator runs one tensor at a time (its lists mix
    dtypes, or paired tensors differ in shape: off PyTorch's multi-tensor fast route), the
    number of tensors; else 0 (one launch)."""
    if not func.__name__.startswith("_foreach_"):
        return 0
    lists = [a for a in args if isinstance(a, (list, tuple)) and a
             and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists:
        return 0
    dtypes = {t.dtype for lst in lists for t in lst}
    shapes_ok = all(len({lst[k].shape for lst in lists}) == 1 for k in range(len(lists[0])))
    return 0 if len(dtypes) == 1 and shapes_ok else len(lists[0])


class StepCounter(TorchDispatchMode):
    """Counts dispatched aten ops and host syncs, by phase (see the module docstring).

    ``emulate`` (default: ``device.type == "cpu"``): count the syncs an accelerator run would
    make, tracking which tensors would be host-side; otherwise count real device-to-host reads.
    Use as a context manager around the counted step; set :attr:`phase` to label the ops.
    """

    def __init__(self, device: torch.device | str = "cpu", emulate: bool | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.emulate = self.device.type == "cpu" if emulate is None else emulate
        self.phase = PHASES[0]
        self.ops: dict[str, Counter[str]] = {p: Counter() for p in PHASES}
        self.syncs: dict[str, Counter[str]] = {p: Counter() for p in PHASES}  # kind @ site
        self.other_ops: dict[str, Counter[str]] = {p: Counter() for p in PHASES}  # not aten
        self.host_reads: Counter[str] = Counter()  # reads of host-side tensors, not syncs
        # ops that mix device-side tensors with host-side ones of one or more dimensions: an
        # accelerator refuses them ("Expected all tensors to be on the same device")
        self.mixed: Counter[str] = Counter()
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._paused = 0
        self._patches: contextlib.ExitStack | None = None

    # phases and totals
    def set_phase(self, phase: str) -> None:
        if phase not in self.ops:
            self.ops[phase], self.syncs[phase], self.other_ops[phase] = (
                Counter(), Counter(), Counter())
        self.phase = phase

    def total_ops(self, phase: str | None = None) -> int:
        return sum(self.ops[phase].values()) if phase else sum(map(self.total_ops, self.ops))

    def total_syncs(self, phase: str | None = None) -> int:
        return (sum(self.syncs[phase].values()) if phase
                else sum(map(self.total_syncs, self.syncs)))

    # host-side tracking
    def is_host(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        return t in self._host if self.emulate else True

    def mark_host(self, out: Any) -> None:
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._host[t] = True

    def _sync(self, kind: str) -> None:
        self.syncs[self.phase][f"{kind} @ {_call_site()}"] += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # the dispatch mode
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        if func.namespace != "aten":  # e.g. profiler markers of Optimizer.step: no compute
            self.other_ops[self.phase][str(func)] += 1
            return out
        fallback = _foreach_fallback(func, args)
        if fallback:  # a multi-tensor op off its fast route: one kernel per tensor
            self.ops[self.phase][f"{func} (per tensor)"] += fallback
        else:
            self.ops[self.phase][str(func)] += 1
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_inputs = [t for t in inputs if not self.is_host(t)]
        if (self.emulate and device_inputs and func not in _MOVES
                and any(t.dim() > 0 and self.is_host(t) for t in inputs)):
            self.mixed[f"{func} @ {_call_site(line=True)}"] += 1
        if func is _ATEN._local_scalar_dense.default:
            if device_inputs:
                self._sync("aten._local_scalar_dense")
            else:
                self.host_reads[f"aten._local_scalar_dense @ {_call_site()}"] += 1
        elif device_inputs and self._shape_depends_on_values(func, args, kwargs):
            self._sync(str(func) + (" (bool index)" if func in _BOOL_INDEXED else ""))
        elif func in (_ATEN.copy_.default, _ATEN.copy.default) and self.is_host(args[0]) \
                and isinstance(args[1], torch.Tensor) and not self.is_host(args[1]):
            self._sync("aten.copy_ device->host")
        elif (not self.emulate and func is _ATEN._to_copy.default and device_inputs
              and kwargs.get("device") is not None and torch.device(kwargs["device"]).type
              == "cpu"):
            self._sync("aten._to_copy device->host")
        elif (not self.emulate and func is _ATEN._to_copy.default and not device_inputs
              and kwargs.get("device") is not None and torch.device(kwargs["device"]).type
              != "cpu" and not kwargs.get("non_blocking", False)):
            self._sync("host->device copy (blocking)")
        if self.emulate and inputs and not device_inputs:
            self.mark_host(out)  # every tensor input host-side: so are the outputs
        return out

    @staticmethod
    def _shape_depends_on_values(func: Any, args: Any, kwargs: Any) -> bool:
        if func in _DATA_DEPENDENT:
            return True
        if func in _REPEAT_INTERLEAVE:
            return kwargs.get("output_size") is None
        if func in _BOOL_INDEXED:
            indices = args[_BOOL_INDEXED[func]]
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                       for i in indices)
        return False

    # device-to-host copies and host-side factories that dispatch nothing on CPU
    def __enter__(self) -> StepCounter:
        self._patches = contextlib.ExitStack()
        if self.emulate:
            self._patches.enter_context(self._patched())
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            assert self._patches is not None
            self._patches.close()
            self._patches = None

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        counter = self
        saved: list[tuple[Any, str, Any, bool]] = []

        def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
            orig = getattr(owner, name)
            saved.append((owner, name, orig, name in vars(owner)))
            setattr(owner, name, make(orig))

        def read(kind: str) -> Callable[[Any], Any]:  # tolist, numpy: a read of the values
            def make(orig: Any) -> Any:
                def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
                    if not counter._paused:
                        if counter.is_host(self):
                            counter.host_reads[f"{kind} @ {_call_site()}"] += 1
                        else:
                            counter._sync(kind)
                    return orig(self, *a, **k)
                return wrapper
            return make

        def to_host(kind: str, literal_cpu: Callable[[tuple[Any, ...], dict[str, Any]], bool]
                    ) -> Callable[[Any], Any]:  # cpu, to("cpu"): a copy to the host
            def make(orig: Any) -> Any:
                def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
                    out = orig(self, *a, **k)
                    if counter._paused or not literal_cpu(a, k) or counter.is_host(self):
                        return out
                    counter._sync(kind)
                    if out is self:
                        with counter.paused():
                            out = self.clone()
                    counter.mark_host(out)
                    return out
                return wrapper
            return make

        def to_device(make_host: Callable[[Any], Any]) -> Callable[[Any], Any]:
            def make(orig: Any) -> Any:
                to = make_host(orig)

                def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
                    # .to(a torch.device), e.g. .to(weight.device): a move to the device, which
                    # waits for the device unless non_blocking (from pageable memory too)
                    target = k.get("device", a[0] if a else None)
                    if counter._paused or not isinstance(target, torch.device) \
                            or not counter.is_host(self):
                        return to(self, *a, **k)
                    if not k.get("non_blocking", False):
                        counter._sync("host->device copy (blocking)")
                    out = orig(self, *a, **k)
                    if out is self:
                        with counter.paused():
                            out = self.clone()
                    counter._host.pop(out, None)
                    return out
                return wrapper
            return make

        def factory(orig: Any) -> Any:
            copies = orig in (torch.tensor, torch.as_tensor, torch.asarray)  # from host data

            def wrapper(*a: Any, **k: Any) -> Any:
                out = orig(*a, **k)
                device = k.get("device")
                no_tensor = not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves((a, k)))
                if no_tensor and (device is None or device == "cpu"):
                    counter.mark_host(out)
                elif no_tensor and copies and not counter._paused:
                    counter._sync("host->device copy (blocking)")  # torch.tensor(.., device=d)
                return out
            return wrapper

        def new_tensor(orig: Any) -> Any:
            def wrapper(self: torch.Tensor, data: Any, *a: Any, **k: Any) -> Any:
                out = orig(self, data, *a, **k)
                if not counter._paused and not isinstance(data, torch.Tensor):
                    if counter.is_host(self):
                        counter.mark_host(out)
                    else:
                        counter._sync("host->device copy (blocking)")
                return out
            return wrapper

        patch(torch.Tensor, "tolist", read("Tensor.tolist"))
        patch(torch.Tensor, "numpy", read("Tensor.numpy"))
        patch(torch.Tensor, "cpu", to_host("Tensor.cpu", lambda a, k: True))
        patch(torch.Tensor, "to", to_device(to_host(
            'Tensor.to("cpu")',
            lambda a, k: (bool(a) and isinstance(a[0], str) and a[0] == "cpu")
            or k.get("device") == "cpu")))
        patch(torch.Tensor, "new_tensor", new_tensor)
        for name in _FACTORIES:
            if hasattr(torch, name):
                patch(torch, name, factory)
        try:
            yield
        finally:
            for owner, name, orig, own in reversed(saved):
                if own:
                    setattr(owner, name, orig)
                else:  # inherited (torch.Tensor from TensorBase): drop the override
                    delattr(owner, name)


def phase_hooks(counter: StepCounter, base: torch.optim.Optimizer) -> list[Any]:
    """Label the base optimizer's own step ``optimizer``, what follows it ``mask_update``."""
    pre = base.register_step_pre_hook(lambda *_: counter.set_phase("optimizer"))
    post = base.register_step_post_hook(lambda *_: counter.set_phase("mask_update"))
    return [pre, post]


def counted_step(model: nn.Module, opt: torch.optim.Optimizer, base: torch.optim.Optimizer,
                 x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                 counter: StepCounter | None = None) -> float:
    """One training step; counted by ``counter`` (by phase) when given. Returns the loss."""
    handles = phase_hooks(counter, base) if counter is not None else []
    ctx: contextlib.AbstractContextManager[Any] = (
        counter if counter is not None else contextlib.nullcontext())
    try:
        with ctx:
            if counter is not None:
                counter.set_phase("forward")
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if counter is not None:
                counter.set_phase("backward")
            loss.backward()
            if counter is not None:
                counter.set_phase("mask_update")  # the base step's hooks label their part
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return float(loss.detach())


# -- models: the same configurations as step_overhead.py ------------------------------------
LABELS = {"resnet50": "ResNet-50", "vit_b_16": "ViT-B/16 16x16 blocks",
          "resnet18": "ResNet-18", "vit_tiny": "ViT-tiny 16x16 blocks"}


def counts_of(counter: StepCounter) -> dict[str, Any]:
    return {
        "ops": {p: counter.total_ops(p) for p in counter.ops},
        "syncs": {p: counter.total_syncs(p) for p in counter.syncs},
        "total_ops": counter.total_ops(),
        "total_syncs": counter.total_syncs(),
        "ops_by_name": {p: dict(c.most_common()) for p, c in counter.ops.items()},
        "syncs_by_site": {p: dict(c.most_common()) for p, c in counter.syncs.items()},
        "host_reads": dict(counter.host_reads.most_common()),
        "mixed": dict(counter.mixed.most_common()),
        "non_aten_ops": {p: dict(c.most_common()) for p, c in counter.other_ops.items() if c},
    }


def measure_config(name: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one configuration (fresh model, seed 0), warm it up and count one step."""
    spec = SPECS[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    names: list[str] = []
    nm = args.policy == "nm24"
    if label == "spartan" and nm:  # 2:4 groups along dim 1: layers whose inputs 4 divides
        names = sparsify_nm(model)
    elif label == "spartan":
        names = sparsify_model(model, spec, args.min_density)
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, fused=args.fused)
    opt: torch.optim.Optimizer = base
    if label == "spartan":
        policy = {"global": ts.Global(), "erk": ts.ERK(), "uniform": ts.Uniform(),
                  "nm24": ts.NM(2, 4)}[args.policy]
        opt = make_dual(model, base, 0.5 if nm else spec.sparsity, spec.beta_target,
                        args.total_steps, args.start_step, policy)
        if args.sync_free:  # the mask update's CUDA path, counted here on the CPU
            opt.updater.solver.sync_free = True  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, spec.image, spec.image, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    loss_fn = nn.CrossEntropyLoss()
    losses = [counted_step(model, opt, base, x, y, loss_fn) for _ in range(args.warmup)]
    counter = StepCounter(device)
    losses.append(counted_step(model, opt, base, x, y, loss_fn, counter))
    out = counts_of(counter)
    out["losses"] = losses
    out["losses_finite"] = all(math.isfinite(v) for v in losses)
    if label == "spartan":
        out["masked_tensors"] = len(names)
        out["masked_weights"] = sum(p.numel() for n, p in model.named_parameters()
                                    if n.endswith(".original"))
        out["record"] = record_of(opt)
    out["params"] = sum(p.numel() for p in model.parameters())
    log(f"[{name} {label}] ops {out['total_ops']} "
        + " ".join(f"{p} {out['ops'][p]}" for p in PHASES)
        + f"; syncs {out['total_syncs']}" + (f"; {out.get('record')}" if label == "spartan"
                                             else ""))
    return out


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = SPECS[name]
    res: dict[str, Any] = {"model": name, "label": LABELS[name], "batch": args.batch,
                           "image": spec.image, "sparsity": spec.sparsity,
                           "beta_target": spec.beta_target, "block": spec.block}
    for label in ("dense", "spartan"):
        res[label] = measure_config(name, label, args)
    d, s = res["dense"], res["spartan"]
    res["masked_tensors"] = s["masked_tensors"]
    res["added_ops"] = s["total_ops"] - d["total_ops"]
    res["added_ops_ratio"] = res["added_ops"] / d["total_ops"]
    res["ops_met"] = res["added_ops_ratio"] <= OPS_RATIO_TARGET
    res["syncs_met"] = s["total_syncs"] <= SYNC_TARGET
    dense_all: Counter[str] = sum((Counter(c) for c in d["ops_by_name"].values()), Counter())
    spartan_all: Counter[str] = sum((Counter(c) for c in s["ops_by_name"].values()), Counter())
    added = {k: spartan_all[k] - dense_all.get(k, 0) for k in spartan_all}
    res["top_added"] = [
        {"op": k, "dense": dense_all.get(k, 0), "spartan": spartan_all[k], "added": v}
        for k, v in sorted(added.items(), key=lambda kv: (-kv[1], kv[0]))[:args.top] if v > 0
    ]
    return res


# -- environment and rendering ----------------------------------------------------------
def library_git() -> str:
    """``git rev-parse --short HEAD`` of the checkout the imported library comes from."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(_LIB_DIR), *cmd], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
        return rev + (" (with uncommitted changes to torchspartan/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(res: dict[str, Any]) -> str:
    env = res["env"]
    cuda = str(env.get("device", "cpu")).startswith("cuda")
    lines = [
        f"# Dispatched ops and host syncs per training step ({'CUDA' if cuda else 'CPU'})",
        "",
        (f"- Device: {env.get('gpu', 'a CUDA GPU')}; host {env['cpu']}, {env['cores']} logical "
         f"cores" if cuda else
         f"- Device: {env['cpu']}, {env['cores']} logical cores, torch threads {env['threads']}"),
        f"- torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}",
        f"- Library at git `{env['git']}`; date {env['date']}",
        f"- One training step (zero_grad, forward, cross-entropy loss, backward, `opt.step()`) "
        f"counted after {res['args']['warmup']} warm-up steps, batch {res['args']['batch']}; "
        f"base optimizer SGD (lr {res['args']['lr']}, momentum 0.9"
        f"{', fused=True' if res['args'].get('fused') else ''}) for both. Spartan: "
        f"`ts.DualAveraging`, policy `{res['args'].get('policy', 'global')}`, "
        f"total_steps={res['args']['total_steps']}, default "
        f"schedule shapes shifted to start at step {res['args']['start_step']} (mid-anneal: "
        "density and beta strictly between their endpoints, the hard masks change every step). "
        + ("Mask update: the sync-free path (selection and warm-started Newton decided on the "
           "device), the default on CUDA." if cuda else
           "Mask update: the sync-free path (selection and warm-started Newton decided on the "
           "device, the default on CUDA), forced on this CPU." if res['args'].get('sync_free')
           else "Mask update: the CPU path (the default off CUDA).")
        + (" Masks: the library's default floors (at least one entry per output unit or block "
           "row of every tensor in a shared budget)." if res['args'].get('min_density') is None
           else f" Masks: `min_density={res['args']['min_density']}` (no default floors)."),
        "- ResNet-50: every Conv2d and the fc masked, unstructured, 95% sparsity, beta target 10. "
        "ViT-B/16: 16x16 blocks on the encoder's Linear layers and MHA in_proj (conv_proj and "
        "heads dense), 90% sparsity, beta target 20 x sqrt(256).",
        "- Ops: every aten op overload reaching a `TorchDispatchMode` (decomposed "
        "CompositeImplicit ops count as their parts). Host syncs: reads of device values that "
        "would make the host wait on an accelerator (`_local_scalar_dense`, i.e. `.item()`/"
        "`float()`/`bool()`/`int()`; data-dependent output shapes: `nonzero`, `masked_select`, "
        "`unique`, boolean indexing, ...; device-to-host copies: `.tolist()`, `.cpu()`, "
        "`.numpy()`; host-to-device copies that wait), "
        + ("counted where they happen, on the GPU (a CUDA dense step runs fused multi-tensor "
           "kernels that a CPU step runs tensor by tensor, so it dispatches fewer ops than on a "
           "CPU)" if cuda else "counted on CPU for the code path a CPU run takes; reads of "
           "tensors that would stay on the host are not counted")
        + " (definitions in the script's docstring).",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for m in res["models"]:
        d, s = m["dense"], m["spartan"]
        lines.append(
            f"| {m['label']}: ops a Spartan step adds <= {OPS_RATIO_TARGET}x the dense step's "
            f"| {m['added_ops_ratio']:.3f}x (+{m['added_ops']} over {d['total_ops']}) "
            f"| {met(m['ops_met'])} |")
        lines.append(
            f"| {m['label']}: host syncs per Spartan step <= {SYNC_TARGET} "
            f"| {s['total_syncs']} (dense {d['total_syncs']}) | {met(m['syncs_met'])} |")
    lines += [
        "",
        "## Ops and host syncs by phase",
        "",
        "Optimizer: the base SGD step (between its step hooks); mask update: the rest of "
        "`DualAveraging.step()`. Forward includes zero_grad and the loss.",
        "",
        "| model | masked tensors | phase | dense ops | Spartan ops | added | dense syncs "
        "| Spartan syncs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in res["models"]:
        d, s = m["dense"], m["spartan"]
        for p in (*PHASES, "total"):
            do = d["total_ops"] if p == "total" else d["ops"].get(p, 0)
            so = s["total_ops"] if p == "total" else s["ops"].get(p, 0)
            ds = d["total_syncs"] if p == "total" else d["syncs"].get(p, 0)
            ss = s["total_syncs"] if p == "total" else s["syncs"].get(p, 0)
            name = f"**{p}**" if p == "total" else p
            added = so - do
            extra = f" ({added / do:.3f}x)" if p == "total" else ""
            lines.append(f"| {m['label']} | {m['masked_tensors']} | {name} | {do} | {so} "
                         f"| {added:+d}{extra} | {ds} | {ss} |")
    lines += ["", "Spartan state at the counted step:", ""]
    for m in res["models"]:
        r = m["spartan"].get("record") or {}
        if r:
            lines.append(
                f"- {m['label']}: step {r['step']}, density {r['density']:.4f} (target "
                f"{r['target_density']:.4f}), beta {r['beta']:.3f}, Newton evaluations "
                f"{r['iterations']}, mask change {100 * r['mask_change']:.3f}%; "
                f"{m['spartan']['masked_weights'] / 1e6:.2f}M masked weights; losses of all "
                f"steps finite: dense {m['dense']['losses_finite']}, "
                f"Spartan {m['spartan']['losses_finite']}.")
    lines += ["", "## Where the Spartan syncs are", "",
              "| model | phase | kind @ call site | count |", "|---|---|---|---|"]
    for m in res["models"]:
        rows = [(p, k, v) for p, c in m["spartan"]["syncs_by_site"].items()
                for k, v in c.items()]
        if not rows:
            lines.append(f"| {m['label']} | | none | 0 |")
        for p, k, v in rows:
            lines.append(f"| {m['label']} | {p} | `{k}` | {v} |")
        hr = sum(m["spartan"]["host_reads"].values())
        if hr:
            lines.append(f"| {m['label']} | | reads of host-side tensors (not syncs) | {hr} |")
    for m in res["models"]:
        lines += ["", f"## Ops Spartan adds: top {len(m['top_added'])}, {m['label']}", "",
                  "| op | dense | Spartan | added |", "|---|---|---|---|"]
        for row in m["top_added"]:
            lines.append(f"| `{row['op']}` | {row['dense']} | {row['spartan']} "
                         f"| +{row['added']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"], choices=SPECS)
    ap.add_argument("--quick", action="store_true", help="small stand-ins: resnet18, vit_tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--start-step", type=int, default=100)
    ap.add_argument("--total-steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--sync-free", action="store_true",
                    help="count the mask update's sync-free path (the CUDA default) on the CPU")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused", action="store_true",
                    help="SGD(fused=True): the finite check is a device flag read with the "
                         "update's values (one sync fewer)")
    ap.add_argument("--policy", default="global", choices=["global", "erk", "uniform", "nm24"],
                    help="the allocation policy of the Spartan runs (default: ts.Global())")
    ap.add_argument("--min-density", type=float, default=None,
                    help="min_density of every mask (default: the library's default floors)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (syncs emulated, see the docstring) or an accelerator")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.models = ["resnet18", "vit_tiny"]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    import torchvision

    env = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": args.device, **({"gpu": torch.cuda.get_device_name(torch.device(args.device))}
                                   if args.device.startswith("cuda") else {}),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "git": library_git(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    log(f"library {env['git']}; torch {env['torch']}; {env['cpu']}")
    res = {"env": env, "args": vars(args), "targets": {"added_ops_ratio": OPS_RATIO_TARGET,
                                                        "syncs_per_step": SYNC_TARGET}}
    res["models"] = [measure(name, args) for name in args.models]
    md = render(res)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
        Path(args.out + ".md").write_text(md)
        log(f"wrote {args.out}.json and {args.out}.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
