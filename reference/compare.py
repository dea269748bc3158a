"""Compare sparse training methods on Fashion-MNIST: accuracy vs sparsity, and mask dynamics.

Variants: dense; gradual magnitude pruning (gmp, global), Top-KAST (``ts.TopKAST``, global), RigL
(``ts.RigL``, ERK as in its paper) and Spartan (global); Spartan with uniform and ERK allocation;
Spartan with 4x4 blocks; Spartan with a 2:4 (N:M) pattern. Each unstructured or block variant runs
at 90%, 95% and 98% sparsity of all parameters, except the 4x4 blocks, counted over their masked
weights (the stem conv and the fc, which 4 does not divide, stay dense and hold 1466 parameters
with BatchNorm: 98% of all parameters would leave 89 weights, fewer than one 4x4 block per masked
conv); a variant whose sparsity is fixed runs at that one only: dense at 0%, 2:4 at 50% of its
masked weights (the pattern's; the stem conv, whose single input channel makes no group of 4,
stays dense). Every run has the same model, data (all 60000 training images), epoch budget and
seeds (3 by default); the table reports mean +- std over seeds. Every sparse method runs with the
library's default floors (no layer is emptied).

Each run is one ``python -m reference.fashion_mnist`` process (``--threads 1``), ``--jobs`` of them
at a time, writing ``reference/results/runs/<name>.json``. Runs whose JSON exists with the same
settings (training images, epochs, widths) are skipped, so an interrupted comparison resumes where
it stopped (a JSON of other settings, e.g. the earlier 30000-image runs, is redone), and
``--methods/--sparsities/--seeds`` select a subset. Afterwards (or with ``--report-only``) the
script writes

- ``reference/results/fashion_mnist.md``: settings and the mean +- std table,
- ``reference/results/fashion_mnist.json``: settings, aggregates, per-run summaries and the mean
  per-step mask-change curves,
- ``reference/results/accuracy_vs_sparsity.png`` and ``reference/results/mask_change.png``.

Usage::

    python -m reference.compare --jobs 2            # everything (about 4 CPU-hours)
    python -m reference.compare --methods spartan gmp --sparsities 0.95 --seeds 0
    python -m reference.compare --methods spartan-2:4 --jobs 1   # its own sparsity, 3 seeds
    python -m reference.compare --report-only       # tables and plots from existing runs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SETTINGS", "VARIANTS", "Run", "Variant", "aggregate", "is_done", "main", "plan_runs"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Variant:
    """One method configuration of the comparison (a row of the table).

    Attributes:
        name: short identifier used in ``--methods`` (and, with ``:`` made ``-``, file names).
        label: human-readable label for tables and plots.
        flags: extra ``reference.fashion_mnist`` flags selecting the method.
        sparsity: the variant's own target sparsity when the method fixes it (0 for dense, 0.5
            for 2:4, counted as its flags say), run instead of the ``--sparsities`` grid; None
            for variants that run at every sparsity of the grid.
    """

    name: str
    label: str
    flags: tuple[str, ...]
    sparsity: float | None = None

    @property
    def dense(self) -> bool:
        """True for the dense baseline (run once per seed, at 0% sparsity)."""
        return "dense" in self.flags

    @property
    def file_stem(self) -> str:
        """``name`` as it appears in run file names (``spartan-2-4`` for ``spartan-2:4``: no
        ``:`` in committed paths, which Windows checkouts cannot hold)."""
        return self.name.replace(":", "-")


VARIANTS: tuple[Variant, ...] = (
    Variant("dense", "dense", ("--method", "dense"), sparsity=0.0),
    Variant("gmp", "GMP (global)", ("--method", "gmp", "--policy", "global")),
    Variant("topkast", "Top-KAST (global)", ("--method", "topkast", "--policy", "global")),
    Variant("rigl", "RigL (ERK)", ("--method", "rigl", "--policy", "erk")),
    Variant("spartan", "Spartan (global)", ("--method", "spartan", "--policy", "global")),
    Variant("spartan-uniform", "Spartan (uniform)", ("--method", "spartan", "--policy", "uniform")),
    Variant("spartan-erk", "Spartan (ERK)", ("--method", "spartan", "--policy", "erk")),
    Variant(
        "spartan-4x4",
        "Spartan (global, 4x4 blocks; stem conv and fc unmasked)",
        # 4 divides neither the stem's single input channel nor the fc's 10 outputs; the
        # sparsity counts the masked convs (see the module docstring)
        (
            "--method",
            "spartan",
            "--block",
            "4x4",
            "--exclude",
            r"^stem\.",
            "--exclude",
            "^fc$",
            "--sparsity-of",
            "masked",
        ),
    ),
    Variant(
        "spartan-2:4",
        "Spartan (2:4, N:M; stem unmasked)",
        # 2 of every 4 consecutive input weights: the sparsity is the pattern's, 50% of the
        # masked weights; the stem conv has 1 input channel (no group of 4) and stays dense
        (
            "--method",
            "spartan",
            "--policy",
            "nm24",
            "--sparsity-of",
            "masked",
            "--exclude",
            r"^stem\.",
        ),
        sparsity=0.5,
    ),
)
"""The rows of the comparison, in table order."""

SPARSITIES: tuple[float, ...] = (0.90, 0.95, 0.98)
SEEDS: tuple[int, ...] = (0, 1, 2)

SETTINGS: dict[str, Any] = {
    "epochs": 3,
    "train_subset": None,  # all 60000 training images
    "widths": "16,32,64",
    "batch_size": 128,
    "lr": 0.1,
    "threads": 1,
}
"""Settings shared by every run (``reference.fashion_mnist`` flags); the full test set is used."""


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    variant: Variant
    sparsity: float
    seed: int

    @property
    def name(self) -> str:
        """File stem of the run, e.g. ``spartan-s95-seed0``, ``spartan-2-4-s50-seed1``."""
        return f"{self.variant.file_stem}-s{round(self.sparsity * 100):02d}-seed{self.seed}"

    def command(self, out: Path, settings: dict[str, Any]) -> list[str]:
        """The ``python -m reference.fashion_mnist`` command line of this run."""
        cmd = [sys.executable, "-m", "reference.fashion_mnist", *self.variant.flags]
        if not self.variant.dense:
            cmd += ["--sparsity", str(self.sparsity)]
        for key, value in settings.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        return [*cmd, "--seed", str(self.seed), "--no-progress", "--out", str(out)]


def plan_runs(
    methods: Sequence[str] | None = None,
    sparsities: Sequence[float] = SPARSITIES,
    seeds: Sequence[int] = SEEDS,
) -> list[Run]:
    """All runs of the selected variants, sparsities and seeds.

    A variant with a fixed :attr:`Variant.sparsity` (dense, 2:4) runs once per seed at that
    sparsity, whatever ``sparsities`` holds; the others at every one of ``sparsities``.

    Raises:
        ValueError: if a method name is not one of :data:`VARIANTS`.
    """
    known = {v.name: v for v in VARIANTS}
    chosen = list(VARIANTS) if not methods else []
    for name in methods or ():
        if name not in known:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(known)}")
        chosen.append(known[name])
    # Seed-major order: an interrupted comparison has every configuration at the first seeds.
    return [
        Run(variant, sparsity, seed)
        for seed in seeds
        for variant in chosen
        for sparsity in (sparsities if variant.sparsity is None else [variant.sparsity])
    ]


def is_done(path: Path, settings: dict[str, Any]) -> bool:
    """Whether ``path`` holds a finished run made with ``settings``' training images, epochs
    and widths (a run of other settings, e.g. the earlier 30000-image comparison, is redone)."""
    if not path.exists():
        return False
    try:
        config = json.loads(path.read_text())["config"]
    except (ValueError, KeyError):
        return False
    widths = [int(w) for w in str(settings["widths"]).split(",")]
    return (
        config.get("train_subset") == settings.get("train_subset")
        and config.get("epochs") == settings["epochs"]
        and list(config.get("widths", [])) == widths
    )


def _execute(run: Run, runs_dir: Path, settings: dict[str, Any]) -> tuple[Run, int, float]:
    out = runs_dir / f"{run.name}.json"
    log = runs_dir / f"{run.name}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        rc = subprocess.call(
            run.command(out, settings), stdout=handle, stderr=subprocess.STDOUT, cwd=_repo_root()
        )
    return run, rc, time.perf_counter() - start


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's JSON in ``runs_dir`` with its file stem under ``"name"``."""
    results = []
    for path in sorted(runs_dir.glob("*.json")):
        result = json.loads(path.read_text())
        result["name"] = path.stem
        results.append(result)
    return results


