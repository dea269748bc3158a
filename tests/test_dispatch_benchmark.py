"""The op/sync counter of ``benchmarks/dispatch.py`` on a small MLP (dense vs Spartan, 1 step)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchspartan as ts

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "dispatch.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_PATH.parent))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location("_dispatch_benchmark", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(_PATH.parent))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _count(bench, spartan: bool):
    model = _mlp()
    if spartan:
        ts.sparsify(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ts.DualAveraging(base, model, sparsity=0.5, total_steps=10) if spartan else base
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    counter = bench.StepCounter("cpu")
    loss = bench.counted_step(model, opt, base, x, y, nn.CrossEntropyLoss(), counter)
    return counter, loss


def test_counts_dense_and_spartan(bench):
    dense, loss_d = _count(bench, spartan=False)
    spartan, loss_s = _count(bench, spartan=True)
    assert torch.isfinite(torch.tensor([loss_d, loss_s])).all()
    for c in (dense, spartan):
        for phase in ("forward", "backward", "optimizer"):
            assert c.total_ops(phase) > 0, phase
    assert dense.total_ops("mask_update") == 0 and dense.total_syncs() == 0
    assert spartan.total_ops("mask_update") > 0
    assert spartan.total_ops() > dense.total_ops()


def test_sync_detector(bench):
    w = nn.Linear(4, 4).weight
    counter = bench.StepCounter("cpu")
    with counter:
        w.sum().item()  # a device value read on the host: one sync
        w[0].tolist()  # a device-to-host copy: one sync
        torch.nonzero(w > 0)  # data-dependent output shape: one sync
        h = torch.tensor([1.0, 2.0])  # made on the host: reading it is no sync
        float(h.sum())
        h.tolist()
    assert counter.total_syncs("forward") == 3
    kinds = [k.split(" @ ")[0] for k in counter.syncs["forward"]]
    assert kinds == ["aten._local_scalar_dense", "Tensor.tolist", "aten.nonzero.default"]
    assert sum(counter.host_reads.values()) == 2
    assert counter.total_ops("forward") > 0
    assert w.tolist()  # the Tensor methods are restored after the counted block
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("policy", [ts.Global, ts.ERK, ts.Uniform, ts.NM])
def test_sync_free_steps_make_at_most_two_host_syncs(bench, policy, fused):
    """On the sync-free path (the CUDA default, forced on the CPU), a warm Spartan step reads
    the device twice at most, whatever the policy (budgets of their own are read together):
    the finite check before the base step and the update's values. With a fused base optimizer
    the finite check is a device flag read with the update's values: one read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    ts.sparsify(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    nm = policy is ts.NM  # 2:4, its rows solved together (torchspartan.rows)
    opt = ts.DualAveraging(base, model, sparsity=0.5 if nm else 0.8, total_steps=100,
                           policy=policy(2, 4) if nm else policy())
    opt.updater.solver.sync_free = True
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    for _ in range(10):  # mid-anneal: every mask below density 1 and warm
        bench.counted_step(model, opt, base, x, y, nn.CrossEntropyLoss())
    counter = bench.StepCounter("cpu")
    bench.counted_step(model, opt, base, x, y, nn.CrossEntropyLoss(), counter)
    record = opt.last_record
    assert record is not None and record.mask_change > 0  # the masks moved at the counted step
    assert counter.total_syncs() <= (1 if fused else 2), dict(counter.syncs["mask_update"])
    if policy in (ts.ERK, ts.Uniform):  # one batched node computes every masked weight
        assert len(opt.updater.couplings) == 1


def test_mix_detector(bench):
    """An op of device tensors and a host tensor of one or more dimensions is what CUDA
    refuses; a host scalar (0-dim) and a tensor moved with ``.to(device)`` are allowed."""
    w = nn.Linear(4, 4).weight
    counter = bench.StepCounter("cpu")
    with counter:
        w.detach() + torch.zeros(4)  # host (4,) into a device op: refused on CUDA
        w.detach() * torch.tensor(2.0)  # a host scalar: allowed
        w.detach() + torch.zeros(4).to(w.device)  # moved to the device first: allowed
    assert len(counter.mixed) == 1, dict(counter.mixed)
    assert next(iter(counter.mixed)).startswith("aten.add.Tensor @ ")


@pytest.mark.parametrize("case", ["global", "global-float64", "blocks", "erk", "uniform-float64",
                                  "floors", "nm24"])
def test_sync_free_steps_keep_every_tensor_on_the_device(bench, case):
    """The masks made and trained on an emulated accelerator (``ts.sparsify`` and the optimizer
    built inside the counter, so what they make on the host is known) never mix a host tensor
    into a device op: on CUDA each such op is an error (CI has no GPU; this is its check)."""
    torch.manual_seed(0)
    dtype = torch.float64 if case.endswith("float64") else torch.float32
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 16)).to(dtype)
    if case == "floors":  # global magnitude would empty the last layers: the held route
        with torch.no_grad():
            model[2].weight.mul_(1e-2)
            model[4].weight.mul_(3e-2)
    policy = {"erk": ts.ERK, "uniform-float64": ts.Uniform,
              "nm24": lambda: ts.NM(2, 4)}.get(case, ts.Global)()
    counter = bench.StepCounter("cpu")
    with counter:
        ts.sparsify(model, block=(4, 4) if case == "blocks" else None)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = ts.DualAveraging(base, model, sparsity=0.5 if case == "nm24" else 0.9,
                               total_steps=8, policy=policy)
        opt.updater.solver.sync_free = True  # the CUDA default
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # cold, annealing, warm, fine-tuning
        x = torch.randn(16, 32, dtype=dtype, generator=gen)
        y = torch.randint(0, 16, (16,), generator=gen)
        bench.counted_step(model, opt, base, x, y, nn.CrossEntropyLoss(), counter)
    assert opt.last_record is not None and opt.last_record.density < 1
    assert dict(counter.mixed) == {}
