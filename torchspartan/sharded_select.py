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

__all__ = ["select_sharded"]

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
    keys, dtype = _keys(units)
    device = units[0].device if units else torch.device("cpu")
    limit = GATHER_MAX if gather_max is None else gather_max
    bits = BITS if entries is None else min(BITS, max(8, int(entries).bit_length() - 5))
    lo, hi = 0, _key_of(unit_max, dtype)
    above = 0.0  # cost of the entries with a key above the bracket, over all ranks
    cand: list[torch.Tensor] = list(keys)  # the keys in the bracket
    where: list[torch.Tensor | None] = [None] * len(keys)  # their local indices (None: all)
    while True:
        shift = max(0, (hi - lo).bit_length() - bits)
        bins = ((hi - lo) >> shift) + 1
        hist = torch.zeros(2, bins, dtype=torch.float64, device=device)  # cost, count
        for k, c in zip(cand, costs, strict=True):
            if k.numel():
                idx = (k - lo).bitwise_right_shift_(shift) if shift else k - lo
                n = torch.bincount(idx, minlength=bins).to(torch.float64)
                hist[0].add_(n, alpha=c)
                hist[1].add_(n)
        hist = group.sum(hist)
        at_least = hist[0].flip(0).cumsum(0).flip(0).add_(above)  # C(>= bin j)
        j = max(int((at_least >= budget).sum()) - 1, 0)  # the highest bin with C(>= j) >= B
        if j + 1 < bins:
            above = float(at_least[j + 1])
        lo, hi = lo + (j << shift), min(hi, lo + ((j + 1) << shift) - 1)
        inside = [(k >= lo) & (k <= hi) for k in cand]
        found = [torch.nonzero(f).squeeze(1) if w is None else w[f]
                 for f, w in zip(inside, where, strict=True)]
        where = list(found)
        if shift == 0 or float(hist[1, j]) <= limit:
            break
        cand = [k[f] for k, f in zip(cand, inside, strict=True)]
    masks = [k > hi for k in keys]
    if shift == 0:
        kept_any = _keep_ties(masks, found, costs, budget - above, group, device)
        threshold = _value_of(lo, dtype) if kept_any else None
    else:
        threshold = _keep_candidates(masks, keys, found, int(hist[1, j]), costs, budget - above,
                                     group, device, dtype)
    if threshold is not None:
        return masks, threshold
    # nothing kept in the bracket: the last kept entry is the smallest one above it
    top = torch.iinfo(keys[0].dtype).max if keys else 0
    mins = [int(torch.where(m, k, top).min()) for m, k in zip(masks, keys, strict=True)
            if k.numel()]
    smallest = -int(group.max(torch.tensor([-min(mins, default=top)], dtype=torch.int64,
                                           device=device))[0])
    return masks, math.inf if smallest == top else _value_of(smallest, dtype)


# At most this many entries left in the bracket (over all ranks) are gathered and ordered on
# every rank instead of another histogram round.
GATHER_MAX = 1 << 12


def _keep_ties(masks: list[torch.Tensor], tied: list[torch.Tensor], costs: Sequence[float],
               remaining: float, group: ShardGroup, device: torch.device) -> bool:
    """Keep the entries tied at the threshold (local indices ``tied``) in the global tie order:
    by tensor, then rank, then index. Returns whether any rank keeps one."""
    counts = torch.tensor([float(t.numel()) for t in tied], dtype=torch.float64, device=device)
    table = group.gather(counts).tolist()  # (world, tensors): tied entries per rank and tensor
    kept_any = False
    prefix = 0.0  # cost of the ties before the current (tensor, rank)
    for t, c in enumerate(costs):
        for r in range(group.size):
            n = int(table[r][t])
            if n == 0:
                continue
            # entry e of this block is kept iff prefix + (e + 1) c - c / 2 <= remaining
            pos = prefix + c * torch.arange(1, n + 1, dtype=torch.float64) - 0.5 * c
            keep = int((pos <= remaining).sum())
            kept_any = kept_any or keep > 0
            if r == group.rank and keep:
                masks[t][tied[t][:keep]] = True
            prefix += n * c
    return kept_any


def _keep_candidates(masks: list[torch.Tensor], keys: list[torch.Tensor],
                     where: list[torch.Tensor], count: int, costs: Sequence[float],
                     remaining: float, group: ShardGroup, device: torch.device,
                     dtype: torch.dtype) -> float | None:
    """Gather the ``count`` entries left in the bracket over all ranks (key, tensor, rank,
    index; every rank sends ``count`` rows, padded), order them on every rank as one process
    would, keep the greedy prefix. Returns the kept threshold."""
    rows = [torch.stack([k[w].to(torch.int64), torch.full_like(w, t), w], 1)
            for t, (k, w) in enumerate(zip(keys, where, strict=True))]
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64, device=device)
    padded = torch.full((count, 4), -1, dtype=torch.int64, device=device)
    padded[:local.shape[0], :3] = local
    padded[:local.shape[0], 3] = group.rank
    everyone = group.gather(padded).reshape(-1, 4)
    everyone = everyone[everyone[:, 0] >= 0]
    # order: key descending, then tensor, rank, index ascending (stable sorts, last key first)
    order = torch.arange(everyone.shape[0], device=device)
    for col, descending in ((2, False), (3, False), (1, False), (0, True)):
        perm = torch.sort(everyone[order, col], descending=descending, stable=True).indices
        order = order[perm]
    ordered = everyone[order]
    cost = torch.tensor(list(costs), dtype=torch.float64, device=device)[ordered[:, 1]]
    fits = (torch.cumsum(cost, 0) - 0.5 * cost) <= remaining
    n_keep = int(torch.cumprod(fits.to(torch.uint8), 0).sum()) if fits.numel() else 0
    mine = ordered[:n_keep]
    mine = mine[mine[:, 3] == group.rank]
    for t in range(len(masks)):
        masks[t][mine[mine[:, 1] == t, 2]] = True
    return _value_of(int(ordered[n_keep - 1, 0]), dtype) if n_keep else None
