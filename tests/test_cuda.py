"""CUDA: operators and training step agree with the CPU; AMP works. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import batches, convnet, train
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
