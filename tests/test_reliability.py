"""Regression tests of issue 10 (reliability): every case is refused clearly or gives the right
result, and a refused call leaves the model and the optimizer as they were.

Sections: the atomic step; state dicts; guards against 0/0 and overflow; schedules; tied
weights; copies and pickles; ``ts.sparsify``; the report; numpy scalars; layers and
parametrizations that do or do not compose.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from helpers import batches, mlp
from torch import nn
from torch.nn.utils import parametrize, prune

import torchspartan as ts

torch.set_flush_denormal(True)


def make(model: nn.Module, sparsity: float = 0.8, steps: int = 10, lr: float = 0.05,
         **kw: Any) -> ts.DualAveraging:
    return ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model,
                            sparsity=sparsity, total_steps=steps, **kw)


def loss_backward(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
    (x, y), = batches(1, (6,), seed=seed, dtype=dtype)
    nn.functional.cross_entropy(model(x), y).backward()


def snapshot(model: nn.Module, opt: ts.DualAveraging | None = None) -> dict[str, Any]:
    """Everything a refused call must leave alone (the gradients excepted)."""
    masks = [r.mask for r in ts.find_masks(model)]
    out: dict[str, Any] = {
        "model": copy.deepcopy(model.state_dict()),
        "flags": [(m.soft_active, m.is_frozen, m._scope, id(m._coupling)) for m in masks],
        "hard": [id(m.hard_mask) for m in masks],
    }
    if opt is not None:
        out["opt"] = copy.deepcopy(opt.state_dict())
        out["step"] = opt._step
        out["record"] = opt.last_record
    return out


def assert_unchanged(before: dict[str, Any], model: nn.Module,
                     opt: ts.DualAveraging | None = None) -> None:
    after = snapshot(model, opt)
    assert before["model"].keys() == after["model"].keys()
    for k, v in before["model"].items():
        w = after["model"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v, w) or bool(((v == w) | (v.isnan() & w.isnan())).all()), k
    assert before["flags"] == after["flags"]
    assert before["hard"] == after["hard"]
    if opt is not None:
        assert before["step"] == after["step"] and before["record"] == after["record"]
        sa, sb = before["opt"], after["opt"]
        assert sa["spartan"] == sb["spartan"] and sa["param_groups"] == sb["param_groups"]
        for k, st in sa["state"].items():
            for name, v in st.items():
                w = sb["state"][k][name]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def trained(steps: int = 3, **kw: Any) -> tuple[nn.Module, ts.DualAveraging]:
    model = mlp()
    ts.sparsify(model)
    opt = make(model, **kw)
    for s in range(steps):
        opt.zero_grad()
        loss_backward(model, seed=s)
        opt.step()
    return model, opt


# ---------------------------------------------------------------------------------------------
# The atomic step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_closure_with_a_non_finite_gradient_changes_nothing(bad: float) -> None:
    model, opt = trained()
    before = snapshot(model, opt)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        (x, y), = batches(1, (6,), seed=7)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model[2].parametrizations.weight.original.grad[0, 0] = bad
        return loss

    with pytest.raises(ValueError, match=r"2\.weight has a non-finite gradient .* nothing was"):
        opt.step(closure)
    assert_unchanged(before, model, opt)
    assert all(r.mask._coupling is not None for r in ts.find_masks(model))  # still bound
    opt.zero_grad()
    loss_backward(model, seed=8)
    opt.step()  # and the run goes on
    assert opt.last_record.step == 4


@pytest.mark.parametrize("value, error, match", [
    (math.nan, ValueError, "density schedule gave nan at step 4"),
    (0.0, ValueError, "densities must be numbers in"),
    (1.5, ValueError, "densities must be numbers in"),
    ("0.5", TypeError, "must return a number"),
    (None, TypeError, "must return a number"),
])
def test_bad_density_schedule_value_changes_nothing(value: Any, error: type, match: str) -> None:
    model, opt = trained()
    opt.density_schedule = lambda t: value
    loss_backward(model)
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize("value", [math.nan, 0.0, -1.0, math.inf])
def test_bad_beta_schedule_value_changes_nothing(value: float) -> None:
    model, opt = trained()
    opt.beta_schedule = lambda t: value
    loss_backward(model)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="beta schedule gave"):
        opt.step()
    assert_unchanged(before, model, opt)


def test_infeasible_budget_and_bad_policy_are_refused_before_the_base_step() -> None:
    # sparsity_of="model": a density below what the unmasked parameters keep leaves no budget
    model = mlp()
    ts.sparsify(model, names=r"^[02]$")
    opt = make(model, sparsity=0.5, sparsity_of="model")
    opt.density_schedule = lambda t: 0.5 if t < 2 else 0.01
    opt.zero_grad()
    loss_backward(model)
    opt.step()
    loss_backward(model, seed=1)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="leaves no budget for the masked tensors"):
        opt.step()
    assert_unchanged(before, model, opt)

    class Breaks(ts.AllocationPolicy):
        def allocate(self, tensors: list[ts.MaskedTensor], density: float
                     ) -> list[ts.Allocation]:
            if density < 0.9:
                return [ts.Allocation((0,), density)]  # forgets the other tensors
            return [ts.Allocation(tuple(range(len(tensors))), density)]

    model = mlp()
    ts.sparsify(model)
    opt = make(model, policy=Breaks())
    loss_backward(model)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="left tensors without a budget"):
        opt.step()
    assert_unchanged(before, model, opt)


def test_weights_made_non_finite_by_the_base_step_leave_the_masks_consistent() -> None:
    model = mlp(dtype=torch.float32)
    ts.sparsify(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ts.DualAveraging(sgd, model, sparsity=0.5, total_steps=10)
    for s in range(2):
        opt.zero_grad()
        loss_backward(model, seed=s, dtype=torch.float32)
        opt.step()
    masks = [r.mask for r in ts.find_masks(model)]
    hard = [m.hard_mask for m in masks]
    tau = [m.threshold.clone() for m in masks]
    couplings = [m._coupling for m in masks]
    record = opt.last_record
    opt.zero_grad()
    loss_backward(model, seed=5, dtype=torch.float32)
    model[2].parametrizations.weight.original.grad.mul_(1e3)
    sgd.param_groups[0]["lr"] = 3e38  # finite weights and gradients, an overflowing update
    with pytest.raises(ValueError, match=r"became non-finite .* base optimizer's step 3 "
                                         r"\(SGD, from finite.*masks and the step counter were "
                                         r"left as before step 3.*reload the last checkpoint"):
        opt.step()
    assert opt._step == 2 and opt.last_record == record
    for m, h, t, c in zip(masks, hard, tau, couplings, strict=True):
        assert m.hard_mask is h and torch.equal(m.threshold, t)
        assert c is not None and m._coupling is c and m._scope == "shared"


@pytest.mark.parametrize("policy", [ts.Uniform(), ts.NM(2, 4)])
def test_non_finite_weights_with_several_problems_are_caught_before_any_write(
        policy: ts.AllocationPolicy) -> None:
    # each tensor its own problem: the last one's NaN must not leave the first ones rewritten
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 4)).double()
    ts.sparsify(model)
    opt = make(model, sparsity=0.5, policy=policy)
    opt.zero_grad()
    (x,) = [torch.randn(4, 8, dtype=torch.float64)]
    model(x).square().mean().backward()
    opt.step()
    hard = [r.mask.hard_mask for r in ts.find_masks(model)]
    tau = [r.mask.threshold.clone() for r in ts.find_masks(model)]
    model(x).square().mean().backward()
    model[4].parametrizations.weight.original.grad.fill_(1e308)
    opt.param_groups[0]["lr"] = 1e10
    with pytest.raises(ValueError, match=r"4\.weight became non-finite"):
        opt.step()
    for r, h, t in zip(ts.find_masks(model), hard, tau, strict=True):
        assert r.mask.hard_mask is h and torch.equal(r.mask.threshold, t)


def test_saturated_soft_mask_has_finite_gradients_and_steps() -> None:
    # beta so sharp that every soft mask is exactly 0 or 1 in float32: the slope S is 0, and the
    # budget term must vanish instead of dividing 0 by 0 (which a GradScaler would then skip)
    model = mlp(dtype=torch.float32)
    ts.sparsify(model)
    opt = make(model, sparsity=0.5, beta=ts.constant(1e9), density=ts.constant(0.5))
    scaler = torch.amp.GradScaler("cpu")
    for s in range(4):
        opt.zero_grad()
        (x, y), = batches(1, (6,), seed=s, dtype=torch.float32)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        grads = [r.theta.grad for r in ts.find_masks(model)]
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        scaler.step(opt)
        scaler.update()
    assert opt.last_record.step == 4  # no step skipped


def test_a_mask_removed_mid_run_is_refused_naming_it() -> None:
    model, opt = trained()
    parametrize.remove_parametrizations(model[2], "weight", leave_parametrized=True)
    loss_backward(model)
    before = snapshot(model)
    step, record = opt._step, opt.last_record
    with pytest.raises(RuntimeError, match=r"2\.weight lost its SpartanMask"):
        opt.step()
    assert_unchanged(before, model)
    assert (opt._step, opt.last_record) == (step, record)
    with pytest.raises(RuntimeError, match=r"2\.weight lost its SpartanMask"):
        opt.state_dict()  # a checkpoint of a broken run is refused too
    ts.finalize(model)
    with pytest.raises(RuntimeError, match="finalized"):
        opt.step()


def test_non_finite_weights_at_construction_are_refused_and_nothing_is_written() -> None:
    model = mlp()
    # min_density=0: at 80% the default floors of this tiny model exceed its budget
    ts.sparsify(model, block=(3, 2), min_density=0.0)
    with torch.no_grad():
        model[2].parametrizations.weight.original[1, 1] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"2\.weight holds NaN or Inf"):
        make(model)
    assert_unchanged(before, model)


def test_a_refused_construction_changes_nothing() -> None:
    model, opt = trained()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="needs dim 1"):
        make(model, sparsity=0.5, policy=ts.NM(2, 4))  # dim 1 of 6 and 12: not multiples of 4
    with pytest.raises(ValueError, match="freeze"):
        make(model, anneal_fraction=1.0)
    assert_unchanged(before, model, opt)
    opt.zero_grad()
    loss_backward(model)
    opt.step()  # the first optimizer still owns the masks


def test_sparse_gradients_are_refused_by_the_step() -> None:
    model, opt = trained()
    loss_backward(model)
    w = model[0].parametrizations.weight.original
    w.grad = w.grad.to_sparse()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"0\.weight has a sparse gradient"):
        opt.step()
    assert_unchanged(before, model, opt)


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------
def _corrupt(sd: dict[str, Any], how: str) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    sp = sd["spartan"]
    if how == "version":
        sp["version"] = 3
    elif how == "no version":
        del sp["version"]
    elif how == "step":
        sp["step"] = -1
    elif how == "record":
        sp["last_record"]["density"] = "high"
    elif how == "record field":
        del sp["last_record"]["beta"]
    elif how == "coupling index":
        sp["updater"]["couplings"] = [{"layers": [0, 7], "slope": 1.0}]
    elif how == "coupling slope":
        sp["updater"]["couplings"][0]["slope"] = math.nan
    elif how == "hint":
        sp["updater"]["hints"] = [[[0, 1, 2], ["x"]]]
    elif how == "offset":
        sp["updater"]["offsets"] = [[[0, 1, 2], [0.1, math.inf]]]
    elif how == "updater version":
        sp["updater"]["version"] = 9
    elif how == "layers":
        sp["updater"]["layers"][0][0] = "other.weight"
    elif how == "groups":
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))
    elif how == "group size":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif how == "keys":
        del sd["state"]
    return sd


@pytest.mark.parametrize("how, match", [
    ("version", "state version 3"), ("no version", "state version None"),
    ("step", "step must be an integer"), ("record", "density='high'"),
    ("record field", "malformed step record"), ("coupling index", "malformed coupling"),
    ("coupling slope", "malformed coupling"), ("hint", "malformed hint"),
    ("offset", "malformed offset"),
    ("updater version", "updater state has version 9"), ("layers", "different model"),
    ("groups", "2 parameter groups"), ("group size", "parameter group 0 of the state dict"),
    ("keys", "must have the keys"),
])
def test_bad_optimizer_state_dict_is_refused_whole(how: str, match: str) -> None:
    model, opt = trained(steps=4)
    sd = opt.state_dict()
    model2, opt2 = trained(steps=2)  # another point of the same run
    before = snapshot(model2, opt2)
    with pytest.raises((ValueError, TypeError), match=match):
        opt2.load_state_dict(_corrupt(sd, how))
    assert_unchanged(before, model2, opt2)


def test_optimizer_state_loaded_before_the_model_state_is_refused() -> None:
    model, opt = trained(steps=4)
    sd = opt.state_dict()
    model2, opt2 = trained(steps=1)
    before = snapshot(model2, opt2)
    with pytest.raises(ValueError, match="load model.state_dict"):
        opt2.load_state_dict(sd)
    assert_unchanged(before, model2, opt2)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["spartan"] == sd["spartan"]


def test_mask_updater_state_is_validated_whole() -> None:
    model = mlp()
    ts.sparsify(model)
    updater = ts.MaskUpdater(model)
    updater.update(0.5, 4.0)
    good = updater.state_dict()
    assert good["version"] == 3
    updater.update(0.3, 5.0)
    before = updater.state_dict()
    bad = copy.deepcopy(good)
    bad["collapsed"] = ["nothing.weight"]
    with pytest.raises(ValueError, match="collapsed"):
        updater.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["last_record"]["frozen"] = "yes"
    with pytest.raises(ValueError, match="frozen"):
        updater.load_state_dict(bad)
    with pytest.raises(TypeError, match="must be a dict"):
        updater.load_state_dict([("layers", [])])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        updater.load_state_dict({**good, "extra": 1})
    assert updater.state_dict() == before


def test_mask_state_dict_entries_are_validated() -> None:
    layer = nn.Linear(8, 4)
    ts.sparsify(layer)
    ts.MaskUpdater(layer).update(0.5, 3.0)
    mask = layer.parametrizations.weight[0]
    good = layer.state_dict()
    for key, value, match in [
        ("hard_mask", torch.ones(4, 8), "hard_mask must be a bool"),
        ("hard_mask", torch.ones(2, 8, dtype=torch.bool), "does not fit"),
        ("threshold", torch.full((), math.nan, dtype=torch.float64), "NaN or Inf"),
        ("threshold", torch.zeros(3, dtype=torch.float64), "do not divide"),
        ("beta", torch.tensor(-1.0, dtype=torch.float64), "beta must be"),
        ("cost", torch.tensor(0.0, dtype=torch.float64), "cost must be"),
    ]:
        bad = dict(good)
        bad[f"parametrizations.weight.0.{key}"] = value
        hard, tau = mask.hard_mask.clone(), mask.threshold.clone()
        with pytest.raises(RuntimeError, match=match):
            layer.load_state_dict(bad)
        assert torch.equal(mask.hard_mask, hard) and torch.equal(mask.threshold, tau)


# ---------------------------------------------------------------------------------------------
# Guards against 0/0 and overflow
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale, beta", [(1e38, 1e-38), (3.3e38, 1e-38), (1.0, 1e-38),
                                         (1e-30, 1e30), (1e38, 1e-30)])
def test_soft_topk_meets_the_budget_at_extreme_scales(scale: float, beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2000, generator=g) * scale
    r = ts.soft_topk(v, 200.3, beta, return_result=True)
    assert bool(torch.isfinite(r.mask).all()) and bool(torch.isfinite(r.threshold).all())
    assert abs(float(r.mask.double().sum()) - 200.3) <= 1e-5 * 200.3
    (listed,) = ts.soft_topk([v], 200.3, beta)
    assert abs(float(listed.double().sum()) - 200.3) <= 1e-5 * 200.3
    # the gradient of the rescaled problem is the problem's own: the total stays put
    vg = v.clone().requires_grad_()
    ts.soft_topk(vg, 200.3, beta).sum().backward()
    assert bool(torch.isfinite(vg.grad).all())


def test_soft_topk_gradient_is_unchanged_by_the_rescaling() -> None:
    g = torch.Generator().manual_seed(1)
    v = (torch.rand(50, generator=g, dtype=torch.float64) + 0.1)
    w = torch.rand(50, generator=g, dtype=torch.float64)
    grads = []
    for s in (1.0, 2.0**60):  # 2**60 is beyond the rescaling bound
        x = (v * s).requires_grad_()
        (ts.soft_topk(x, 10.5, 3.0 / s) * w).sum().backward()
        grads.append(x.grad * s)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_soft_topk_within_one_entry_warns_and_beyond_raises() -> None:
    v = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1e38
    with pytest.warns(RuntimeWarning, match="within|less than one entry"):
        r = ts.soft_topk(v, 100.3, 1.0, return_result=True)
    assert abs(float(r.mask.double().sum()) - 100.3) <= 1.0


def test_zero_or_bad_costs_name_the_tensor_and_the_fix() -> None:
    class Costs(ts.CostModel):
        def __init__(self, costs: list[Any]) -> None:
            self.costs = costs

        def unit_costs(self, model: nn.Module, modules: Any) -> list[Any]:
            return self.costs

    for costs, error, match in [
        ([0.0, 1.0, 1.0], ValueError, r"cost 0\.0 for 0\.weight.*fix the CostModel"),
        ([1.0, -2.0, 1.0], ValueError, r"cost -2\.0 for 2\.weight"),
        ([1.0, 1.0, math.nan], ValueError, r"cost nan for 4\.weight"),
        ([1.0, 1.0], ValueError, "2 costs for 3 masked tensors"),
        ([1.0, "x", 1.0], TypeError, "costs must be numbers"),
    ]:
        model = mlp()
        ts.sparsify(model)
        with pytest.raises(error, match=match):
            make(model, policy=ts.Global(costs=Costs(costs)))


# ---------------------------------------------------------------------------------------------
# Schedules and the final sparsity
# ---------------------------------------------------------------------------------------------
def test_density_target_after_the_freeze_is_refused() -> None:
    model = mlp()
    ts.sparsify(model, min_density=0.0)  # at 90% the default floors exceed this tiny budget
    with pytest.raises(ValueError, match=r"freeze at step 8 .* would be 0\.6\d* instead of 0\.9"
                                         r".*anneal_fraction \(at most 0\.7 here\)"):
        make(model, sparsity=0.9, anneal_fraction=1.0)
    with pytest.raises(ValueError, match="freeze"):
        make(model, sparsity=0.9, steps=1)  # the freeze at step 1: no update before it
    opt = make(model, sparsity=0.9, anneal_fraction=1.0, finetune_fraction=0.0)
    for s in range(10):
        opt.zero_grad()
        loss_backward(model, seed=s)
        opt.step()
    ts.finalize(model)
    masked = sum(r.numel for r in ts.sparsity_report(model).rows if r.masked)
    assert ts.sparsity_report(model).masked_sparsity == pytest.approx(
        1 - math.floor(0.1 * masked + 0.5) / masked, abs=1e-12)
    model = mlp()
    ts.sparsify(model, min_density=0.0)
    with pytest.warns(UserWarning, match="final sparsity follows the schedule"):
        make(model, sparsity=0.9, density=ts.linear(1.0, 0.1, 0, 10))  # reaches 0.1 at step 10


# ---------------------------------------------------------------------------------------------
# Tied weights
# ---------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 12)
        self.mid = nn.Linear(12, 12)
        self.head = nn.Linear(12, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(x))))


def train_lm(model: nn.Module, opt: ts.DualAveraging, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        x = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()


@pytest.mark.parametrize("sparsity_of", ["model", "masked"])
def test_tied_weights_are_masked_once_and_counted_once(sparsity_of: str) -> None:
    model = TiedLM()
    # the head is a Linear: its tied embedding gets the same mask (min_density=0: at 90% of the
    # model the default floors, 52 weights, exceed the budget of 51.6)
    names = ts.sparsify(model, min_density=0.0)
    assert names == ["emb.weight", "mid.weight"] and names.aliases == {
        "emb.weight": ["head.weight"]}
    assert model.emb.parametrizations.weight[0] is model.head.parametrizations.weight[0]
    opt = make(model, sparsity=0.9, sparsity_of=sparsity_of)
    assert opt.masked_names == ["emb.weight", "mid.weight"]
    train_lm(model, opt, 10)
    assert torch.equal(model.emb.weight, model.head.weight)
    ts.finalize(model)
    assert model.head.weight is model.emb.weight
    rep = ts.sparsity_report(model)
    assert [r.name for r in rep.rows] == ["emb.weight", "mid.bias", "mid.weight"]
    total = 40 * 12 + 12 * 12 + 12
    if sparsity_of == "model":
        kept = math.floor(0.1 * total - 12 + 0.5)  # the 12 biases are unmasked
        assert sum(r.nonzero for r in rep.rows) == kept + 12
    else:
        masked = 40 * 12 + 12 * 12
        assert rep.masked_sparsity == pytest.approx(1 - math.floor(0.1 * masked + 0.5) / masked)


def test_tied_weights_with_one_place_unmasked_or_two_masks_are_refused() -> None:
    model = TiedLM()
    parametrize.register_parametrization(model.head, "weight", ts.SpartanMask())
    with pytest.raises(ValueError, match="head.weight is tied to emb.weight.*used without"):
        ts.MaskUpdater(model)
    parametrize.register_parametrization(model.emb, "weight", ts.SpartanMask())
    with pytest.raises(ValueError, match="two different SpartanMasks"):
        ts.MaskUpdater(model)


# ---------------------------------------------------------------------------------------------
# Copies and pickles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copied_optimizer_resumes_bit_identically(how: str) -> None:
    model = TiedLM()
    ts.sparsify(model, min_density=0.0)  # one coupled budget (the floors would split it)
    opt = make(model, sparsity=0.8)
    train_lm(model, opt, 4)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.model is not model
    assert {id(p) for g in twin.param_groups for p in g["params"]} == {
        id(p) for p in twin.model.parameters()}
    assert all(r.mask._coupling is not None for r in ts.find_masks(twin.model))
    train_lm(model, opt, 6, start=4)
    train_lm(twin.model, twin, 6, start=4)
    for (k, a), b in zip(model.state_dict().items(), twin.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert opt.state_dict()["spartan"] == twin.state_dict()["spartan"]


def test_masked_model_pickles_and_deepcopies_alone() -> None:
    model, _ = trained()
    x = torch.randn(3, 6, dtype=torch.float64)
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
        assert [r.name for r in ts.find_masks(twin)] == [r.name for r in ts.find_masks(model)]
        assert pickle.loads(pickle.dumps(twin))(x).shape == (3, 3)  # and again


# ---------------------------------------------------------------------------------------------
# ts.sparsify
# ---------------------------------------------------------------------------------------------
class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Linear(4, 8)
        self.f = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 6)
        self.odd = nn.Linear(6, 5)


def test_sparsify_is_all_or_nothing() -> None:
    model = Named()
    with pytest.raises(ValueError, match=r"odd\.weight: block \(2, 2\) does not divide"):
        ts.sparsify(model, block=(2, 2))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_sparsify_rolls_back_a_failed_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Named()
    weights = {n: p for n, p in model.named_parameters()}
    real = parametrize.register_parametrization
    calls = {"n": 0}

    def flaky(module: nn.Module, name: str, p: nn.Module, **kw: Any) -> nn.Module:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real(module, name, p, **kw)

    monkeypatch.setattr(parametrize, "register_parametrization", flaky)
    with pytest.raises(ValueError, match="no mask was registered"):
        ts.sparsify(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p is weights[n] for n, p in model.named_parameters())  # the same Parameters


def test_sparsify_include_exclude_and_names_forms() -> None:
    assert ts.sparsify(Named(), exclude="fc|odd") == ["c1.weight", "f.weight"]  # one pattern
    assert ts.sparsify(Named(), include=nn.Linear, exclude=["^f$", "odd"]) == [
        "c1.weight", "fc.weight"]
    assert ts.sparsify(Named(), include="Linear", names="^c") == ["c1.weight"]
    with pytest.raises(TypeError, match="include must hold nn.Module subclasses"):
        ts.sparsify(Named(), include=(nn.Linear, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exclude must hold regular expressions"):
        ts.sparsify(Named(), exclude=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ts.sparsify(Named(), exclude="(")
    with pytest.raises(ValueError, match="matched no layer"):
        ts.sparsify(Named(), names="nothing")


def test_sparsify_default_coverage_attention_embedding_and_report() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=4, batch_first=True)
            self.out = nn.Linear(16, 3)

    with pytest.warns(UserWarning, match=r"emb\.weight \(1600\)"):
        names = ts.sparsify(Net())
    assert names == ["attn.in_proj_weight", "attn.out_proj.weight", "cross.q_proj_weight",
                     "cross.k_proj_weight", "cross.v_proj_weight", "cross.out_proj.weight",
                     "out.weight"]
    assert names.left == {"emb.weight": 1600}
    assert names.masked_numel == sum(math.prod(s) for s in [
        (48, 16), (16, 16), (16, 16), (16, 8), (16, 4), (16, 16), (3, 16)])
    assert 0 < names.masked_fraction < 1 and "left dense" in names.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = ts.sparsify(Net(), include=(nn.Embedding, nn.Linear, nn.MultiheadAttention))
    assert "emb.weight" in names and names.left == {}


def test_sparsify_refuses_what_it_cannot_mask() -> None:
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"0\.weight: Embedding\(sparse=True\) produces sparse"):
        ts.sparsify(sparse, include=(nn.Embedding, nn.Linear))
    assert not parametrize.is_parametrized(sparse[1])
    parametrize.register_parametrization(sparse[0], "weight", ts.SpartanMask())
    with pytest.raises(ValueError, match="sparse=True"):
        ts.MaskUpdater(sparse)
    model = nn.Sequential(nn.Linear(4, 4))
    ts.sparsify(model)
    with pytest.raises(ValueError, match="already has a SpartanMask"):
        ts.sparsify(model)
    with pytest.raises(ValueError, match="method='fixed'"):
        ts.sparsify(nn.Linear(2, 2), method="fixed")
    with pytest.raises(TypeError, match=r"block=\(16, 16\)"):
        ts.sparsify(nn.Linear(2, 2), block=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer sizes"):
        ts.sparsify(nn.Linear(2, 2), block=(2.5, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point weight"):
        ts.SpartanMask().check_tensor(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty weight"):
        ts.sparsify(nn.Linear(0, 3))
    with pytest.raises(ValueError, match="meta device"):
        ts.sparsify(nn.Linear(2, 3, device="meta"))
    lazy = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match="not initialized yet"):
        ts.sparsify(lazy)
    lazy(torch.randn(2, 3))
    assert ts.sparsify(lazy) == ["0.weight"]


class Conv1D(nn.Module):
    """The layout of transformers' Conv1D (GPT-2): weight ``in x out``, ``y = x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf)


