"""The mask-update component (ts.MaskUpdater) and the mask (ts.SpartanMask), each alone; and the
one-engine property: training's gradient is the public soft top-k's gradient."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import block_expand, block_reduce, block_sizes, convnet, floored_mlp, mlp
from torch import nn
from torch.nn.utils import parametrize

import torchspartan as ts
from torchspartan._select import HINT_WIDTH, MIN_HINT_WIDTH
from torchspartan.allocation import NEWTON_DRIFTING

torch.set_flush_denormal(True)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# training's gradient == autograd through ts.soft_topk with the same policy (one engine)


def public_operator_loss(model: nn.Module, policy: ts.AllocationPolicy, density: float,
                         x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
    refs = ts.find_masks(model)
    thetas = [r.theta.detach().clone().requires_grad_() for r in refs]
    sizes = [block_sizes(tuple(t.shape), r.mask.block) for t, r in zip(thetas, refs, strict=True)]
    scores = [block_reduce(t.abs(), s) for t, s in zip(thetas, sizes, strict=True)]
    costs = [float(r.mask.cost) for r in refs]
    betas = [float(r.mask.beta) for r in refs]
    total = sum(s.numel() * c for s, c in zip(scores, costs, strict=True))
    taus = [r.mask.threshold.reshape(-1) for r in refs]
    init = taus[0] if isinstance(policy, ts.Global) else torch.cat(taus)
    # max_iter=1: evaluate at training's own thresholds, so both sides share tau exactly
    masks = ts.soft_topk(scores, density * total, betas, costs, policy=policy,
                         threshold_init=init, max_iter=1)
    weights = {}
    for r, t, m, s in zip(refs, thetas, masks, sizes, strict=True):
        kappa = t * block_expand(m, s)
        h = block_expand(r.mask.hard_mask, s).to(t.dtype)
        weights[r.name] = kappa + (kappa * h - kappa).detach()
    plain = copy.deepcopy(model)
    for r in ts.find_masks(plain):
        parametrize.remove_parametrizations(r.module, r.tensor_name, leave_parametrized=False)
    out = torch.func.functional_call(plain, weights, (x,))
    return nn.functional.cross_entropy(out, y), thetas


@pytest.mark.parametrize("kind", ["global", "blocks", "uniform", "erk", "nm", "nm-conv",
                                  "nm-channels-last", "flops"])
def test_training_gradient_is_the_public_soft_topk_gradient(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "flops":
        model = convnet()
        ts.sparsify(model, exclude=[r"^0$"])  # the 1-channel stem: a dim 1 of 1
        x = torch.randn(5, 1, 7, 7, dtype=torch.float64)
        policy: ts.AllocationPolicy = ts.Global(costs=ts.FlopCost(x[:1]))
    else:
        model = mlp(width=8)
        ts.sparsify(model, block=(2, 2) if kind == "blocks" else None,
                    exclude=[r"^4$"] if kind == "blocks" else ())
        x = torch.randn(5, 6, dtype=torch.float64)
        policy = {"global": ts.Global(), "blocks": ts.Global(), "uniform": ts.Uniform(),
                  "erk": ts.ERK()}.get(kind, ts.Global())
    if kind == "nm":
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
        ts.sparsify(model)
        x = torch.randn(5, 8, dtype=torch.float64)
        policy = ts.NM(2, 4)
    if kind.startswith("nm-"):  # 4-D groups along dim 1: in the weight's layout (contiguous)
        # or through the rows of a permuted copy (channels_last)
        model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 4)).double()
        if kind == "nm-channels-last":
            model = model.to(memory_format=torch.channels_last)
        ts.sparsify(model)
        x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
        policy = ts.NM(2, 4)
        assert (kind == "nm-conv") == ts.find_masks(model)[0].theta.is_contiguous()
    y = torch.tensor([0, 1, 2, 1, 0])
    updater = ts.MaskUpdater(model, policy)
    density = 0.5 if kind.startswith("nm") else 0.4
    record = updater.update(density=density, beta=3.0)
    nn.functional.cross_entropy(model(x), y).backward()
    ours = [r.theta.grad for r in ts.find_masks(model)]
    loss, thetas = public_operator_loss(model, policy, record.target_density, x, y)
    loss.backward()
    for name, a, b in zip(updater.names, ours, [t.grad for t in thetas], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------
# the updater alone


def test_updater_exact_counts_state_round_trip_and_warm_start() -> None:
    torch.manual_seed(1)
    model = mlp(width=16)
    ts.sparsify(model)
    updater = ts.MaskUpdater(model)
    r1 = updater.update(density=0.3, beta=2.0)
    kept = sum(int(r.mask.hard_mask.sum()) for r in ts.find_masks(model))
    total = sum(r.theta.numel() for r in ts.find_masks(model))
    assert kept == int(0.3 * total + 0.5) and r1.budget_error <= 1e-6
    r2 = updater.update(density=0.3, beta=2.0)  # warm: the same problem again
    assert r2.iterations <= 2 and r2.mask_change == 0.0
    state = copy.deepcopy(updater.state_dict())
    other = copy.deepcopy(model)
    fresh = ts.MaskUpdater(other)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_updater_nm_training_finalizes_to_exact_pattern() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 8, 1), nn.Flatten(),
                          nn.Linear(8, 4))
    ts.sparsify(model, include=(nn.Linear, nn.Conv1d))
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
                           sparsity=0.5, total_steps=12, policy=ts.NM(2, 4))
    for step in range(12):
        opt.zero_grad()
        x = torch.randn(8, 16, 1).transpose(1, 2).reshape(8, 16)
        out = model[4](model[3](model[2](model[1](model[0](x)).unsqueeze(-1))))
        nn.functional.cross_entropy(out, torch.randint(0, 4, (8,))).backward()
        opt.step()
        if step == 1:  # mid-anneal: every group keeps round(density * 4)
            kept = ts.find_masks(model)[0].mask.hard_mask.reshape(-1, 4).sum(-1)
            assert len(set(kept.tolist())) == 1
    ts.finalize(model)
    for layer in (model[0], model[2], model[4]):
        groups = (layer.weight != 0).movedim(1, -1).reshape(-1, 4).sum(-1)
        assert bool((groups <= 2).all()) and int((groups == 2).sum()) >= groups.numel() - 1


def test_updater_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="no SpartanMask"):
        ts.MaskUpdater(nn.Linear(3, 3))
    model = nn.Linear(4, 4)
    ts.sparsify(model)
    with pytest.raises(TypeError, match="AllocationPolicy"):
        ts.MaskUpdater(model, "global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sparsity_of"):
        ts.MaskUpdater(model, sparsity_of="all")  # type: ignore[arg-type]
    updater = ts.MaskUpdater(model)
    with pytest.raises(ValueError, match="different model"):
        updater.load_state_dict({"layers": [["x", [1], "spartan"]]})


# ---------------------------------------------------------------------------------------------
# the mask alone


def test_mask_update_validates_and_state_dict_round_trips_nm_threshold() -> None:
    layer = nn.Linear(8, 2)
    mask = ts.SpartanMask()
    parametrize.register_parametrization(layer, "weight", mask)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(2, 8\)"):
        mask.update(torch.ones(8, 2, dtype=torch.bool))
    hard = torch.rand(2, 8) > 0.5
    mask.update(hard, threshold=torch.rand(4, dtype=torch.float64), beta=3.0, scope="local")
    out = layer(torch.randn(3, 8))
    other = nn.Linear(8, 2)
    parametrize.register_parametrization(other, "weight", ts.SpartanMask())
    other.load_state_dict(layer.state_dict())
    new = other.parametrizations.weight[0]
    assert new.threshold.shape == (4,) and new.soft_active and torch.equal(new.hard_mask, hard)
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), layer(x))
    assert out.shape == (3, 2)


def test_mask_freeze_folds_once_and_survives_the_model_state_dict() -> None:
    layer = nn.Linear(6, 3)
    mask = ts.SpartanMask()
    parametrize.register_parametrization(layer, "weight", mask)
    mask.update(torch.rand(3, 6) > 0.3, threshold=0.2, beta=4.0)
    theta = layer.parametrizations.weight.original
    before = layer.weight.detach().clone()
    mask.freeze(theta)
    torch.testing.assert_close(layer.weight, before)  # w = theta*m*h  ==  folded theta * h
    assert mask.is_frozen and not mask.soft_active
    other = nn.Linear(6, 3)
    parametrize.register_parametrization(other, "weight", ts.SpartanMask())
    other.load_state_dict(layer.state_dict())
    assert other.parametrizations.weight[0].is_frozen


def test_release_0_1_checkpoint_loads_and_continues() -> None:
    # tests/data/release_0_1.pth: written by release 0.1 (state version 1, no 'frozen' buffers)
    # after 3 steps of this run, with the weights 0.1 reached 2 steps later
    from helpers import batches

    ckpt = torch.load(ROOT / "tests" / "data" / "release_0_1.pth", weights_only=True)
    assert ckpt["optimizer"]["spartan"]["version"] == 1
    model = mlp(width=8)
    ts.sparsify(model)
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                           sparsity=0.5, total_steps=10)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    assert opt.last_record.step == 3 and opt.state_dict()["spartan"]["version"] == 2
    for x, y in batches(5, (6,))[3:]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = model.state_dict()
    for key, expected in ckpt["after_two_more_steps"].items():
        if expected.dtype == torch.bool:
            assert torch.equal(state[key], expected), key
        else:
            torch.testing.assert_close(state[key], expected, rtol=1e-6, atol=1e-9, msg=key)


def test_state_dict_of_a_newer_release_is_refused() -> None:
    model = mlp(width=8)
    ts.sparsify(model)
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.5,
                           total_steps=10)
    sd = opt.state_dict()
    sd["spartan"]["version"] = 99
    with pytest.raises(ValueError, match="state version 99"):
        opt.load_state_dict(sd)


def test_import_graph_has_no_private_cross_imports() -> None:
    # no module imports a private name (a leading underscore) of another module
    code = textwrap.dedent("""
        import ast, pathlib, sys
        bad = []
        for f in pathlib.Path(sys.argv[1]).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and \\
                        node.module.startswith("torchspartan"):
                    bad += [f"{f.name}: {a.name}" for a in node.names if a.name.startswith("_")]
        print(bad)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "torchspartan")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ---------------------------------------------------------------------------------------------
