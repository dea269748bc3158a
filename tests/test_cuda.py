"""CUDA: operators and training step agree with the CPU; AMP works. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batches, convnet, floored_mlp, train
from torch import nn

import torchspartan as ts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_soft_and_hard_topk_match_cpu() -> None:
    torch.manual_seed(0)
    v = torch.rand(4, 5000, dtype=torch.float64)
    c = torch.rand(4, 5000, dtype=torch.float64) + 0.5
    for costs in (None, c):
        cpu = ts.soft_topk(v, 700.0, 5.0, costs)
        gpu = ts.soft_topk(v.cuda(), 700.0, 5.0, None if costs is None else costs.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-10)
        assert torch.equal(ts.hard_topk(v.cuda(), 700.0, None if costs is None else costs.cuda())
                           .cpu(), ts.hard_topk(v, 700.0, costs))
    vr = v.cuda().requires_grad_()
    ts.soft_topk(vr, 700.0, 5.0).pow(2).sum().backward()
    vc = v.clone().requires_grad_()
    ts.soft_topk(vc, 700.0, 5.0).pow(2).sum().backward()
    torch.testing.assert_close(vr.grad.cpu(), vc.grad, rtol=1e-6, atol=1e-9)
    half = ts.soft_topk(v.cuda().half(), 700.0, 5.0)
    assert half.dtype == torch.float16 and abs(float(half.float().sum(-1).mean()) - 700) < 2


def test_training_step_matches_cpu_in_float64() -> None:
    data = batches(10, (1, 7, 7))
    states = []
    for device in ("cpu", "cuda"):
        model = convnet().to(device)
        ts.sparsify(model)
        opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                               model, sparsity=0.8, total_steps=10)
        train(model, opt, [(x.to(device), y.to(device)) for x, y in data])
        states.append({k: v.cpu() for k, v in model.state_dict().items()})
    for k in states[0]:
        if k.endswith("hard_mask"):
            assert torch.equal(states[0][k], states[1][k]), k
        else:
            torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_autocast_trains(dtype: torch.dtype) -> None:
    model = convnet(dtype=torch.float32).cuda()
    ts.sparsify(model)
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
                           sparsity=0.9, total_steps=10)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for x, y in batches(10, (1, 7, 7), dtype=torch.float32):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x.cuda()), y.cuda())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    assert opt.last_record is not None and opt.last_record.density == pytest.approx(0.1, abs=0.01)


def test_device_selection_on_cuda_is_the_host_selection() -> None:
    """The sync-free selection (sample, key histogram, ties by position) run by CUDA kernels
    keeps what the host selection keeps, past the sample size (the histogram route)."""
    from torchspartan._select import select_on_device, select_top_budget

    for n, count, ties in [(3_000_000, 1_470_000, False), (3_000_000, 150_000, False),
                           (300_000, 123_457, True), (5000, 7, False)]:
        u = torch.randn(n, generator=torch.Generator().manual_seed(n + count)).abs()
        if ties:
            u = (u * 4).round()
        mask, threshold, ok = select_on_device(u.cuda(), count)
        exact, t = select_top_budget([u], [1.0], float(count))
        assert bool(ok), (n, count)
        assert torch.equal(mask.cpu(), exact[0]) and float(threshold) == t, (n, count)


@pytest.mark.parametrize("case", ["global", "erk", "uniform", "blocks", "floors", "nm24"])
def test_sync_free_updates_on_cuda_write_the_cpu_masks(case: str) -> None:
    """Float32 masks on CUDA take the sync-free path by default; its masks are the CPU path's
    (hard masks equal, soft thresholds within the Newton tolerance)."""
    torch.manual_seed(3)
    if case == "floors":
        model = floored_mlp()
    else:
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 16))
    ts.sparsify(model, block=(4, 4) if case == "blocks" else None)
    twin = copy.deepcopy(model).cuda()
    policy = {"erk": ts.ERK, "uniform": ts.Uniform, "nm24": lambda: ts.NM(2, 4)}.get(
        case, ts.Global)
    cpu, gpu = ts.MaskUpdater(model, policy()), ts.MaskUpdater(twin, policy())
    assert gpu.solver.on_device and not cpu.solver.on_device
    gen = torch.Generator().manual_seed(1)
    schedule = [(0.5, 2.0), (0.3, 3.0), (0.1, 4.0), (0.09, 4.5), (0.08, 5.0)]
    if case == "nm24":  # N:M anneals from dense to n/m
        schedule = [(0.9, 2.0), (0.75, 3.0), (0.6, 4.0), (0.5, 4.5), (0.5, 5.0)]
    for step, (density, beta) in enumerate(schedule):
        with torch.no_grad():  # the weights move between updates, identically on both
            for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
                a.theta.add_(1e-3 * torch.randn(a.theta.shape, generator=gen))
                b.theta.copy_(a.theta)
        ra, rb = cpu.update(density, beta, step), gpu.update(density, beta, step)
        assert ra.density == pytest.approx(rb.density, abs=1e-12)
        for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
            assert torch.equal(a.mask.hard_mask, b.mask.hard_mask.cpu()), (case, step, a.name)
            torch.testing.assert_close(b.mask.threshold.cpu(), a.mask.threshold, rtol=1e-4,
                                       atol=1e-7)
