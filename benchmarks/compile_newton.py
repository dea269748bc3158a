"""Does compiling the mask update's inner pass pay? One Newton evaluation, three ways.

The inner pass of the mask update is a Newton evaluation of the budget equation: over every unit
value ``u``, ``m = sigmoid(beta u - beta tau)`` and the sums ``sum m`` and ``sum m^2`` (and, for
the soft top-k operator, ``m`` itself). Three implementations, timed in the same process on the
same ``u`` (ResNet-50's 25.5M masked weights by default):

- ``eager``: the four ops of the engine's plain route (``add``, ``sigmoid_``, ``sum``, ``dot``)
  over the whole buffer (what a GPU runs);
- ``chunked``: the engine's CPU route (``_chunks.sigmoid_sums``: the same ops a cache-sized chunk
  at a time, the mask never written out);
- ``compiled``: ``torch.compile`` of the same expression, sums only and with the mask returned,
  with dynamic shapes (one compilation for every tensor size); compile time reported apart.

Each is reported in milliseconds, as a multiple of the eager route, and with the relative error of
its ``sum m`` against a float64 reference (the solve stops at a relative budget error of 1e-6, so
an evaluation must be well inside that). CPU time of this process, one thread, medians.

Usage::

    python benchmarks/compile_newton.py --out benchmarks/results/compile_newton
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from machine import cpu_name, git_describe

from torchspartan._chunks import sigmoid_sums


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def eager(u: torch.Tensor, beta: float, shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
    m = torch.add(shift, u, alpha=beta).sigmoid_()
    return m.sum(), torch.dot(m, m)


def expression(u: torch.Tensor, beta: torch.Tensor, shift: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.sigmoid(u * beta + shift)
    return m.sum(), (m * m).sum()


def expression_with_mask(u: torch.Tensor, beta: torch.Tensor, shift: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = torch.sigmoid(u * beta + shift)
    return m, m.sum(), (m * m).sum()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=25_557_032)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load_start = round(os.getloadavg()[0], 2)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(args.numel, generator=g).abs_().mul_(0.02)  # |theta| of a trained-ish net
    beta = 200.0
    tau = float(torch.quantile(u[::97], 0.95))  # 5% of the entries above the threshold
    shift = torch.tensor(-beta * tau)
    reference = torch.sigmoid(u.double() * beta - beta * tau).sum().item()
    rows: list[dict[str, Any]] = []

    def add(route: str, fn: Callable[[], Any], total: float, compile_s: float | None = None
            ) -> None:
        rows.append({"route": route, "ms": median_ms(fn, args.repeats),
                     "rel_error": abs(total - reference) / reference, "compile_s": compile_s})
        print(f"[{route}] {rows[-1]['ms']:.1f} ms", file=sys.stderr)

    add("eager (4 ops over the buffer)", lambda: eager(u, beta, shift),
        float(eager(u, beta, shift)[0]))
    add("chunked (the CPU route)", lambda: sigmoid_sums(u, beta, shift),
        float(sigmoid_sums(u, beta, shift)[0]))
    b = torch.tensor(beta)
    for name, fn in (("compiled, sums only", expression),
                     ("compiled, mask returned", expression_with_mask)):
        t0 = time.perf_counter()
        compiled = torch.compile(fn, dynamic=True)
        out = compiled(u, b, shift)
        compile_s = time.perf_counter() - t0
        total = float(out[-2])
        add(name, lambda c=compiled: c(u, b, shift), total, compile_s)  # type: ignore[misc]
    base = rows[0]["ms"]
    for r in rows:
        r["ratio"] = r["ms"] / base
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_start": load_start,
           "load_end": round(os.getloadavg()[0], 2), "git": git_describe(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines = [
        "# One Newton evaluation of the mask update: eager, chunked, compiled (CPU)",
        "",
        f"- CPU: {env['cpu']}, {env['cores']} logical cores, torch threads {env['threads']}; "
        f"torch {env['torch']}; load average at start {env['load_start']}, at end "
        f"{env['load_end']}; library at git `{env['git']}`, {env['date']}",
        f"- {args.numel:,} float32 unit values (|N(0, 0.02)|), beta {beta:g}, tau at their 95th "
        f"percentile; CPU time of the process, median of {args.repeats}. Error: relative error "
        "of `sum m` against float64 (the solve's tolerance is 1e-6 of the budget).",
        "",
        "| route | ms | x eager | relative error of sum m | compile time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        compile_text = "" if r["compile_s"] is None else f"{r['compile_s']:.1f} s"
        lines.append(f"| {r['route']} | {r['ms']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['rel_error']:.1e} | {compile_text} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"env": env, "args": vars(args), "rows": rows}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
