"""What the benchmarks record about where they ran: CPU/GPU name, git commit; device sync."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_name", "git_describe", "sync"]


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo``, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_describe() -> str:
    """The commit the library was at, with ``-dirty`` when the working tree differs; in a copy
    without git history, ``$GIT_COMMIT`` (as a CI sets it) or "unknown"."""
    fallback = os.environ.get("GIT_COMMIT", "unknown")
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=False, cwd=Path(__file__).parent,
                              timeout=10).stdout.strip() or fallback
    except (OSError, subprocess.SubprocessError):
        return fallback


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
