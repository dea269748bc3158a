"""The sharded hard top-k and soft threshold equal the unsharded ones (Hypothesis, ties included).

The ranks are threads here, exchanging through an in-process board with the collectives'
semantics (sums in rank order, identical on every rank), so that many examples run in seconds;
the gloo runs of test_fsdp.py exercise the same code over real process groups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchspartan._engine import Piece, hard_select, solve_soft
from torchspartan.distributed import ShardGroup
from torchspartan.sharded_select import select_segments, select_sharded


class Board:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[Any] = [None] * world


class ThreadGroup(ShardGroup):
    """A ShardGroup whose ranks are threads of one process."""

    def __init__(self, board: Board, rank: int) -> None:  # no torch.distributed
        self.group = None
        self.board, self.rank, self.size = board, rank, board.world

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.board.slots[self.rank] = t.clone()
        self.board.barrier.wait()
        out = list(self.board.slots)
        self.board.barrier.wait()
        return out

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        parts = self._exchange(t)
        out = parts[0].clone()
        for p in parts[1:]:
            out = out + p if op == "sum" else torch.maximum(out, p)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(t))


def on_ranks(world: int, fn: Callable[[ShardGroup], Any]) -> list[Any]:
    board = Board(world)
    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(fn, ThreadGroup(board, r)) for r in range(world)]
        return [f.result(timeout=60) for f in futures]


def shards(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """FSDP2's Shard(0) of a flat tensor viewed as rows of 1: chunks of ceil(n / world)."""
    chunk = -(-t.numel() // world)
    return [t[min(r * chunk, t.numel()):min((r + 1) * chunk, t.numel())] for r in range(world)]


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[float], float, int]:
    world = draw(st.integers(1, 4))
    n_tensors = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    ties = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(n_tensors):
        n = draw(st.integers(1, 300))
        u = torch.randn(n, generator=g, dtype=torch.float64).abs()
        if ties:
            u = (u * 3).round() / 3  # few distinct values: many ties straddle the boundary
        tensors.append(u.to(dtype))
    costs = [draw(st.sampled_from([1.0, 0.5, 2.0])) for _ in range(n_tensors)]
    total = sum(c * t.numel() for c, t in zip(costs, tensors, strict=True))
    budget = draw(st.floats(0.01, 0.99)) * total
    return tensors, costs, budget, world


@settings(max_examples=80, deadline=None)
@given(problems(), st.sampled_from([0, 64, 1 << 12]), st.booleans())
def test_sharded_hard_topk_equals_unsharded(problem: Any, gather_max: int, sized: bool) -> None:
    # gather_max 0: histogram rounds down to one key and the tie table; else candidates gathered
    tensors, costs, budget, world = problem
    pieces = [Piece(t.reshape(1, -1), 1.0, c, 0) for t, c in zip(tensors, costs, strict=True)]
    want, want_t = hard_select(pieces, [budget])
    unit_max = max(float(t.max()) for t in tensors)
    entries = sum(t.numel() for t in tensors) if sized else None

    def rank(group: ShardGroup) -> tuple[list[torch.Tensor], float]:
        mine = [shards(t, group.size)[group.rank] for t in tensors]
        return select_sharded(mine, costs, budget, unit_max, group, entries, gather_max)

    results = on_ranks(world, rank)
    for k, w in enumerate(want):
        got = torch.cat([masks[k] for masks, _ in results])
        assert torch.equal(got, w.reshape(-1)), f"tensor {k}"
    assert all(t == want_t[0] for _, t in results)


@settings(max_examples=30, deadline=None)
@given(problems(), st.floats(0.5, 20.0), st.booleans())
def test_sharded_soft_threshold_equals_unsharded(problem: Any, beta: float, warm: bool
                                                 ) -> None:
    tensors, costs, budget, world = problem
    tensors = [t.double() for t in tensors]
    betas = [beta * (1 + k) for k in range(len(tensors))]
    budgets = torch.tensor([budget], dtype=torch.float64)
    full = [Piece(t.reshape(1, -1), b, c, 0) for t, b, c in zip(tensors, betas, costs,
                                                                 strict=True)]
    init = torch.tensor([float(torch.cat(tensors).median())]) if warm else None
    want = solve_soft(full, budgets, tau_init=init, tol=1e-12)
    unit_max = torch.stack([t.max() for t in tensors])

    def rank(group: ShardGroup) -> tuple[float, float, float]:
        mine = [Piece(shards(t, group.size)[group.rank].reshape(1, -1), b, c, 0)
                for t, b, c in zip(tensors, betas, costs, strict=True)]
        s = solve_soft(mine, budgets, tau_init=init, unit_max=unit_max, reduce=group.sum,
                       tol=1e-12)
        return float(s.tau[0]), float(s.slope[0]), float(s.error[0])

    results = on_ranks(world, rank)
    assert len({r[0] for r in results}) == 1  # every rank the same threshold
    tau, slope, error = results[0]
    assert error <= 1e-10
    scale = 1.0 + abs(float(want.tau[0]))
    assert abs(tau - float(want.tau[0])) <= 1e-8 * scale
    torch.testing.assert_close(slope, float(want.slope[0]), rtol=1e-6, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([0, 1 << 12]), st.integers(0, 2**16))
def test_sharded_hard_topk_of_several_budgets(problem: Any, gather_max: int, seed: int) -> None:
    # every tensor its own budget or tensors sharing one: select_segments equals one budget at
    # a time, unsharded
    tensors, costs, _, world = problem
    g = torch.Generator().manual_seed(seed)
    segment_of = [0] + [int(torch.randint(0, 2, (1,), generator=g)) * k
                        for k in range(1, len(tensors))]
    segments = sorted(set(segment_of))
    segment_of = [segments.index(s) for s in segment_of]
    budgets, want = [], {}
    for j in range(len(segments)):
        members = [k for k, s in enumerate(segment_of) if s == j]
        total = sum(costs[k] * tensors[k].numel() for k in members)
        budgets.append(float(torch.rand((), generator=g)) * 0.98 * total + 0.01 * total)
        pieces = [Piece(tensors[k].reshape(1, -1), 1.0, costs[k], 0) for k in members]
        masks, thresholds = hard_select(pieces, [budgets[-1]])
        want[j] = (members, masks, thresholds[0])
    unit_max = [max(float(tensors[k].max()) for k in want[j][0]) for j in range(len(budgets))]

    def rank(group: ShardGroup) -> tuple[list[torch.Tensor], list[float]]:
        mine = [shards(t, group.size)[group.rank] for t in tensors]
        return select_segments(mine, costs, segment_of, budgets, unit_max, group,
                               gather_max=gather_max)

    results = on_ranks(world, rank)
    for j, (members, masks, threshold) in want.items():
        for k, w in zip(members, masks, strict=True):
            got = torch.cat([r[0][k] for r in results])
            assert torch.equal(got, w.reshape(-1)), f"tensor {k} of budget {j}"
        assert all(r[1][j] == threshold for r in results)
