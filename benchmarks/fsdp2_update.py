"""Mask-update time and per-rank memory of a model sharded with FSDP2, on 1, 2 and 4 CPU ranks.

Question: how long does the global mask update take when the masked weights are FSDP2 shards
(the local-shard solve, histogram selection and mask gathers of ``torchspartan.sharded``), and
how much memory does each rank need for it, at ResNet-50 (25.5M masked weights, unstructured)
and ViT-B/16 (85M, 16x16 blocks on the encoder's linear layers) scale?

Method: every rank builds the same synthetic layers (the masked weight shapes of the real
models: torchvision's ResNet-50 convolutions and fc; per ViT-B/16 encoder layer a 2304x768
in-projection, 768x768 out-projection and the two 3072/768 MLP layers, as ``nn.Linear``) on the
meta device, registers the masks, calls ``fully_shard`` on every layer and the root, and only
then allocates its shards (``to_empty``): no rank ever holds the full weights. A
``ts.MaskUpdater`` with the global policy runs one cold update (density 0.5, beta 5), then
``--repeats`` warm updates (after an untimed first one) at the target density (ResNet-50
0.05, ViT 0.10; beta 10), the weights moving by ``theta *= 1.001`` on the local shards between
them. Reported per world size:
the median warm update (the slowest rank's), the cold one, and per rank (the largest over the
ranks): the local masked weights, the peak growth of the resident set during a warm update over
its value before it (sampled every 0.5 ms, with glibc's mmap threshold fixed at 64 KiB so that
freed blocks leave the resident set), the same for the cold update (which also pages in the code
it runs first), the largest float tensor one op of a warm update returned (numel), the bytes of
the full replicated hard masks, and the resident set after the updates. Every rank runs
``--threads`` torch threads (default 1). The row "no FSDP" is one process with the same layers
unsharded (the plain update, for reference).

Run:  .venv/bin/python benchmarks/fsdp2_update.py          (writes results/fsdp2_update.md)
      .venv/bin/python benchmarks/fsdp2_update.py --quick  (small stand-ins, prints only)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import cpu_name, git_describe
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchspartan as ts
from torchspartan.distributed import local_tensor

RESULT = Path(__file__).parent / "results" / "fsdp2_update.md"
TARGET = {"resnet50": 0.05, "vit_b_16": 0.10, "resnet18": 0.05, "vit_tiny": 0.10}


def resnet_shapes(name: str) -> list[tuple[int, ...]]:
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d,
                                                                             nn.Linear))]


def vit_shapes(layers: int, width: int) -> list[tuple[int, ...]]:
    per = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    return per * layers


def shapes_of(name: str) -> list[tuple[int, ...]]:
    if name.startswith("resnet"):
        return resnet_shapes(name)
    return vit_shapes(12, 768) if name == "vit_b_16" else vit_shapes(2, 192)


class Layer(nn.Module):
    """A weight of a given shape (the masks need no forward here)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


