"""Passes over the scores on a CPU, a cache-sized chunk at a time, and exact counts of flags.

On a CPU the mask update is bound by how often it reads the scores from memory and by a few
slow kernels (a comparison into ``bool`` takes about two elementwise passes, ``nonzero`` and
``count_nonzero`` one or more each). Here:

- :func:`sigmoid_sums`: one Newton evaluation of a piece, ``sum m`` and ``sum m^2`` (and
  ``sum m^3``) for ``m = sigmoid(beta u + shift)``, with the soft mask of a chunk kept in the
  cache (never written out): one read of ``u`` instead of four passes;
- :func:`split_window`: the flags ``u > b`` and the positions of ``a <= u <= b`` in one read of
  ``u`` (both comparisons on a chunk in the cache, into float flags, which compare at the speed
  of a multiplication);
- :func:`abs_max`: ``|x|`` and its largest value in one read of ``x``;
- :func:`count_true`: the number of True flags, summing the flags eight at a time as the bytes
  of 64-bit words (exact: each byte lane stays below 256);
- :func:`true_positions`: the positions of few True flags, found among the nonzero words.

Every function returns what the plain ``torch`` ops return, exactly (the sums up to the order of
their additions: chunk sums in float32, added in float64), on any device; the chunked routes run
on a CPU only (on a GPU one kernel per op is already the fast way).
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "abs_max", "count_true", "moments", "sigmoid_sums", "split_window",
           "true_positions"]

# Entries per chunk: 1 MiB of float32 scores, which stays in an L2 cache with its scratch (from
# 64k to 256k entries the update took the same time on one Xeon core; fewer chunks, fewer ops).
CHUNK = 1 << 18
# Below this many entries the plain ops are as fast.
_MIN_CHUNKED = 1 << 15
# Words summed before their byte lanes could reach 256.
_LANE_WORDS = 255


def _chunked(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() >= _MIN_CHUNKED and t.is_contiguous()


def _aligned(flags: torch.Tensor, multiple: int) -> tuple[int, int]:
    """``(start, length)`` of the longest run of ``flags`` (flat, bool) that starts on an 8-byte
    boundary of its storage and holds a multiple of ``multiple`` flags."""
    n = int(flags.numel())
    start = min(-int(flags.storage_offset()) % 8, n)
    return start, (n - start) // multiple * multiple


def count_true(flags: torch.Tensor) -> torch.Tensor:
    """The number of True entries of a bool tensor, int64 0-dim (``torch.count_nonzero``)."""
    flat = flags.reshape(-1)
    if not _chunked(flat):
        return torch.count_nonzero(flat)
    start, length = _aligned(flat, 8 * _LANE_WORDS)
    words = flat.narrow(0, start, length).view(torch.int64).view(-1, _LANE_WORDS)
    # every byte of a word is 0 or 1: a sum of 255 words has byte lanes <= 255, no carries
    lanes = words.sum(1).view(torch.uint8).sum(dtype=torch.int64)
    rest = torch.count_nonzero(flat[:start]) + torch.count_nonzero(flat[start + length:])
    return lanes + rest


def true_positions(flags: torch.Tensor) -> torch.Tensor:
    """Flat positions of the True entries, int64 1-D (``flags.reshape(-1).nonzero()``), fast
    when they are few: only the 8-byte words holding one are looked into."""
    flat = flags.reshape(-1)
    if not _chunked(flat):
        return torch.nonzero(flat).squeeze(1)
    start, length = _aligned(flat, 8)
    body = flat.narrow(0, start, length)
    words = torch.nonzero(body.view(torch.int64)).squeeze(1)
    inside = torch.nonzero(body.view(-1, 8).index_select(0, words))
    found = (words.index_select(0, inside[:, 0]) * 8).add_(inside[:, 1]).add_(start)
    head = torch.nonzero(flat[:start]).squeeze(1)
    tail = torch.nonzero(flat[start + length:]).squeeze(1).add_(start + length)
    return torch.cat([head, found, tail])


def split_window(units: torch.Tensor, low: float, high: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(units > high, positions of low <= units <= high)``: bool flags of the shape of
    ``units`` and int64 flat positions, in one read of ``units`` on a CPU."""
    if not _chunked(units):
        above = torch.gt(units, high)
        return above, true_positions(torch.ge(units, low).logical_xor_(above))
    flat = units.reshape(-1)
    above = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    inside = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    scratch = torch.empty(min(CHUNK, flat.numel()), dtype=flat.dtype, device=flat.device)
    for start in range(0, flat.numel(), CHUNK):
        u = flat[start:start + CHUNK]
        s, a, w = scratch[:u.numel()], above[start:start + CHUNK], inside[start:start + CHUNK]
        a.copy_(torch.gt(u, high, out=s))
        w.copy_(torch.ge(u, low, out=s)).logical_xor_(a)
    # the few positions found once at the end (a chunk at a time was a dozen small ops each)
    return above.view(units.shape), true_positions(inside)