def test_third_party_conv1d_is_masked_by_default_with_its_input_axis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.Tanh(), Conv1D(4, 16))
    names = ts.sparsify(model, block=(4, 2))  # (out, in) as for nn.Linear
    assert names == ["0.weight", "2.weight"]
    assert [r.mask.block for r in ts.find_masks(model)] == [(2, 4), (2, 4)]  # in x out
    with pytest.raises(ValueError, match=r"0\.weight .* stores its weight in x out .* NM"):
        make(model, sparsity=0.5, policy=ts.NM(2, 4))
    opt = make(model, sparsity=0.75, steps=5)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(3, 8)).square().mean().backward()
        opt.step()
    ts.finalize(model)
    assert ts.sparsity_report(model).masked_sparsity == pytest.approx(0.75)


def test_gpt2_from_transformers_is_covered_by_default() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    names = ts.sparsify(model)
    assert "transformer.h.0.attn.c_attn.weight" in names  # a Conv1D
    assert names.aliases == {"transformer.wte.weight": ["lm_head.weight"]}  # tied, masked once
    assert names.masked_fraction > 0.9
    opt = ts.DualAveraging(torch.optim.AdamW(model.parameters(), lr=1e-3), model, 0.9, 5)
    for s in range(5):
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    ts.finalize(model)
    rep = ts.sparsity_report(model)
    masked = sum(r.numel for r in rep.rows if r.masked)
    assert rep.masked_sparsity == pytest.approx(1 - math.floor(0.1 * masked + 0.5) / masked)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def test_masked_sparsity_counts_the_masked_tensors_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    ts.sparsify(model, exclude=r"^4$")  # the classifier stays dense
    opt = make(model, sparsity=0.9)
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
    live = ts.sparsity_report(model)
    ts.finalize(model)
    rep = ts.sparsity_report(model)
    masked = 8 * 16 + 16 * 16
    expected = 1 - math.floor(0.1 * masked + 0.5) / masked
    assert rep.masked_sparsity == pytest.approx(expected) == live.masked_sparsity
    assert rep.weight_sparsity < rep.masked_sparsity  # the dense classifier counts there
    assert "masked tensors" in str(rep) and "weights (dim >= 2)" in str(rep)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    fresh.load_state_dict(model.state_dict())  # nothing says what was masked any more
    assert math.isnan(ts.sparsity_report(fresh).masked_sparsity)
    assert ts.sparsity_report(fresh).weight_sparsity == rep.weight_sparsity
    assert ts.sparsity_report(copy.deepcopy(model)).masked_sparsity == rep.masked_sparsity


