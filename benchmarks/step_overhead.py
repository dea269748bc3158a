"""How much does a Spartan training step cost over a dense one? (time, memory, scaling, compile)

One question, one script. In one process, a dense model and a Spartan copy of it
(same initial weights, same base optimizer: SGD with momentum 0.9) take training steps in turn
(dense, spartan, dense, spartan, ...) on the same random batch; after warm-up the median of the
repeats is reported, with the breakdown of a step into forward (with the loss), backward,
optimizer step (the base optimizer's own step, timed by its step hooks) and mask update
(everything else ``DualAveraging.step()`` does: the finite check and the mask update).

The Spartan model is measured in the middle of the annealing phase with a moving mask: with
``total_steps=1000`` and the default shapes (density linear from 1 to the target over the first
20% of the steps, beta linear from 1 to its target until fine-tuning at 80%), the schedules are
shifted by ``--start-step`` (default 100), so density and beta are strictly between 1 and their
targets and the hard mask changes at every step.

Also measured:

- peak memory of each configuration alone, in a fresh subprocess (``VmHWM`` of
  ``/proc/self/status``, i.e. peak RSS; plus ``torch.cuda.max_memory_allocated`` on CUDA);
- the mask update (and the masked-weight forward+backward of the parametrizations) against the
  number of masked weights, 1M..100M, on 8 ``Linear`` layers, for linearity;
- a ``torch.compile``'d Spartan model (``--compile``): graph count, graph breaks and their
  reasons, recompilations, compile time and step time, against the compiled dense model.

Targets written into the results: Spartan step <= 1.15x dense at batch 32 on CPU (<= 1.05x on
CUDA with AMP); peak memory <= dense + 2x the bytes of the masked weights; mask update linear in
the number of masked weights.

Usage::

    python benchmarks/step_overhead.py --quick                  # small models, a fast check
    python benchmarks/step_overhead.py --batch 32 8 --out benchmarks/results/step_overhead_cpu
    python benchmarks/step_overhead.py --device cuda --amp fp16 --batch 256 \\
        --models resnet50 --out benchmarks/results/step_overhead_gpu
    python benchmarks/step_overhead.py --render benchmarks/results/step_overhead_cpu  # JSON -> md

The pieces: ``step_runner.py`` builds the dense and Spartan models and times a step by phase,
``render_step_overhead.py`` writes the Markdown report (and judges the targets), ``machine.py``
names the device and the git commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import cpu_name, git_describe, sync
from render_step_overhead import render
from step_runner import SPECS, make_dual, make_runners, masked_numel, record_of
from torch import nn

import torchspartan as ts


# -- step time: dense and Spartan interleaved ------------------------------------------------
def bench_step(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dense, spartan, info = make_runners(name, batch, device, args.amp, args.start_step,
                                        args.channels_last, policy=args.policy,
                                        check_finite=not args.no_check_finite,
                                        fused=args.fused)
    log(f"[{name} b{batch}] {info['masked_weights'] / 1e6:.2f}M masked weights in "
        f"{info['masked_tensors']} tensors; warm-up {args.warmup}, repeats {args.repeats}")
    losses: dict[str, list[float]] = {"dense": [], "spartan": []}
    records = []
    for i in range(args.warmup + args.repeats):
        for r in (dense, spartan):
            loss = r.step(record=i >= args.warmup)
            losses[r.label].append(loss)
        records.append(record_of(spartan.opt))
        if i >= args.warmup:
            d, s = dense.times["total"][-1], spartan.times["total"][-1]
            log(f"  repeat {i - args.warmup}: dense {d:.3f}s spartan {s:.3f}s ({s / d:.3f}x) "
                f"mask update {spartan.times['mask_update'][-1]:.3f}s")
        else:
            log(f"  warm-up {i} done")
    pipelined: dict[str, list[float]] = {"dense": [], "spartan": []}
    for i in range(args.pipelined_rounds):
        for r in (dense, spartan):
            pipelined[r.label].append(r.pipelined(args.pipelined_steps))
        d, s = pipelined["dense"][-1], pipelined["spartan"][-1]
        log(f"  pipelined round {i}: dense {d:.4f}s spartan {s:.4f}s per step ({s / d:.3f}x)")
    out = dict(info)
    if pipelined["dense"]:
        out["pipelined"] = {k: statistics.median(v) for k, v in pipelined.items()}
        out["pipelined_samples"] = pipelined
        out["pipelined_ratio"] = out["pipelined"]["spartan"] / out["pipelined"]["dense"]
        records.append(record_of(spartan.opt))
    out["dense"] = dense.medians()
    out["spartan"] = spartan.medians()
    out["dense_samples"] = dense.times["total"]
    out["spartan_samples"] = spartan.times["total"]
    out["ratio"] = out["spartan"]["total"] / out["dense"]["total"]
    # ratio per interleaved pair, to show the spread under a noisy machine
    pair = [s / d for s, d in zip(spartan.times["total"], dense.times["total"], strict=True)]
    out["pair_ratio_min_max"] = [min(pair), max(pair)]
    out["records"] = records
    out["losses_finite"] = all(math.isfinite(v) for v in losses["dense"] + losses["spartan"])
    del dense, spartan
    return out


# -- peak memory in a fresh subprocess -------------------------------------------------------
def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration alone (called in a fresh process) and report its peaks."""
    torch.set_flush_denormal(True)
    device = torch.device(cfg["device"])
    hwm_start = vm_hwm_bytes()
    dense, spartan, info = make_runners(cfg["model"], cfg["batch"], device, cfg["amp"],
                                        cfg["start_step"], cfg["channels_last"])
    runner = dense if cfg["label"] == "dense" else spartan
    other = spartan if runner is dense else dense
    other_bytes = sum(p.numel() * p.element_size() for p in other.model.parameters())
    del other, dense, spartan
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg["steps"]):
        runner.step()
    out = {"label": cfg["label"], "vm_hwm": vm_hwm_bytes(), "vm_hwm_at_start": hwm_start,
           "other_model_bytes": other_bytes, "masked_weights": info["masked_weights"]}
    if device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def bench_memory(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of dense and Spartan, each alone in a fresh subprocess.

    Both configurations build both models (so that initialisation is identical) and delete the
    other before training; the copy's parameter bytes were resident briefly, so the RSS peak of
    both includes one extra model's parameters before training starts. Training peaks are larger
    than that at these batch sizes, and the comparison is like for like.
    """
    results = {}
    for label in ("dense", "spartan"):
        cfg = {"model": name, "batch": batch, "device": args.device, "amp": args.amp,
               "start_step": args.start_step, "channels_last": args.channels_last,
               "label": label, "steps": args.memory_steps, "threads": args.threads}
        proc = subprocess.run(
            [sys.executable, __file__, "--child-memory", json.dumps(cfg)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {label} failed:\n{proc.stderr[-3000:]}")
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"[{name} b{batch}] peak RSS {label}: {results[label]['vm_hwm'] / 2**20:.0f} MiB")
    masked_bytes = results["spartan"]["masked_weights"] * 4
    out = {"dense": results["dense"], "spartan": results["spartan"], "masked_bytes": masked_bytes}
    out["rss_extra"] = results["spartan"]["vm_hwm"] - results["dense"]["vm_hwm"]
    out["rss_met"] = out["rss_extra"] <= 2 * masked_bytes
    if "cuda_max_allocated" in results["dense"]:
        out["cuda_extra"] = (results["spartan"]["cuda_max_allocated"]
                             - results["dense"]["cuda_max_allocated"])
        out["cuda_met"] = out["cuda_extra"] <= 2 * masked_bytes
    return out


# -- mask update against the number of masked weights ---------------------------------------
def bench_scaling(sizes_m: list[float], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Mask update and masked-weight forward+backward on 8 Linear layers of N/8 weights each."""
    device = torch.device(args.device)
    rows = []
    n_layers, cols = 8, 1024
    for size in sizes_m:
        n = int(size * 1e6)
        rows_per = max(1, round(n / n_layers / cols))
        torch.manual_seed(0)
        layers = nn.ModuleList(
            nn.Linear(cols, rows_per, bias=False, device=device) for _ in range(n_layers)
        )
        ts.sparsify(layers)
        numel = masked_numel(layers)
        base = torch.optim.SGD(layers.parameters(), lr=1e-2)
        dual = make_dual(layers, base, 0.95, 10.0, 1000, args.start_step)
        thetas = [p for p in layers.parameters()]
        grads = [torch.randn_like(p) for p in thetas]
        marks: dict[str, float] = {}
        def mark(key: str, marks: dict[str, float] = marks) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                sync(device)
                marks[key] = time.perf_counter()

            return hook

        base.register_step_pre_hook(mark("pre"))
        base.register_step_post_hook(mark("post"))
        upd, fb = [], []
        for i in range(args.scaling_warmup + args.scaling_repeats):
            # masked-weight forward + backward through the parametrizations only
            sync(device)
            t0 = time.perf_counter()
            weights = [m.weight for m in layers]  # type: ignore[union-attr]
            torch.autograd.backward(weights, grads)
            sync(device)
            t1 = time.perf_counter()
            del weights
            dual.step()
            sync(device)
            t2 = time.perf_counter()
            if i >= args.scaling_warmup:
                fb.append(t1 - t0)
                upd.append((t2 - t1) - (marks["post"] - marks["pre"]))
            dual.zero_grad()
        rec = record_of(dual)
        rows.append({"masked_weights": numel, "mask_update": statistics.median(upd),
                     "masked_fwd_bwd": statistics.median(fb), "samples": upd, "record": rec})
        log(f"[scaling] {numel / 1e6:.1f}M weights: mask update {rows[-1]['mask_update']:.4f}s, "
            f"masked fwd+bwd {rows[-1]['masked_fwd_bwd']:.4f}s")
        del layers, base, dual, thetas, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def linear_fit(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Least-squares fit t = a + b N; R^2; and per-weight cost at the largest vs at 10% of it."""
    xs = [float(r["masked_weights"]) for r in rows]
    ys = [float(r[key]) for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    per = [y / x for x, y in zip(xs, ys, strict=True)]
    # superlinearity check: ns/weight at the largest size over the smallest size >= 10% of it
    big = xs.index(max(xs))
    mids = [i for i, x in enumerate(xs) if x >= 0.09 * xs[big] and i != big]
    ref = min(mids, key=lambda i: xs[i]) if mids else big
    return {"intercept_s": a, "ns_per_weight": b * 1e9, "r2": r2,
            "per_weight_ratio": per[big] / per[ref], "ref_weights": xs[ref]}


# -- torch.compile ----------------------------------------------------------------------------
def bench_compile(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch._dynamo as dynamo

    device = torch.device(args.device)
    dense, spartan, info = make_runners(name, batch, device, args.amp, args.start_step,
                                        args.channels_last)
    out: dict[str, Any] = {"model": name, "batch": batch, "backend": args.compile_backend,
                           "masked_weights": info["masked_weights"]}
    for r in (dense, spartan):
        dynamo.reset()
        entry: dict[str, Any] = {}
        try:
            with r.autocast():
                ex = dynamo.explain(r.model)(r.x)
            entry["graphs"] = ex.graph_count
            entry["graph_breaks"] = ex.graph_break_count
            reasons = []
            for br in ex.break_reasons:
                first = " ".join(str(br.reason).split())[:160]
                if first not in reasons:
                    reasons.append(first)
            entry["break_reasons"] = reasons[:6]
        except Exception as e:  # report, do not hide
            entry["explain_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        dynamo.reset()
        dynamo.utils.counters.clear()
        r.forward = torch.compile(r.model, backend=args.compile_backend)
        try:
            t0 = time.perf_counter()
            r.step(record=False)
            sync(device)
            entry["first_step_s"] = time.perf_counter() - t0
            for _ in range(args.compile_warmup):
                r.step(record=False)
            for _ in range(args.compile_repeats):
                r.step()
            entry["step"] = r.medians()
            stats = dynamo.utils.counters["stats"]
            entry["unique_graphs"] = int(stats.get("unique_graphs", 0))
            entry["frames_compiled"] = int(stats.get("calls_captured", 0))
            entry["frames_total"] = int(
                dynamo.utils.counters["frames"].get("total", 0))
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
        out[r.label] = entry
        log(f"[compile {name} b{batch}] {r.label}: "
            + ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("break_reasons",)))
        r.forward = None
    if "step" in out["dense"] and "step" in out["spartan"]:
        out["ratio"] = out["spartan"]["step"]["total"] / out["dense"]["step"]["total"]
    return out


# -- profile of one Spartan step ----------------------------------------------------------------
def bench_profile(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler table of one Spartan step and a cProfile of ``DualAveraging.step()``."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    _, spartan, _ = make_runners(name, batch, device, args.amp, args.start_step,
                                 args.channels_last)
    for _ in range(2):
        spartan.step(record=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        spartan.step(record=False)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=45)
    # the optimizer step alone under cProfile (Python functions of torchspartan)
    spartan.opt.zero_grad(set_to_none=True)
    with spartan.autocast():
        loss = spartan.loss_fn(spartan.model(spartan.x), spartan.y)
    loss.backward()
    pr = cProfile.Profile()
    pr.enable()
    spartan.opt.step()
    sync(device)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(r"torchspartan|torch\.", 30)
    text = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    log(f"[profile {name} b{batch}] done")
    return {"model": name, "batch": batch, "table": table, "cprofile": text}


# -- environment and command line ----------------------------------------------------------
def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype (fp16 uses torch.amp.GradScaler)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); on an oversubscribed machine 1 thread "
                        "avoids barrier waits that inflate many small kernels")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(SPECS))
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="resnet18 + a 2-layer ViT at 64 px, batch 8, scaling to 4M weights")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--start-step", type=int, default=100)
    p.add_argument("--pipelined-rounds", type=int, default=None,
                   help="rounds of back-to-back steps after the timing by phase (default: 5 on "
                        "CUDA, 0 on CPU, where waiting between phases costs nothing)")
    p.add_argument("--pipelined-steps", type=int, default=5, help="steps per pipelined round")
    p.add_argument("--policy", choices=("global", "nm24"), default="global",
                   help="the Spartan masks of the step timings: global (the model's spec) or "
                        "2:4 at 50%% on every Conv2d/Linear whose dim 1 four divides")
    p.add_argument("--no-check-finite", action="store_true",
                   help="ts.DualAveraging(check_finite=False): no host sync before the base step")
    p.add_argument("--fused", action="store_true",
                   help="SGD(fused=True) for both runs: GradScaler and the finite check skip "
                        "on the device instead of waiting for it")
    p.add_argument("--only", nargs="+",
                   choices=("steps", "memory", "scaling", "compile", "profile"),
                   default=("steps", "memory", "scaling"),
                   help="which parts to run (compile and profile are opt-in)")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--scaling-sizes", nargs="+", type=float, default=None,
                   help="millions of masked weights")
    p.add_argument("--scaling-warmup", type=int, default=1)
    p.add_argument("--scaling-repeats", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-models", nargs="+", default=None, choices=sorted(SPECS))
    p.add_argument("--compile-batch", type=int, default=None)
    p.add_argument("--compile-warmup", type=int, default=2)
    p.add_argument("--compile-repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="path stem: writes STEM.md and STEM.json")
    p.add_argument("--render", default=None, metavar="STEM",
                   help="re-write STEM.md from STEM.json (no measurement)")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.models = args.models or ["resnet18", "vit_tiny"]
        args.batch = args.batch or [8]
        args.scaling_sizes = args.scaling_sizes or [0.5, 1, 2, 4]
        args.warmup = 1 if args.warmup is None else args.warmup
        args.repeats = 3 if args.repeats is None else args.repeats
    args.models = args.models or (["resnet50"] if cuda else ["resnet50", "vit_b_16"])
    args.batch = args.batch or ([256] if cuda else [32, 8])
    args.scaling_sizes = args.scaling_sizes or [1, 3, 10, 30, 100]
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.repeats = (10 if cuda else 5) if args.repeats is None else args.repeats
    if args.pipelined_rounds is None:
        args.pipelined_rounds = 5 if cuda else 0
    args.compile_models = args.compile_models or args.models[:1]
    args.compile_batch = args.compile_batch or min(args.batch)
    return args


def main(argv: list[str] | None = None) -> None:
    torch.set_flush_denormal(True)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child_memory is not None:
        cfg = json.loads(args.child_memory)
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        print(json.dumps(child_memory(cfg)))
        return
    if args.render is not None:
        res = json.loads(Path(args.render + ".json").read_text())
        Path(args.render + ".md").write_text(render(res))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    import torchvision

    start = time.time()
    res: dict[str, Any] = {
        "device_name": device_name(args.device), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None
        else " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "git": git_describe(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "args": vars(args), "steps": [], "memory": [], "compile": [], "profile": [],
    }
    log(f"device: {res['device_name']}")

    def save() -> None:
        res["wall_s"] = time.time() - start
        res["load_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".json").write_text(json.dumps(res, indent=1, default=str))
            Path(args.out + ".md").write_text(render(res))

    for name in args.models:
        for batch in args.batch:
            if "steps" in args.only:
                res["steps"].append(bench_step(name, batch, args))
                save()
            if "memory" in args.only:
                res["memory"].append({"model": name, "batch": batch,
                                      "memory": bench_memory(name, batch, args)})
                save()
    if "scaling" in args.only:
        res["scaling"] = bench_scaling(args.scaling_sizes, args)
        res["scaling_fit"] = linear_fit(res["scaling"], "mask_update")
        res["scaling_fit_fwd_bwd"] = linear_fit(res["scaling"], "masked_fwd_bwd")
        save()
    if "profile" in args.only:
        res["profile"].append(bench_profile(args.models[0], min(args.batch), args))
        save()
    if "compile" in args.only:
        for name in args.compile_models:
            res["compile"].append(bench_compile(name, args.compile_batch, args))
            save()
    save()
    print(render(res))


if __name__ == "__main__":
    main()
