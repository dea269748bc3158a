"""The Spartan mask work of one step, in elementwise passes over the masked weights.

One question: how many elementwise passes over all masked weights does the mask work of a
training step cost? A pass is measured in the same process on the same tensors:
``torch.mul(theta, 2.0, out=buffer)`` for every masked weight (read every entry, write a result
into a buffer allocated beforehand, so that no fresh memory is faulted in while timing), the
median of several. Then, for a model mid-anneal (``ts.DualAveraging`` defaults, the schedules
shifted to ``--start-step`` of 1000 steps, so the hard masks change at every step):

- ``mask update``: ``opt.step()`` minus the base SGD step (its step hooks delimit it), after the
  weights and gradients of a step: checks, hard selection, soft threshold, mask writes;
- ``masked forward+backward``: reading every masked weight through its parametrization and
  back-propagating a random gradient into ``theta``, minus the same for plain weights
  (``w = theta``: nothing but the autograd bookkeeping).

Each is reported in seconds and as a multiple of the pass: the mask update's target is "about 10
elementwise passes over the scores" on a CPU. CPU time of this process (``time.process_time``)
with one thread, so that other processes on the machine count less; the mask update's two paths
are measured: the CPU default (a piece per tensor) and the sync-free path (packed, the default
on CUDA), forced here.

Usage::

    python benchmarks/mask_passes.py --out benchmarks/results/mask_passes
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
from machine import cpu_name
from step_runner import SPECS, build_model, make_dual, record_of, sparsify_model

import torchspartan as ts

LABELS = {"resnet50": "ResNet-50 (unstructured, global, 95%)",
          "vit_b_16": "ViT-B/16 (16x16 blocks, global, 90%)"}


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(name: str, sync_free: bool, args: argparse.Namespace) -> dict[str, Any]:
    spec = SPECS[name]
    torch.manual_seed(0)
    model = build_model(name).train()
    names = sparsify_model(model, spec)
    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    opt = make_dual(model, base, spec.sparsity, spec.beta_target, 1000, args.start_step)
    opt.updater.solver.sync_free = sync_free  # type: ignore[attr-defined]
    refs = ts.find_masks(model)
    thetas = [r.theta for r in refs]
    numel = sum(t.numel() for t in {id(t): t for t in thetas}.values())
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=gen) * 1e-3 for t in thetas]

    with torch.no_grad():
        buffers = [torch.empty_like(t) for t in thetas]

        def one_pass_of_all() -> None:
            for t, b in zip(thetas, buffers, strict=True):
                torch.mul(t, 2.0, out=b)

        one_pass_of_all()
        one_pass = median_time(one_pass_of_all, args.repeats)

    def masked_fwd_bwd() -> None:
        weights = [getattr(r.module, r.tensor_name) for r in refs]
        torch.autograd.backward(weights, grads)

    plain = [t.detach().clone().requires_grad_() for t in thetas]

    def plain_fwd_bwd() -> None:
        torch.autograd.backward([p.view_as(p) for p in plain], grads)

    marks: dict[str, float] = {}
    base.register_step_pre_hook(lambda *_: marks.__setitem__("pre", time.process_time()))
    base.register_step_post_hook(lambda *_: marks.__setitem__("post", time.process_time()))
    updates, fwd_bwd = [], []
    for i in range(args.warmup + args.repeats):
        opt.zero_grad()
        t0 = time.process_time()
        masked_fwd_bwd()
        t1 = time.process_time()
        opt.step()
        t2 = time.process_time()
        if i >= args.warmup:
            fwd_bwd.append(t1 - t0)
            updates.append((t2 - t1) - (marks["post"] - marks["pre"]))
    plain_time = median_time(plain_fwd_bwd, args.repeats)
    update = statistics.median(updates)
    masked = statistics.median(fwd_bwd) - plain_time
    return {
        "model": name, "label": LABELS[name], "sync_free": sync_free,
        "masked_tensors": len(names), "masked_weights": numel,
        "pass_s": one_pass, "mask_update_s": update, "masked_fwd_bwd_s": masked,
        "mask_update_passes": update / one_pass, "masked_fwd_bwd_passes": masked / one_pass,
        "update_samples_s": updates, "record": record_of(opt),
    }


def render(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [
        "# Spartan mask work in elementwise passes over the masked weights (CPU)",
        "",
        f"- CPU: {env['cpu']}, {env['cores']} logical cores, torch threads {env['threads']}; "
        f"torch {env['torch']}; load average at start {env['load_start']}, at end "
        f"{env['load_end']}; library at git `{env['git']}`, {env['date']}",
        "- A pass: `torch.mul(theta, 2.0, out=buffer)` over every masked weight (median of "
        f"{res['args']['repeats']}). Mask update: `opt.step()` minus the base SGD step, "
        "mid-anneal (hard masks change every step). Masked forward+backward: every masked "
        "weight through its parametrization and a random gradient back into it, minus the same "
        "for plain weights. CPU time of the process (`time.process_time`), medians.",
        f"- Schedules shifted to start at step {res['args']['start_step']} of 1000; the density "
        "and beta of the last measured update, and its Newton evaluations, are in the table.",
        "",
        "| model | masked weights | mask-update path | density, beta (Newton evaluations) | "
        "one pass | mask update | in passes | masked fwd+bwd | in passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        path = "sync-free (packed; CUDA default)" if r["sync_free"] else "CPU default"
        rec = r.get("record") or {}
        at = (f"{rec['density']:.3f}, {rec['beta']:.3g} ({rec['iterations']})" if rec
              else "-")
        lines.append(
            f"| {r['label']} | {r['masked_weights'] / 1e6:.1f}M in {r['masked_tensors']} | "
            f"{path} | {at} | {r['pass_s'] * 1e3:.1f} ms | {r['mask_update_s'] * 1e3:.0f} ms | "
            f"**{r['mask_update_passes']:.1f}** | {r['masked_fwd_bwd_s'] * 1e3:.0f} ms | "
            f"{r['masked_fwd_bwd_passes']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"], choices=LABELS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--start-step", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_start": round(os.getloadavg()[0], 2)}
    rows = []
    for name in args.models:
        for sync_free in (False, True):
            rows.append(measure(name, sync_free, args))
            r = rows[-1]
            print(f"[{name} sync_free={sync_free}] pass {r['pass_s'] * 1e3:.1f} ms, update "
                  f"{r['mask_update_s'] * 1e3:.0f} ms = {r['mask_update_passes']:.1f} passes, "
                  f"masked fwd+bwd {r['masked_fwd_bwd_passes']:.1f} passes", file=sys.stderr)
    env["load_end"] = round(os.getloadavg()[0], 2)
    env["git"] = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or "unknown"
    env["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res = {"env": env, "args": vars(args), "rows": rows}
    text = render(res)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