# ---------------------------------------------------------------------------------------------
# numpy scalars
# ---------------------------------------------------------------------------------------------
def test_numpy_scalars_are_numbers_everywhere() -> None:
    model = mlp()
    ts.sparsify(model, min_density=np.float64(0.01), max_density=np.float32(1.0))
    opt = ts.DualAveraging(
        torch.optim.SGD(model.parameters(), lr=np.float32(0.05)), model,
        sparsity=np.float32(0.75), total_steps=np.int64(6), beta_target=np.float32(8.0),
        anneal_fraction=np.float64(0.3), finetune_fraction=np.float32(0.2),
        beta=lambda t: np.float32(2.0 + t))
    assert isinstance(opt.sparsity, float) and isinstance(opt.total_steps, int)
    for s in range(6):
        opt.zero_grad()
        loss_backward(model, seed=s)
        opt.step()
    assert opt.last_record.step == 6
    updater = ts.MaskUpdater(mlp_masked())
    updater.update(np.float32(0.5), np.float64(3.0))
    sched = ts.linear(np.float32(1.0), np.float32(0.1), np.int64(0), np.int64(5))
    assert sched(5) == pytest.approx(0.1)
    v = torch.rand(10)
    assert float(ts.soft_topk(v, np.float32(3.0), np.float32(2.0)).sum()) == pytest.approx(3.0)
    assert int(ts.hard_topk(v, np.int64(3)).sum()) == 3
    assert ts.NM(np.int64(2), np.int64(4)).n == 2
    assert ts.ERK(np.float32(1.0)).power == 1.0
    with pytest.raises(ValueError, match="sparsity"):
        make(mlp_masked(), sparsity=np.bool_(True))  # a bool is not a number


