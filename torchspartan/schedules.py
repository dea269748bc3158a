"""Schedules: callables ``step -> value`` for the density and the sharpness ``beta``.

Any callable ``Callable[[int], float]`` works where a schedule is expected; these are the
built-in shapes. Outside ``[begin, end]`` a schedule holds its end values.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torchspartan._checks import schedule_value

__all__ = ["Phases", "Schedule", "constant", "cosine", "linear", "values_at"]

Schedule = Callable[[int], float]


def _check_steps(begin: int, end: int) -> tuple[int, int]:
    ok = all(isinstance(x, (int, numbers.Integral)) and not isinstance(x, bool)
             for x in (begin, end))
    if not ok or begin < 0 or end < begin:
        raise ValueError(
            f"a schedule needs integer steps 0 <= begin <= end, got begin={begin!r}, end={end!r}"
        )
    return int(begin), int(end)


def _check_value(name: str, value: float) -> float:
    """``value`` as a float: any real number (numpy scalars included), finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)) or (
            not math.isfinite(value)):
        raise ValueError(f"a schedule's {name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Interpolated:
    start: float
    stop: float
    begin: int
    end: int
    shape: str

    def __call__(self, step: int) -> float:
        if step <= self.begin:
            return self.start
        if step >= self.end:
            return self.stop
        frac = (step - self.begin) / (self.end - self.begin)
        if self.shape == "cosine":
            frac = 0.5 * (1 - math.cos(math.pi * frac))
        return self.start + (self.stop - self.start) * frac


def linear(start: float, stop: float, begin: int, end: int) -> Schedule:
    """``start`` until step ``begin``, then linearly to ``stop`` at step ``end``, then ``stop``.

    Example:
        >>> import torchspartan as ts
        >>> s = ts.linear(1.0, 0.1, begin=0, end=10)
        >>> s(0), round(s(5), 6), s(99)
        (1.0, 0.55, 0.1)
    """
    begin, end = _check_steps(begin, end)
    return _Interpolated(_check_value("start", start), _check_value("stop", stop), begin, end,
                         "linear")


def cosine(start: float, stop: float, begin: int, end: int) -> Schedule:
    """Like :func:`linear` with a half-cosine ramp (flat at both ends).

    Example:
        >>> import torchspartan as ts
        >>> round(ts.cosine(1.0, 0.0, begin=0, end=10)(5), 6)
        0.5
    """
    begin, end = _check_steps(begin, end)
    return _Interpolated(_check_value("start", start), _check_value("stop", stop), begin, end,
                         "cosine")


def constant(value: float) -> Schedule:
    """The same value at every step."""
    value = _check_value("value", value)
    return _Interpolated(value, value, 0, 0, "linear")


@dataclass(frozen=True)
class Phases:
    """The schedules of one run and its two phases: the anneal, then fine-tuning with frozen
    masks from step ``finetune_start`` on (after ``total_steps + 1``: never).

    Build it with :meth:`plan`; :meth:`at` gives the checked values of one step.
    """

    density: Schedule
    beta: Schedule
    finetune_start: int

    @classmethod
    def plan(
        cls,
        sparsity: float,
        total_steps: int,
        density: Schedule | None,
        beta: Schedule | None,
        beta_target: float,
        anneal_fraction: float,
        finetune_fraction: float,
    ) -> Phases:
        """The default schedules where none is given (density linear from 1 to ``1 - sparsity``
        over the first ``anneal_fraction`` of the steps, beta linear from 1 to ``beta_target``
        until the freeze), checked against the freeze.

        Raises:
            ValueError: the default density schedule would reach its target only after the
                masks freeze (the message gives the largest ``anneal_fraction`` that fits).

        Warns:
            UserWarning: a given density schedule that has not reached ``1 - sparsity`` by the
                last mask update before the freeze.
        """
        finetune_start = (total_steps - int(round(finetune_fraction * total_steps))
                          if finetune_fraction > 0 else total_steps + 1)
        # the masks of the last update before the freeze are the final ones
        last_update = min(finetune_start - 1, total_steps)
        anneal_end = max(1, int(round(anneal_fraction * total_steps)))
        if density is None and anneal_end > last_update:
            final = 1.0 - (1.0 - (1.0 - sparsity)) * last_update / anneal_end
            raise ValueError(
                f"the density reaches its target {1 - sparsity:g} at step {anneal_end} "
                f"(anneal_fraction={anneal_fraction:g}), but the masks freeze at step "
                f"{finetune_start} (finetune_fraction={finetune_fraction:g} of "
                f"total_steps={total_steps}), so the final sparsity would be "
                f"{1 - final:.3g} instead of {sparsity:g}; use a smaller anneal_fraction (at "
                f"most {max(0, last_update) / total_steps:.3g} here), finetune_fraction=0, or "
                f"more total_steps"
            )
        phases = cls(
            density if density is not None else linear(1.0, 1.0 - sparsity, 0, anneal_end),
            beta if beta is not None
            else linear(1.0, beta_target, 0, max(1, min(finetune_start, total_steps))),
            finetune_start,
        )
        phases.at(0)
        if density is not None:
            final_density, _ = phases.at(max(0, last_update))
            if abs(final_density - (1.0 - sparsity)) > 1e-6:
                warnings.warn(
                    f"the density schedule gives {final_density:.6g} at step {last_update}, the "
                    f"last mask update before the freeze, but sparsity={sparsity:g} asks for "
                    f"{1 - sparsity:.6g}; the final sparsity follows the schedule",
                    UserWarning, stacklevel=3,
                )
        return phases

    def at(self, t: int) -> tuple[float, float]:
        """The density and beta of step ``t``, checked (:func:`values_at`)."""
        return values_at(self.density, self.beta, t)


def values_at(density: Schedule, beta: Schedule, t: int) -> tuple[float, float]:
    """The density and beta that ``density`` and ``beta`` give at step ``t``, checked.

    Raises:
        TypeError / ValueError: a value that is not a number, a density outside ``(0, 1]``, a
            beta that is not finite and > 0 (naming the schedule and the step).
    """
    d = schedule_value("density", density(t), t)
    if not 0.0 < d <= 1.0:
        raise ValueError(
            f"the density schedule gave {d!r} at step {t}; densities must be numbers in (0, 1]"
        )
    b = schedule_value("beta", beta(t), t)
    if not (b > 0 and math.isfinite(b)):
        raise ValueError(f"the beta schedule gave {b!r} at step {t}; need a finite beta > 0")
    return d, b