# the sync-free path (the default on CUDA), forced on the CPU


def test_device_selection_is_exact_or_says_so() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from torchspartan._select import select_on_device, select_top_budget

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 200_000), st.integers(0, 2**16), st.sampled_from(["normal", "ties"]),
           st.integers(0, 1000))
    def check(n: int, seed: int, kind: str, permille: int) -> None:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(n, generator=g).abs()
        if kind == "ties":
            u = (u * 4).round()
        count = max(1, min(n - 1, round(permille * n / 1000))) if n > 1 else 1
        mask, threshold, ok = select_on_device(u, count)
        exact, t = select_top_budget([u], [1.0], float(count))
        if n < 2**17:  # small enough to sort whole: always decided on the device
            assert bool(ok)
        if bool(ok):
            assert torch.equal(mask, exact[0]) and float(threshold) == t

    check()
    # the realistic case succeeds: a million float weights, 5% kept
    u = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)).abs()
    mask, _, ok = select_on_device(u, 50_000)
    assert bool(ok) and int(mask.sum()) == 50_000
    # heavy ties straddling the boundary are decided on the device too, by position as the host
    # selection decides them
    tied = (torch.randn(300_000, generator=torch.Generator().manual_seed(1)).abs() * 4).round()
    mask, threshold, ok = select_on_device(tied, 123_457)
    exact, t = select_top_budget([tied], [1.0], 123_457.0)
    assert bool(ok) and torch.equal(mask, exact[0]) and float(threshold) == t