def _variant_of(result: dict[str, Any]) -> str:
    """``spartan-erk`` from a run named ``spartan-erk-s95-seed0``, ``spartan-2:4`` from
    ``spartan-2-4-s50-seed0`` (see :attr:`Run.name`); an unknown stem is returned as it is."""
    match = re.fullmatch(r"(.+)-s\d+-seed\d+", result["name"])
    if match is None:
        raise ValueError(
            f"run file {result['name']!r} does not follow <variant>-s<percent>-seed<seed>; "
            "remove it from the runs directory"
        )
    stems = {v.file_stem: v.name for v in VARIANTS}
    return stems.get(match.group(1), match.group(1))


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- std (over seeds) of accuracy, achieved sparsity and time per (variant, sparsity)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((_variant_of(r), r["config"]["sparsity"]), []).append(r)
    order = {v.name: i for i, v in enumerate(VARIANTS)}
    rows = []
    for (variant, sparsity), group in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])
    ):
        acc_mean, acc_std = _mean_std([r["test_accuracy"] for r in group])
        sp_mean, _ = _mean_std([r["achieved_sparsity"] for r in group])
        masked = [r.get("achieved_sparsity_masked") for r in group]
        time_mean, _ = _mean_std([r["time_s"]["total"] for r in group])
        exact = [r["nm_pattern_exact"] for r in group if "nm_pattern_exact" in r]
        rows.append(
            {
                "variant": variant,
                "target_sparsity": sparsity,
                "seeds": sorted(r["config"]["seed"] for r in group),
                "accuracy_mean": acc_mean,
                "accuracy_std": acc_std,
                "achieved_sparsity_mean": sp_mean,
                # over the masked tensors; None where a run did not record it (older runs)
                "achieved_sparsity_masked_mean": (
                    None if None in masked else _mean_std([float(m) for m in masked])[0]
                ),
                "sparsity_of": group[0]["config"]["sparsity_of"],
                "time_s_mean": time_mean,
                **({"nm_pattern_exact_all": all(exact)} if exact else {}),
            }
        )
    return rows


