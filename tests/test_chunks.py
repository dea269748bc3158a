"""The CPU chunked passes (``torchspartan._chunks``) against the plain ops they replace."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchspartan._chunks as chunks_module
from torchspartan._chunks import (
    abs_max,
    count_true,
    sigmoid_sums,
    split_window,
    true_positions,
)
from torchspartan._engine import Piece, solve_soft


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 64 entries, chunked from 16 entries on, 3 words per lane sum: every route
    (head, words, tail, several chunks, a short last chunk) on small tensors."""
    monkeypatch.setattr(chunks_module, "CHUNK", 64)
    monkeypatch.setattr(chunks_module, "_MIN_CHUNKED", 16)
    monkeypatch.setattr(chunks_module, "_LANE_WORDS", 3)


def flags_of(seed: int, n: int, offset: int, density: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n + offset, generator=g) < density)[offset:]


@given(st.integers(0, 2**16), st.integers(0, 700), st.integers(0, 15),
       st.sampled_from([0.0, 0.01, 0.3, 1.0]))
@settings(deadline=None)
def test_counts_and_positions_equal_the_plain_ops(seed: int, n: int, offset: int,
                                                  density: float) -> None:
    flags = flags_of(seed, n, offset, density)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunks_module, "_MIN_CHUNKED", 16)
        mp.setattr(chunks_module, "_LANE_WORDS", 3)
        assert int(count_true(flags)) == int(torch.count_nonzero(flags))
        assert torch.equal(true_positions(flags), torch.nonzero(flags).squeeze(1))


@pytest.mark.parametrize("n", [100_003, 1 << 20])
def test_counts_and_positions_at_full_size(n: int) -> None:
    for offset, density in ((0, 0.05), (3, 0.001), (8, 0.7)):
        flags = flags_of(n + offset, n, offset, density)
        assert int(count_true(flags)) == int(torch.count_nonzero(flags))
        assert torch.equal(true_positions(flags), torch.nonzero(flags).squeeze(1))
    shaped = flags_of(1, n - n % 7, 0, 0.2).view(7, -1)  # any shape: flat positions
    assert torch.equal(true_positions(shaped), torch.nonzero(shaped.reshape(-1)).squeeze(1))


@given(st.integers(0, 2**16), st.integers(0, 500), st.sampled_from([torch.float32,
                                                                     torch.float64]))
@settings(deadline=None)
def test_split_window_equals_two_comparisons(seed: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    units = torch.randint(0, 20, (n,), generator=g).to(dtype) / 4  # many ties at the ends
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunks_module, "CHUNK", 64)
        mp.setattr(chunks_module, "_MIN_CHUNKED", 16)
        for low, high in ((1.0, 2.5), (2.0, 2.0), (-float("inf"), 1.25), (4.0, float("inf"))):
            above, inside = split_window(units, low, high)
            assert above.dtype == torch.bool and above.shape == units.shape
            assert torch.equal(above, units > high)
            want = torch.nonzero((units >= low) & (units <= high)).squeeze(1)
            assert torch.equal(inside, want)


def test_split_window_at_full_size_keeps_the_shape() -> None:
    units = torch.rand(300, 1000, generator=torch.Generator().manual_seed(2))
    above, inside = split_window(units, 0.5, 0.501)
    assert torch.equal(above, units > 0.501)
    flat = units.reshape(-1)
    assert torch.equal(inside, torch.nonzero((flat >= 0.5) & (flat <= 0.501)).squeeze(1))


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("n", [5, 64, 65, 1000])
def test_sigmoid_sums_match_float64(n: int) -> None:
    units = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for beta, shift in ((3.0, -1.5), (400.0, -300.0), (1e-3, 0.0)):
        m = torch.add(torch.tensor(shift), units, alpha=beta).sigmoid_().double()
        want = torch.stack([m.sum(), (m * m).sum(), (m * m * m).sum()])
        for cubes in (False, True):
            sums = sigmoid_sums(units, beta, torch.tensor(shift), cubes)
            assert sums.shape == (3 if cubes else 2,) and sums.dtype == torch.float64
            torch.testing.assert_close(sums, want[:sums.numel()], rtol=1e-6, atol=1e-12)


def test_solve_soft_chunked_evaluations_give_the_thresholds_of_the_full_ones() -> None:
    g = torch.Generator().manual_seed(5)
    pieces = [Piece(torch.rand(1, n, generator=g) * s, 30.0, 1.0, 0)
              for n, s in ((200_000, 1.0), (70_000, 2.0), (900, 0.5))]
    budgets = torch.tensor([0.05 * 270_900], dtype=torch.float64)
    chunked = solve_soft(pieces, budgets)
    full = solve_soft(pieces, budgets, masks=True)
    assert chunked.masks == [] and len(full.masks) == 3
    assert float(chunked.error.max()) <= 1e-6 and float(full.error.max()) <= 1e-6
    torch.testing.assert_close(chunked.tau, full.tau, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(chunked.slope, full.slope, rtol=1e-4, atol=0.0)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("n", [5, 64, 1000])
def test_abs_max_equals_abs_and_amax(n: int) -> None:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    a, top = abs_max(x)
    assert torch.equal(a, x.abs().reshape(-1)) and torch.equal(top, x.abs().amax())
    x[n // 2, 1] = float("nan")
    assert bool(abs_max(x)[1].isnan())  # a NaN reaches the maximum (the finiteness check)