def build(name: str, shard: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = nn.Sequential(*[Layer(s) for s in shapes_of(name)])
    ts.sparsify(model, include=Layer, block=(16, 16) if name.startswith("vit") else None)
    if shard:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # CPU ranks, also on a GPU host
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for layer in model:
            local = local_tensor(layer.parametrizations.weight.original)
            # ResNet: He-like scale per layer; ViT: one scale (its init, std 0.02)
            fan_in = math.prod(layer.parametrizations.weight.original.shape[1:])
            local.normal_(generator=g).mul_(0.02 if name.startswith("vit") else fan_in ** -0.5)
            mask = layer.parametrizations.weight[0]
            mask.hard_mask.fill_(True)
            mask.threshold.zero_()
            mask.beta.zero_()
            mask.cost.fill_(1.0)
            mask.frozen.fill_(False)
    return model


_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mib() -> float:
    """The current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_MIB


class PeakRss:
    """Samples the resident set size every 0.5 ms while active; ``growth``: the peak over the
    RSS at entry (with ``MALLOC_MMAP_THRESHOLD_`` fixed, freed large blocks leave the RSS, so it
    follows the live tensors)."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_mib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.0005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *_: Any) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def growth(self) -> float:
        return self.peak - self.base


class Largest(TorchDispatchMode):
    """The largest floating-point tensor an op returns (a DTensor: its local shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                n = t.to_local().numel() if hasattr(t, "to_local") else t.numel()
                self.numel = max(self.numel, n)
        return out


def worker(rank: int, world: int, port: int, name: str, repeats: int, threads: int,
           out: str) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=max(world, 1))
    model = build(name, shard=world > 0)
    refs = ts.find_masks(model)
    local = sum(local_tensor(r.theta).numel() for r in refs)
    masks = sum(r.mask.hard_mask.numel() for r in refs)
    updater = ts.MaskUpdater(model)
    growth = []

    def timed(density: float, beta: float) -> float:
        with torch.no_grad():
            for r in refs:
                local_tensor(r.theta).mul_(1.001)  # the weights move between updates
        dist.barrier()
        with PeakRss() as rss:
            start = time.perf_counter()
            updater.update(density, beta)
            took = time.perf_counter() - start
        growth.append(rss.growth)
        return took

    cold = timed(0.5, 5.0)
    timed(TARGET[name], 10.0)  # the first update at the target (its sharpness, its density)
    warm = [timed(TARGET[name], 10.0) for _ in range(repeats)]
    with Largest() as seen:
        updater.update(TARGET[name], 10.0)
    row = {"rank": rank, "cold_s": cold, "warm_s": warm, "rss_mib": rss_mib(),
           "rss_peak_growth_mib": max(growth[2:]), "cold_rss_growth_mib": growth[0],
           "largest_float_numel": seen.numel,
           "local_masked": local, "masked": sum(r.theta.numel() for r in refs),
           "mask_bytes": masks}
    Path(f"{out}/{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(name: str, world: int, repeats: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by the new processes
        mp.start_processes(worker, args=(world, free_port(), name, repeats, threads, out),
                           nprocs=max(world, 1), start_method="spawn", join=True)
        rows = [json.loads(Path(f"{out}/{r}.json").read_text()) for r in range(max(world, 1))]
    warm = [max(r["warm_s"][k] for r in rows) for k in range(repeats)]
    return {"model": name, "world": world, "warm_s": statistics.median(warm),
            "cold_s": max(r["cold_s"] for r in rows), "ranks": rows}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | ranks | masked weights | warm update (s) | cold update (s) | per rank: "
             "local masked weights | warm update peak RSS growth (MiB) | cold update (MiB) | "
             "largest float tensor (numel) | full hard masks (MiB) | RSS after (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        rows = res["ranks"]
        lines.append(
            f"| {res['model']} | {res['world'] or 'no FSDP'} | {rows[0]['masked'] / 1e6:.1f}M | "
            f"{res['warm_s']:.3f} | {res['cold_s']:.3f} | "
            f"{max(r['local_masked'] for r in rows) / 1e6:.2f}M | "
            f"{max(r['rss_peak_growth_mib'] for r in rows):.0f} | "
            f"{max(r['cold_rss_growth_mib'] for r in rows):.0f} | "
            f"{max(r['largest_float_numel'] for r in rows) / 1e6:.2f}M | "
            f"{rows[0]['mask_bytes'] / 2**20:.1f} | {max(r['rss_mib'] for r in rows):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stand-ins, print only")
    parser.add_argument("--worlds", default="0,1,2,4",
                        help="ranks per run; 0: one process without FSDP (the plain update)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = ["resnet18", "vit_tiny"] if args.quick else ["resnet50", "vit_b_16"]
    load_before = os.getloadavg()
    start = time.time()
    results = []
    for name in models:
        for world in (int(w) for w in args.worlds.split(",")):
            results.append(run(name, world, args.repeats, args.threads))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    header = (f"Device: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} torch "
              f"thread(s) per rank, torch {torch.__version__}, gloo, git {git_describe()}.\n"
              f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}"
              f"; after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; the run took "
              f"{time.time() - start:.0f} s.\n")
    print(header)
    print(text)
    if not args.quick:
        RESULT.write_text("# FSDP2 mask update on CPU ranks (`benchmarks/fsdp2_update.py`)\n\n"
                          + header + "\n" + text + "\n")
        (RESULT.with_suffix(".json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