def test_a_policy_computing_with_numpy_trains_and_saves_plain_numbers() -> None:
    class NumpyUniform(ts.AllocationPolicy):
        def allocate(self, tensors: list[ts.MaskedTensor], density: float
                     ) -> list[ts.Allocation]:
            return [ts.Allocation((np.int64(i),), np.float32(density))  # type: ignore[arg-type]
                    for i in range(len(tensors))]

    model = mlp_masked()
    opt = make(model, sparsity=0.5, policy=NumpyUniform())
    for s in range(4):
        opt.zero_grad()
        loss_backward(model, seed=s)
        opt.step()
    state = opt.state_dict()["spartan"]["updater"]
    assert state["hints"] and all(type(i) is int for key, _ in state["hints"] for i in key)


def mlp_masked() -> nn.Module:
    model = mlp()
    ts.sparsify(model)
    return model


# ---------------------------------------------------------------------------------------------
# What composes
# ---------------------------------------------------------------------------------------------
def test_prune_and_parametrizations_compose_or_are_refused() -> None:
    pruned = mlp()
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"0\.weight is pruned .*prune\.remove"):
        ts.sparsify(pruned)
    assert not any(parametrize.is_parametrized(m) for m in pruned.modules())
    prune.remove(pruned[0], "weight")  # the fix the message gives
    ts.sparsify(pruned)
    make(pruned)

    # prune on a masked tensor: torch refuses (the tensor is no longer a Parameter)
    model = mlp()
    ts.sparsify(model)
    with pytest.raises(TypeError, match="weight_orig"):
        prune.l1_unstructured(model[0], "weight", amount=0.5)

    for add, match in [
        (lambda m: nn.utils.parametrizations.orthogonal(m), "_Orthogonal after the SpartanMask"),
        (lambda m: nn.utils.parametrizations.weight_norm(m), "_WeightNorm after the SpartanMask"),
    ]:
        model = mlp()
        ts.sparsify(model)
        add(model[2])
        with pytest.raises(ValueError, match=match):
            make(model)

    model = mlp()  # a zero-preserving parametrization after the mask composes
    ts.sparsify(model)
    nn.utils.parametrizations.spectral_norm(model[2])
    opt = make(model, sparsity=0.75)
    for s in range(10):
        opt.zero_grad()
        loss_backward(model, seed=s)
        opt.step()
    kept = int(model[2].parametrizations.weight[0].hard_mask.sum())
    assert int((model[2].weight != 0).sum()) == kept
    ts.finalize(model)
    assert int((model[2].weight != 0).sum()) == kept


