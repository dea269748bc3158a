"""The compiled elementwise chains of the sync-free update (``torchspartan._fused``), compiled
here for the CPU (on a GPU they are compiled for CUDA tensors; the CUDA tests run them there)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import floored_mlp
from torch._dynamo.utils import counters

import torchspartan as ts
import torchspartan._fused as fused
import torchspartan.coupling as coupling
from torchspartan._select import select_on_device, select_top_budget


@pytest.fixture(scope="module")
def cpu_compiler() -> None:
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.ones(3))
    except Exception as exc:  # e.g. no C++ compiler on this machine
        pytest.skip(f"torch.compile cannot build for this CPU: {exc!r:.200}")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "COMPILED_ON", {"cpu", "cuda"})
    # fresh wrappers: nothing compiled or failed from another test
    monkeypatch.setattr(fused, "_bin_index_compiled", fused.Compiled(fused._bin_index))
    monkeypatch.setattr(fused, "_moments2_compiled", fused.Compiled(fused._moments2))
    monkeypatch.setattr(fused, "_moments3_compiled", fused.Compiled(fused._moments3))
    for name, fn in (("_WEIGHTS", fused.masked_weights), ("_GRAD_SUMS", fused.weight_grad_sums),
                     ("_GRADS", fused.weight_grads)):
        monkeypatch.setattr(coupling, name, fused.Compiled(fn, dynamic=False, contiguous=False))
    torch._dynamo.reset()


@pytest.fixture
def compiled_on_cpu(fresh: None, cpu_compiler: None) -> None:
    pass


def test_compiled_bins_and_moments_are_the_eager_ones(compiled_on_cpu: None) -> None:
    """The bins are exactly the eager ops' (int32); the moments agree to float32 rounding; and
    each function compiles once, whatever the problem size, the sharpness and the shift (a
    recompile costs seconds in the middle of training)."""
    counters.clear()
    for n in (300_007, 16_390):
        u = torch.rand(1, n, generator=torch.Generator().manual_seed(n))
        keys = u.view(torch.int32).reshape(-1)
        for key_lo in (keys[0].clone(), keys[17], keys.new_zeros(())):  # views as well
            assert torch.equal(fused.bin_index(keys, key_lo, 1 << 22, 1 << 12),
                               fused._bin_index(keys, key_lo, 1 << 22, 1 << 12))
        out = torch.empty_like(u)
        for step in range(3):
            beta, shift = 2.0 + 0.3 * step, torch.tensor(-1.0 - 0.2 * step)
            for cubes in (False, True):
                got = fused.sigmoid_moments(u, beta, shift, cubes, out)
                want = fused.sigmoid_moments(u, beta, shift, cubes, out, keep=True)  # eager
                assert got.dtype == torch.float64 and got.shape == (3 if cubes else 2,)
                torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    assert counters["stats"]["unique_graphs"] == 3  # bins, moments, moments with cubes
    for f in (fused._bin_index_compiled, fused._moments2_compiled, fused._moments3_compiled):
        assert not f.failed and f.compiled is not None


def test_the_device_selection_with_compiled_bins_is_the_host_selection(
        compiled_on_cpu: None) -> None:
    # past the sample size: the histogram route, with ties straddling the boundary
    for n, count, ties in [(400_000, 20_000, False), (300_000, 123_457, True)]:
        u = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
        if ties:
            u = (u * 4).round()
        mask, threshold, ok = select_on_device(u, count)
        exact, t = select_top_budget([u], [1.0], float(count))
        assert bool(ok) and torch.equal(mask, exact[0]) and float(threshold) == t


def test_a_failed_compile_warns_once_and_runs_the_eager_ops(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("no backend here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    u = torch.rand(1000)
    keys, key_lo = u.view(torch.int32), u.view(torch.int32)[3].clone()
    with pytest.warns(UserWarning, match="compiling _bin_index failed.*eager ops"):
        got = fused.bin_index(keys, key_lo, 1 << 22, 1 << 12)
    assert torch.equal(got, fused._bin_index(keys, key_lo, 1 << 22, 1 << 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next call runs the eager ops quietly
        fused.bin_index(keys, key_lo, 1 << 22, 1 << 12)


def test_under_a_dispatch_mode_the_eager_ops_run_and_compiling_is_not_given_up(
        compiled_on_cpu: None) -> None:
    """torch.compile refuses to compile under a user's TorchDispatchMode (FlopCounterMode, a
    counting mode): the eager ops run there, quietly, and the kernel compiles after it."""
    from torch.utils.flop_counter import FlopCounterMode

    u = torch.rand(1000)
    keys, key_lo = u.view(torch.int32), u.view(torch.int32)[3].clone()
    want = fused._bin_index(keys, key_lo, 1 << 22, 1 << 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compiling failed"
        with FlopCounterMode(display=False):
            assert torch.equal(fused.bin_index(keys, key_lo, 1 << 22, 1 << 12), want)
        assert fused._bin_index_compiled.compiled is None  # not even tried
        assert torch.equal(fused.bin_index(keys, key_lo, 1 << 22, 1 << 12), want)
    assert not fused._bin_index_compiled.failed
    assert fused._bin_index_compiled.compiled is not None


def test_sync_free_training_with_compiled_chains_keeps_its_promises(
        compiled_on_cpu: None) -> None:
    """A sync-free run whose selection and Newton evaluations take the compiled kernels keeps
    the exact budget and the Newton tolerance at every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 800), torch.nn.Tanh(),
                                torch.nn.Linear(800, 10))  # past the sample: the histogram
    ts.sparsify(model, min_density=0.0)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = ts.DualAveraging(base, model, sparsity=0.9, total_steps=40)
    opt.updater.solver.sync_free = True
    x, y = torch.randn(64, 300), torch.randint(0, 10, (64,))
    counters.clear()
    masked = sum(r.theta.numel() for r in ts.find_masks(model))
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        record = opt.last_record
        assert record is not None and record.budget_error <= 1e-4
        kept = sum(int(r.mask.hard_mask.sum()) for r in ts.find_masks(model))
        assert kept == round(record.target_density * masked)
    assert not fused._moments2_compiled.failed and not fused._bin_index_compiled.failed
    assert fused._moments2_compiled.compiled is not None
    assert fused._bin_index_compiled.compiled is not None
    # compiled once each, at the first steps: bins, the sums with and without cubes, and the
    # masked weights' forward and two backward passes
    assert counters["stats"]["unique_graphs"] <= 6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_masked_weights_and_gradients_are_the_eager_ones(
        compiled_on_cpu: None, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The batched node's forward and backward as one compiled pass per weight: the masked
    weights and every gradient (the shared budget's cross term and the held layers' own) are
    the multi-tensor ops', and the three kernels compile once over a run whose masks,
    thresholds and sharpness change every step."""
    def run(compiled: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        monkeypatch.setattr(fused, "COMPILED_ON", {"cpu"} if compiled else set())
        torch.manual_seed(0)
        model = floored_mlp().to(dtype)
        ts.sparsify(model)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = ts.DualAveraging(base, model, sparsity=0.95, total_steps=20)
        x = torch.randn(16, 32, dtype=dtype)
        y = torch.randint(0, 10, (16,))
        weights, grads = [], []
        counters.clear()
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            refs = ts.find_masks(model)
            weights += [getattr(r.module, r.tensor_name).detach().clone() for r in refs]
            grads += [r.theta.grad.clone() for r in refs]
            opt.step()
        held = sum(len(c.locals) for c in opt.updater.couplings)
        assert held > 0  # the floors hold layers: their own budgets in the node too
        return weights, grads, counters["stats"]["unique_graphs"]

    w_fused, g_fused, graphs = run(True)
    w_eager, g_eager, _ = run(False)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(w_fused + g_fused, w_eager + g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    assert graphs == 3
    assert all(f.compiled is not None and not f.failed
               for f in (coupling._WEIGHTS, coupling._GRAD_SUMS, coupling._GRADS))
