"""The baselines in the masks' frame (Top-KAST, RigL) and the default floors.

Each method's defining behaviour is checked against an independent computation: RigL's drop and
grow sets and counts at an update step (with a zero learning rate, so the weights the update sees
are known, and the dense gradient from a plain copy of the model), Top-KAST's backward set and
exploration penalty; every method resumes bit for bit; the default floors keep every layer.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import batches, masked_kept, mlp, train
from torch import nn

import torchspartan as ts

torch.set_flush_denormal(True)


def rigl_model(block: tuple[int, int] | None = None) -> nn.Module:
    model = mlp(width=16)
    ts.sparsify(model, method="rigl", block=block, names=r"^[02]$")
    ts.sparsify(model, method="rigl", names=r"^4$")  # 3 outputs: no block of 2 divides them
    return model


def plain_dense_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """``dL/dw`` of every masked weight ``w = theta * h`` of an ``mlp(width=16)``, through a
    plain (unmasked) copy of it."""
    plain = mlp(width=16)
    weights = {}
    for r in ts.find_masks(model):
        h = r.mask.hard_mask
        if r.mask.block is not None:
            for dim, s in enumerate(r.mask.block):
                h = h.repeat_interleave(s, dim=dim)
        layer = plain.get_submodule(r.name.rsplit(".", 1)[0])
        layer.weight = nn.Parameter(r.theta.detach() * h)
        layer.bias = nn.Parameter(r.module.bias.detach().clone())
        weights[r.name] = layer.weight
    loss = nn.functional.cross_entropy(plain(x), y)
    grads = torch.autograd.grad(loss, list(weights.values()))
    return dict(zip(weights, grads, strict=True))


@pytest.mark.parametrize("block", [None, (2, 2)])
def test_rigl_drops_and_grows_exactly_at_update_steps(block: tuple[int, int] | None) -> None:
    model = rigl_model(block)
    opt = ts.RigL(torch.optim.SGD(model.parameters(), lr=0.0), model, sparsity=0.7,
                  total_steps=20, delta_t=4, alpha=0.5, end_fraction=0.6)
    assert opt.end_step == 12 and opt.last_record.density == pytest.approx(0.3, abs=0.02)
    data = batches(20, (6,))
    kept0 = masked_kept(model)
    for t, (x, y) in enumerate(data, start=1):
        before = {r.name: r.mask.hard_mask.clone() for r in ts.find_masks(model)}
        theta = {r.name: r.theta.detach().clone() for r in ts.find_masks(model)}
        expected_grads = plain_dense_grads(model, x, y)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert masked_kept(model) == kept0  # the count of every tensor stays exact
        for r in ts.find_masks(model):
            old, new = before[r.name], r.mask.hard_mask
            if t % 4 or t >= 12:  # between updates and from T_end on: no change
                assert torch.equal(old, new), (t, r.name)
                continue
            sizes = r.mask.spec().sizes
            k = math.floor(0.25 * (1 + math.cos(math.pi * t / 12)) * int(old.sum()))
            mag = theta[r.name].abs()
            grad = expected_grads[r.name].abs()
            if block is not None and r.mask.block is not None:
                b0, b1 = sizes[0], sizes[1]
                mag = mag.reshape(old.shape[0], b0, old.shape[1], b1).sum((1, 3))
                grad = grad.reshape(old.shape[0], b0, old.shape[1], b1).sum((1, 3))
            # reference drop: the k active entries of smallest |theta| (ties: lower position)
            active = [i for i in range(old.numel()) if old.reshape(-1)[i]]
            drop = sorted(active, key=lambda i: (float(mag.reshape(-1)[i]), i))[:k]
            after = old.reshape(-1).clone()
            after[drop] = False
            inactive = [i for i in range(old.numel()) if not after[i]]
            grow = sorted(inactive, key=lambda i: (-float(grad.reshape(-1)[i]), i))[:k]
            after[grow] = True
            assert torch.equal(new.reshape(-1), after), (t, r.name)
            assert k > 0
            fresh = [i for i in grow if not old.reshape(-1)[i]]
            w = r.theta.detach()
            w_grid = w.reshape(old.shape[0], sizes[0], old.shape[1], sizes[1]) if (
                r.mask.block is not None) else w.reshape(old.shape[0], 1, old.shape[1], 1)
            flat_blocks = w_grid.permute(0, 2, 1, 3).reshape(old.numel(), -1)
            assert bool((flat_blocks[fresh] == 0).all())  # grown weights start at zero
            assert len(fresh) > 0


def test_rigl_records_the_dense_gradient_only_for_update_steps() -> None:
    model = rigl_model()
    opt = ts.RigL(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.8,
                  total_steps=10, delta_t=3)
    masks = [r.mask for r in ts.find_masks(model)]
    armed = []
    for x, y in batches(10, (6,)):
        armed.append(masks[0].dense_grad.armed)
        opt.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):  # accumulation: micro-batches add up
            nn.functional.cross_entropy(model(x[half]), y[half]).backward()
        for r in ts.find_masks(model):
            assert bool((r.theta.grad[~r.mask.hard_mask] == 0).all())  # masked backward
        opt.step()
    assert armed == [False, False, True, False, False, True, False, False, False, False]
    assert all(m.dense_grad.grad is None for m in masks)


def test_rigl_initial_masks_are_random_with_the_policys_counts() -> None:
    counts = {}
    for init in ("random", "magnitude"):
        model = rigl_model()
        ts.RigL(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.8,
                total_steps=10, init=init)
        counts[init] = masked_kept(model)
        if init == "magnitude":
            r = ts.find_masks(model)[1]
            kept = r.theta.detach().abs()[r.mask.hard_mask]
            assert float(kept.min()) >= float(r.theta.detach().abs()[~r.mask.hard_mask].max())
    assert counts["random"] == counts["magnitude"]
    erk = ts.ERK().allocate([ts.MaskedTensor(r.name, tuple(r.theta.shape))
                             for r in ts.find_masks(model)], 0.2)
    assert [round(a.density * math.prod(r.theta.shape)) for a, r in
            zip(erk, ts.find_masks(model), strict=True)] == list(counts["random"].values())


def topkast_setup(sparsity: float = 0.8, penalty: float = 1e-2, lr: float = 0.05,
                  **kw: object) -> tuple[nn.Module, ts.TopKAST]:
    model = mlp(width=16)
    ts.sparsify(model, method="topkast")
    opt = ts.TopKAST(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model,
                     sparsity=sparsity, total_steps=12, penalty=penalty, **kw)  # type: ignore[arg-type]
    return model, opt


def test_topkast_gradient_reaches_the_backward_set_only() -> None:
    model, opt = topkast_setup(penalty=0.0)
    train(model, opt, batches(5, (6,)))
    refs = ts.find_masks(model)
    total = sum(r.theta.numel() for r in refs)
    a_kept = sum(int(r.mask.hard_mask.sum()) for r in refs)
    b_kept = sum(int(r.mask.backward_mask.sum()) for r in refs)
    assert a_kept == math.floor(0.2 * total + 0.5)
    assert b_kept >= math.floor(0.4 * total + 0.5)  # D_B = 2 D by default, united with A
    x, y = batches(1, (6,), seed=9)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for r in refs:
        a_set, b_set = r.mask.hard_mask, r.mask.backward_mask
        assert bool((a_set & ~b_set).sum() == 0)  # A inside B
        g = r.theta.grad
        assert bool((g[~b_set] == 0).all())
        assert bool((g[b_set & ~a_set] != 0).any())  # B \ A learns while it is not used
    # B is the global top-40% by magnitude (plus A's floors, none binding here)
    mags = torch.cat([r.theta.detach().abs().reshape(-1) for r in refs])
    in_b = torch.cat([r.mask.backward_mask.reshape(-1) for r in refs])
    assert float(mags[in_b].min()) >= float(mags[~in_b].max())


def test_topkast_penalty_value_and_gradient_match_the_formula() -> None:
    lam = 0.03
    model, opt = topkast_setup(penalty=lam, lr=0.0)
    train(model, opt, batches(3, (6,)))
    refs = ts.find_masks(model)
    d = 0.2
    expected = 0.0
    for r in refs:
        a_set, b_set = r.mask.hard_mask, r.mask.backward_mask
        w2 = r.theta.detach().double().square()
        expected += float(w2[a_set].sum()) + float(w2[b_set & ~a_set].sum()) / d
    expected *= lam / 2
    assert float(opt.exploration_penalty().detach()) == pytest.approx(expected, rel=1e-12)
    x, y = batches(1, (6,), seed=5)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    task = {r.name: r.theta.grad.clone() for r in refs}
    thetas = [r.theta for r in refs]
    pen_grads = torch.autograd.grad(opt.exploration_penalty(), thetas)
    sets = {r.name: (r.mask.hard_mask.clone(), r.mask.backward_mask.clone()) for r in refs}
    opt.step()  # lr 0: the gradient the base step saw stays in .grad
    for r, pg in zip(refs, pen_grads, strict=True):
        a_set, b_set = sets[r.name]
        coef = a_set.double() + (b_set & ~a_set).double() / d
        torch.testing.assert_close(pg, lam * coef * r.theta.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(r.theta.grad, task[r.name] + pg, rtol=1e-12, atol=1e-15)
        assert bool((r.theta.grad[~b_set] == 0).all())


def test_topkast_is_sparse_from_the_start_and_warns_about_weight_decay() -> None:
    model = mlp(width=16)
    ts.sparsify(model, method="topkast")
    with pytest.warns(UserWarning, match=r"weight_decay=0\.01 .*penalty replaces it"):
        opt = ts.TopKAST(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01), model,
                         sparsity=0.9, total_steps=10)
    assert opt.last_record.density == pytest.approx(0.1, abs=1 / 400)
    with pytest.raises(ValueError, match=r"backward_sparsity must be a number in \[0, "
                                         r"sparsity=0\.9\]"):
        ts.TopKAST(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.9,
                   total_steps=10, backward_sparsity=0.95)


def test_old_topkast_checkpoints_load_with_an_identity_backward() -> None:
    model, _ = topkast_setup()
    state = model.state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("backward_mask")}  # release 0.2
    fresh = mlp(width=16)
    ts.sparsify(fresh, method="topkast")
    fresh.load_state_dict(old)
    for r in ts.find_masks(fresh):
        assert bool(r.mask.backward_mask.all())
        assert torch.equal(r.mask.hard_mask, state[r.name.replace(
            ".weight", ".parametrizations.weight.0.hard_mask")])


def test_dual_averaging_refuses_the_baselines_masks() -> None:
    for method, owner in (("rigl", "ts.RigL"), ("topkast", "ts.TopKAST")):
        model = mlp()
        ts.sparsify(model, method=method)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=rf"0\.weight has a SpartanMask\(method='{method}'\)"
                                             rf".*build {owner}"):
            ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.5,
                             total_steps=10)
    model = mlp()
    ts.sparsify(model)
    with pytest.raises(ValueError, match=r"method='spartan'.*RigL does not train"):
        ts.RigL(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.5,
                total_steps=10)


def build(method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = mlp(width=16)
    ts.sparsify(model, method=method)  # type: ignore[arg-type]
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if method == "rigl":
        return model, ts.RigL(sgd, model, sparsity=0.8, total_steps=16, delta_t=3)
    if method == "topkast":
        return model, ts.TopKAST(sgd, model, sparsity=0.8, total_steps=16, penalty=1e-2)
    return model, ts.DualAveraging(sgd, model, sparsity=0.8, total_steps=16)


@pytest.mark.parametrize("method", ["spartan", "gmp", "topkast", "rigl"])
def test_every_method_resumes_bit_for_bit(method: str) -> None:
    data = batches(16, (6,))
    model, opt = build(method)
    train(model, opt, data[:7])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, data[7:])
    model2, opt2 = build(method)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, data[7:])
    a, b = model.state_dict(), model2.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert opt.last_record == opt2.last_record
    assert opt.state_dict()["spartan"] == opt2.state_dict()["spartan"]


# ---------------------------------------------------------------------------------------------
# default floors
def small_layer_model() -> nn.Module:
    model = mlp(width=16)
    with torch.no_grad():
        model[4].weight.mul_(1e-3)  # a global magnitude threshold would drop this layer
    return model


@pytest.mark.parametrize("method", ["spartan", "topkast", "gmp"])
def test_default_floors_keep_every_layer_and_the_budget_exact(method: str) -> None:
    model = small_layer_model()
    ts.sparsify(model, method=method)  # type: ignore[arg-type]
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    opt: ts.DualAveraging = (ts.TopKAST(sgd, model, sparsity=0.9, total_steps=10)
                             if method == "topkast" else
                             ts.DualAveraging(sgd, model, sparsity=0.9, total_steps=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no collapse warning
        train(model, opt, batches(10, (6,)))
    kept = masked_kept(model)
    total = 6 * 16 + 16 * 16 + 16 * 3
    assert sum(kept.values()) == math.floor(0.1 * total + 0.5)
    assert kept["4.weight"] == 3  # the floor: one entry per output unit
    ts.finalize(model)
    assert (model[4].weight != 0).sum() == 3


def test_floors_that_do_not_fit_the_budget_are_refused_before_training() -> None:
    model = mlp(width=16)
    ts.sparsify(model)
    with pytest.raises(ValueError, match=r"shared budget of 4 weights .*one entry per "
                                         r"output unit .*min_density=0\.0"):
        ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.99,
                         total_steps=10)
    model = mlp(width=16)
    ts.sparsify(model, block=(4, 2), names=r"^[02]$")
    ts.sparsify(model, names=r"^4$")
    with pytest.raises(ValueError, match=r"0\.weight: the policy gives it density 0\.01, less "
                                         r"than one of its 12 mask entries"):
        ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.99,
                         total_steps=10, policy=ts.Uniform())


def test_explicit_min_density_zero_still_allows_collapse() -> None:
    model = small_layer_model()
    ts.sparsify(model, min_density=0.0)
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.05), model, sparsity=0.9,
                           total_steps=10)
    with pytest.warns(UserWarning, match="layer collapse"):
        train(model, opt, batches(10, (6,)))
    assert masked_kept(model)["4.weight"] == 0


def test_a_bounded_solve_leaves_no_stale_coupling_in_the_checkpoint() -> None:
    # a tensor below its bound is solved alone and the others again: before the fix the first
    # pass's coupling stayed in the updater, and its state dict could not be loaded back
    model = small_layer_model()
    ts.sparsify(model, names=r"^[02]$", min_density=0.0)
    ts.sparsify(model, names=r"^4$", min_density=0.5)
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.05), model, sparsity=0.8,
                           total_steps=10)
    train(model, opt, batches(5, (6,)))
    couplings = opt.state_dict()["spartan"]["updater"]["couplings"]
    assert [c["layers"] for c in couplings] == [[0, 1]]
    opt.load_state_dict(opt.state_dict())
    assert masked_kept(model)["4.weight"] == 24


def test_copies_of_the_optimizers_keep_floors_and_methods() -> None:
    for method in ("spartan", "topkast", "rigl"):
        model, opt = build(method)
        train(model, opt, batches(4, (6,)))
        twin = copy.deepcopy(opt)
        assert twin.updater.solver.floors == opt.updater.solver.floors != {}
        data = batches(5, (6,), seed=3)
        train(model, opt, data)
        train(twin.model, twin, data)
        for a, b in zip(model.state_dict().values(), twin.model.state_dict().values(),
                        strict=True):
            assert torch.equal(a, b), method


def test_floors_on_the_sync_free_path_give_the_synchronous_masks() -> None:
    model = small_layer_model()
    ts.sparsify(model)
    twin = copy.deepcopy(model)
    sync, free = ts.MaskUpdater(model), ts.MaskUpdater(twin)
    free.solver.sync_free = True  # the CUDA default, forced on the CPU
    for density, beta in [(0.5, 2.0), (0.2, 3.0), (0.1, 4.0), (0.1, 4.5)]:
        ra, rb = sync.update(density, beta), free.update(density, beta)
        assert ra.density == rb.density
        for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
            assert torch.equal(a.mask.hard_mask, b.mask.hard_mask), a.name
    assert masked_kept(model)["4.weight"] == 3  # the floor binds at density 0.1
