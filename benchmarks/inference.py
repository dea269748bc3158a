"""Is an exported sparse model actually faster and smaller? Dense vs sparse inference latency.

One question, one script. Each case builds a model with random weights (no downloads), zeros a
fraction of the weights by magnitude (unstructured: per layer; blocks: the blocks with the
smallest sum of ``|w|`` per layer), and times a forward pass under ``torch.inference_mode`` of

- the dense model with its zeros (what ``ts.finalize`` leaves),
- the model exported by ``torchspartan.export.to_sparse`` in one layout for every eligible layer
  (``csr`` for unstructured zeros, ``bsr`` with the detected block for block zeros), and
- for the whole models, ``to_sparse(layout="auto")`` at the same input (per layer, the faster of
  dense and the sparse layouts in its own measurement).

Cases: (a) one ``Linear(4096, 4096)`` at 90/95/98% unstructured zeros, input ``(batch, 4096)``;
(b) a ViT-B/16 MLP block ``Linear(768, 3072) -> GELU -> Linear(3072, 768)`` at 90% in 16x16 and
32x32 blocks, input ``(batch, 197, 768)`` (197 tokens per image); (c) torchvision ResNet-50 at 95%
unstructured (every Conv2d and the fc) and torchvision ViT-B/16 at 90% in 16x16 and 32x32 blocks
(the encoder's Linear layers and attention in/out projections; ``conv_proj`` and the head dense),
input ``(batch, 3, 224, 224)``. Batches 1 and 64.

Timing: ``torch.utils.benchmark.Timer``; after one warm-up call per variant, the variants take
turns (dense, sparse, auto, dense, ...) for ``--rounds`` rounds, each round one
``blocked_autorange`` (fast calls) or one ``timeit(1)`` (calls over 0.5 s), and the median over
rounds is reported, so a change in machine load hits every variant alike. File sizes: the dense
``torch.save(model.state_dict())`` against ``save_sparse``.

Usage::

    python benchmarks/inference.py --quick      # smaller batches and inputs, ~2 minutes
    python benchmarks/inference.py              # the full table, ~15 minutes on 1 thread
    python benchmarks/inference.py --threads 2  # both cores (noisy when the machine is shared)

Results go to ``benchmarks/results/inference.{json,md}`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Threads that finish a parallel region sleep instead of spinning: on a shared 2-core machine a
# spinning team loses its core to a neighbour and stalls the next region (10x outliers seen).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from machine import cpu_name  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from torchspartan.export import to_sparse  # noqa: E402
from torchspartan.sparse_checkpoint import save_sparse  # noqa: E402

ANCHORS = (
    "Published anchors (GPU, not measured here): block-sparse ViT MLP at 90% sparsity, "
    "1.24x / 1.37x / 1.65x faster than dense for 16x16 / 32x32 / 64x64 blocks on an A100 "
    "(PyTorch BSR with Triton kernels); 2:4 semi-structured linear layers about 1.3x faster "
    "than dense in fp16."
)


# -- zeroing weights ---------------------------------------------------------------------------


@torch.no_grad()
def zero_unstructured(w: torch.Tensor, sparsity: float) -> None:
    k = int(round(w.numel() * sparsity))
    if k == 0:
        return
    thr = w.abs().flatten().kthvalue(k).values
    w.mul_(w.abs() > thr)


@torch.no_grad()
def zero_blocks(w: torch.Tensor, sparsity: float, block: int) -> None:
    rows, cols = w.shape
    score = w.abs().reshape(rows // block, block, cols // block, block).sum((1, 3))
    k = int(round(score.numel() * sparsity))
    keep = score > score.flatten().kthvalue(k).values
    w.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))


def resnet50(sparsity: float) -> nn.Module:
    from torchvision.models import resnet50 as build

    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            zero_unstructured(m.weight, sparsity)
    return model


def vit_b_16(sparsity: float, block: int) -> nn.Module:
    from torchvision.models import vit_b_16 as build

    torch.manual_seed(0)
    model = build().eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    for m in model.encoder.modules():
        if isinstance(m, nn.Linear):
            zero_blocks(m.weight, sparsity, block)
        elif isinstance(m, nn.MultiheadAttention):
            zero_blocks(m.in_proj_weight, sparsity, block)
    return model


def linear(sparsity: float, n: int = 4096) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n))
    zero_unstructured(model[0].weight, sparsity)
    return model.eval()


def vit_mlp(sparsity: float, block: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))
    for i in (0, 2):
        zero_blocks(model[i].weight, sparsity, block)
    return model.eval()


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Row:
    group: str
    case: str
    batch: int
    input_shape: list[int]
    zeros: str
    layout: str
    dense_ms: float
    sparse_ms: float
    speedup: float
    dense_file_mib: float
    compact_file_mib: float
    rounds: int
    layers: str = ""
    export_s: float = 0.0
    round_ms: dict[str, list[float]] = field(default_factory=dict)


def time_variants(variants: dict[str, nn.Module], x: torch.Tensor, rounds: int,
                  block_time: float) -> dict[str, list[float]]:
    """Per variant, one time per round (ms): the variants take turns within every round."""
    slow: dict[str, bool] = {}
    with torch.inference_mode():
        for key, m in variants.items():  # warm-up, and is one call slow?
            t0 = time.perf_counter()
            m(x)
            slow[key] = time.perf_counter() - t0 > 0.5
        out: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for key, m in variants.items():
                timer = Timer("m(x)", globals={"m": m, "x": x}, num_threads=torch.get_num_threads())
                if slow[key]:
                    out[key].append(timer.timeit(1).median * 1e3)
                else:
                    out[key].append(timer.blocked_autorange(min_run_time=block_time).median * 1e3)
    return out


def file_sizes(model: nn.Module, tmp: Path) -> tuple[float, float]:
    dense_path = tmp / "dense.pt"
    torch.save(model.state_dict(), dense_path)
    dense = dense_path.stat().st_size
    info = save_sparse(model, tmp / "sparse.pt")
    dense_path.unlink()
    (tmp / "sparse.pt").unlink()
    return dense / 2**20, info.file_bytes / 2**20


def layer_counts(summary: Any) -> str:
    counts: dict[str, int] = {}
    for r in summary.layers:
        key = r.layout + (f" {r.blocksize[0]}x{r.blocksize[1]}" if r.blocksize else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def run_case(group: str, case: str, builds: list[tuple[str, Callable[[], nn.Module], str]],
             input_shape: tuple[int, ...], batch: int, rounds: int, block_time: float,
             tmp: Path, auto: bool) -> list[Row]:
    """Time one dense baseline against sparse exports of one or more zero patterns.

    ``builds``: ``(zeros label, builder, layout)``; the dense baseline is the first builder's
    model (dense time does not depend on where the zeros are: same shapes, denormals flushed).
    ``auto`` adds ``to_sparse(layout="auto")`` of every builder's model.
    """
    x = torch.randn(batch, *input_shape)
    variants: dict[str, nn.Module] = {}
    meta: dict[str, tuple[str, str, str, float, float, float]] = {}
    for zeros, build, layout in builds:
        dense = build()
        if not variants:
            variants["dense"] = dense
        dense_mib, compact_mib = file_sizes(dense, tmp)
        for lay in [layout] + (["auto"] if auto else []):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            if lay == "auto":
                summary = to_sparse(model, "auto", example_inputs=x, min_run_time=0.02)
            else:
                summary = to_sparse(model, lay)  # type: ignore[arg-type]
            key = f"{lay} [{zeros}]"
            variants[key] = model
            meta[key] = (zeros, lay, layer_counts(summary), time.perf_counter() - t0, dense_mib,
                         compact_mib)
    times = time_variants(variants, x, rounds, block_time)
    dense_ms = statistics.median(times["dense"])
    rows = []
    for key, (zeros, lay, layers, export_s, dense_mib, compact_mib) in meta.items():
        sparse_ms = statistics.median(times[key])
        r = Row(group, case, batch, [batch, *input_shape], zeros, lay, dense_ms, sparse_ms,
                dense_ms / sparse_ms, dense_mib, compact_mib, rounds, layers, export_s,
                {k: [round(t, 3) for t in times[k]] for k in ("dense", key)})
        rows.append(r)
        print(f"{group:<4} {case:<26} {zeros:<20} b{batch:<3} {lay:<5} dense {dense_ms:9.2f} ms "
              f" sparse {sparse_ms:9.2f} ms  {r.speedup:5.2f}x  file {dense_mib:6.1f} -> "
              f"{compact_mib:5.1f} MiB  [{layers}]", flush=True)
    return rows


# -- the machine -------------------------------------------------------------------------------


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine(threads: int) -> dict[str, Any]:
    import torchvision

    return {
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "mkl": torch.backends.mkl.is_available(),
        "cuda_available": torch.cuda.is_available(),
        "flush_denormal": True,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


# -- report ------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Inference latency: dense vs exported sparse (CPU)",
        "",
        f"- Device: {m['cpu']}, {m['logical_cores']} logical cores, torch threads "
        f"{m['torch_threads']}; MKL sparse kernels; denormals flushed; OMP_WAIT_POLICY="
        f"{m['omp_wait_policy']}",
        f"- torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}",
        f"- Date: {result['date']}; wall time {result['wall_min']:.1f} min; load average at start "
        f"{result['load_start']}, at end {result['load_end']} (shared machine)",
        f"- Mode: {'quick' if result['quick'] else 'full'}; {result['rounds_note']}",
        "- Weights: random init (no downloads), zeroed by magnitude per layer (unstructured) or "
        "by the sum of |w| per block (blocks); times are medians of one forward pass under "
        "`torch.inference_mode`, float32.",
        "- **Not measured: GPU BSR (Triton) and 2:4 semi-structured kernels (no GPU on this "
        "machine).** Every number below is CPU (MKL sparse BLAS vs oneDNN/MKL dense).",
        "",
        ANCHORS,
        "",
        "| group | case | zeros | batch | layout | dense ms | sparse ms | speedup (dense/sparse) "
        "| dense file MiB | compact file MiB | layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        speed = f"**{r['speedup']:.2f}x**" if r["speedup"] >= 1 else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['group']} | {r['case']} | {r['zeros']} | {r['batch']} | {r['layout']} | "
            f"{r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {speed} | {r['dense_file_mib']:.1f} | "
            f"{r['compact_file_mib']:.1f} | {r['layers']} |")
    spread: dict[tuple[str, int], set[float]] = {}
    for r in result["rows"]:
        spread.setdefault((r["case"], r["batch"]), set()).add(round(r["dense_ms"], 2))
    noisy = [f"{case} b{batch}: {', '.join(f'{v:.2f}' for v in sorted(vals))} ms"
             for (case, batch), vals in spread.items() if len(vals) > 1]
    if noisy:
        lines += ["", "Noise check: the same dense shapes timed in separate cases (the zeros do "
                  "not change dense time): " + "; ".join(noisy) + "."]
    faster = [r for r in result["rows"] if r["speedup"] >= 1.0]
    slower = [r for r in result["rows"] if r["speedup"] < 1.0]
    lines += [
        "",
        f"Sparse faster than dense in {len(faster)} of {len(result['rows'])} rows, slower in "
        f"{len(slower)}"
        + (": " + "; ".join(f"{r['case']} b{r['batch']} {r['layout']} {r['speedup']:.2f}x"
                            for r in slower) if slower else "") + ".",
        "",
        "`layers` lists how many Linear/Conv2d layers compute in each layout after export "
        "(`dense` includes layers below `min_sparsity`, e.g. the dense stem/head, and attention "
        "projections, which `nn.MultiheadAttention` reads directly). `auto` times each layer "
        "dense and sparse at the benchmark's input and keeps the faster one. File sizes: "
        "`torch.save(state_dict)` of the dense model with zeros vs `save_sparse`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="layers at batch 1 and 8, whole models at batch 1 only (ResNet-50 at "
                        "112x112), fewer rounds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine a "
                        "2-thread team stalls whenever a neighbour takes a core)")
    p.add_argument("--only", nargs="*", choices=["linear", "mlp", "resnet50", "vit_b_16"],
                   default=["linear", "mlp", "resnet50", "vit_b_16"])
    p.add_argument("--out", default="benchmarks/results/inference",
                   help="output stem: writes <stem>.json and <stem>.md")
    args = p.parse_args(argv)

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    start = time.time()
    load_start = load_average()
    warm = torch.randn(2048, 2048)
    for _ in range(20):  # wake the thread pool and the clocks before the first case
        warm @ warm
    batches = [1, 8] if args.quick else [1, 64]
    small_rounds, big_rounds = (3, 2) if args.quick else (5, 2)
    image = 112 if args.quick else 224
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for batch in batches:
            if "linear" in args.only:
                rows += run_case(
                    "(a)", "Linear 4096x4096",
                    [(f"{sp:.0%} unstructured", lambda sp=sp: linear(sp), "csr")
                     for sp in (0.90, 0.95, 0.98)],
                    (4096,), batch, small_rounds, 0.2, tmp, auto=False)
            if "mlp" in args.only:
                rows += run_case(
                    "(b)", "ViT-B/16 MLP 768-3072-768",
                    [(f"90%, {b}x{b} blocks", lambda b=b: vit_mlp(0.9, b), lay)
                     for b in (16, 32) for lay in ("bsr", "csr")],
                    (197, 768), batch, small_rounds, 0.2, tmp, auto=False)
        for batch in batches[:1] if args.quick else batches:
            rounds = small_rounds if batch == 1 else big_rounds
            if "resnet50" in args.only:
                rows += run_case("(c)", "ResNet-50",
                                 [("95% unstructured", lambda: resnet50(0.95), "csr")],
                                 (3, image, image), batch, rounds, 0.3, tmp, auto=True)
            if "vit_b_16" in args.only:
                rows += run_case("(c)", "ViT-B/16",
                                 [(f"90%, {b}x{b} blocks", lambda b=b: vit_b_16(0.9, b), "bsr")
                                  for b in (16, 32)],
                                 (3, 224, 224), batch, rounds, 0.3, tmp, auto=batch == 1)
    wall = (time.time() - start) / 60
    rounds_note = (f"{small_rounds} rounds for the layers and for whole models at batch 1, "
                   f"{big_rounds} rounds for whole models at batch {batches[-1]} (each call "
                   f"takes seconds on {args.threads} thread(s)); no `auto` for ViT-B/16 at batch "
                   f"{batches[-1]} (its per-layer timing at 12608 tokens costs minutes; (b) "
                   f"times those MLP layers); within a case one dense baseline is timed against "
                   f"every sparse variant")
    if args.quick:
        rounds_note += f"; whole ResNet-50 at {image}x{image} input"
    result = {
        "machine": machine(args.threads),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
        "wall_min": wall,
        "load_start": load_start,
        "load_end": load_average(),
        "quick": args.quick,
        "rounds_note": rounds_note,
        "anchors": ANCHORS,
        "gpu_measured": False,
        "rows": [asdict(r) for r in rows],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(f"wall {wall:.1f} min; wrote {out.with_suffix('.md').name} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
