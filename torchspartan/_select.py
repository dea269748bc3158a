"""Exact budgeted top-k selection over many tensors, without sorting all entries.

The hard top-k of Spartan keeps entries greedily by decreasing unit value ``u`` (ties: lower
chunk index first, then lower flat index), an entry being kept while at least half of its cost
still fits in the budget ``B``::

    keep entry e  <=>  (cost of the entries before e) + c_e / 2 <= B.

Costs are positive, so the kept entries are a prefix of that order and everything is decided by
the last kept entry. We locate it by selection instead of a sort:

1. A window ``[a, b]`` of unit values is guessed from a strided sample (or from the previous
   threshold, ``hint``), with a margin of a few standard deviations of the sample quantile.
2. One exact pass flags the entries above ``b`` (their cost ``C(>b)``) and gathers the entries
   inside the window (on a CPU in one read, a chunk at a time: ``_chunks.split_window``). If
   ``C(>b) <= B <= C(>=a)`` then every entry above ``b`` is kept (the last of them starts before
   ``C(>b) - c/2 < B``) and every entry below ``a`` is dropped (the first of them starts at
   ``C(>=a) >= B``), so only the window's few candidates remain to be ordered.
   Otherwise the failed side tightens a bracket that provably contains the boundary and the
   window is widened; once the margin covers the whole sample the window is the bracket itself,
   which always passes.
3. The candidates are ordered (stable sort, descending, of entries gathered in tie order) or, when
   there are many, narrowed again by the same procedure on the candidates alone.

All comparisons are exact: window ends are rounded outwards into each tensor's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from torchspartan._chunks import count_true, split_window
from torchspartan._device import to_device
from torchspartan._fused import bin_index

__all__ = ["HINT_WIDTH", "MIN_HINT_WIDTH", "Hint", "select_flat", "select_segments_on_device",
           "select_top_budget"]

# Size of the strided sample that guesses the window, and the most candidates ordered by a sort
# (more are narrowed again by the same selection applied to the candidates alone).
_SAMPLE_SIZE = 1 << 16
_MAX_SORTED = 1 << 17
# Margin of the first window in standard deviations of the sample rank; multiplied by 4 per retry.
_Z = 5.0
# Relative half-width of the window around a warm-start hint: the widest, and the narrowest
# (:class:`Hint` gives one in between).
HINT_WIDTH = 2.0**-8
MIN_HINT_WIDTH = 2.0**-16
_MAX_DEPTH = 4
# With ``group`` and at least this many chunks and four times fewer (cost, dtype) groups, chunks
# are concatenated per group (see _select_grouped).
_GROUP_MIN_CHUNKS = 8

Cost = float | torch.Tensor


class Hint(NamedTuple):
    """A guess of the threshold (``value``) and the relative half-width of the first window
    around it (``width``; the result is exact whatever they are, a window that misses the
    threshold costs one more pass)."""

    value: float
    width: float = HINT_WIDTH


def select_top_budget(
    chunks: Sequence[torch.Tensor],
    costs: Sequence[float],
    budget: float,
    hint: float | Hint | None = None,
    *,
    check: bool = True,
    group: bool | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Hard top-k with a budget over several tensors at once, with no sort of all entries.

    Entries are taken by decreasing unit value (ties: lower chunk index, then lower flat index
    first); an entry is kept while at least half of its cost still fits in ``budget``, i.e. when
    the cost of the entries before it plus half its own cost is ``<= budget``. This equals
    :func:`torchspartan.hard_topk` on the concatenation of the flattened chunks with per-entry
    costs ``costs[i]`` repeated over ``chunks[i]``. Cost: a few elementwise passes plus a sort of
    the few entries near the boundary. Nothing is copied, unless ``group`` asks to copy many
    chunks sharing few (cost, dtype) pairs into one buffer per pair, so that each pass is one
    kernel instead of one per chunk.

    Args:
        chunks: tensors of unit values ``u >= 0`` (any shapes, floating dtypes, one device).
        costs: the cost ``> 0`` of every entry of ``chunks[i]``, one number per chunk.
        budget: the budget ``B``. ``B <= 0`` keeps nothing, ``B >= sum of all costs`` keeps all.
        hint: the threshold returned by a previous call on similar values (e.g. the previous
            training step); it narrows the first window. Any value is safe.
        check: validate the values (one extra read pass detecting NaN, Inf and negatives).
        group: copy chunks into one buffer per (cost, dtype) when there are 8 or more chunks and
            at least 4 per pair on average. ``None`` (default) groups on CUDA, where the copy is
            cheap and it saves a host synchronisation per chunk, and not on CPU, where the copy
            costs more than the kernels it saves (except on an oversubscribed CPU, where every
            multi-threaded kernel waits for a descheduled thread: there ``group=True`` helps).

    Returns:
        ``(masks, threshold)``: one bool tensor per chunk, of its shape, True for kept entries;
        and the unit value of the last kept entry (``inf`` when nothing is kept).

    Raises:
        TypeError: a chunk that is not a floating-point tensor.
        ValueError: different numbers of chunks and costs, chunks on several devices, a cost that
            is not finite and positive, a NaN budget, or (with ``check``) NaN, Inf or negative
            values.

    Example:
        >>> import torch
        >>> masks, t = select_top_budget([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0])],
        ...                              costs=[1.0, 1.0], budget=2)
        >>> [m.tolist() for m in masks], t
        ([[True, False], [True, False]], 2.0)
    """
    chunks = list(chunks)
    cost_list = [float(c) for c in costs]
    if len(chunks) != len(cost_list):
        raise ValueError(
            f"chunks and costs must have the same length, got {len(chunks)} chunks and "
            f"{len(cost_list)} costs; give one cost per chunk"
        )
    for i, (t, c) in enumerate(zip(chunks, cost_list, strict=True)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"chunks[{i}] must be a floating-point tensor, got {what}")
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"costs[{i}] must be finite and > 0, got {c!r}")
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget must be a number, got nan")
    if not chunks:
        return [], math.inf
    devices = {t.device for t in chunks}
    if len(devices) > 1:
        raise ValueError(f"chunks must all be on one device, got {sorted(map(str, devices))}")
    flat = [t.reshape(-1) for t in chunks]
    groups: dict[tuple[float, torch.dtype], list[int]] = {}
    for k, (u, c) in enumerate(zip(flat, cost_list, strict=True)):
        if u.numel():
            groups.setdefault((c, u.dtype), []).append(k)
    if group is None:
        group = flat[0].is_cuda
    if group and len(flat) >= _GROUP_MIN_CHUNKS and len(groups) * 4 <= len(flat):
        return _select_grouped(chunks, flat, groups, budget, hint, check)
    if check:
        _check_values(flat)
    masks, threshold = select_flat(flat, list(cost_list), budget, hint)
    return [m.view(t.shape) for m, t in zip(masks, chunks, strict=True)], threshold


