"""The training API: gradients, lifecycle, resume, policies, mixing, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import (
    batches,
    block_expand,
    block_reduce,
    block_sizes,
    convnet,
    masked_kept,
    mlp,
    train,
)
from torch import nn
from torch.nn.utils import parametrize, prune

import torchspartan as ts

torch.set_flush_denormal(True)


def make(model: nn.Module, sparsity: float = 0.8, steps: int = 20, lr: float = 0.05,
         **kw: object) -> ts.DualAveraging:
    return ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model,
                            sparsity=sparsity, total_steps=steps, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Gradient: the exact gradient through the global soft top-k, against autograd through a
# float64 reference (one unrolled Newton step from the solved threshold, so autograd sees the
# implicit-function derivative of tau, and a straight-through hard mask).
# ---------------------------------------------------------------------------------------
def reference_loss(model: nn.Module, masks: list[tuple[str, ts.SpartanMask, torch.Tensor]],
                   x: torch.Tensor, y: torch.Tensor, budget: float) -> torch.Tensor:
    tau0 = float(masks[0][1].threshold)
    us, metas = [], []
    for _, mask, theta in masks:
        sizes = block_sizes(theta.shape, mask.block)
        cost, beta = float(mask.cost), float(mask.beta)
        us.append(block_reduce(theta.abs(), sizes) / cost)
        metas.append((sizes, cost, beta))

    def residual(tau: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        f = -budget + sum(c * torch.sigmoid(b * (u - tau)).sum()
                          for u, (_, c, b) in zip(us, metas, strict=True))
        slope = sum(c * b * (torch.sigmoid(b * (u - tau)) * (1 - torch.sigmoid(b * (u - tau))))
                    .sum() for u, (_, c, b) in zip(us, metas, strict=True))
        return f, slope  # type: ignore[return-value]

    f0, s0 = residual(tau0)
    # value tau0, derivative d tau / d u = c beta a / S: the implicit derivative (one Newton step)
    tau = tau0 + (f0 - f0.detach()) / s0.detach()
    weights = {}
    for (name, mask, theta), u, (sizes, _, b) in zip(masks, us, metas, strict=True):
        m = block_expand(torch.sigmoid(b * (u - tau)), sizes)
        h = block_expand(mask.hard_mask, sizes).to(theta.dtype)
        kappa = theta * m
        weights[name] = kappa + (kappa * h - kappa).detach()  # straight-through h
    return nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)


@pytest.mark.parametrize("kind", ["mlp", "blocks", "conv-cost"])
def test_gradient_matches_float64_reference(kind: str) -> None:
    if kind == "conv-cost":
        model = convnet()
        ts.sparsify(model, min_density=0.0)  # one global problem (no floor splits it)
        x = torch.randn(5, 1, 7, 7, dtype=torch.float64)
        policy: ts.AllocationPolicy = ts.CostSensitive(x[:1])
    else:
        model = mlp()
        ts.sparsify(model, block=(3, 2) if kind == "blocks" else None)
        x = torch.randn(5, 6, dtype=torch.float64)
        policy = ts.Global()
    y = torch.tensor([0, 1, 2, 1, 0])
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.0), model, sparsity=0.6,
                           total_steps=10, policy=policy, density=ts.constant(0.4),
                           beta=ts.constant(3.0))
    nn.functional.cross_entropy(model(x), y).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = copy.deepcopy(model)
    masks = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            mask = module.parametrizations.weight[0]
            theta = module.parametrizations.weight.original.detach().clone().requires_grad_()
            masks.append((f"{name}.weight", mask, theta))
            parametrize.remove_parametrizations(
                plain.get_submodule(name), "weight", leave_parametrized=False)
    assert {float(m.threshold) for _, m, _ in masks}.__len__() == 1  # one global problem
    budget = 0.4 * sum(float(m.cost) / m.block_numel * t.numel() for _, m, t in masks)
    loss = reference_loss(plain, masks, x, y, budget)
    grads = torch.autograd.grad(loss, [t for _, _, t in masks])
    for (name, _, _), g in zip(masks, grads, strict=True):
        key = name.replace(".weight", ".parametrizations.weight.original")
        torch.testing.assert_close(ours[key], g, rtol=1e-7, atol=1e-10)
    # the cross-layer term matters: without it the gradient differs
    assert opt.last_record is not None and opt.last_record.iterations > 0


def test_gradient_accumulation_equals_full_batch() -> None:
    data = batches(1, (6,), batch=8)
    full, halves = mlp(), mlp()
    for model in (full, halves):
        ts.sparsify(model)
    opts = [make(m, density=ts.constant(0.3), beta=ts.constant(4.0)) for m in (full, halves)]
    x, y = data[0]
    nn.functional.cross_entropy(full(x), y).backward()
    for sl in (slice(0, 4), slice(4, 8)):
        (0.5 * nn.functional.cross_entropy(halves(x[sl]), y[sl])).backward()
    for (n, a), (_, b) in zip(full.named_parameters(), halves.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=n)
    for opt in opts:
        opt.step()
    for a, b in zip(full.parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_clipping_sees_the_full_gradient() -> None:
    model = mlp()
    ts.sparsify(model)
    opt = make(model, density=ts.constant(0.3), beta=ts.constant(4.0))
    x, y = batches(1, (6,))[0]
    nn.functional.cross_entropy(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    clipped = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    assert float(norm) > 1e-3 and math.isclose(float(clipped), 1e-3, rel_tol=1e-5)
    opt.step()


# ---------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------
def test_lifecycle_identity_sparsity_and_state_dict_keys() -> None:
    model = mlp()
    params = {n: p for n, p in model.named_parameters()}
    ts.sparsify(model)
    for i in (0, 2, 4):
        assert model[i].parametrizations.weight.original is params[f"{i}.weight"]
    opt = make(model, sparsity=0.75)
    train(model, opt, batches(20, (6,)))
    ts.finalize(model)
    for i in (0, 2, 4):
        assert model[i].weight is params[f"{i}.weight"]
        assert not parametrize.is_parametrized(model[i])
    n = sum(model[i].weight.numel() for i in (0, 2, 4))
    zeros = sum(int((model[i].weight == 0).sum()) for i in (0, 2, 4))
    assert zeros == n - math.floor(0.25 * n + 0.5)
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())  # the original keys
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(RuntimeError, match="finalized"):
        opt.step()


@pytest.mark.parametrize("stop", [3, 9, 17])
def test_resume_is_bit_identical(stop: int) -> None:
    data = batches(20, (1, 7, 7), dtype=torch.float32)
    steps = 20

    def build() -> tuple[nn.Module, ts.DualAveraging]:
        model = convnet(dtype=torch.float32)
        ts.sparsify(model, exclude=[r"^0$"])
        ts.sparsify(model, names=r"^0$", block=(2, 1))
        return model, make(model, sparsity=0.9, steps=steps)

    model, opt = build()
    train(model, opt, data)

    model2, opt2 = build()
    train(model2, opt2, data[:stop])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3, opt3 = build()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    train(model3, opt3, data[stop:])
    for (n, a), b in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert opt.last_record == opt3.last_record
    # the wrapper still shares the base optimizer's param_groups after loading
    assert opt3.param_groups is opt3.optimizer.param_groups
    assert opt3.state is opt3.optimizer.state


def test_state_dict_from_another_model_is_refused() -> None:
    a, b = mlp(), mlp(width=10)
    ts.sparsify(a)
    ts.sparsify(b)
    sd = make(a).state_dict()
    with pytest.raises(ValueError, match="different model"):
        make(b).load_state_dict(sd)


def test_plain_optimizer_checkpoint_loads_with_warning() -> None:
    model = mlp()
    ts.sparsify(model)
    opt = make(model)
    with pytest.warns(UserWarning, match="spartan"):
        opt.load_state_dict(opt.optimizer.state_dict())


# ---------------------------------------------------------------------------------------
# Exact sparsity per policy and block shape
# ---------------------------------------------------------------------------------------
def _kept_after_training(policy: ts.AllocationPolicy, block: tuple[int, ...] | None,
                         sparsity: float = 0.85) -> tuple[nn.Module, ts.DualAveraging]:
    model = convnet()
    # min_density=0: the budget exactness itself (at 85% the default floors exceed the budget of
    # this tiny model, and Uniform rounds a 2-block tensor to no block)
    ts.sparsify(model, block=(2, 1) if block else None, include=(nn.Conv2d,), min_density=0.0)
    ts.sparsify(model, block=block, include=(nn.Linear,), min_density=0.0)
    opt = make(model, sparsity=sparsity, steps=12, policy=policy)
    train(model, opt, batches(12, (1, 7, 7)))
    return model, opt


@pytest.mark.parametrize("block", [None, (2, 1), (4, 4)])
def test_exact_sparsity_global_and_uniform(block: tuple[int, ...] | None) -> None:
    for policy in (ts.Global(), ts.Uniform()):
        model, opt = _kept_after_training(policy, block)
        kept = masked_kept(model)
        sizes = {n: int(t.numel()) for n, t in model.state_dict().items()}
        numel = {n: sizes[n.replace(".weight", ".parametrizations.weight.original")]
                 for n in kept}
        bnum = 1 if block is None else max(2, math.prod(block))
        if isinstance(policy, ts.Global):
            target = 0.15 * sum(numel.values())
            if block is None:
                assert sum(kept.values()) == math.floor(target + 0.5)
            assert abs(sum(kept.values()) - target) <= bnum / 2
        else:
            for n, k in kept.items():
                target = 0.15 * numel[n]
                if block is None:
                    assert k == math.floor(target + 0.5), n
                assert abs(k - target) <= bnum / 2, n
        ts.finalize(model)
        rep = ts.sparsity_report(model)
        assert abs(rep.masked_sparsity - 0.85) <= len(kept) * bnum / sum(numel.values())


def capped_proportional(weights: list[float], sizes: list[int], kept: float) -> list[float]:
    """Reference ERK densities: bisection on the scale eps of min(1, eps * w)."""
    lo, hi = 0.0, 1e12
    for _ in range(200):
        eps = 0.5 * (lo + hi)
        if sum(min(1.0, eps * w) * n for w, n in zip(weights, sizes, strict=True)) < kept:
            lo = eps
        else:
            hi = eps
    return [min(1.0, hi * w) for w in weights]


def test_exact_sparsity_erk_and_cost_sensitive() -> None:
    model, opt = _kept_after_training(ts.ERK(), None)
    kept = masked_kept(model)
    infos = opt.updater.tensors
    scores = [sum(i.shape) / math.prod(i.shape) for i in infos]
    dens = capped_proportional(scores, [i.numel for i in infos],
                               0.15 * sum(i.numel for i in infos))
    for info, d in zip(infos, dens, strict=True):
        assert kept[info.name] == math.floor(d * info.numel + 0.5)
    assert len(set(round(k / i.numel, 2) for k, i in zip(kept.values(), infos, strict=True))) > 1

    x = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    model, opt = _kept_after_training(ts.CostSensitive(x), None)
    kept = masked_kept(model)
    costs = {t.name: t.unit_cost for t in opt.updater.tensors}
    assert len(set(round(c, 6) for c in costs.values())) > 1  # conv entries cost more
    budget = 0.15 * sum(i.cost for i in opt.updater.tensors)
    spent = sum(kept[n] * costs[n] for n in kept)
    assert abs(spent - budget) <= max(costs.values()) / 2


def test_sparsity_of_whole_model_compensates() -> None:
    model = mlp(width=16)
    ts.sparsify(model, exclude=[r"^4$"], min_density=0.0)  # 4 weights left: below the floors
    opt = make(model, sparsity=0.8, sparsity_of="model")
    train(model, opt, batches(20, (6,)))
    ts.finalize(model)
    rep = ts.sparsity_report(model)
    total = sum(p.numel() for p in model.parameters())
    assert abs(rep.overall_sparsity - 0.8) <= 1.0 / total
    with pytest.raises(ValueError, match="no budget"):
        other = mlp(width=16)
        ts.sparsify(other, names=r"^0$")
        make(other, sparsity=0.99, sparsity_of="model")


def test_min_max_density_bounds() -> None:
    model = mlp()
    ts.sparsify(model, names=r"^[02]$", min_density=0.0)  # the default floors would not fit
    ts.sparsify(model, names=r"^4$", min_density=0.5)
    opt = make(model, sparsity=0.9)
    train(model, opt, batches(20, (6,)))
    kept = masked_kept(model)
    assert kept["4.weight"] == 18  # 0.5 * 36
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("original"))
    assert sum(kept.values()) == math.floor(0.1 * total + 0.5)


# ---------------------------------------------------------------------------------------
# Methods, phases and records
# ---------------------------------------------------------------------------------------
# topkast and rigl masks are trained by ts.TopKAST / ts.RigL (tests/test_baselines.py)
@pytest.mark.parametrize("method", ["spartan", "gmp"])
def test_methods_train_and_freeze(method: str) -> None:
    model = mlp()
    ts.sparsify(model, method=method)  # type: ignore[arg-type]
    opt = make(model, sparsity=0.8, steps=20)
    records = []
    for x, y in batches(20, (6,)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        records.append(opt.last_record)
    assert records[3].density == pytest.approx(0.2, abs=0.01)  # annealed over 20% = 4 steps
    assert [r.frozen for r in records].index(True) == 15  # last 20% frozen
    assert all(r.mask_change == 0 for r in records[16:])
    assert records[0].mask_change > 0
    assert records[10].beta == pytest.approx(1 + 9 * 11 / 16)


def test_fixed_mask_is_kept() -> None:
    model = mlp()
    fixed = torch.rand(12, 6) > 0.5
    parametrize.register_parametrization(model[0], "weight",
                                         ts.SpartanMask("fixed", mask=fixed))
    ts.sparsify(model, exclude=[r"^0$"])
    opt = make(model, sparsity=0.5)
    train(model, opt, batches(20, (6,)))
    assert torch.equal(model[0].parametrizations.weight[0].hard_mask, fixed)
    assert torch.equal(model[0].weight != 0, fixed)


def test_lr_scheduler_and_grad_scaler_work_unchanged() -> None:
    model = mlp(dtype=torch.float32)
    ts.sparsify(model)
    opt = make(model, steps=10)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in batches(10, (6,), dtype=torch.float32):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert opt.last_record is not None and opt.last_record.step == 10
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------
# Mixing, stacking, deepcopy, layer types
# ---------------------------------------------------------------------------------------
def test_mixes_with_torch_prune_and_other_parametrizations() -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    ts.sparsify(model, names=r"^[24]$")
    parametrize.register_parametrization(model[2], "weight", Scale())  # stacked after the mask
    opt = make(model, sparsity=0.75)
    train(model, opt, batches(20, (6,)))
    assert int((model[0].weight == 0).sum()) == 36
    w2 = model[2].weight.detach().clone()
    ts.finalize(model)
    assert torch.equal(model[2].weight, w2)  # both parametrizations baked in
    assert int((model[0].weight == 0).sum()) == 36

    wrong = mlp()
    parametrize.register_parametrization(wrong[0], "weight", Scale())
    parametrize.register_parametrization(wrong[0], "weight", ts.SpartanMask())
    with pytest.raises(ValueError, match="registered first"):
        make(wrong)


def test_deepcopy_gives_an_unbound_equal_model() -> None:
    model = mlp()
    ts.sparsify(model)
    opt = make(model)
    train(model, opt, batches(6, (6,)))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    opt2 = make(twin)
    before = [p.detach().clone() for p in model.parameters()]
    train(twin, opt2, batches(3, (6,), seed=5))
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_layer_types_attention_embedding_conv1d_conv3d() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.c1 = nn.Conv1d(8, 8, 3, padding=1)
            self.c3 = nn.Conv3d(1, 2, 2)
            self.out = nn.Linear(8 + 2 * 27, 3)

        def forward(self, tok: torch.Tensor, vol: torch.Tensor) -> torch.Tensor:
            e = self.emb(tok)
            a, _ = self.attn(e, e, e)
            c = self.c1(a.transpose(1, 2)).mean(-1)
            v = self.c3(vol).flatten(1)
            return self.out(torch.cat([c, v], 1))

    net = Net()
    names = ts.sparsify(net, include=(nn.Linear, nn.Conv1d, nn.Conv3d, nn.MultiheadAttention,
                                      nn.Embedding))
    assert "attn.in_proj_weight" in names and "attn.out_proj.weight" in names
    assert "emb.weight" in names
    opt = make(net, sparsity=0.7, steps=6)
    for _ in range(6):
        opt.zero_grad()
        out = net(torch.randint(0, 20, (4, 5)), torch.randn(4, 1, 4, 4, 4))
        nn.functional.cross_entropy(out, torch.randint(0, 3, (4,))).backward()
        opt.step()
    total = sum(int(m.numel()) for n, m in net.state_dict().items() if n.endswith("original"))
    assert sum(masked_kept(net).values()) == math.floor(0.3 * total + 0.5)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def test_bad_input_errors() -> None:
    model = mlp()
    ts.sparsify(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            ts.DualAveraging(sgd, model, sparsity=bad, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        ts.DualAveraging(sgd, model, sparsity=0.5, total_steps=0)
    with pytest.raises(ValueError, match="no SpartanMask"):
        ts.DualAveraging(sgd, mlp(), sparsity=0.5, total_steps=10)
    partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="2.weight is masked but its parameter is not in"):
        ts.DualAveraging(partial, model, sparsity=0.5, total_steps=10)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ts.DualAveraging(model, model, sparsity=0.5, total_steps=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"block \(5, 5\) does not divide .*\(12, 6\)"):
        ts.sparsify(mlp(), block=(5, 5))
    with pytest.raises(ValueError, match="method"):
        ts.SpartanMask("magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matched no layer"):
        ts.sparsify(mlp(), names="nothing")


def test_nan_weights_raise_naming_the_tensor_and_change_nothing() -> None:
    model = mlp()
    ts.sparsify(model)
    opt = make(model)
    train(model, opt, batches(2, (6,)))
    x, y = batches(1, (6,))[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].parametrizations.weight.original.grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"2\.weight has a non-finite gradient"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.state_dict()["spartan"] == state_before["spartan"]


def test_issue_usage_resnet18_runs_as_written() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            parametrize.register_parametrization(m, "weight", ts.SpartanMask())
    steps = 3
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           model, sparsity=0.95, total_steps=steps, anneal_fraction=0.34)
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(steps)]
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masked = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ts.finalize(model)
    n = sum(w.numel() for w in masked)
    zeros = sum(int((w == 0).sum()) for w in masked)
    assert zeros == n - math.floor(0.05 * n + 0.5)
    assert "weights (dim >= 2)" in str(ts.sparsity_report(model))


def test_layer_collapse_warns_once_and_min_density_prevents_it() -> None:
    def build(min_density: float | None) -> tuple[nn.Module, ts.DualAveraging]:
        model = mlp()
        with torch.no_grad():
            model[4].weight.mul_(1e-4)  # tiny weights: the global budget drops them all
        # explicit 0 on the others: their default floors (24 of a 25-weight budget) and this
        # one's would not fit together
        ts.sparsify(model, names=r"^[02]$", min_density=0.0)
        ts.sparsify(model, names=r"^4$", min_density=min_density)
        return model, make(model, sparsity=0.9, steps=10)

    model, opt = build(0.0)
    with pytest.warns(UserWarning, match=r"4\.weight: every entry is pruned .*min_density"):
        train(model, opt, batches(10, (6,)))
    assert masked_kept(model)["4.weight"] == 0
    model, opt = build(0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, batches(10, (6,)))
    assert masked_kept(model)["4.weight"] == 4  # floor(0.1 * 36 + 0.5)
    model, opt = build(None)  # the default floor: one entry per output unit, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, batches(10, (6,)))
    kept = masked_kept(model)
    assert kept["4.weight"] == 3 and sum(kept.values()) == 25  # 3 outputs; the budget exact


def test_dtype_casts_keep_the_mask_scalars_in_float64() -> None:
    model = mlp(dtype=torch.float32)
    ts.sparsify(model)
    opt = make(model, density=ts.constant(0.3), beta=ts.constant(4.0))
    mask = model[0].parametrizations.weight[0]
    tau = mask.threshold.clone()
    model.to(torch.bfloat16)
    assert mask.threshold.dtype == torch.float64 and torch.equal(mask.threshold, tau)
    assert model[0].parametrizations.weight.original.dtype == torch.bfloat16
    x, y = batches(1, (6,), dtype=torch.bfloat16)[0]
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()
    assert opt.last_record is not None and opt.last_record.density == pytest.approx(0.3, abs=0.02)


def test_activation_checkpointing_gives_the_same_gradient() -> None:
    from torch.utils.checkpoint import checkpoint

    plain, ckpt = mlp(), mlp()
    for model in (plain, ckpt):
        ts.sparsify(model)
        make(model, density=ts.constant(0.3), beta=ts.constant(4.0))
    x, y = batches(1, (6,))[0]
    nn.functional.cross_entropy(plain(x), y).backward()
    hidden = checkpoint(lambda t: ckpt[2](ckpt[1](ckpt[0](t))), x, use_reentrant=False)
    nn.functional.cross_entropy(ckpt[4](ckpt[3](hidden)), y).backward()
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_weights_made_non_finite_by_the_base_step_raise_naming_the_tensor() -> None:
    model = mlp(dtype=torch.float32)
    ts.sparsify(model)
    sgd = torch.optim.SGD(model.parameters(), lr=float("inf"))
    opt = ts.DualAveraging(sgd, model, sparsity=0.5, total_steps=10, density=ts.constant(0.5))
    x, y = batches(1, (6,), dtype=torch.float32)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"weight became non-finite .* base optimizer's step 1"):
        opt.step()