def sigmoid_sums(units: torch.Tensor, beta: float, shift: torch.Tensor, cubes: bool = False
                 ) -> torch.Tensor:
    """``[sum m, sum m^2]`` of ``m = sigmoid(beta * units + shift)`` (``shift``: 0-dim, the
    units' dtype), with ``cubes`` also ``sum m^3``, float64; ``m`` is computed as
    ``torch.add(shift, units, alpha=beta).sigmoid_()`` (the same values as that expression), a
    chunk at a time."""
    flat = units.reshape(-1)
    if not _chunked(flat):
        return moments(torch.add(shift, flat, alpha=beta).sigmoid_(), cubes)
    # with cubes a quarter chunk, so that m and m^2 stay in the cache together (ResNet-50's
    # weights on one Xeon core: 3.0 passes with whole chunks, 2.5 with quarters; 1.9 without
    # the cubes)
    size = max(1, CHUNK // 4) if cubes else CHUNK
    chunks = -(-flat.numel() // size)
    scratch = torch.empty(min(size, flat.numel()), dtype=flat.dtype, device=flat.device)
    squares = torch.empty_like(scratch) if cubes else scratch
    sums = torch.empty(3 if cubes else 2, chunks, dtype=flat.dtype, device=flat.device)
    for k in range(chunks):
        u = flat[k * size:(k + 1) * size]
        m = torch.add(shift, u, alpha=beta, out=scratch[:u.numel()]).sigmoid_()
        torch.sum(m, 0, out=sums[0, k])
        if cubes:
            sq = torch.mul(m, m, out=squares[:u.numel()])
            torch.sum(sq, 0, out=sums[1, k])
            torch.dot(sq, m, out=sums[2, k])
        else:
            torch.dot(m, m, out=sums[1, k])
    return sums.sum(1, dtype=torch.float64)


def moments(m: torch.Tensor, cubes: bool = False) -> torch.Tensor:
    """``[sum m, sum m^2]`` of a tensor, with ``cubes`` also ``sum m^3``: summed in ``m``'s
    dtype, returned in float64."""
    flat = m.reshape(-1)
    if not cubes:
        return torch.stack([flat.sum(), torch.dot(flat, flat)]).double()
    sq = flat * flat
    return torch.stack([flat.sum(), sq.sum(), torch.dot(sq, flat)]).double()


def abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|x|, max |x|)``: the absolute values, flat, and their largest (0-dim; NaN when one is
    NaN), a chunk at a time on a CPU (the maximum of a chunk read in the cache)."""
    flat = x.reshape(-1)
    if not _chunked(flat):
        a = flat.abs()
        return a, a.amax()
    out = torch.empty_like(flat)
    chunks = -(-flat.numel() // CHUNK)
    maxima = torch.empty(chunks, dtype=flat.dtype, device=flat.device)
    for k in range(chunks):
        a = torch.abs(flat[k * CHUNK:(k + 1) * CHUNK], out=out[k * CHUNK:(k + 1) * CHUNK])
        torch.amax(a, 0, out=maxima[k])
    return out, maxima.amax()