def _select_grouped(
    chunks: list[torch.Tensor],
    flat: list[torch.Tensor],
    groups: dict[tuple[float, torch.dtype], list[int]],
    budget: float,
    hint: float | Hint | None,
    check: bool,
) -> tuple[list[torch.Tensor], float]:
    """Many chunks with few distinct (cost, dtype): one buffer per group, one kernel per pass.

    Costs one copy of the values, and saves the fixed cost of every kernel on every chunk (which
    dominates for many chunks, above all on a loaded CPU or a GPU). Ties keep the order of the
    original chunks: the candidates are ordered by their position in the original sequence.
    """
    starts = [0]
    for u in flat:
        starts.append(starts[-1] + u.numel())
    buffers, costs, tie_keys = [], [], []
    for (cost, _), members in groups.items():
        buffers.append(torch.cat([flat[k] for k in members]))
        local = [0]
        for k in members[:-1]:
            local.append(local[-1] + flat[k].numel())
        device = buffers[-1].device
        tie_keys.append((to_device(local, device),
                         to_device([starts[k] for k in members], device)))
        costs.append(cost)
    if check:
        try:
            _check_values(buffers)
        except ValueError:
            _check_values(flat)  # raises naming the chunk
            raise
    group_masks, threshold = select_flat(buffers, list(costs), budget, hint, tie_keys=tie_keys)
    masks: list[torch.Tensor] = [
        torch.zeros(t.shape, dtype=torch.bool, device=t.device) for t in chunks
    ]
    for mask, members in zip(group_masks, groups.values(), strict=True):
        parts = mask.split([flat[k].numel() for k in members])
        for k, part in zip(members, parts, strict=True):
            masks[k] = part.view(chunks[k].shape)
    return masks, threshold


