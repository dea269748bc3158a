"""How fast are the mask operators compared with a sort of the same scores?

Question: at ResNet-50 scale (d = 25.5M float32 scores) and across sizes, what do ``soft_topk``
(cold forward + backward, and a warm-started forward), ``hard_topk``, and both on a list of 50
chunks under one budget (the global problem of training) cost, as a multiple of ``torch.sort``
of the same scores and of one ``torch.sigmoid`` pass, both measured in the same run?

Targets (issue): soft cold fwd+bwd <= 1.0x sort, warm-started fwd <= 0.3x sort,
hard_topk <= 0.2x sort, and time linear in d.

Method: each operation runs once to warm up, then ``--repeats`` times; the median wall time is
reported (CPU, so no synchronisation is needed; on CUDA the script synchronises). The 50 chunks
are separate tensors of equal cost, passed as a list (``ts.hard_topk(chunks, budget)``,
``ts.soft_topk(chunks, budget, beta)``): one piece of the engine per chunk. Scores are
``|N(0, 1)|``, budget 10% of the entries (90% sparsity), beta = 10. The warm start solves the
scores, then times the forward on ``scores * 1.001`` with ``threshold_init`` from the first solve.

Run:  .venv/bin/python benchmarks/topk_speed.py            (writes benchmarks/results/topk_speed.md)
      .venv/bin/python benchmarks/topk_speed.py --quick    (small sizes, prints only)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_name, sync

import torchspartan as ts

RESULT = Path(__file__).parent / "results" / "topk_speed.md"
FRACTION = 0.1
BETA = 10.0
N_CHUNKS = 50
TARGETS = {"soft cold fwd+bwd": 1.0, "soft warm fwd": 0.3, "hard_topk": 0.2}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), host CPU {cpu_name()}"
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch threads = "
            f"{torch.get_num_threads()}")


def measure(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time in seconds of ``repeats`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        gc.collect()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_size(d: int, repeats: int, device: torch.device) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(d, generator=g, device=device).abs_()
    budget = FRACTION * d
    upstream = torch.randn(d, generator=g, device=device)
    times: dict[str, float] = {}

    times["torch.sort"] = measure(lambda: torch.sort(scores), max(1, repeats // 2), device)
    times["torch.sigmoid"] = measure(lambda: torch.sigmoid(scores), repeats, device)

    def soft_cold() -> None:
        x = scores.detach().requires_grad_()
        ts.soft_topk(x, budget, BETA).backward(upstream)

    times["soft cold fwd+bwd"] = measure(soft_cold, repeats, device)
    times["soft cold fwd"] = measure(lambda: ts.soft_topk(scores, budget, BETA), repeats, device)
    first = ts.soft_topk(scores, budget, BETA, return_result=True)
    nearby = scores * 1.001
    warm = ts.soft_topk(nearby, budget, BETA, threshold_init=first.threshold, return_result=True)
    cold = ts.soft_topk(nearby, budget, BETA, return_result=True)
    times["soft warm fwd"] = measure(
        lambda: ts.soft_topk(nearby, budget, BETA, threshold_init=first.threshold), repeats, device
    )
    times["evaluations cold"] = float(cold.iterations)
    times["evaluations warm"] = float(warm.iterations)
    times["hard_topk"] = measure(lambda: ts.hard_topk(scores, budget), repeats, device)

    chunks = [c.clone() for c in torch.chunk(scores, N_CHUNKS)]
    times[f"hard_topk ({N_CHUNKS} chunks)"] = measure(
        lambda: ts.hard_topk(chunks, budget), repeats, device
    )
    times[f"soft_topk ({N_CHUNKS} chunks) fwd"] = measure(
        lambda: ts.soft_topk(chunks, budget, BETA), repeats, device
    )
    return times


def fits(d: int, device: torch.device) -> bool:
    """Peak use is about 14 float32 copies of the scores (sort values and int64 indices, the
    soft mask, its buffers and gradient, the chunks)."""
    need = 14 * 4 * d
    if device.type == "cuda":
        return need < torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return need < info["MemAvailable"]
    except (OSError, KeyError):
        return d <= 64_000_000


OPS = ["soft cold fwd+bwd", "soft cold fwd", "soft warm fwd", "hard_topk",
       f"hard_topk ({N_CHUNKS} chunks)", f"soft_topk ({N_CHUNKS} chunks) fwd"]


def main_table(d: int, t: dict[str, float]) -> list[str]:
    lines = [
        f"### d = {d:,} float32 scores",
        "",
        f"Baselines measured in the same run: `torch.sort` {t['torch.sort'] * 1e3:.0f} ms, "
        f"one `torch.sigmoid` pass {t['torch.sigmoid'] * 1e3:.1f} ms. Budget evaluations "
        f"(Newton): cold {t['evaluations cold']:.0f}, warm {t['evaluations warm']:.0f}.",
        "",
        "| operation | time (ms) | x sort | x sigmoid | target (x sort) | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for op in OPS:
        r = t[op] / t["torch.sort"]
        target = TARGETS.get(op)
        met = "" if target is None else ("yes" if r <= target else f"**no** ({r:.2f}x)")
        lines.append(
            f"| {op} | {t[op] * 1e3:.1f} | {r:.3f} | {t[op] / t['torch.sigmoid']:.1f} | "
            f"{'' if target is None else f'<= {target}'} | {met} |"
        )
    return lines


def sweep_table(results: dict[int, dict[str, float]]) -> list[str]:
    cols = ["torch.sort", "torch.sigmoid", *OPS]
    lines = [
        "| d | " + " | ".join(cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for d, t in results.items():
        lines.append(f"| {d:,} | " + " | ".join(f"{t[c] * 1e3:.0f} ms" for c in cols) + " |")
    lines += ["", "Nanoseconds per entry (flat across d means linear time):", "",
              "| d | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for d, t in results.items():
        lines.append(f"| {d:,} | " + " | ".join(f"{t[c] / d * 1e9:.2f}" for c in cols) + " |")
    lines += ["", "Ratio to `torch.sort` of the same scores:", "",
              "| d | " + " | ".join(OPS) + " |", "|---:|" + "---:|" * len(OPS)]
    for d, t in results.items():
        lines.append(f"| {d:,} | " + " | ".join(f"{t[c] / t['torch.sort']:.3f}" for c in OPS)
                     + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main-size", type=int, default=25_500_000)
    parser.add_argument("--sizes", type=int, nargs="*",
                        default=[1_000_000, 4_000_000, 16_000_000, 64_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--note", default="", help="a line added under the device name")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        args.main_size, args.sizes, args.repeats, args.sweep_repeats = 2_000_000, [
            500_000, 2_000_000], 3, 2
    load_before = os.getloadavg()
    started = time.perf_counter()
    main_times = run_size(args.main_size, args.repeats, device)
    sweep: dict[int, dict[str, float]] = {}
    skipped = []
    for d in args.sizes:
        if not fits(d, device):
            skipped.append(d)
            continue
        sweep[d] = run_size(d, args.sweep_repeats, device)
        print(f"d = {d:,} done", flush=True)
    load_after = os.getloadavg()
    lines = [
        "# Speed of the mask operators against a sort",
        "",
        f"Produced by `benchmarks/topk_speed.py` (torch {torch.__version__}).",
        "",
        f"Device: {device_description(device)}.",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}; "
        f"the run took {time.perf_counter() - started:.0f} s.",
    ]
    if args.note:
        lines += ["", args.note]
    lines += ["", f"Median of {args.repeats} runs (sort: {max(1, args.repeats // 2)}) after a "
              f"warm-up; budget {FRACTION:.0%} of the entries, beta {BETA}.", ""]
    lines += main_table(args.main_size, main_times)
    lines += ["", "### Scaling sweep", "",
              f"Median of {args.sweep_repeats} runs per size."
              + (f" Skipped (memory): {', '.join(f'{d:,}' for d in skipped)}." if skipped
                 else ""), ""]
    lines += sweep_table(sweep)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
