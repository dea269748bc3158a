"""Markdown report of a ``step_overhead.py`` result (the JSON it writes next to it).

``python benchmarks/step_overhead.py --render STEM`` re-writes ``STEM.md`` from ``STEM.json``.
The verdicts against the targets (Spartan step <= 1.15x dense on CPU at batch 32, <= 1.10x on
CUDA at batch 256, judged on the pipelined steps where they were timed; peak memory <= dense +
2x the masked weights' bytes; mask update at most linear in the number of masked weights) are
made here.
"""

from __future__ import annotations

from typing import Any

from step_runner import PHASES

__all__ = ["CPU_RATIO_TARGET", "CUDA_RATIO_TARGET", "render"]

CPU_RATIO_TARGET = 1.15
CUDA_RATIO_TARGET = 1.10


def ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(res: dict[str, Any]) -> str:
    a = res["args"]
    cuda = a["device"].startswith("cuda")
    target = CUDA_RATIO_TARGET if cuda else CPU_RATIO_TARGET
    target_batch = 256 if cuda else 32
    policy = ("`ts.NM(2, 4)` at 50% (every Conv2d/Linear whose dim 1 four divides, no floors)"
              if a.get("policy") == "nm24" else "`ts.Global()`")
    lines = [
        f"# Spartan step overhead ({'CUDA' if cuda else 'CPU'})",
        "",
        f"- Device: {res['device_name']}",
        f"- torch {res['torch']}, torchvision {res['torchvision']}, Python {res['python']}",
        f"- Command: `{res['command']}` (library at git `{res.get('git', 'unknown')}`)",
        f"- Date: {res['date']}; wall time of the run {res['wall_s'] / 60:.1f} min; "
        f"load average at start {res['load_start']}, at end {res['load_end']} "
        f"(steps are interleaved and medians reported, so that a change of load hits both "
        f"configurations alike)",
        f"- AMP: {a['amp']}; channels_last: {a['channels_last']}; base optimizer SGD "
        f"(momentum 0.9, weight decay 1e-4{', fused=True' if a.get('fused') else ''}); "
        f"Spartan: `ts.DualAveraging`, {policy} policy"
        f"{', check_finite=False' if a.get('no_check_finite') else ''}, "
        f"total_steps=1000, schedules shifted to start at step {a['start_step']} (mid-anneal, "
        f"moving mask); warm-up {a['warmup']} + {a['repeats']} interleaved repeats per "
        f"configuration, medians.",
        "- Sparsity targets are over the masked tensors (`sparsity_of='masked'`): ResNet-50 95% "
        "(every Conv2d and the fc, beta target 10); ViT-B/16 90% with 16x16 blocks on the "
        "encoder's Linear layers and MHA in_proj (conv_proj and heads dense, beta target 20 x "
        "sqrt(256)).",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for s in res.get("steps", []):
        if s["batch"] == target_batch and "pipelined_ratio" in s:
            p = s["pipelined"]
            lines.append(
                f"| {s['model']} b{s['batch']}: Spartan step <= {target:.2f}x dense (pipelined) | "
                f"{s['pipelined_ratio']:.3f}x ({ms(p['spartan'])} / {ms(p['dense'])} ms) "
                f"| {met(s['pipelined_ratio'] <= target)} |")
        elif s["batch"] == target_batch:
            lines.append(
                f"| {s['model']} b{s['batch']}: Spartan step <= {target:.2f}x dense | "
                f"{s['ratio']:.3f}x ({ms(s['spartan']['total'])} / {ms(s['dense']['total'])} ms) "
                f"| {met(s['ratio'] <= target)} |")
    for m in res.get("memory", []):
        mm = m["memory"]
        lines.append(
            f"| {m['model']} b{m['batch']}: peak RSS <= dense + 2 x masked bytes "
            f"(+{mib(2 * mm['masked_bytes'])} MiB) | +{mib(mm['rss_extra'])} MiB "
            f"({mib(mm['spartan']['vm_hwm'])} vs {mib(mm['dense']['vm_hwm'])} MiB) | "
            f"{met(mm['rss_met'])} |")
        if "cuda_extra" in mm:
            lines.append(
                f"| {m['model']} b{m['batch']}: CUDA max allocated <= dense + 2 x masked bytes | "
                f"+{mib(mm['cuda_extra'])} MiB "
                f"({mib(mm['spartan']['cuda_max_allocated'])} vs "
                f"{mib(mm['dense']['cuda_max_allocated'])} MiB) | {met(mm['cuda_met'])} |")
    if res.get("scaling"):
        fit = res["scaling_fit"]
        ok = fit["per_weight_ratio"] <= 1.25
        lines.append(
            f"| mask update at most linear in #weights (time per weight at the largest size <= "
            f"1.25x that at {fit['ref_weights'] / 1e6:.1f}M, i.e. no superlinear growth over the "
            f"last decade; the fit t = a + bN is for information) | per-weight ratio "
            f"{fit['per_weight_ratio']:.2f}; fit a = {ms(fit['intercept_s'])} ms, b = "
            f"{fit['ns_per_weight']:.2f} ns/weight, R^2 {fit['r2']:.4f} | {met(ok)} |")
    if res.get("steps"):
        lines += ["", "## Step time (median, ms)", "",
                  "| model | batch | masked weights | config | forward | backward | optimizer | "
                  "mask update | total | ratio | pair ratio min..max |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in res["steps"]:
            for label in ("dense", "spartan"):
                t = s[label]
                ratio = f"{s['ratio']:.3f}x" if label == "spartan" else ""
                spread = (f"{s['pair_ratio_min_max'][0]:.2f}..{s['pair_ratio_min_max'][1]:.2f}"
                          if label == "spartan" else "")
                lines.append(
                    f"| {s['model']} | {s['batch']} | {s['masked_weights'] / 1e6:.2f}M | {label} | "
                    + " | ".join(ms(t[p]) for p in PHASES)
                    + f" | {ms(t['total'])} | {ratio} | {spread} |")
        piped = [s for s in res["steps"] if "pipelined" in s]
        if piped:
            lines += ["", f"## Step time, pipelined ({a['pipelined_rounds']} rounds of "
                      f"{a['pipelined_steps']} steps back to back, one device sync per round; "
                      "median ms per step)", "",
                      "The timing by phase above waits for the device between phases, so the "
                      "host's work (kernel launches, the library's syncs) cannot overlap the "
                      "device's. Here the steps run as in a training loop, the loss unread.", "",
                      "| model | batch | dense | spartan | ratio | round ratios min..max |",
                      "|---|---|---|---|---|---|"]
            for s in piped:
                rounds = [b / a for a, b in zip(s["pipelined_samples"]["dense"],
                                                s["pipelined_samples"]["spartan"], strict=True)]
                lines.append(f"| {s['model']} | {s['batch']} | {ms(s['pipelined']['dense'])} | "
                             f"{ms(s['pipelined']['spartan'])} | {s['pipelined_ratio']:.3f}x | "
                             f"{min(rounds):.2f}..{max(rounds):.2f} |")
        lines += ["", "Spartan state at the measured steps (last repeat): " + "; ".join(
            f"{s['model']} b{s['batch']}: step {s['records'][-1]['step']}, density "
            f"{s['records'][-1]['density']:.4f}, beta {s['records'][-1]['beta']:.3f}, Newton "
            f"evaluations {s['records'][-1]['iterations']}, mask change "
            f"{100 * s['records'][-1]['mask_change']:.3f}%"
            for s in res["steps"] if s["records"] and s["records"][-1]) + "."]
    if res.get("memory"):
        lines += ["", "## Peak memory (each configuration alone in a fresh process)", "",
                  "| model | batch | masked weights (MiB fp32) | dense peak RSS (MiB) | "
                  "Spartan peak RSS (MiB) | extra (MiB) | extra / masked bytes |"
                  + (" dense CUDA max alloc | Spartan CUDA max alloc | extra |" if cuda else ""),
                  "|---|---|---|---|---|---|---|" + ("---|---|---|" if cuda else "")]
        for m in res["memory"]:
            mm = m["memory"]
            row = (f"| {m['model']} | {m['batch']} | {mib(mm['masked_bytes'])} | "
                   f"{mib(mm['dense']['vm_hwm'])} | {mib(mm['spartan']['vm_hwm'])} | "
                   f"{mib(mm['rss_extra'])} | {mm['rss_extra'] / mm['masked_bytes']:.2f} |")
            if cuda and "cuda_extra" in mm:
                row += (f" {mib(mm['dense']['cuda_max_allocated'])} | "
                        f"{mib(mm['spartan']['cuda_max_allocated'])} | {mib(mm['cuda_extra'])} |")
            lines.append(row)
        lines += ["", f"Peak RSS is `VmHWM` after {a['memory_steps']} training steps."]
    if res.get("scaling"):
        fit = res["scaling_fit"]
        fit2 = res["scaling_fit_fwd_bwd"]
        lines += ["", "## Mask update against the number of masked weights", "",
                  "8 `nn.Linear(1024, N/8)` layers, global policy, 95% target, mid-anneal "
                  "(moving mask), SGD without momentum on random gradients; median of "
                  f"{a['scaling_repeats']} after {a['scaling_warmup']} warm-up. "
                  "'masked fwd+bwd' is the parametrizations alone: computing every masked "
                  "weight and back-propagating a random gradient through it.", "",
                  "| masked weights | mask update (ms) | ns / weight | masked fwd+bwd (ms) | "
                  "ns / weight | Newton evaluations |", "|---|---|---|---|---|---|"]
        for r in res["scaling"]:
            n = r["masked_weights"]
            lines.append(f"| {n / 1e6:.1f}M | {ms(r['mask_update'])} | "
                         f"{1e9 * r['mask_update'] / n:.2f} | {ms(r['masked_fwd_bwd'])} | "
                         f"{1e9 * r['masked_fwd_bwd'] / n:.2f} | "
                         f"{r['record']['iterations'] if r['record'] else ''} |")
        lines += ["", f"Least squares t = a + b N: mask update a = {ms(fit['intercept_s'])} ms, "
                  f"b = {fit['ns_per_weight']:.2f} ns/weight, R^2 = {fit['r2']:.4f}; masked "
                  f"fwd+bwd a = {ms(fit2['intercept_s'])} ms, b = {fit2['ns_per_weight']:.2f} "
                  f"ns/weight, R^2 = {fit2['r2']:.4f}."]
    for c in res.get("compile", []):
        lines += ["", f"## torch.compile ({c['model']} b{c['batch']}, backend "
                  f"{c['backend']!r})", "",
                  "| config | graphs | graph breaks | first step (s) | step (ms) | forward | "
                  "backward | optimizer | mask update | error |", "|---|---|---|---|---|---|---|"
                  "---|---|---|"]
        for label in ("dense", "spartan"):
            e = c[label]
            st = e.get("step", {})
            lines.append(
                f"| {label} | {e.get('graphs', '?')} | {e.get('graph_breaks', '?')} | "
                f"{e['first_step_s']:.1f} | " if "first_step_s" in e else
                f"| {label} | {e.get('graphs', '?')} | {e.get('graph_breaks', '?')} | - | ")
            lines[-1] += (" | ".join(ms(st[p]) for p in ("total", *PHASES)) if st
                          else "- | - | - | - | -") + f" | {e.get('error', '')} |"
        if "ratio" in c:
            lines += ["", f"Compiled Spartan / compiled dense: {c['ratio']:.3f}x."]
        reasons = c["spartan"].get("break_reasons", [])
        if reasons:
            lines += ["", "Distinct graph-break reasons of the Spartan model (first 6, "
                      "`torch._dynamo.explain`):", ""]
            lines += [f"- `{r}`" for r in reasons]
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    for pr in res.get("profile", []):
        lines += ["", f"## Profile of one Spartan step ({pr['model']} b{pr['batch']})", "",
                  "torch.profiler, top operators by self time:", "", "```", pr["table"].strip(),
                  "```", "", "cProfile of `DualAveraging.step()` (cumulative):", "", "```",
                  pr["cprofile"].strip(), "```"]
    lines.append("")
    return "\n".join(lines)

