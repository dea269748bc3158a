"""Schedules: callables ``step -> value`` for the density and the sharpness ``beta``.

Any callable ``Callable[[int], float]`` works where a schedule is expected; these are the
built-in shapes. Outside ``[begin, end]`` a schedule holds its end values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Schedule", "constant", "cosine", "linear"]

Schedule = Callable[[int], float]


def _check_steps(begin: int, end: int) -> None:
    if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end < begin:
        raise ValueError(
            f"a schedule needs integer steps 0 <= begin <= end, got begin={begin!r}, end={end!r}"
        )


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
    _check_steps(begin, end)
    return _Interpolated(float(start), float(stop), begin, end, "linear")


def cosine(start: float, stop: float, begin: int, end: int) -> Schedule:
    """Like :func:`linear` with a half-cosine ramp (flat at both ends).

    Example:
        >>> import torchspartan as ts
        >>> round(ts.cosine(1.0, 0.0, begin=0, end=10)(5), 6)
        0.5
    """
    _check_steps(begin, end)
    return _Interpolated(float(start), float(stop), begin, end, "cosine")


def constant(value: float) -> Schedule:
    """The same value at every step."""
    return _Interpolated(float(value), float(value), 0, 0, "linear")
