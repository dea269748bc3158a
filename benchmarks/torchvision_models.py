"""Every torchvision classification model through the defaults: ``ts.sparsify``, a few
``ts.DualAveraging`` steps, ``ts.finalize``.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (randomly
initialised, ``num_classes=10``, batch 2, a small input): register the default masks, train
``--steps`` steps at ``--sparsity`` over the masked tensors (global allocation, SGD), finalize,
and check that the masks keep exactly ``floor((1 - sparsity) * N + 0.5)`` of the ``N`` masked
weights, that the finalized masked tensors have that sparsity, and that the losses and the
finalized model's outputs are finite. Each model runs in its own process (``--one NAME`` runs
one in this process and prints its JSON row).

    python -m benchmarks.torchvision_models                  # all; writes the results table
    python -m benchmarks.torchvision_models --only resnet18 vit_b_16
    python -m benchmarks.torchvision_models --render         # the .md from the .json again

Results: ``benchmarks/results/torchvision_models.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchspartan as ts

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZE = 64
# Models that need another input, or other constructor arguments, and why.
SPECIAL: dict[str, tuple[int, dict[str, Any], str]] = {
    "inception_v3": (80, {"aux_logits": False, "init_weights": True},
                     "needs >= 75 px; auxiliary head off (training returns one output)"),
    "googlenet": (DEFAULT_SIZE, {"aux_logits": False, "init_weights": True},
                  "auxiliary heads off (training returns one output)"),
    "maxvit_t": (224, {}, "its partition size 7 needs 224 px"),
    "vit_b_16": (32, {"image_size": 32}, "built for 32 px (2x2 patches)"),
    "vit_b_32": (64, {"image_size": 64}, "built for 64 px (2x2 patches)"),
    "vit_l_16": (32, {"image_size": 32}, "built for 32 px (2x2 patches)"),
    "vit_l_32": (64, {"image_size": 64}, "built for 64 px (2x2 patches)"),
    "vit_h_14": (28, {"image_size": 28}, "built for 28 px (2x2 patches)"),
}


def build(name: str) -> tuple[nn.Module, int, str]:
    import torchvision

    size, kwargs, note = SPECIAL.get(name, (DEFAULT_SIZE, {}, ""))
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return model, size, note


def run(name: str, steps: int = 4, sparsity: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """One model through the defaults; a row of the results table."""
    torch.manual_seed(seed)
    model, size, note = build(name)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage warnings and layer collapse are reported
        names = ts.sparsify(model)
        opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.01), model,
                               sparsity=sparsity, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        losses, times = [], []
        for _ in range(steps):
            x = torch.randn(2, 3, size, size, generator=g)
            y = torch.randint(0, 10, (2,), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        refs = ts.find_masks(model)
        unique = {id(r.mask): r for r in refs}.values()
        masked = sum(r.theta.numel() for r in unique)
        kept = sum(int(r.mask.hard_mask.sum()) * r.mask.block_numel for r in unique)
        collapsed = sorted(opt.updater.collapsed)
        ts.finalize(model)
    report = ts.sparsity_report(model)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size, generator=g))
    want = math.floor((1 - sparsity) * masked + 0.5)
    return {
        "model": name,
        "input": size,
        "params": n_params,
        "masked_tensors": len(names),
        "masked_share": names.masked_fraction,
        "left_dense_2d": sum(names.left.values()),
        "masked_weights": masked,
        "kept": kept,
        "kept_expected": want,
        "mask_sparsity": 1 - kept / masked,
        "masked_sparsity": report.masked_sparsity,
        "weight_sparsity": report.weight_sparsity,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "output_finite": bool(torch.isfinite(out).all()),
        "collapsed_layers": len(collapsed),
        "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "note": note,
    }


def ok(row: dict[str, Any], sparsity: float) -> bool:
    """The row meets the target: exact kept count, finalized sparsity at the target (a kept
    weight may be exactly 0, so up to a few more zeros), finite losses and outputs."""
    if "error" in row:
        return False
    n = row["masked_weights"]
    return (row["kept"] == row["kept_expected"]
            and row["masked_sparsity"] >= row["mask_sparsity"] - 0.5 / n
            and row["masked_sparsity"] <= row["mask_sparsity"] + 1e-3
            and abs(row["mask_sparsity"] - sparsity) <= 1.0 / n
            and row["losses_finite"] and row["output_finite"])


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    rows = data["rows"]
    passed = sum(ok(r, meta["sparsity"]) for r in rows if "error" not in r)
    errors = [r for r in rows if "error" in r]
    commits = sorted({meta["commit"]} | {r["commit"] for r in rows if r.get("commit")})
    lines = [
        "# Every torchvision classification model through the defaults",
        "",
        f"`python -m benchmarks.torchvision_models` on the CPU ({meta['cpu']}, "
        f"{meta['threads']} threads, no GPU; "
        f"torch {meta['torch']}, torchvision {meta['torchvision']}; library at "
        f"{', '.join(commits)}).",
        "",
        f"Each model (random init, `num_classes=10`): `ts.sparsify(model)` (default layers), "
        f"`ts.DualAveraging(SGD(lr=0.01), model, sparsity={meta['sparsity']}, "
        f"total_steps={meta['steps']})` for {meta['steps']} steps at batch 2, `ts.finalize`. "
        f"Kept = weights the masks keep (exactly `floor({1 - meta['sparsity']:.2g} N + 0.5)` "
        f"of the N masked weights is the target); masked sparsity = zeros of the finalized "
        f"masked tensors (`ts.sparsity_report(model).masked_sparsity`); all weights (2-D) = "
        f"zeros over every tensor with >= 2 dims (`weight_sparsity`). Step times are in the "
        f"JSON only: the 2 cores were under load during the run.",
        "",
        f"**{passed} of {len(rows)} models at the target with finite losses and outputs**"
        + (f"; {len(errors)} did not run (below)." if errors else "."),
        "",
        "| model | input | params | masked share | left dense (2-D) | kept / target | "
        "masked sparsity | all weights (2-D) | collapsed layers | finite | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | | | | no: {r['error']} |")
            continue
        finite = "yes" if r["losses_finite"] and r["output_finite"] else "NO"
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params'] / 1e6:.1f}M | "
            f"{r['masked_share']:.1%} | {r['left_dense_2d']} | {r['kept']} / "
            f"{r['kept_expected']} | {r['masked_sparsity']:.4f} | {r['weight_sparsity']:.4f} | "
            f"{r['collapsed_layers']} | {finite} | {'yes' if ok(r, meta['sparsity']) else 'NO'} |"
        )
    notes = [(r["model"], r["note"]) for r in rows if r.get("note")]
    if notes:
        lines += ["", "Inputs other than 64 px, or other arguments:", ""]
        lines += [f"- {m}: {n}" for m, n in notes]
    lines += [
        "",
        "Collapsed layers: layers whose every weight the global budget pruned (raw |theta| "
        "scores across layers of different scale, random init, few steps); see the README's "
        "limitations (`min_density=` or `ts.ERK()` prevent it). They do not change the "
        "sparsity over the masked tensors.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--one", help="run one model in this process, print its JSON row")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "torchvision_models.json")
    parser.add_argument("--render", action="store_true", help="write the .md from the .json")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.one:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from machine import git_describe

        row = run(args.one, args.steps, args.sparsity)
        row["commit"] = git_describe()
        print(json.dumps(row))
        return
    if args.render:
        data = json.loads(args.out.read_text())
        args.out.with_suffix(".md").write_text(render(data))
        return
    import torchvision

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_name, git_describe

    names = args.only or torchvision.models.list_models(module=torchvision.models)
    data: dict[str, Any] = {
        "meta": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "torchvision": torchvision.__version__,
                 "python": platform.python_version(), "commit": git_describe(),
                 "steps": args.steps, "sparsity": args.sparsity},
        "rows": [],
    }
    if args.out.exists() and args.only:  # update those rows of an earlier full run
        old = json.loads(args.out.read_text())
        data["rows"] = [r for r in old["rows"] if r["model"] not in names]
    root = Path(__file__).resolve().parents[1]
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.torchvision_models", "--one", name,
               "--steps", str(args.steps), "--sparsity", str(args.sparsity)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                                  timeout=args.timeout, env={**os.environ})
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                why = "killed (out of memory?)" if proc.returncode < 0 else (
                    proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
                row = {"model": name, "error": why}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"over {args.timeout} s"}
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        data["rows"].append(row)
        print(json.dumps(row), flush=True)
        order = {n: k for k, n in enumerate(
            torchvision.models.list_models(module=torchvision.models))}
        data["rows"].sort(key=lambda r: order.get(r["model"], len(order)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(render(data))


if __name__ == "__main__":
    main()
