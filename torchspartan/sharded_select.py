"""The exact hard top-k of one budget whose entries are sharded over ranks.

The same rule as ``_select.py`` (keep entries by decreasing unit value, ties to the earlier
tensor, then the lower flat index, while at least half of an entry's cost still fits), decided
with histograms instead of a gather: no rank ever holds more than its own entries.

Non-negative floats order like their bit patterns read as integers, so the search runs on keys:

1. Round by round, every rank counts the cost of its entries in ``2^16`` bins of the current key
   bracket; the counts are all-reduced (one small collective per round), and the bracket becomes
   the bin holding the boundary (the bin ``j`` with ``C(>= j) >= B > C(> j)``). Entries above it
   are kept, entries below dropped. float32 keys need two rounds, float64 keys four. Only the
   first round passes over all local entries; the later ones over the few left in the bracket.
2. When a bin is one value ``T``, the entries tied at ``T`` are kept in the global tie order:
   every rank gathers the cost of every rank's ties per tensor (a ``world x tensors`` table), so
   it knows the cost of the ties before its own. When at most ``GATHER_MAX`` entries are left in
   the bracket, they are gathered instead (key, tensor, rank, index) and ordered on every rank as
   one process orders them. The histograms have fewer bins for small problems.

Costs are per tensor (numbers), the budget ``B`` and the cost sums float64: with unit costs every
sum is an exact integer, so the masks equal the unsharded selection bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchspartan.distributed import ShardGroup

__all__ = ["select_segments", "select_sharded"]

# Bits of key resolved per histogram round.
BITS = 16


def _keys(units: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.dtype]:
    """Integer keys ordered like the values: int32 bits of float32, int64 bits of float64."""
    dtypes = {u.dtype for u in units}
    if dtypes == {torch.float32}:
        return [u.view(torch.int32) for u in units], torch.float32
    return [u.to(torch.float64).view(torch.int64) for u in units], torch.float64


def _key_of(value: float, dtype: torch.dtype) -> int:
    idt = torch.int32 if dtype == torch.float32 else torch.int64
    return int(torch.tensor(value, dtype=dtype).view(idt))


def _value_of(key: int, dtype: torch.dtype) -> float:
    idt = torch.int32 if dtype == torch.float32 else torch.int64
    return float(torch.tensor(key, dtype=idt).view(dtype))


def select_sharded(
    units: Sequence[torch.Tensor],
    costs: Sequence[float],
    budget: float,
    unit_max: float,
    group: ShardGroup,
    entries: int | None = None,
    gather_max: int | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Local masks of the hard top-k of one budget over sharded entries.

    Args:
        units: this rank's flat unit values ``u >= 0`` (finite) of every tensor of the budget, in
            the budget's tensor order (empty where this rank holds none of a tensor); every rank
            passes the same number of tensors.
        costs: the cost of one entry of each tensor.
        budget: the budget ``B`` (same on every rank), strictly between 0 and the total cost.
        unit_max: the largest unit value over all ranks.
        group: the ranks.
        entries: the number of entries over all ranks (sizes the histograms; default 2^16 bins).
        gather_max: gather the entries left in the bracket once at most this many remain
            (default ``GATHER_MAX``; 0 resolves every key by histograms and tie counts).

    Returns:
        ``(masks, threshold)``: this rank's bool masks, and the unit value of the last kept entry
        over all ranks (the same on every rank).
    """
    masks, thresholds = select_segments(units, costs, [0] * len(units), [budget], [unit_max],
                                        group, None if entries is None else [entries],
                                        gather_max)
    return masks, thresholds[0]