def _label(variant: str) -> str:
    return next((v.label for v in VARIANTS if v.name == variant), variant)


def _settings_text(results: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    c = results[0]["config"]
    machines: dict[str, list[float]] = {}
    for r in results:
        env = r["environment"]
        key = f"{env['cpu_count']}-core CPU, torch {env['torch']}"
        machines.setdefault(key, []).append(r["time_s"]["total"])
    where = "; ".join(
        f"{len(t)} runs on a {k} (mean {statistics.fmean(t):.0f} s per run)"
        for k, t in machines.items()
    )
    flags = {k: v for k, v in settings.items() if v is not None and k != "data_dir"}
    masked_of = sorted(
        {_label(_variant_of(r)) for r in results if r["config"]["sparsity_of"] == "masked"}
    )
    return (
        f"Model: SmallResNet widths {tuple(c['widths'])}, {c['blocks']} block(s) per stage, "
        f"{results[0]['params']} parameters. Training: {c['epochs']} epochs on "
        + (
            f"a random subset of {results[0]['train_images']} of the 60000 training images (the "
            "same subset per seed)"
            if c.get("train_subset")
            else f"all {results[0]['train_images']} training images"
        )
        + f", batch {c['batch_size']}, SGD Nesterov momentum {c['momentum']}, lr {c['lr']} "
        f"with {c['warmup']:.0%} warm-up and cosine decay, weight decay {c['weight_decay']} on "
        f"conv/linear weights, random flips. Test: the full {results[0]['test_images']}-image "
        "test set, after `ts.finalize`. Sparse runs use `ts.DualAveraging` defaults (density "
        "1 -> target over the first 20% of steps, beta 1 -> 10, mask frozen in the last 20%), "
        "Top-KAST and RigL their own (`ts.TopKAST`: sparse from the start, backward set of "
        "twice the density, exploration penalty = the weight decay, which the masked weights "
        "then lack; `ts.RigL`: sparse from the start, drop/grow every 100 steps with alpha 0.3 "
        "until 75% of the steps, frozen after); all with the default floors (no layer emptied); "
        "sparsity counts all parameters (BatchNorm included)"
        + (
            f", except for {', '.join(masked_of)}, whose target counts the masked weights only"
            if masked_of
            else ""
        )
        + ". "
        f"Each run is one process with {results[0]['environment']['threads']} thread(s): "
        f"{where}. Shared flags: {flags}."
    )


def write_markdown(
    rows: list[dict[str, Any]], results: list[dict[str, Any]], settings: dict[str, Any], path: Path
) -> None:
    """The settings paragraph and the accuracy table (methods x sparsities) as markdown.

    Columns: every target sparsity of a sparse row. A fixed-sparsity variant (2:4) fills only
    its own column ("-" elsewhere, as grid variants do in its column), and a column whose rows
    all count the masked weights says so in its header; the dense row repeats in every column.
    """
    sparsities = sorted({r["target_sparsity"] for r in rows if r["target_sparsity"] > 0})
    by_key = {(r["variant"], r["target_sparsity"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fixed = {v.name: v.sparsity for v in VARIANTS if v.sparsity is not None}
    grid = {r["target_sparsity"] for r in rows if r["variant"] not in fixed}

    def header(s: float) -> str:
        of = {r["sparsity_of"] for r in rows if r["target_sparsity"] == s}
        return f"{s:.0%} of masked weights" if of == {"masked"} else f"{s:.0%} sparse"

    def cell_text(r: dict[str, Any]) -> str:
        where = f"{100 * r['achieved_sparsity_mean']:.1f}%"
        if r["sparsity_of"] == "masked" and r["achieved_sparsity_masked_mean"] is not None:
            where += f" of all; {100 * r['achieved_sparsity_masked_mean']:.1f}% of masked"
        return (
            f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} [{where}] "
            f"(n={len(r['seeds'])})"
        )

    lines = [
        "# Fashion-MNIST: sparse training methods compared",
        "",
        "Generated by `python -m reference.compare`. Test accuracy (%), mean +- std over seeds "
        "(n = number of seeds); achieved sparsity of all parameters in brackets (and of the "
        "masked weights, for a target that counts those). A variant whose method fixes its "
        "sparsity runs at that one only (-: not part of its plan).",
        "",
        _settings_text(results, settings),
        "",
        "| method | " + " | ".join(header(s) for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    for variant in variants:
        if (variant, 0.0) in by_key:
            r = by_key[(variant, 0.0)]
            n = len(r["seeds"])
            cell = f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} (n={n})"
            lines.append(
                f"| {_label(variant)} (0% sparse) | " + " | ".join([cell] * len(sparsities)) + " |"
            )
            continue
        cells = []
        for s in sparsities:
            r = by_key.get((variant, s))
            planned = fixed[variant] == s if variant in fixed else s in grid
            cells.append(cell_text(r) if r is not None else ("not run" if planned else "-"))
        lines.append(f"| {_label(variant)} | " + " | ".join(cells) + " |")
    times = [r["time_s"]["total"] for r in results]
    lines += ["", *_collapse_notes(results), *_pattern_notes(rows)]
    notes = path.with_name(path.stem + "_notes.md")  # hand-written provenance and analysis
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    lines += [
        "",
        f"{len(results)} runs, {sum(times) / 60:.1f} min of process time in all "
        f"(mean {statistics.fmean(times):.0f} s per run, including data loading and evaluation).",
        "",
        "Plots: `accuracy_vs_sparsity.png` (mean +- std), `mask_change.png` (fraction of mask "
        "entries that changed at each step, 95% sparsity, mean over seeds).",
        "",
    ]
    path.write_text("\n".join(lines))


def collapsed_layers(result: dict[str, Any]) -> list[str]:
    """Weights left entirely zero after finalisation (a layer collapse), from the run's report."""
    names = []
    for line in result.get("sparsity_report", "").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].endswith(".weight") and fields[-1] == "100.00%":
            names.append(fields[0].removesuffix(".weight"))
    return names


def _collapse_notes(results: list[dict[str, Any]]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for r in results:
        layers = collapsed_layers(r)
        if layers:
            groups.setdefault(r["name"].rsplit("-seed", 1)[0], []).append(
                f"seed {r['config']['seed']}: {', '.join(layers)}"
            )
    if not groups:
        return ["No run ended with a fully pruned layer."]
    lines = [
        "Runs that ended with entirely pruned layers (layer collapse), from `ts.sparsity_report`:"
    ]
    lines += [f"- {name}: " + "; ".join(entries) for name, entries in sorted(groups.items())]
    return lines


def _pattern_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per N:M row: whether every run's finalized masked tensors kept the pattern."""
    lines = []
    for r in rows:
        if "nm_pattern_exact_all" in r:
            verdict = "held" if r["nm_pattern_exact_all"] else "did NOT hold"
            lines.append(
                f"{_label(r['variant'])}: the N:M pattern (at most n nonzeros in every group of m "
                f"consecutive input weights of every masked tensor, checked after `ts.finalize`) "
                f"{verdict} in all {len(r['seeds'])} runs."
            )
    return ["", *lines] if lines else []


def mask_change_curves(
    results: list[dict[str, Any]], sparsity: float = 0.95
) -> dict[str, list[float]]:
    """Per-step mask-change fraction averaged over seeds, per sparse variant, at ``sparsity``."""
    curves: dict[str, list[list[float]]] = {}
    for r in results:
        steps = r["steps"]["mask_change"]
        if steps and math.isclose(r["config"]["sparsity"], sparsity):
            curves.setdefault(_variant_of(r), []).append(steps)
    return {
        v: [statistics.fmean(col) for col in zip(*runs, strict=False)] for v, runs in curves.items()
    }


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs sparsity of all parameters per variant, error bars = std over seeds; dense
    as a band. Fixed-sparsity variants (2:4) sit in a narrow panel of their own on the left, at
    their achieved sparsity, so that the 90-98% grid keeps its resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {v.name for v in VARIANTS if v.sparsity is not None and not v.dense}
    side = [r for r in rows if r["variant"] in fixed]
    if side:
        fig, (ax_side, ax) = plt.subplots(
            1, 2, figsize=(11, 4.5), sharey=True, gridspec_kw={"width_ratios": [1, 4]}
        )
        axes = [ax_side, ax]
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        axes = [ax]
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = [r for r in rows if r["variant"] == variant]
        if pts[0]["target_sparsity"] == 0.0:
            m, s = 100 * pts[0]["accuracy_mean"], 100 * pts[0]["accuracy_std"]
            for a in axes:
                a.axhline(m, color="black", linestyle="--", linewidth=1, label=f"dense ({m:.2f}%)")
                a.axhspan(m - s, m + s, color="black", alpha=0.08)
            continue
        target = axes[0] if variant in fixed else ax
        label = _label(variant)
        if variant in fixed:
            label += f" [{100 * pts[0]['achieved_sparsity_mean']:.1f}% of all params]"
        target.errorbar(
            # the achieved sparsity of all parameters: the grid's targets (to 0.01%), and for a
            # target counted over the masked weights the honest position on this axis
            [100 * r["achieved_sparsity_mean"] for r in pts],
            [100 * r["accuracy_mean"] for r in pts],
            yerr=[100 * r["accuracy_std"] for r in pts],
            marker="s" if variant in fixed else "o",
            capsize=3,
            color=next(colors),
            label=label,
        )
    floor = 60.0  # keep the interesting range readable; points below are marked at the floor
    stacked: dict[tuple[bool, float], int] = {}
    for r in rows:
        x = 100 * r["achieved_sparsity_mean"]
        if r["target_sparsity"] > 0 and 100 * r["accuracy_mean"] < floor:
            # stacked per plotted target (achieved sparsities differ in the 4th digit)
            key = (r["variant"] in fixed, r["target_sparsity"])
            k = stacked[key] = stacked.get(key, -1) + 1
            (axes[0] if r["variant"] in fixed else ax).annotate(
                f"{r['variant']}: {100 * r['accuracy_mean']:.1f}%",
                xy=(x, floor),
                xytext=(x - 2.5, floor + 2 + 3 * k),
                fontsize=7,
                arrowprops={"arrowstyle": "->", "linewidth": 0.6},
            )
    ax.set_ylim(bottom=floor)
    title = "Fashion-MNIST, SmallResNet: accuracy vs sparsity (mean +- std over seeds)"
    if side:
        xs = [100 * r["achieved_sparsity_mean"] for r in side]
        ax_side.set_xlim(min(xs) - 3, max(xs) + 3)
        ax_side.set_title("fixed pattern", fontsize=9)
        ax_side.set_ylabel("test accuracy (%)")
        ax_side.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
        fig.supxlabel("sparsity (% of all parameters)", fontsize=10)
        handles, labels = [], []
        for a in (ax, ax_side):  # one legend: both panels' entries, dense once, grid first
            for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.set_xlabel("sparsity (% of all parameters)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_mask_change(curves: dict[str, list[float]], path: Path, window: int = 10) -> None:
    """Mask-change fraction per step (moving average over ``window`` steps), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    total = 0
    for variant in ("spartan", "topkast", "rigl", "gmp"):
        curve = curves.get(variant)
        if not curve:
            continue
        smoothed = [
            statistics.fmean(curve[max(0, i - window + 1) : i + 1]) for i in range(len(curve))
        ]
        steps = list(range(1, len(curve) + 1))
        ax.plot(steps, [v if v > 0 else float("nan") for v in smoothed], label=_label(variant))
        total = len(curve)
    if total:
        ax.axvspan(0, 0.2 * total, color="tab:blue", alpha=0.06, label="density ramp (20%)")
        ax.axvspan(0.8 * total, total, color="tab:gray", alpha=0.12, label="mask frozen (20%)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"fraction of mask entries changed (moving avg, {window} steps)")
    ax.set_title("Mask changes per step at 95% sparsity (mean over seeds; 0 once frozen)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs_dir: Path, results_dir: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Write the markdown table, the aggregate JSON and the two plots; return the table rows."""
    results = load_runs(runs_dir)
    if not results:
        raise FileNotFoundError(
            f"no finished runs in {runs_dir}; run `python -m reference.compare` first"
        )
    rows = aggregate(results)
    curves = mask_change_curves(results)
    write_markdown(rows, results, settings, results_dir / "fashion_mnist.md")
    summaries = [
        {k: v for k, v in r.items() if k not in ("steps", "sparsity_report")} for r in results
    ]
    (results_dir / "fashion_mnist.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "settings_text": _settings_text(results, settings),
                "table": rows,
                "runs": summaries,
                "mask_change_mean_at_95": curves,
            },
            indent=1,
        )
        + "\n"
    )
    plot_accuracy(rows, results_dir / "accuracy_vs_sparsity.png")
    plot_mask_change(curves, results_dir / "mask_change.png")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run the missing runs of the selection ``--jobs`` at a time, then write the report."""
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(
        prog="python -m reference.compare", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--methods", nargs="+", default=None, help=f"subset of {[v.name for v in VARIANTS]}"
    )
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses --threads)")
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    p.add_argument("--train-subset", type=int, default=SETTINGS["train_subset"])
    p.add_argument("--widths", default=SETTINGS["widths"])
    p.add_argument("--threads", type=int, default=SETTINGS["threads"])
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (see --help of runs)")
    p.add_argument("--runs-dir", type=Path, default=RESULTS_DIR / "runs")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--report-only", action="store_true", help="only rebuild tables and plots")
    p.add_argument("--dry-run", action="store_true", help="list the runs to do and exit")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    settings = {
        **SETTINGS,
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "widths": args.widths,
        "threads": args.threads,
        "data_dir": args.data_dir,
    }
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        runs = plan_runs(args.methods, args.sparsities, args.seeds)
    except ValueError as exc:
        p.error(str(exc))
    todo = [r for r in runs if not is_done(args.runs_dir / f"{r.name}.json", settings)]
    print(f"{len(runs)} runs selected, {len(runs) - len(todo)} already done, {len(todo)} to do")
    if args.dry_run:
        for r in todo:
            print(" ", r.name, " ".join(r.command(args.runs_dir / f"{r.name}.json", settings)[1:]))
        return
    failed = []
    if todo and not args.report_only:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), unit="run") as bar:
            futures = [pool.submit(_execute, r, args.runs_dir, settings) for r in todo]
            for future in as_completed(futures):
                run, rc, seconds = future.result()
                bar.update()
                status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {run.name}.log)"
                tqdm.write(f"{run.name}: {status} in {seconds:.0f} s")
                if rc != 0:
                    failed.append(run.name)
        print(f"runs finished in {(time.perf_counter() - start) / 60:.1f} min wall")
    rows = report(args.runs_dir, args.results_dir, settings)
    for r in rows:
        print(
            f"{_label(r['variant']):36s} {r['target_sparsity']:5.0%}  "
            f"{100 * r['accuracy_mean']:6.2f} +- {100 * r['accuracy_std']:.2f}  "
            f"(n={len(r['seeds'])})"
        )
    print(f"wrote {args.results_dir / 'fashion_mnist.md'} and plots")
    if failed:
        sys.exit(f"{len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
