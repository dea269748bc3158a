"""The mask engine: one soft top-k solve, one backward, one hard selection, for every policy.

Every allocation reduces to one shape (docs/design.md, "The engine"): unit values ``u >= 0``
split into *pieces*, each a ``(rows, length)`` view with one sharpness ``beta`` and a cost (a
number, or per-entry costs), and *segments*, each with a budget ``B_j``. A piece lies in one
segment (Global: every piece in segment 0; Uniform/ERK: one segment per tensor), or, when
``rowwise``, each of its rows is a segment of its own (N:M: rows of ``m`` entries, budget ``n``;
the public batched ``soft_topk`` on ``(*, d)``). Per segment the soft mask is::

    m_i = sigmoid(beta_i * (u_i - tau_j)),   sum_{i in j} c_i m_i = B_j,

the entropy-regularised knapsack with per-entry temperatures ``c_i / beta_i``; ``tau_j`` is the
segment's threshold, in the units of ``u`` (so it stays put while ``beta`` anneals, which makes it
the right warm start). The hard mask keeps, per segment, the entries of highest ``u`` whose
cumulative cost fits (ties: lower position first).

Every pass is one op per piece: the caller packs tensors that share (beta, cost, segment) into one
piece (one flat buffer) so that the number of ops does not grow with the number of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from torchspartan._chunks import moments, sigmoid_sums
from torchspartan._device import to_device
from torchspartan._fused import sigmoid_moments
from torchspartan._select import Hint, select_flat

__all__ = [
    "TOLERANCE",
    "Piece",
    "SoftSolution",
    "hard_select",
    "safeguarded_newton",
    "soft_backward",
    "solve_soft",
    "unit_maxima",
]

Cost = float | torch.Tensor
# A reduce hook: sums over scores go through it (identity in one process; an all-reduce when the
# scores are sharded over ranks).
Reduce = Callable[[torch.Tensor], torch.Tensor]

# The relative budget tolerance of a float32 solve (training's, and soft_topk's default).
TOLERANCE = 1e-6
# Problems with at least this many entries get their cold start from a strided sample.
SAMPLE_SIZE = 1 << 14


@dataclass
class Piece:
    """Unit values of one part of a problem.

    Attributes:
        units: ``(rows, length)`` unit values ``u >= 0`` in the compute dtype (float32/float64).
        beta: sharpness ``> 0`` of every entry of the piece (a number; for a rowwise piece also
            a float64 tensor of one beta per row).
        cost: cost of every entry (a number) or per-entry costs broadcastable to ``units``.
        segment: the piece's segment; with ``rowwise``, row ``r`` is segment ``segment + r``.
        rowwise: every row is its own segment.
        lengths: a one-row piece cut into consecutive segments of these lengths (``int64``
            tensor on the units' device; segment ``segment + k`` for the ``k``-th): tensors of
            different sizes with budgets of their own in one buffer. Only :func:`solve_soft`
            takes such pieces, with ``unit_max`` and ``tau_init`` given.
        unit_max: the largest unit value of a one-segment piece (0-dim), when its maker knows it
            (computed with the units: ``_chunks.abs_max``); else None.
    """

    units: torch.Tensor
    beta: float | torch.Tensor
    cost: Cost
    segment: int
    rowwise: bool = False
    lengths: torch.Tensor | None = None
    unit_max: torch.Tensor | None = None

    @property
    def segments(self) -> int:
        if self.lengths is not None:
            return self.lengths.numel()
        return self.units.shape[0] if self.rowwise else 1

    @property
    def many(self) -> bool:
        """Whether the piece holds several segments (rowwise, or cut by ``lengths``)."""
        return self.rowwise or self.lengths is not None


def _segment_index(pieces: Sequence[Piece], device: torch.device) -> torch.Tensor:
    """For the per-piece sums (one per row of a rowwise piece, else one), their segment."""
    parts = []
    for p in pieces:
        if p.many:
            parts.append(torch.arange(p.segment, p.segment + p.segments, device=device))
        else:
            parts.append(to_device([p.segment], device))
    return torch.cat(parts)


def _betas(pieces: Sequence[Piece], device: torch.device) -> torch.Tensor:
    """The beta of every per-piece sum (one per row of a rowwise piece), float64 ``(K,)``."""
    parts = []
    for p in pieces:
        if isinstance(p.beta, torch.Tensor):
            parts.append(torch.broadcast_to(p.beta.reshape(-1), (p.segments,)).to(torch.float64))
        else:
            parts.append(torch.full((p.segments,), float(p.beta), dtype=torch.float64,
                                    device=device))
    return torch.cat(parts)


def _beta_of(p: Piece, dtype: torch.dtype) -> float | torch.Tensor:
    return p.beta.to(dtype).reshape(-1, 1) if isinstance(p.beta, torch.Tensor) else p.beta


def _row_sum(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    return x.sum(-1) if rowwise else x.sum().reshape(1)


def _cost_sums(p: Piece, m: torch.Tensor, cubes: bool) -> torch.Tensor:
    """``sum c m``, ``sum c m^2`` (and with ``cubes`` ``sum c m^3``) per segment of the piece,
    float64 ``(2 or 3, segments)``."""
    if p.lengths is not None:  # unit costs (a number), one sum per segment of the buffer,
        # in float64 (a segment reduction may add sequentially: float32 would miss 1e-6)
        flat = m.reshape(-1).double()
        power = flat * flat
        sums = [torch.segment_reduce(x, "sum", lengths=p.lengths) for x in (flat, power)]
        if cubes:
            sums.append(torch.segment_reduce(power.mul_(flat), "sum", lengths=p.lengths))
        return torch.stack(sums) * p.cost
    if isinstance(p.cost, torch.Tensor):
        cm = m * p.cost
        sums = [_row_sum(cm, p.rowwise).double()]
        for _ in range(2 if cubes else 1):
            sums.append(_row_sum(cm.mul_(m), p.rowwise).double())
        return torch.stack(sums)
    if p.rowwise:  # float32 sums, then float64 (a float64 accumulation is slower on a CPU)
        sq = m * m
        parts = [m.sum(-1), sq.sum(-1)] + ([sq.mul_(m).sum(-1)] if cubes else [])
        return torch.stack(parts).double() * p.cost
    return moments(m, cubes).unsqueeze(1) * p.cost


def _tau_of(p: Piece, tau: torch.Tensor) -> torch.Tensor:
    if p.lengths is not None:  # every entry its segment's threshold
        return tau.narrow(0, p.segment, p.segments).to(p.units.dtype).repeat_interleave(
            p.lengths, output_size=p.units.numel()).reshape(p.units.shape)
    if p.rowwise:
        return tau.narrow(0, p.segment, p.segments).unsqueeze(1)
    return tau[p.segment]


def _total_cost(pieces: Sequence[Piece], index: torch.Tensor, num_segments: int) -> torch.Tensor:
    parts = []
    for p in pieces:
        if p.lengths is not None:
            parts.append(p.lengths.to(torch.float64) * float(p.cost))
        elif isinstance(p.cost, torch.Tensor):
            c = torch.broadcast_to(p.cost, p.units.shape).to(torch.float64)
            parts.append(_row_sum(c, p.rowwise))
        else:
            n = p.units.shape[-1] if p.rowwise else p.units.numel()
            parts.append(torch.full((p.segments,), float(n) * p.cost, dtype=torch.float64,
                                    device=index.device))
    return torch.zeros(num_segments, dtype=torch.float64, device=index.device).index_add_(
        0, index, torch.cat(parts))


@dataclass
class SoftSolution:
    """What :func:`solve_soft` returns.

    Attributes:
        masks: the soft mask of every piece at ``tau``, ``(rows, length)`` like its units
            (only when asked for: ``solve_soft(masks=True)``; else empty).
        tau: the threshold of every segment, float64, shape ``(S,)``.
        slope: ``S_j = sum_{i in j} c_i beta_i m_i (1 - m_i)``, float64 ``(S,)``.
        evaluations: evaluations of the budget equation (each one pass per piece).
        error: relative budget error ``|sum c m - B| / B`` per segment (after a certified
            last step, :func:`safeguarded_newton`, the bound on it).
    """

    masks: list[torch.Tensor]
    tau: torch.Tensor
    slope: torch.Tensor
    evaluations: int
    error: torch.Tensor


def solve_soft(
    pieces: Sequence[Piece],
    budgets: torch.Tensor,
    *,
    tau_init: torch.Tensor | None = None,
    unit_max: torch.Tensor | None = None,
    tol: float = TOLERANCE,
    max_iter: int = 100,
    reduce: Reduce | None = None,
    check: bool = True,
    masks: bool = False,
    chunks: bool = True,
) -> SoftSolution:
    """Thresholds ``tau`` with ``sum_{i in j} c_i sigmoid(beta_i (u_i - tau_j)) = B_j``.

    Args:
        pieces: the problem (see :class:`Piece`); all on one device, one compute dtype.
        budgets: ``B_j``, float64 ``(S,)``, each strictly between 0 and the segment's total cost.
        tau_init: warm start ``(S,)`` (e.g. the previous training step's thresholds).
        unit_max: the largest unit value per piece row sum (``(K,)``, one per segment of each
            piece, in piece order), if the caller knows it; saves one pass.
        tol: relative budget tolerance.
        max_iter: most evaluations.
        reduce: applied to every vector of segment sums and to the segments' total costs (an
            all-reduce when the entries are sharded over ranks: then every rank passes the same
            pieces, empty where it holds none of one, and ``unit_max`` over all ranks; the cold
            start is the bracket's midpoint, the same on every rank).
        check: test convergence (host syncs); ``False`` runs exactly ``max_iter`` evaluations
            and leaves the check of ``error`` to the caller.
        masks: return the soft masks at the solution (``SoftSolution.masks``; else ``[]``).
        chunks: without ``masks``, evaluate a one-segment piece on a CPU a chunk at a time in
            the cache (``_chunks.sigmoid_sums``: one read of its units, not four passes). The
            sync-free route passes ``False``: one op per pass, as it runs on a GPU.
    """
    device = budgets.device
    num_segments = budgets.numel()
    index = _segment_index(pieces, device)
    total = _total_cost(pieces, index, num_segments)
    reduce_ = reduce if reduce is not None else (lambda t: t)
    if reduce is not None:  # sharded: the costs of every rank's entries
        total = reduce(total)
    cdt = pieces[0].units.dtype
    if unit_max is None:
        unit_max = torch.cat([
            p.units.amax(-1) if p.rowwise else p.units.amax().reshape(1) for p in pieces
        ]).double()
    # f(tau) <= 0 once every beta_i (u_i - tau) <= logit(B/T); f >= 0 once every one is >= it
    # (u >= 0 bounds every minimum below by 0: a slightly wider bracket, one pass less).
    logit = torch.logit(budgets / total)
    betas = _betas(pieces, device)
    shift = logit[index] / betas
    tau_hi = torch.full_like(budgets, -math.inf).scatter_reduce_(
        0, index, unit_max - shift, "amax")
    tau_lo = torch.full_like(budgets, math.inf).scatter_reduce_(0, index, -shift, "amin")
    work = [None if chunks and not masks and _sums_only(p) else torch.empty_like(p.units)
            for p in pieces]
    # one piece, one segment, numbers for beta and cost, a buffer for m (the GPU route): the
    # sums straight into f and f' (the same values, 11 ops an evaluation instead of 25)
    single = (len(pieces) == 1 and num_segments == 1 and reduce is None and work[0] is not None
              and _plain(pieces[0]))

    # a certified last step (safeguarded_newton; its slope within the rounding of the sums in
    # the compute dtype), not with the masks (those of the last evaluation's tau)
    beta_max = None if masks else torch.zeros_like(budgets).scatter_reduce_(
        0, index, betas, "amax")

    def evaluate(x: torch.Tensor, curvature: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tau = -x
        if single:
            p, m, beta = pieces[0], work[0], float(pieces[0].beta)
            shift = (-beta * tau[0]).to(cdt)
            sums = sigmoid_moments(p.units, beta, shift, curvature, m, keep=masks)
            return _derivatives(sums.mul_(float(p.cost)).unsqueeze(1), betas, budgets)
        parts = []
        for p, m in zip(pieces, work, strict=True):
            if m is None:  # a CPU piece with a number for beta and cost: chunk by chunk
                shift = (-p.beta * _tau_of(p, tau)).to(cdt)
                parts.append(sigmoid_sums(p.units, float(p.beta), shift, curvature).mul_(
                    float(p.cost)).unsqueeze(1))
                continue
            if p.many or isinstance(p.beta, torch.Tensor):
                torch.sub(p.units, _tau_of(p, tau).to(cdt), out=m).mul_(_beta_of(p, cdt))
            else:  # beta u - beta tau in one pass
                torch.add((-p.beta * _tau_of(p, tau)).to(cdt), p.units, alpha=p.beta, out=m)
            m.sigmoid_()
            parts.append(_cost_sums(p, m, curvature))
        terms = [t for t in _derivatives(torch.cat(parts, 1), betas, None) if t is not None]
        sums = torch.zeros(len(terms), num_segments, dtype=torch.float64, device=device)
        sums = reduce_(sums.index_add_(1, index, torch.stack(terms)))
        return sums[0] - budgets, sums[1], sums[2] if curvature else None

    if tau_init is None and reduce is not None:
        # sharded: the sampled cold start would differ by rank; start from the bracket
        tau0 = 0.5 * (tau_lo + tau_hi)
    elif tau_init is None:
        tau0 = _cold_start(pieces, budgets, total, index, num_segments, tau_lo, tau_hi)
    else:
        tau0 = tau_init.to(torch.float64)
    tau0 = torch.minimum(torch.maximum(tau0, tau_lo), tau_hi)
    # beta * (u - tau) is rounded to the compute dtype: a bracket narrower than that rounding
    # cannot improve the residual.
    resolution = 8 * torch.finfo(cdt).eps
    x, f, evaluations, slope = safeguarded_newton(
        evaluate, -tau0, -tau_hi, -tau_lo, budgets, tol, max_iter, resolution=resolution,
        check=check, beta_max=beta_max, max_shift=math.sqrt(2 * torch.finfo(cdt).eps))
    kept = [m for m in work if m is not None] if masks else []
    return SoftSolution(kept, -x, slope, evaluations, f / budgets)


def _derivatives(sums: torch.Tensor, betas: torch.Tensor, budgets: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From ``sum c m``, ``sum c m^2`` (and ``sum c m^3``) per sum (``(2 or 3, K)``, float64),
    with ``x = -tau``: ``f = sum c m`` (less ``budgets`` when given), ``f' = sum c beta m (1 - m)``
    and ``f'' = sum c beta^2 m (1 - m) (1 - 2 m)`` (None without the cubes)."""
    s1, s2 = sums[0], sums[1]
    f = s1 - budgets if budgets is not None else s1
    fp = (s1 - s2) * betas
    if sums.shape[0] == 2:
        return f, fp, None
    return f, fp, (s1 - 3 * s2 + 2 * sums[2]) * (betas * betas)


def _plain(p: Piece) -> bool:
    """Whether piece ``p`` is one segment with a number for beta and for cost."""
    return not p.many and not isinstance(p.beta, torch.Tensor) and not isinstance(
        p.cost, torch.Tensor)


def _sums_only(p: Piece) -> bool:
    """Whether an evaluation of piece ``p`` can be summed a chunk at a time (a plain CPU piece:
    :func:`_plain`)."""
    return p.units.device.type == "cpu" and _plain(p) and p.units.is_contiguous()


def _cold_start(
    pieces: Sequence[Piece], budgets: torch.Tensor, total: torch.Tensor, index: torch.Tensor,
    num_segments: int, lo: torch.Tensor, hi: torch.Tensor,
) -> torch.Tensor:
    """Initial ``tau``: the root of the same budget equation on a strided sample (one stride for
    the whole problem, along the rows; short rows stay whole), so that the full Newton iteration
    starts in its quadratic regime; the bracket's midpoint for small problems."""
    n = sum(p.units.numel() for p in pieces)
    if n < 4 * SAMPLE_SIZE:
        return 0.5 * (lo + hi)
    stride = n // SAMPLE_SIZE
    sample = []
    for p in pieces:
        length = p.units.shape[-1]
        if length < 4 * stride:
            sample.append(p)
            continue
        offset = stride // 2
        cost = p.cost
        if isinstance(cost, torch.Tensor):
            cost = torch.broadcast_to(cost, p.units.shape)[:, offset::stride]
        sample.append(Piece(p.units[:, offset::stride], p.beta, cost, p.segment, p.rowwise))
    if all(s is p for s, p in zip(sample, pieces, strict=True)):
        return 0.5 * (lo + hi)
    target = budgets * (_total_cost(sample, index, num_segments) / total)
    return solve_soft(sample, target, tol=1e-6, max_iter=60).tau


def safeguarded_newton(
    evaluate: Callable[[torch.Tensor, bool],
                       tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    target: torch.Tensor,
    tol: float,
    max_iter: int,
    *,
    resolution: float = 8 * torch.finfo(torch.float64).eps,
    check: bool = True,
    beta_max: torch.Tensor | None = None,
    max_shift: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Solve ``f(x) = 0`` elementwise for increasing ``f`` with ``f(lo) <= 0 <= f(hi)``.

    ``evaluate(x, curvature)`` returns ``(f(x), f'(x), f''(x))``, float64 (``f''`` only when
    ``curvature``, else None). A Newton step that leaves the bracket is replaced by bisection.
    Stops when ``|f| <= tol * target`` everywhere, when the bracket has shrunk to
    ``resolution * (1 + |x|)`` (the tolerance is not attainable at the precision ``f`` is
    computed in), or after ``max_iter`` evaluations. On CUDA the convergence test (a host
    synchronisation) runs every fourth evaluation only; with ``check=False`` never (exactly
    ``max_iter`` evaluations, no host synchronisation: the caller checks the residual).

    ``beta_max``: for ``f`` a sum of terms ``c sigmoid(beta (u + x))`` (``c >= 0``), the largest
    ``beta`` of each component. Where an evaluation is not within the tolerance, the Newton step
    from it is then taken without evaluating when its residual is certified within it: every
    term of ``f'`` changes by at most a factor ``exp(beta_max |t - x|)`` from ``x`` to ``t``, so
    that after the step ``dx = -f/f'``, with ``a = beta_max |dx|``,
    ``|f(x + dx)| <= |f(x)| (exp(a) - 1 - a) / a`` (about ``|f| a / 2``: quadratic). Its
    ``f'`` is then ``f' + f'' dx``, off by at most about ``f' a^2 / 2``: the step is taken only
    where ``a <= max_shift``, so that this stays within the rounding of the sums.

    Returns ``(x, |f(x)| or the certified bound on it, evaluations, f'(x))``.
    """
    check_every = (4 if x.is_cuda else 1) if check else max_iter + 1

    def last(evaluations: int) -> bool:  # whether the iteration may stop after this evaluation
        return evaluations >= max_iter or evaluations % check_every == 0

    certify = beta_max is not None
    f, fp, fpp = evaluate(x, certify and last(1))
    evaluations = 1
    while True:
        if last(evaluations):
            final = evaluations >= max_iter
            done, out = _stop(x, f, fp, fpp, lo, hi, tol * target, resolution, beta_max,
                              max_shift, decide=not final)
            if final or (done is not None and bool(done.all())):
                return out[0], out[1], evaluations, out[2]
        lo = torch.where(f <= 0, x, lo)
        hi = torch.where(f >= 0, x, hi)
        step = x - f / fp
        inside = (step > lo) & (step < hi)  # False for a NaN or infinite step too
        x = torch.where(inside, step, 0.5 * (lo + hi))
        f, fp, fpp = evaluate(x, certify and last(evaluations + 1))
        evaluations += 1


def _stop(x: torch.Tensor, f: torch.Tensor, fp: torch.Tensor, fpp: torch.Tensor | None,
          lo: torch.Tensor, hi: torch.Tensor, limit: torch.Tensor, resolution: float,
          beta_max: torch.Tensor | None, max_shift: float, decide: bool = True
          ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Where :func:`safeguarded_newton` may stop after evaluating ``x`` (None without
    ``decide``: it stops anyway), and its answer ``(x, |f| or its bound, f')`` there: ``x``
    itself, or the certified Newton step from it."""
    r = f.abs()
    done = (r <= limit) | ((hi - lo) <= resolution * (1 + x.abs())) if decide else None
    if fpp is None or beta_max is None:
        return done, (x, r, fp)
    dx = -f / fp
    a = beta_max * dx.abs()
    bound = r * (torch.expm1(a) - a) / a  # NaN for f = 0 or f' = 0: not taken
    take = (bound < r) & (bound <= limit) & (a <= max_shift)
    return done | take if done is not None else None, (
        torch.where(take, x + dx, x), torch.where(take, bound, r),
        torch.where(take, fp + fpp * dx, fp))


def soft_backward(
    pieces: Sequence[Piece], masks: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
    num_segments: int, reduce: Reduce | None = None,
) -> list[torch.Tensor]:
    """Closed-form ``dL/dv`` (``v = c u``, the scores) of the soft top-k, cross-piece term included.

    With ``a = m (1 - m)``, ``S_j = sum_{i in j} c_i beta_i a_i`` and
    ``Lambda_j = sum_{i in j} g_i beta_i a_i / S_j``::

        dL/du_i = beta_i a_i (g_i - c_i Lambda_j),   dL/dv_i = beta_i a_i (g_i / c_i - Lambda_j).

    A saturated segment (``S_j = 0``) has no cross term (``Lambda_j = 0``), not a NaN.
    """
    device = masks[0].device
    index = _segment_index(pieces, device)
    a_list, num, den = [], [], []
    for p, m, g in zip(pieces, masks, grads, strict=True):
        a = torch.addcmul(m, m, m, value=-1).mul_(_beta_of(p, m.dtype))  # beta m (1 - m)
        a_list.append(a)
        ga = a * g if g is not None else torch.zeros_like(a)
        num.append(_row_sum(ga, p.rowwise).double())
        ca = a * p.cost if isinstance(p.cost, torch.Tensor) else a
        den_p = _row_sum(ca, p.rowwise).double()
        den.append(den_p if isinstance(p.cost, torch.Tensor) else den_p * p.cost)
    sums = torch.zeros(2, num_segments, dtype=torch.float64, device=device)
    sums[0].index_add_(0, index, torch.cat(num))
    sums[1].index_add_(0, index, torch.cat(den))
    if reduce is not None:
        sums = reduce(sums)
    lam = torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(torch.finfo(torch.float64).tiny),
                      torch.zeros_like(sums[0]))
    out = []
    for p, a, g in zip(pieces, a_list, grads, strict=True):
        lam_p = _tau_of(p, lam).to(a.dtype)
        gc = g if g is not None else torch.zeros_like(a)
        if isinstance(p.cost, torch.Tensor):
            gc = gc / p.cost
        elif p.cost != 1.0:
            gc = gc / p.cost
        out.append(a.mul_(gc - lam_p))
    return out


def hard_select(
    pieces: Sequence[Piece], budgets: Sequence[float] | torch.Tensor,
    hints: Sequence[float | Hint | None] | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """Hard top-k per segment: the greedy knapsack prefix, ties to the lower position.

    ``budgets``: one per segment, numbers or a float64 tensor (millions of N:M rows: a list
    would take longer to turn into a tensor than the selection takes).

    An entry is kept while at least half of its cost still fits in its segment's budget (with unit
    costs exactly ``floor(B + 0.5)`` entries). Long segments are selected without a sort (a
    sampled window verified by exact counts, ``_select.py``); rows are sorted in one batched call.

    Returns the bool mask of every piece and the unit value of the last kept entry per segment
    (``nan`` for rowwise segments, which do not report one; ``inf`` when nothing is kept).
    """
    masks: list[torch.Tensor | None] = [None] * len(pieces)
    thresholds = [math.nan] * len(budgets)
    by_segment: dict[int, list[int]] = {}
    for k, p in enumerate(pieces):
        if p.rowwise:
            rows = budgets[p.segment:p.segment + p.segments]
            masks[k] = select_rows(p.units, p.cost, rows)
        else:
            by_segment.setdefault(p.segment, []).append(k)
    for j, members in by_segment.items():
        us = [pieces[k].units.reshape(-1) for k in members]
        cs: list[Cost] = []
        for k in members:
            c = pieces[k].cost
            cs.append(torch.broadcast_to(c, pieces[k].units.shape).reshape(-1)
                      if isinstance(c, torch.Tensor) else float(c))
        hint = hints[j] if hints is not None else None
        found, thresholds[j] = select_flat(us, cs, float(budgets[j]), hint)
        for k, m in zip(members, found, strict=True):
            masks[k] = m.view(pieces[k].units.shape)
    return [m for m in masks if m is not None], thresholds


# Rows at least this long are selected one by one without sorting; shorter rows are sorted in
# one batched call (cheaper for many short rows, e.g. N:M groups).
SELECT_MIN_LENGTH = 1 << 12


def select_rows(units: torch.Tensor, cost: Cost, budgets: Sequence[float] | torch.Tensor
                ) -> torch.Tensor:
    """Hard top-k of every row of ``units`` (``(R, L)``) with its own budget (numbers or a
    tensor); bool ``(R, L)``."""
    rows, d = units.shape
    costs = None if not isinstance(cost, torch.Tensor) else torch.broadcast_to(cost, units.shape)
    unit_cost = 1.0 if isinstance(cost, torch.Tensor) else float(cost)
    if d >= SELECT_MIN_LENGTH or rows == 1:
        out = torch.empty(units.shape, dtype=torch.bool, device=units.device)
        for r, row_budget in enumerate(budgets):
            c: Cost = unit_cost if costs is None else costs[r]
            found, _ = select_flat([units[r]], [c], float(row_budget), None)
            out[r] = found[0]
        return out
    cdt = torch.float64
    order = torch.sort(units, dim=-1, descending=True, stable=True).indices
    b = (budgets.to(units.device, cdt) if isinstance(budgets, torch.Tensor)
         else to_device(list(budgets), units.device, cdt)).unsqueeze(-1)
    if costs is None:
        position = torch.arange(1, d + 1, dtype=cdt, device=units.device) * unit_cost
        keep_sorted = (position - 0.5 * unit_cost) <= b
        keep_sorted = keep_sorted.expand(units.shape)
    else:
        c_sorted = torch.gather(costs.to(cdt), -1, order)
        keep_sorted = (c_sorted.cumsum(-1) - 0.5 * c_sorted) <= b
    out = torch.zeros(units.shape, dtype=torch.bool, device=units.device)
    return out.scatter_(-1, order, keep_sorted)


def unit_maxima(pieces: Sequence[Piece]) -> torch.Tensor:
    """The largest unit value of every one-segment piece, float64 ``(len(pieces),)`` (NaN when
    a piece holds one): known ones as they are, the others by one ``amax`` each."""
    return torch.stack([p.unit_max if p.unit_max is not None else p.units.amax()
                        for p in pieces]).double()