def test_error_messages_name_the_argument_and_value() -> None:
    model = mlp_masked()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw, match in [
        ({"sparsity": 0.5, "total_steps": 10, "density": 0.5}, "density must be a schedule"),
        ({"sparsity": 0.5, "total_steps": 10.0}, re.escape("total_steps must be an integer >= 1, "
                                                           "got 10.0")),
        ({"sparsity": 0.5, "total_steps": 10, "beta_target": -1}, "beta_target .* got -1"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            ts.DualAveraging(sgd, model, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ts.DualAveraging(sgd, "model", 0.5, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule's stop must be a finite number, got nan"):
        ts.linear(1.0, math.nan, 0, 5)
    with pytest.raises(TypeError, match="min_density must be a number"):
        ts.SpartanMask(min_density="0.1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Every torchvision classification model through the defaults (slow: about half an hour on 2
# CPU cores; the committed table is benchmarks/results/torchvision_models.md)
# ---------------------------------------------------------------------------------------------
def _torchvision_models() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))


@pytest.fixture(scope="module")
def tv_bench() -> Any:
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torchvision_models.py"
    spec = importlib.util.spec_from_file_location("_torchvision_models_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", _torchvision_models())
def test_every_torchvision_model_reaches_the_target_with_the_defaults(tv_bench: Any,
                                                                      name: str) -> None:
    row = tv_bench.run(name, steps=4, sparsity=0.9)
    assert row["kept"] == row["kept_expected"], row
    assert row["masked_share"] > 0.95, row  # the defaults cover the model's weights
    assert tv_bench.ok(row, 0.9), row
