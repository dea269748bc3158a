"""How long does the host work in a Spartan step, and how much of it comes after the step's read?

One question, one script. On a GPU a training step is launched by the host ahead of the device;
the device waits for the host only where the host waits for the device first: at the mask
update's one host read (``.tolist()`` of the update's checks and counts, on the sync-free path
that CUDA runs). Everything the host does after that read, until the next forward's first
kernel, is time the GPU sits idle. That host time does not depend on the GPU, so it is measured
here on the CPU, on a model whose compute is negligible: ``--layers`` (54, as ResNet-50's masked
tensors) ``Linear(--width, --width)`` layers with ReLU, batch 4.

In one process, a dense copy and a Spartan copy (same initial weights; ``SGD(momentum=0.9,
fused=True)``, the base optimizer that skips on the device, so the step's finite check is a
device flag read with the update's values) take steps in turn, in rounds; the medians are
reported:

- the whole step's host time, dense and Spartan, and their ratio;
- ``after read``: from the return of the mask update's last host read to the end of
  ``opt.step()`` (the GPU's idle time a step, from the library's Python);
- ``to first matmul``: from the start of the step (``zero_grad``) to the forward's first
  ``F.linear`` call, dense and Spartan (the forward's masked weights are computed before it).

The Spartan copy runs the mask update's sync-free path (the CUDA default, forced on the CPU),
mid-anneal (``total_steps=10000``, schedules shifted by 1000 steps: density and beta move at every
measured step, and so do the hard masks),
95% sparsity, global budget. CPU multi-tensor ops run tensor by tensor where a GPU launches one
kernel, so the whole-step ratio overstates a GPU's launch count; ``after read`` is Python
bookkeeping and a few multi-tensor ops, the same work on either device.

Usage::

    python benchmarks/host_time.py --out benchmarks/results/host_time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from machine import cpu_name, git_describe
from step_runner import make_dual
from torch import nn
from torch.nn import functional as F  # noqa: N812

import torchspartan as ts


def build(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])


class Clock:
    """When the host last read a device value (``.tolist()``/``.item()``/``.cpu()``)."""

    def __init__(self) -> None:
        self.last_read: float | None = None

    @contextmanager
    def watching(self) -> Iterator[None]:
        saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "cpu")}

        def timed(orig: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                out = orig(t, *a, **k)
                self.last_read = time.perf_counter()
                return out
            return wrapper

        for name, orig in saved.items():
            setattr(torch.Tensor, name, timed(orig))
        try:
            yield
        finally:
            for name, orig in saved.items():
                setattr(torch.Tensor, name, orig)


class FirstMatmul:
    """Records when the forward first calls ``F.linear`` (its arguments evaluated: the masked
    weight computed). A wrapper of the function, not a ``TorchDispatchMode``: under a dispatch
    mode the compiled kernels of a GPU run give way to their eager ops."""

    def __init__(self) -> None:
        self.at: float | None = None

    @contextmanager
    def watching(self) -> Iterator[None]:
        orig = F.linear

        def linear(*args: Any, **kwargs: Any) -> torch.Tensor:
            if self.at is None:
                self.at = time.perf_counter()
            return orig(*args, **kwargs)

        F.linear = linear
        try:
            yield
        finally:
            F.linear = orig


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dense, sparse = build(args.layers, args.width), build(args.layers, args.width)
    ts.sparsify(sparse)
    opt_dense = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, fused=True)
    base = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9, fused=True)
    opt = make_dual(sparse, base, 0.95, 10.0, 10_000, 1000)
    opt.updater.solver.sync_free = True  # the CUDA path
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, args.width, generator=gen)
    y = torch.randn(4, args.width, generator=gen)
    for _ in range(args.warmup):
        train_step(dense, opt_dense, x, y)
        train_step(sparse, opt, x, y)

    clock = Clock()
    steps: dict[str, list[float]] = {"dense": [], "spartan": []}
    after: list[float] = []
    with clock.watching():
        for _ in range(args.rounds):
            for label, model, o in (("dense", dense, opt_dense), ("spartan", sparse, opt)):
                times = []
                for _ in range(args.steps):
                    clock.last_read = None
                    t0 = time.perf_counter()
                    train_step(model, o, x, y)
                    t1 = time.perf_counter()
                    times.append(t1 - t0)
                    if label == "spartan":
                        if clock.last_read is None:
                            raise RuntimeError("the Spartan step made no host read; this "
                                               "benchmark times what follows the read")
                        after.append(t1 - clock.last_read)
                steps[label].append(statistics.median(times))
    first: dict[str, float] = {}
    for label, model, o in (("dense", dense, opt_dense), ("spartan", sparse, opt)):
        times = []
        for _ in range(args.steps):
            first_call = FirstMatmul()
            with first_call.watching():
                t0 = time.perf_counter()
                train_step(model, o, x, y)
            if first_call.at is None:
                raise RuntimeError("no F.linear in the forward")
            times.append(first_call.at - t0)
        first[label] = statistics.median(times) * 1e3
    dense_ms = statistics.median(steps["dense"]) * 1e3
    spartan_ms = statistics.median(steps["spartan"]) * 1e3
    record = opt.last_record
    return {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "threads": 1,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average": [round(v, 2) for v in os.getloadavg()],
                    "library_git": git_describe(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "dense_step_ms": dense_ms,
        "spartan_step_ms": spartan_ms,
        "ratio": spartan_ms / dense_ms,
        "after_read_ms": statistics.median(after) * 1e3,
        "to_first_matmul_ms": first,
        "record": {"step": record.step, "density": record.density, "beta": record.beta,
                   "mask_change": record.mask_change} if record is not None else None,
    }


def render(res: dict[str, Any]) -> str:
    m, a = res["machine"], res["args"]
    first = res["to_first_matmul_ms"]
    return "\n".join([
        "# Host time of a Spartan step, and the part after its one host read",
        "",
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads']} thread; "
        f"load average {', '.join(map(str, m['load_average']))}",
        f"- torch {m['torch']}, Python {m['python']}; library at git `{m['library_git']}`; "
        f"{m['date']}",
        f"- Model: {a['layers']} x Linear({a['width']}, {a['width']}) + ReLU, batch 4; "
        f"{a['rounds']} rounds of {a['steps']} steps each, dense and Spartan in turn; medians. "
        "Spartan: global budget, 95%, mid-anneal, the sync-free update (the CUDA path), "
        "SGD(momentum=0.9, fused=True).",
        "",
        "| | dense | Spartan | ratio |",
        "|---|---|---|---|",
        f"| step (ms) | {res['dense_step_ms']:.3f} | {res['spartan_step_ms']:.3f} | "
        f"{res['ratio']:.2f}x |",
        f"| step start to the forward's first matmul (ms) | {first['dense']:.3f} | "
        f"{first['spartan']:.3f} | |",
        f"| after the update's host read to the end of `opt.step()` (ms) | | "
        f"{res['after_read_ms']:.3f} | {res['after_read_ms'] / res['dense_step_ms']:.2f}x "
        "the dense step |",
        "",
        "The step ratio counts CPU multi-tensor ops tensor by tensor (a GPU launches one kernel "
        "each); the time after the read is the library's Python and a few multi-tensor ops, "
        "during which a GPU has nothing queued.",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--layers", type=int, default=54)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="path stem: writes STEM.md and STEM.json")
    args = ap.parse_args()
    res = measure(args)
    text = render(res)
    print(text)
    if args.out:
        with open(f"{args.out}.json", "w") as f:
            json.dump(res, f, indent=1)
        with open(f"{args.out}.md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
