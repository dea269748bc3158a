"""End to end on real data (scikit-learn digits): 90% sparse Spartan within 2 points of dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchspartan as ts

torch.set_flush_denormal(True)
sklearn = pytest.importorskip("sklearn.datasets")


def _data() -> tuple[torch.Tensor, ...]:
    x, y = sklearn.load_digits(return_X_y=True)
    xt = torch.tensor(x, dtype=torch.float32) / 16.0
    yt = torch.tensor(y)
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return xt[tr], yt[tr], xt[te], yt[te]


def _run(sparse: bool, seed: int, epochs: int = 40, batch: int = 50) -> tuple[float, float]:
    xtr, ytr, xte, yte = _data()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    steps = epochs * (len(xtr) // batch)
    opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                                 nesterov=True)
    if sparse:
        ts.sparsify(model)
        opt = ts.DualAveraging(opt, model, sparsity=0.9, total_steps=steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(len(xtr) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    if sparse:
        ts.finalize(model)
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc, ts.sparsity_report(model).masked_sparsity


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny matrices: intra-op threads only add synchronisation (and thrash a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_spartan_90_percent_within_two_points_of_dense_on_digits(one_thread: None) -> None:
    gaps = []
    for seed in (0, 1):
        dense, _ = _run(False, seed)
        sparse, sparsity = _run(True, seed)
        assert sparsity == pytest.approx(0.9, abs=1e-4)
        assert dense > 0.95
        gaps.append(dense - sparse)
    assert sum(gaps) / len(gaps) <= 0.02, gaps
