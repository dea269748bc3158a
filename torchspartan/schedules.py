"""Schedules: callables ``step -> value`` for the density and the sharpness ``beta``.

Any callable ``Callable[[int], float]`` works where a schedule is expected; these are the
built-in shapes. Outside ``[begin, end]`` a schedule holds its end values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Schedule", "constant", "cosine", "linear"]

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