def _check_values(flat: list[torch.Tensor]) -> None:
    nonempty = [(i, u) for i, u in enumerate(flat) if u.numel() > 0]
    if not nonempty:
        return
    ext = torch.stack([torch.stack(torch.aminmax(u)).to(torch.float64) for _, u in nonempty])
    for (i, u), (lo, hi) in zip(nonempty, ext.tolist(), strict=True):
        if math.isnan(lo) or math.isnan(hi) or math.isinf(hi) or lo < 0:
            bad = "NaN" if math.isnan(lo) or math.isnan(hi) else (
                "Inf" if math.isinf(hi) else f"a negative value ({lo:.6g})"
            )
            raise ValueError(
                f"chunks[{i}] (shape {tuple(u.shape)}) must hold finite unit values >= 0, "
                f"found {bad}; pass scores such as |theta| / cost"
            )


def _round_to(x: float, dtype: torch.dtype, up: bool) -> float:
    """``x`` rounded up (or down) to a value of ``dtype``, so that comparisons stay exact."""
    if dtype == torch.float64 or not math.isfinite(x):
        return x
    t = torch.tensor(x, dtype=torch.float64).to(dtype)
    y = float(t)
    if (up and y < x) or (not up and y > x):
        y = float(torch.nextafter(t, torch.tensor(math.inf if up else -math.inf, dtype=dtype)))
    return y


def _cost_total(us: list[torch.Tensor], cs: list[Cost]) -> float:
    total = 0.0
    for u, c in zip(us, cs, strict=True):
        total += c * u.numel() if isinstance(c, float) else float(c.sum(dtype=torch.float64))
    return total


def _cost_of(flags: list[torch.Tensor], cs: list[Cost]) -> float:
    """Total cost of the flagged entries (one host synchronisation)."""
    parts = []
    for f, c in zip(flags, cs, strict=True):
        if isinstance(c, float):
            parts.append(count_true(f).to(torch.float64) * c)
        else:
            parts.append(torch.where(f, c, 0.0).sum(dtype=torch.float64))
    return float(torch.stack(parts).sum()) if parts else 0.0


