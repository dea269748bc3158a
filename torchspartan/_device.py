"""Host values onto the device without waiting for it.

``torch.tensor(values, device=cuda)`` copies from pageable host memory and then waits for the
stream: a host sync hidden in a constructor. :func:`to_device` makes the tensor on the host and
copies it with ``non_blocking=True``, which stages the values at once and returns without waiting
for the device's queued work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["to_device"]


def to_device(values: float | Sequence[float] | Sequence[int], device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` with no host sync."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
