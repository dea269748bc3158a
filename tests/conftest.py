"""Test-wide settings: denormals flushed (as in training), Hypothesis profiles.

Profiles (select with ``HYPOTHESIS_PROFILE=<name>``): ``default`` (quick, for every run and CI),
``thorough`` (ten times the examples, for a change to the solvers).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_flush_denormal(True)

settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,  # shared CPUs: timings vary too much for per-example deadlines
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