def select_segments(
    units: Sequence[torch.Tensor],
    costs: Sequence[float],
    segment_of: Sequence[int],
    budgets: Sequence[float],
    unit_max: Sequence[float],
    group: ShardGroup,
    entries: Sequence[int] | None = None,
    gather_max: int | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """:func:`select_sharded` of several budgets at once (tensor ``k`` in budget
    ``segment_of[k]``, in tie order within its budget): every round's histograms of all budgets
    travel in one all-reduce, the candidates and tie tables in one gather each.

    Returns this rank's masks and every budget's threshold (the same on every rank).
    """
    keys, dtype = _keys(units)
    device = units[0].device if units else torch.device("cpu")
    limit = GATHER_MAX if gather_max is None else gather_max
    n_seg = len(budgets)
    bits = [BITS if entries is None else min(BITS, max(8, int(entries[j]).bit_length() - 5))
            for j in range(n_seg)]
    lo = [0] * n_seg
    hi = [_key_of(float(u), dtype) for u in unit_max]
    above = [0.0] * n_seg  # cost of the entries with a key above the bracket, over all ranks
    shift = [0] * n_seg
    count = [0] * n_seg
    cand: list[torch.Tensor] = list(keys)  # the keys in their segment's bracket
    where: list[torch.Tensor | None] = [None] * len(keys)  # their local indices (None: all)
    active = list(range(n_seg))
    while active:
        shifts = {j: max(0, (hi[j] - lo[j]).bit_length() - bits[j]) for j in active}
        bins = {j: ((hi[j] - lo[j]) >> shifts[j]) + 1 for j in active}
        start, size = {}, 0
        for j in active:
            start[j], size = size, size + bins[j]
        hist = torch.zeros(2, size, dtype=torch.float64, device=device)  # cost, count
        for k, (c, j) in enumerate(zip(costs, segment_of, strict=True)):
            if j in start and cand[k].numel():
                sh = shifts[j]
                idx = (cand[k] - lo[j]).bitwise_right_shift_(sh) if sh else cand[k] - lo[j]
                n = torch.bincount(idx, minlength=bins[j]).to(torch.float64)
                hist[0].narrow(0, start[j], bins[j]).add_(n, alpha=c)
                hist[1].narrow(0, start[j], bins[j]).add_(n)
        hist = group.sum(hist)
        for j in active:
            h = hist.narrow(1, start[j], bins[j])
            at_least = h[0].flip(0).cumsum(0).flip(0).add_(above[j])  # C(>= bin)
            b = max(int((at_least >= budgets[j]).sum()) - 1, 0)  # the highest bin C >= B
            if b + 1 < bins[j]:
                above[j] = float(at_least[b + 1])
            sh = shifts[j]
            lo[j], hi[j] = lo[j] + (b << sh), min(hi[j], lo[j] + ((b + 1) << sh) - 1)
            shift[j], count[j] = sh, int(h[1, b])
        for k, j in enumerate(segment_of):
            if j in start:
                inside = (cand[k] >= lo[j]) & (cand[k] <= hi[j])
                w = where[k]
                where[k] = torch.nonzero(inside).squeeze(1) if w is None else w[inside]
                cand[k] = cand[k][inside]
        active = [j for j in active if shift[j] > 0 and count[j] > limit]
    found = [w if w is not None else torch.nonzero(k >= 0).squeeze(1)
             for w, k in zip(where, keys, strict=True)]
    masks = [k > hi[j] for k, j in zip(keys, segment_of, strict=True)]
    thresholds: list[float | None] = [None] * n_seg
    remaining = [b - a for b, a in zip(budgets, above, strict=True)]
    tied = [j for j in range(n_seg) if shift[j] == 0]
    if tied:
        kept = _keep_ties(masks, found, costs, segment_of, tied, remaining, group, device)
        for j in tied:
            thresholds[j] = _value_of(lo[j], dtype) if kept[j] else None
    gathered = [j for j in range(n_seg) if shift[j] > 0]
    if gathered:
        got = _keep_candidates(masks, keys, found, costs, segment_of, gathered,
                               sum(count[j] for j in gathered), remaining, group, device, dtype)
        for j in gathered:
            thresholds[j] = got[j]
    missing = [j for j in range(n_seg) if thresholds[j] is None]
    if missing:  # nothing kept in the bracket: the last kept entry is the smallest above it
        top = torch.iinfo(keys[0].dtype).max if keys else 0
        local = []
        for j in missing:
            mins = [int(torch.where(m, k, top).min()) for m, k, s in
                    zip(masks, keys, segment_of, strict=True) if s == j and k.numel()]
            local.append(-min(mins, default=top))
        smallest = (-group.max(torch.tensor(local, dtype=torch.int64, device=device))).tolist()
        for j, v in zip(missing, smallest, strict=True):
            thresholds[j] = math.inf if v == top else _value_of(int(v), dtype)
    return masks, [float(t) for t in thresholds]  # type: ignore[arg-type]


# At most this many entries left in a bracket (over all ranks) are gathered and ordered on
# every rank instead of another histogram round.
GATHER_MAX = 1 << 12


def _keep_ties(masks: list[torch.Tensor], tied: list[torch.Tensor], costs: Sequence[float],
               segment_of: Sequence[int], segments: Sequence[int], remaining: Sequence[float],
               group: ShardGroup, device: torch.device) -> dict[int, bool]:
    """Keep the entries tied at their budget's threshold (local indices ``tied``) in the global
    tie order: by tensor, then rank, then index. Returns per budget whether any rank keeps one."""
    counts = torch.tensor([float(t.numel()) if j in segments else 0.0
                           for t, j in zip(tied, segment_of, strict=True)],
                          dtype=torch.float64, device=device)
    table = group.gather(counts).tolist()  # (world, tensors): tied entries per rank and tensor
    kept_any = {j: False for j in segments}
    prefix = {j: 0.0 for j in segments}  # cost of the ties before the current (tensor, rank)
    for t, (c, j) in enumerate(zip(costs, segment_of, strict=True)):
        if j not in prefix:
            continue
        for r in range(group.size):
            n = int(table[r][t])
            if n == 0:
                continue
            # entry e of this block is kept iff prefix + (e + 1) c - c / 2 <= remaining
            pos = prefix[j] + c * torch.arange(1, n + 1, dtype=torch.float64) - 0.5 * c
            keep = int((pos <= remaining[j]).sum())
            kept_any[j] = kept_any[j] or keep > 0
            if r == group.rank and keep:
                masks[t][tied[t][:keep]] = True
            prefix[j] += n * c
    return kept_any


def _keep_candidates(masks: list[torch.Tensor], keys: list[torch.Tensor],
                     where: list[torch.Tensor], costs: Sequence[float],
                     segment_of: Sequence[int], segments: Sequence[int], count: int,
                     remaining: Sequence[float], group: ShardGroup, device: torch.device,
                     dtype: torch.dtype) -> dict[int, float | None]:
    """Gather the ``count`` entries left in the brackets of ``segments`` over all ranks (key,
    tensor, rank, index; every rank sends ``count`` rows, padded), order each budget's on every
    rank as one process would, keep the greedy prefix. Returns each budget's threshold (None:
    nothing kept in the bracket)."""
    rows = [torch.stack([k[w].to(torch.int64), torch.full_like(w, t), w], 1)
            for t, (k, w, j) in enumerate(zip(keys, where, segment_of, strict=True))
            if j in segments]
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64, device=device)
    padded = torch.full((count, 4), -1, dtype=torch.int64, device=device)
    padded[:local.shape[0], :3] = local
    padded[:local.shape[0], 3] = group.rank
    everyone = group.gather(padded).reshape(-1, 4)
    everyone = everyone[everyone[:, 0] >= 0]
    seg = torch.tensor(list(segment_of), dtype=torch.int64, device=device)
    cost_of = torch.tensor(list(costs), dtype=torch.float64, device=device)
    out: dict[int, float | None] = {}
    for j in segments:
        mine_j = everyone[seg[everyone[:, 1]] == j]
        # order: key descending, then tensor, rank, index ascending (stable sorts, last first)
        order = torch.arange(mine_j.shape[0], device=device)
        for col, descending in ((2, False), (3, False), (1, False), (0, True)):
            perm = torch.sort(mine_j[order, col], descending=descending, stable=True).indices
            order = order[perm]
        ordered = mine_j[order]
        cost = cost_of[ordered[:, 1]]
        fits = (torch.cumsum(cost, 0) - 0.5 * cost) <= remaining[j]
        n_keep = int(torch.cumprod(fits.to(torch.uint8), 0).sum()) if fits.numel() else 0
        kept = ordered[:n_keep]
        kept = kept[kept[:, 3] == group.rank]
        for t in {int(x) for x in kept[:, 1].tolist()}:
            masks[t][kept[kept[:, 1] == t, 2]] = True
        out[j] = _value_of(int(ordered[n_keep - 1, 0]), dtype) if n_keep else None
    return out