class _Sample:
    """A strided sample of the entries, sorted by decreasing value, with cumulative cost weights."""

    def __init__(self, us: list[torch.Tensor], cs: list[Cost]) -> None:
        n = sum(u.numel() for u in us)
        stride = max(1, n // _SAMPLE_SIZE)
        values, weights = [], []
        for u, c in zip(us, cs, strict=True):
            if u.numel() == 0:
                continue
            offset = min(stride // 2, u.numel() - 1)
            s = u[offset::stride]
            scale = u.numel() / s.numel()
            values.append(s.to(torch.float64))
            if isinstance(c, float):
                weights.append(torch.full_like(values[-1], c * scale))
            else:
                weights.append(c[offset::stride].to(torch.float64) * scale)
        v = torch.cat(values).cpu()
        w = torch.cat(weights).cpu()
        v, order = torch.sort(v, descending=True)
        self.values = v
        self.cumulative = torch.cumsum(w[order], 0)

    def window(self, budget: float, attempt: int, lo: float, hi: float) -> tuple[float, float]:
        s = self.values.numel()
        r = int(torch.searchsorted(self.cumulative, torch.tensor([budget], dtype=torch.float64)))
        p = min(max(r / s, 0.0), 1.0)
        margin = int(_Z * math.sqrt(s * p * (1 - p)) + 8) * 4**attempt
        a = float(self.values[r + margin]) if r + margin < s else lo
        b = float(self.values[r - margin]) if r - margin >= 0 else hi
        a, b = max(a, lo), min(b, hi)
        return (lo, hi) if a > b else (a, b)


def select_flat(
    us: list[torch.Tensor],
    cs: list[Cost],
    budget: float,
    hint: float | Hint | None,
    depth: int = 0,
    tie_keys: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Core of :func:`select_top_budget` on flat tensors; ``cs[i]`` a number or per-entry costs.

    Ties go by position in the concatenation of ``us``, unless ``tie_keys[i]`` gives, for the
    pieces that make up ``us[i]``, their start in ``us[i]`` and their position in the tie order.
    """
    if budget <= 0:
        return [torch.zeros(u.shape, dtype=torch.bool, device=u.device) for u in us], math.inf
    total = _cost_total(us, cs)
    if budget >= total:
        masks = [torch.ones(u.shape, dtype=torch.bool, device=u.device) for u in us]
        lows = [u.min().to(torch.float64) for u in us if u.numel() > 0]
        return masks, float(torch.stack(lows).min()) if lows else math.inf
    dtypes = {u.dtype for u in us}
    # Bracket of the boundary: C(> hi) <= budget <= C(>= lo).
    lo, hi = -math.inf, math.inf
    sample: _Sample | None = None
    attempt = 0
    first: tuple[float, float] | None = None
    if hint is not None and not isinstance(hint, Hint):
        hint = Hint(hint)  # a number: the widest window
    if hint is not None and math.isfinite(hint.value) and hint.value >= 0:
        first = (hint.value * (1 - hint.width), hint.value * (1 + hint.width))
    while True:
        if first is not None:
            a, b = max(first[0], lo), min(first[1], hi)
            first = None
            if a > b:
                continue
        else:
            if sample is None:
                sample = _Sample(us, cs)
            a, b = sample.window(budget, attempt, lo, hi)
            attempt += 1
        b_in = {dt: _round_to(b, dt, up=False) for dt in dtypes}
        a_in = {dt: _round_to(a, dt, up=True) for dt in dtypes}
        split = [split_window(u, a_in[u.dtype], b_in[u.dtype]) for u in us]
        above = [s[0] for s in split]
        cost_above = _cost_of(above, cs)
        if cost_above > budget:
            lo = b
            continue
        hi = b
        idx = [s[1] for s in split]
        cand_cost = [
            torch.full((i.numel(),), c, dtype=torch.float64, device=i.device)
            if isinstance(c, float)
            else c[i].to(torch.float64)
            for i, c in zip(idx, cs, strict=True)
        ]
        costs_c = torch.cat(cand_cost)
        if cost_above + float(costs_c.sum()) < budget:
            hi = a
            continue
        break
    values_c = torch.cat([u[i].to(torch.float64) for u, i in zip(us, idx, strict=True)])
    remaining = budget - cost_above
    perm = None
    if tie_keys is not None:
        position = torch.cat([
            ends[1][seg] + (i - ends[0][seg])
            for i, ends in zip(idx, tie_keys, strict=True)
            for seg in [torch.searchsorted(ends[0], i, right=True) - 1]
        ])
        perm = torch.argsort(position)
        values_c, costs_c = values_c[perm], costs_c[perm]
    if values_c.numel() > _MAX_SORTED and a < b and depth < _MAX_DEPTH:
        same = len({c for c in cs if isinstance(c, float)}) == 1 and all(
            isinstance(c, float) for c in cs
        )
        sub_cost: Cost = float(cs[0]) if same else costs_c
        sub_masks, threshold = select_flat([values_c], [sub_cost], remaining, None, depth + 1)
        kept_c = sub_masks[0]
    else:
        order = torch.sort(values_c, descending=True, stable=True).indices
        sorted_cost = costs_c[order]
        fits = (torch.cumsum(sorted_cost, 0) - 0.5 * sorted_cost) <= remaining
        n_keep = int(torch.cumprod(fits.to(torch.uint8), 0).sum()) if fits.numel() else 0
        kept_c = torch.zeros_like(fits)
        kept_c[order[:n_keep]] = True
        threshold = float(values_c[order[n_keep - 1]]) if n_keep > 0 else math.inf
    if math.isinf(threshold) and cost_above > 0:
        # Nothing kept in the window: the last kept entry is the smallest one above it.
        mins = [torch.where(g, u, math.inf).min().to(torch.float64)
                for u, g in zip(us, above, strict=True) if u.numel() > 0]
        threshold = float(torch.stack(mins).min())
    if perm is not None:
        kept_c = torch.empty_like(kept_c).index_put_((perm,), kept_c)
    masks = above
    start = 0
    for m, i in zip(masks, idx, strict=True):
        n = i.numel()
        if n:
            m[i[kept_c[start:start + n]]] = True
        start += n
    return masks, threshold


# Bins of the key histogram of select_on_device (one per float32 value in the window), and the
# bins that count the entries below (and above) the window.
_KEY_BINS = 1 << 22
_LANES = 1 << 12


def select_on_device(units: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """Keep the ``count`` largest of ``units`` (flat float32, ``>= 0``) with no host sync.

    The same window idea as :func:`select_top_budget`, decided on the device: a strided sample
    (sorted on the device) brackets the boundary; one histogram of the float32 bit patterns inside
    the bracket (non-negative floats order like their bits, so every bin is one exact value)
    gives the exact threshold ``T``; the mask keeps the entries above ``T`` and, of those equal
    to ``T``, the first ones by position up to ``count`` (the host selection's order). About
    a dozen passes over ``units`` (int32 keys and bools), with no atomic add queueing on one bin.

    Returns ``(mask, threshold, ok)``, all on the device. ``ok`` is False when the answer may be
    wrong: the bracket missed the boundary or is wider than the histogram.
    The caller reads ``ok`` with its other results and redoes the selection with
    :func:`select_top_budget` when it is False.
    """
    n = units.numel()
    keys = units.view(torch.int32)
    stride = max(1, n // _SAMPLE_SIZE)
    sample = torch.sort(units[stride // 2::stride], descending=True).values
    count_dtype = torch.int32 if n < 2**31 else torch.int64
    if stride == 1 and 0 < count <= n:  # the sample is every entry: its count-th is exact
        threshold_key = sample[count - 1].view(torch.int32)
        above, tied = keys > threshold_key, keys == threshold_key
        need = count - above.sum(dtype=count_dtype)
        mask = above.logical_or_(tied.logical_and_(tied.cumsum(0, dtype=count_dtype) <= need))
        threshold = threshold_key.view(torch.float32).to(torch.float64)
        return mask, threshold, torch.ones((), dtype=torch.bool, device=units.device)
    s = sample.numel()
    r = count * s / n
    p = min(max(r / s, 0.0), 1.0)
    margin = int(_Z * math.sqrt(s * p * (1 - p)) + 8)
    lo_i, hi_i = min(int(r) + margin, s - 1), max(int(r) - margin, 0)
    key_lo = sample[lo_i].view(torch.int32) if int(r) + margin < s else keys.new_zeros(())
    key_hi = sample[hi_i].view(torch.int32)
    # bins 1.._KEY_BINS: one key each from key_lo up. The entries below and above the window
    # (most of them) are counted in _LANES bins each, picked by their low key bits: the atomic
    # adds of a GPU to one bin would queue (10 ms for 25M entries on an H200; 1.9 ms spread)
    b = _KEY_BINS
    idx = bin_index(keys, key_lo, b, _LANES)
    spread = torch.zeros(b + 2 + 2 * _LANES, dtype=count_dtype, device=units.device).index_add_(
        0, idx, torch.ones(1, dtype=count_dtype, device=units.device).expand(n))
    ends = spread[b + 2:].view(2, _LANES).sum(1, dtype=count_dtype)
    # bins: 0 below the window, 1.._KEY_BINS one key each from key_lo up, the last above it
    counts = torch.cat([ends[:1], spread[1:b + 1], ends[1:]])
    at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[j]: entries in bins >= j
    j = (at_least[1:_KEY_BINS + 1] >= count).sum()  # the bin of the count-th largest key
    threshold_key = key_lo + j - 1
    ok = (at_least[_KEY_BINS + 1] < count) & (at_least[1] >= count) & (j >= 1) & (
        key_hi - key_lo < _KEY_BINS)
    # entries tied at T may straddle the boundary: keep the first of them (by position, as
    # the host selection does) up to the count, with a running count of the ties
    need = count - at_least.index_select(0, (j + 1).reshape(1))[0]  # ties kept at T
    tied = keys == threshold_key
    mask = (keys > threshold_key).logical_or_(
        tied.logical_and_(tied.cumsum(0, dtype=count_dtype) <= need))
    threshold = threshold_key.to(torch.int32).view(torch.float32).to(torch.float64)
    return mask, threshold, ok


def select_segments_on_device(units: torch.Tensor, sizes: Sequence[int], counts: Sequence[int]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``counts[k]`` largest entries of every consecutive segment (``sizes[k]``
    entries) of the flat float32 ``units`` (``>= 0``), with no host sync: one stable sort of
    int64 ``(segment, -u)`` keys (the segment in the high bits, the complemented float bits of
    ``u`` in the low ones; segments of one length: a stable descending sort of each row), so
    that equal values keep their order, as the host selection keeps them. The sort's buffers
    take about 40 bytes per entry.

    Returns the flat bool mask and the ``counts[k]``-th largest value of every segment
    (float64; ``inf`` where ``counts[k]`` is 0).
    """
    device, total, n = units.device, units.numel(), len(sizes)
    if len(set(sizes)) == 1:  # segments of one length: a stable sort of each row
        ranked, order = torch.sort(units.view(n, sizes[0]), dim=1, descending=True, stable=True)
        count = to_device(list(counts), device).unsqueeze(1)
        keep = torch.arange(sizes[0], device=device) < count
        mask = torch.zeros_like(keep).scatter_(1, order, keep).view(-1)
        kth = ranked.gather(1, (count - 1).clamp_min_(0)).view(-1).double()
        return mask, kth if min(counts) > 0 else torch.where(count.view(-1) > 0, kth, math.inf)
    lengths = to_device(list(sizes), device)
    segment = torch.arange(n, device=device).repeat_interleave(lengths, output_size=total)
    key = (segment << 32) | (0x7FFFFFFF - units.view(torch.int32)).to(torch.int64)
    order = torch.sort(key, stable=True).indices
    starts = [sum(sizes[:k]) for k in range(n)]
    ends = to_device([s + c for s, c in zip(starts, counts, strict=True)], device)
    keep = torch.arange(total, device=device) < ends.repeat_interleave(lengths,
                                                                      output_size=total)
    mask = torch.zeros(total, dtype=torch.bool, device=device).scatter_(0, order, keep)
    last = to_device([s + max(c, 1) - 1 for s, c in zip(starts, counts, strict=True)], device)
    kth = units.index_select(0, order.index_select(0, last)).double()
    if min(counts) > 0:
        return mask, kth
    return mask, torch.where(to_device(list(counts), device) > 0, kth, math.inf)