@pytest.mark.parametrize("sizes,counts", [([50, 50, 50], [3, 0, 50]),
                                          ([40, 70, 10], [5, 0, 10]), ([64] * 4, [1, 2, 3, 4])])
@pytest.mark.parametrize("ties", [False, True])
def test_device_selection_of_segments_is_the_host_selection(sizes: list[int], counts: list[int],
                                                            ties: bool) -> None:
    """Several budgets of their own on the device (one sort; rows when the segments share a
    length): per segment the host selection's mask (ties by position) and its threshold."""
    from torchspartan._select import select_segments_on_device, select_top_budget

    u = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(0))
    if ties:
        u = (u * 4).round()
    mask, kth = select_segments_on_device(u, sizes, counts)
    start = 0
    for size, count, threshold in zip(sizes, counts, kth.tolist(), strict=True):
        part = u[start:start + size]
        if count:
            exact, t = select_top_budget([part], [1.0], float(count))
            assert torch.equal(mask[start:start + size], exact[0]) and threshold == t
        else:
            assert not mask[start:start + size].any() and threshold == float("inf")
        start += size


@pytest.mark.parametrize("policy", ["global", "erk", "uniform", "nm"])
def test_sync_free_updates_give_the_synchronous_masks(policy: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync-free path (one read per update; every budget of its own prepared on the device
    for Uniform and ERK) writes what the synchronous path writes."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    ts.sparsify(model)
    twin = copy.deepcopy(model)
    from torchspartan.own import Segments

    make = {"global": ts.Global, "erk": ts.ERK, "uniform": ts.Uniform,
            "nm": lambda: ts.NM(2, 4)}[policy]
    sync, free = ts.MaskUpdater(model, make()), ts.MaskUpdater(twin, make())
    free.solver.sync_free = True
    together = []
    commit = Segments.commit

    def counted(self: Segments, values: list[float]) -> tuple:
        together.append(len(self.ids))
        return commit(self, values)

    monkeypatch.setattr(Segments, "commit", counted)
    steps = [(0.5, 2.0), (0.3, 3.0), (0.1, 4.0), (0.1, 4.5)]
    if policy == "nm":  # rows of 4 keeping 2, 1, 2, 3
        steps = [(0.5, 2.0), (0.25, 3.0), (0.5, 4.0), (0.75, 4.5)]
    for density, beta in steps:  # cold, then warm
        for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
            b.theta.data.copy_(a.theta.data.mul_(1.01))  # the weights move between updates
        ra, rb = sync.update(density, beta), free.update(density, beta)
        assert rb.budget_error <= 1e-6 and ra.density == rb.density
        # own budgets are solved together from another start (torchspartan.own): the same
        # budget tolerance (1e-6 of each budget), which at beta 2-4 leaves about 1e-4 in tau
        rtol = 1e-5 if policy == "global" else 1e-4
        for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
            assert torch.equal(a.mask.hard_mask, b.mask.hard_mask), a.name
            torch.testing.assert_close(a.mask.threshold, b.mask.threshold, rtol=rtol, atol=0)
    # warm own budgets were computed together (ERK keeps the last layer whole at first: cold
    # when it first drops entries, that step goes tensor by tensor)
    if policy in ("global", "nm"):  # nm: its rows are one problem (torchspartan.rows)
        assert together == []
    else:
        assert len(together) >= 2 and min(together) >= 2, together


def test_held_route_gives_the_bounded_solution() -> None:
    """With the floors binding step after step, the sync-free path tries last step's held set
    with one read (torchspartan.held) and writes what the bounded solve writes."""
    from torchspartan.held import HeldUpdate

    model, twin = floored_twins()
    sync, free = ts.MaskUpdater(model), ts.MaskUpdater(twin)
    free.solver.sync_free = True  # the CUDA default, forced on the CPU
    taken = []
    commit = HeldUpdate.commit

    def counted(self: HeldUpdate, *args: object) -> tuple[int, float]:
        taken.append(len(self.held))
        return commit(self, *args)  # type: ignore[arg-type]

    HeldUpdate.commit = counted  # type: ignore[method-assign]
    try:
        gen = torch.Generator().manual_seed(1)
        for step, (density, beta) in enumerate([(0.1, 2.0), (0.09, 2.5), (0.08, 3.0),
                                                (0.08, 3.5), (0.07, 4.0)]):
            if step:
                with torch.no_grad():  # the weights move between updates
                    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
                        noise = 1e-3 * torch.randn(a.shape, generator=gen)
                        a.add_(noise)
                        b.add_(noise)
            ra, rb = sync.update(density, beta, step), free.update(density, beta, step)
            assert ra.density == rb.density
            for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
                assert torch.equal(a.mask.hard_mask, b.mask.hard_mask), (step, a.name)
                torch.testing.assert_close(a.mask.threshold, b.mask.threshold, rtol=1e-5,
                                           atol=1e-7)
    finally:
        HeldUpdate.commit = commit  # type: ignore[method-assign]
    assert taken and all(k >= 1 for k in taken)  # the held route wrote the masks
    kept = {r.name: int(r.mask.hard_mask.sum()) for r in ts.find_masks(twin)}
    assert kept["4.weight"] == 48  # its floor: one entry per output unit


@pytest.mark.parametrize("block", [None, (2, 2)])
def test_held_tensors_join_the_batched_node_with_their_own_budget(
        block: tuple[int, int] | None) -> None:
    """Tensors held at their floors keep budgets of their own, but their weights are computed in
    the shared budget's batched node: the same gradient as each computed alone, and the same
    node again after a checkpoint is loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        model[4].weight.mul_(1e-2)  # global magnitude would empty these: their floors bind
        model[6].weight.mul_(3e-2)
    ts.sparsify(model, block=block)
    updater = ts.MaskUpdater(model)
    updater.update(0.3, 3.0)
    refs = ts.find_masks(model)
    held = [r for r in refs if r.mask.scope == "local"]
    assert {r.name for r in held} == {"4.weight", "6.weight"}
    assert len(updater.couplings) == 1
    assert all(r.mask.coupling is updater.couplings[0] for r in refs)
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])

    def grads(net: nn.Module) -> list[torch.Tensor]:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        return [r.theta.grad.clone() for r in ts.find_masks(net)]

    batched = grads(model)
    twin = copy.deepcopy(model)  # copies are unbound; the loaded state binds them again
    loaded = ts.MaskUpdater(twin)
    loaded.load_state_dict(updater.state_dict())
    assert all(r.mask.coupling is loaded.couplings[0] for r in ts.find_masks(twin))
    assert all(torch.equal(a, b) for a, b in zip(batched, grads(twin), strict=True))
    for r in held:  # each alone: the per-tensor path of a budget of its own
        r.mask.unbind()
    assert all(r.mask.coupling is None and r.mask.scope == "local" for r in held)
    for r, a, b in zip(refs, batched, grads(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=r.name)


@pytest.mark.parametrize("policy", [ts.ERK(), ts.Uniform()])
def test_masks_with_budgets_of_their_own_share_one_batched_node(
        policy: ts.AllocationPolicy) -> None:
    """Uniform and ERK give every tensor a budget of its own; their weights are still computed
    in one batched node (a coupling that shares no threshold), which is not saved in the
    checkpoint but made again when it is loaded, with the same gradient."""
    torch.manual_seed(0)
    model = mlp(width=8)
    ts.sparsify(model)
    updater = ts.MaskUpdater(model, policy)
    updater.update(0.4, 3.0)
    (node,) = updater.couplings
    refs = ts.find_masks(model)
    assert node.masks == [] and all(r.mask.coupling is node for r in refs)
    state = updater.state_dict()
    assert state["couplings"] == []
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])

    def grads(net: nn.Module) -> list[torch.Tensor]:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        return [r.theta.grad.clone() for r in ts.find_masks(net)]

    twin = copy.deepcopy(model)
    loaded = ts.MaskUpdater(twin, policy)
    loaded.load_state_dict(state)
    assert len(loaded.couplings) == 1 and all(
        r.mask.coupling is loaded.couplings[0] for r in ts.find_masks(twin))
    assert all(torch.equal(a, b) for a, b in zip(grads(model), grads(twin), strict=True))


@pytest.mark.parametrize("density, policy", [(0.3, "uniform"), (1.0, "uniform"), (0.5, "nm")])
def test_sync_free_own_budgets_refuse_non_finite_weights_before_writing(density: float,
                                                                        policy: str) -> None:
    """Uniform and N:M on the sync-free path read every check with their values: a NaN weight
    (also in a tensor kept whole) is named and no mask changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    ts.sparsify(model)
    updater = ts.MaskUpdater(model, ts.Uniform() if policy == "uniform" else ts.NM(2, 4))
    updater.solver.sync_free = True
    updater.update(0.5, 2.0)
    before = [r.mask.hard_mask.clone() for r in ts.find_masks(model)]
    with torch.no_grad():
        model[2].parametrizations.weight.original[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight"):
        updater.update(density, 3.0)
    for r, b in zip(ts.find_masks(model), before, strict=True):
        assert torch.equal(r.mask.hard_mask, b), r.name


def test_bounded_solve_from_the_last_held_set_writes_what_the_rounds_from_none_write(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With floors binding step after step, the bounded solve (torchspartan.bounded) tries the
    last step's held set first, in one round; the masks it writes equal, bit for bit, those of
    the rounds from no tensor held (a resumed run starts with no held set), and held tensors
    that stop breaking their floor are released."""
    import torchspartan.bounded as bounded

    model, twin = floored_twins()
    warm, cold = ts.MaskUpdater(model), ts.MaskUpdater(twin)
    gen = torch.Generator().manual_seed(1)
    held_sets: list[list[int]] = []
    tried: list[str] = []
    holds = bounded._holds

    def counted(*args: object) -> bool:  # asked only when last step's held set was tried
        kept = holds(*args)  # type: ignore[arg-type]
        tried.append("kept" if kept else "dropped")
        return kept

    monkeypatch.setattr(bounded, "_holds", counted)
    schedule = [(0.1, 2.0), (0.09, 2.5), (0.08, 3.0), (0.08, 3.5), (0.07, 4.0), (0.3, 4.5),
                (0.3, 5.0)]  # at 30% fewer floors bind
    for step, (density, beta) in enumerate(schedule):
        with torch.no_grad():  # the weights move between updates
            for a, b in zip(model.parameters(), twin.parameters(), strict=True):
                noise = 1e-3 * torch.randn(a.shape, generator=gen)
                a.add_(noise)
                b.add_(noise)
        cold.solver.held.clear()  # the rounds start from no tensor held every time
        ra, rb = warm.update(density, beta, step), cold.update(density, beta, step)
        assert ra == rb
        held_sets.append(sorted(i for held in warm.solver.held.values() for i, _ in held))
        for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
            assert torch.equal(a.mask.hard_mask, b.mask.hard_mask), (step, a.name)
            assert torch.equal(a.mask.threshold, b.mask.threshold), (step, a.name)
            assert torch.equal(a.mask.beta, b.mask.beta), (step, a.name)
    assert tried.count("kept") >= 3, tried  # last step's set, one round, most steps
    # a tensor held at one step and released at the next (its floor no longer binds)
    assert any(set(b) < set(a) for a, b in itertools.pairwise(held_sets)), held_sets


def test_nm_rows_of_all_tensors_are_one_problem_with_the_masks_of_one_problem_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """N:M: the rows of every masked tensor are selected and solved together (one selection,
    one Newton solve per update), and give each tensor the masks it gets alone."""
    import torchspartan.rows as rows_module

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Conv1d(32, 8, 1), nn.Flatten(),
                          nn.Linear(8, 12))
    ts.sparsify(model)
    twin = copy.deepcopy(model)
    together, alone = ts.MaskUpdater(model, ts.NM(2, 4)), ts.MaskUpdater(twin, ts.NM(2, 4))
    solves = []
    solve_soft = rows_module.solve_soft

    def counted(pieces: list, *args: object, **kwargs: object) -> object:
        solves.append(pieces[0].units.shape[0])
        return solve_soft(pieces, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rows_module, "solve_soft", counted)
    for step, beta in enumerate([2.0, 3.0, 4.0]):  # cold, then warm
        solves.clear()
        together.update(0.5, beta, step)
        rows = [r.theta.numel() // 4 for r in ts.find_masks(model)]
        assert solves == [sum(rows)]  # one solve over the rows of all three tensors
        with torch.no_grad():
            for i in range(len(rows)):  # each tensor alone: its own problem
                alone.solver.solve_rows((i,), 0.5, 4, beta)
        for a, b in zip(ts.find_masks(model), ts.find_masks(twin), strict=True):
            assert torch.equal(a.mask.hard_mask, b.mask.hard_mask), (step, a.name)
            rows_kept = to_groups(a.mask.hard_mask).sum(-1)
            assert bool((rows_kept == 2).all()), a.name
            torch.testing.assert_close(a.mask.threshold, b.mask.threshold, rtol=1e-5, atol=1e-7)


def to_groups(mask: torch.Tensor) -> torch.Tensor:
    """The N:M groups of a mask: 4 consecutive entries along dim 1."""
    return mask.movedim(1, -1).reshape(-1, 4)


def floored_twins() -> tuple[nn.Module, nn.Module]:
    """A sparsified MLP whose default floors bind under a global budget, and a copy of it."""
    torch.manual_seed(0)
    model = floored_mlp()
    ts.sparsify(model)
    return model, copy.deepcopy(model)


def test_the_batched_node_follows_in_place_changes_of_each_mask() -> None:
    """The batched node is computed once for every layer of a forward pass (and for every
    forward of a step), and again when a mask's own weight or hard mask changed: each layer's
    weight is then what its mask computes alone, never a stale one."""
    torch.manual_seed(0)
    model = mlp(width=8)
    ts.sparsify(model)
    updater = ts.MaskUpdater(model)
    updater.update(0.4, 3.0)
    (node,) = updater.couplings
    refs = ts.find_masks(model)
    x = torch.randn(5, 6, dtype=torch.float64)

    def weights() -> list[torch.Tensor]:
        return [getattr(r.module, r.tensor_name) for r in refs]

    first = weights()
    assert all(a is b for a, b in zip(first, weights(), strict=True))  # one node, kept
    model(x)
    alone = [r.mask.factor(r.theta) * r.theta for r in refs]
    for r, w, a in zip(refs, first, alone, strict=True):
        torch.testing.assert_close(w, a, rtol=1e-12, atol=0, msg=r.name)
    last = refs[-1]
    with torch.no_grad():  # the last layer's own weight, then the first mask's hard mask
        last.theta.mul_(2.0)
    w = weights()
    assert w[-1] is not first[-1]
    torch.testing.assert_close(w[-1], last.mask.factor(last.theta) * last.theta, rtol=1e-12,
                               atol=0)
    first_mask = refs[0].mask
    first_mask.update(~first_mask.hard_mask, threshold=first_mask.threshold,
                      beta=float(first_mask.beta), scope="shared", coupling=node)
    w0 = getattr(refs[0].module, refs[0].tensor_name)
    assert w0 is not w[0]
    torch.testing.assert_close(w0, first_mask.factor(refs[0].theta) * refs[0].theta,
                               rtol=1e-12, atol=0)


def test_newton_starts_follow_the_drift_of_the_soft_thresholds_offset() -> None:
    # mid-anneal the offset beta (tau - h) of the soft threshold from the hard one moves about
    # the same amount every step: the start that extrapolates it needs fewer evaluations than
    # the one that keeps it, and lands about the same tau
    def anneal(drift: bool, sync_free: bool = False) -> tuple[list[int], list[float]]:
        torch.manual_seed(3)
        model = mlp(width=64)
        ts.sparsify(model, min_density=0.0)
        updater = ts.MaskUpdater(model)
        updater.solver.sync_free = sync_free
        if not drift:
            updater.solver.drift = lambda idx: 0.0  # type: ignore[method-assign]
        evaluations, taus = [], []
        for t in range(8):
            record = updater.update(density=0.6 - 0.03 * t, beta=2.0 + 0.2 * t)
            evaluations.append(record.iterations)
            taus.append(float(ts.find_masks(model)[0].mask.threshold))
            assert record.budget_error <= 1e-6
        return evaluations, taus

    with_drift, taus = anneal(True)
    without, taus_without = anneal(False)
    assert sum(with_drift[3:]) < sum(without[3:]), (with_drift, without)
    assert taus == pytest.approx(taus_without, rel=1e-4)
    # the sync-free solve runs fewer unchecked evaluations once its start follows the drift,
    # and none fails its check at the commit (that would add evaluations)
    sync_free, taus_sync_free = anneal(True, sync_free=True)
    assert sync_free[3:] == [NEWTON_DRIFTING] * 5, sync_free
    assert taus_sync_free == pytest.approx(taus, rel=1e-4)


def test_the_window_around_the_hard_thresholds_hint_follows_the_hints_errors() -> None:
    model = mlp(width=8)
    ts.sparsify(model)
    solver = ts.MaskUpdater(model).solver
    key = (0, 1)
    for t in range(30):  # a threshold on a straight line: exact hints, the window halves
        solver.remember(key, 1.0 + 0.01 * t)
    assert solver.hint(key) == (pytest.approx(1.30), MIN_HINT_WIDTH)
    solver.remember(key, 1.30 * (1 + 1e-4))  # off by 1e-4: 16 times that
    assert solver.hint(key).width == pytest.approx(16e-4 / 1.0001, rel=1e-6)
    solver.remember(key, 2.0)  # a jump: the widest window
    assert solver.hint(key).width == HINT_WIDTH
    solver.remember(key, 2.7)  # right on the line again: half as wide
    assert solver.hint(key).width == HINT_WIDTH / 2
