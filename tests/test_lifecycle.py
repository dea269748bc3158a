"""The training lifecycle under a Hypothesis state machine (issue 10).

Rules: register masks and build the optimizer (at the start), train with random batches, try
steps with bad gradients (NaN/Inf, directly or from a closure) and with bad schedule values, let
the base optimizer overflow, change the density and beta schedules, save and load checkpoints at
random points (into a fresh model and optimizer), finalize at the end.

Invariants: a refused step changes nothing and leaves every weight finite; after an overflow of
the base optimizer the masks and the step counter are as before (the run then resumes from the
last checkpoint, as the error says); the masks sit at the exact target sparsity after
``finalize``; and a run that was saved, loaded and resumed equals, bit for bit, the same run
replayed without interruption.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from torch import nn

import torchspartan as ts

torch.set_flush_denormal(True)

T = 12
SPARSITY = 0.75
DENSITIES = [None, ts.cosine(1.0, 1.0 - SPARSITY, 0, 4), ts.linear(1.0, 1.0 - SPARSITY, 1, 5)]
BETAS = [None, ts.constant(3.0), ts.linear(2.0, 8.0, 0, 8)]


def build(policy: str) -> tuple[nn.Module, ts.DualAveraging]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    ts.sparsify(model)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pol = ts.Global() if policy == "global" else ts.Uniform()
    return model, ts.DualAveraging(base, model, sparsity=SPARSITY, total_steps=T, policy=pol)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def set_schedules(opt: ts.DualAveraging, defaults: tuple[Any, Any],
                  events: list[tuple[str, int]]) -> None:
    """The schedules the events chose last (schedules are not in the state dict)."""
    density, beta = defaults
    for kind, k in events:
        if kind == "density":
            density = DENSITIES[k] or defaults[0]
        elif kind == "beta":
            beta = BETAS[k] or defaults[1]
    opt.density_schedule, opt.beta_schedule = density, beta


def train_step(model: nn.Module, opt: ts.DualAveraging, seed: int) -> None:
    x, y = batch(seed)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def replay(policy: str, events: list[tuple[str, int]]) -> tuple[nn.Module, ts.DualAveraging]:
    """The same run without interruption."""
    model, opt = build(policy)
    defaults = (opt.density_schedule, opt.beta_schedule)
    done: list[tuple[str, int]] = []
    for kind, value in events:
        if kind == "step":
            train_step(model, opt, value)
        else:
            done.append((kind, value))
            set_schedules(opt, defaults, done)
    return model, opt


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


class Lifecycle(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["global", "uniform"]))
    def start(self, policy: str) -> None:
        self.policy = policy
        self.model, self.opt = build(policy)
        self.defaults = (self.opt.density_schedule, self.opt.beta_schedule)
        self.events: list[tuple[str, int]] = []
        self.checkpoints: list[tuple[dict[str, Any], dict[str, Any], list[tuple[str, int]]]] = []
        self.finished = False

    def running(self) -> bool:
        return not self.finished and self.opt._step < T

    def snapshot(self) -> tuple[Any, ...]:
        masks = [r.mask for r in ts.find_masks(self.model)]
        return (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()),
                [(m._scope, id(m._coupling), id(m.hard_mask)) for m in masks])

    def assert_unchanged(self, before: tuple[Any, ...]) -> None:
        model_sd, opt_sd, flags = self.snapshot()
        for k, v in before[0].items():
            assert torch.equal(v, model_sd[k]), k
        assert before[1]["spartan"] == opt_sd["spartan"]
        for k, st_ in before[1]["state"].items():
            for name, v in st_.items():
                assert torch.equal(v, opt_sd["state"][k][name]), (k, name)
        assert before[2] == flags

    # -- rules ---------------------------------------------------------------------------
    @precondition(running)
    @rule(seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=6))
    def train(self, seeds: list[int]) -> None:
        for seed in seeds[:T - self.opt._step]:
            train_step(self.model, self.opt, seed)
            self.events.append(("step", seed))

    @precondition(running)
    @rule(seed=st.integers(0, 2**16), layer=st.sampled_from([0, 2, 4]),
          bad=st.sampled_from([math.nan, math.inf, -math.inf]), closure=st.booleans())
    def bad_gradient(self, seed: int, layer: int, bad: float, closure: bool) -> None:
        x, y = batch(seed)
        theta = self.model[layer].parametrizations.weight.original

        def poisoned() -> torch.Tensor:
            self.opt.zero_grad()
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            theta.grad.view(-1)[seed % theta.numel()] = bad
            return loss

        before = self.snapshot()
        with pytest.raises(ValueError, match=f"{layer}.weight has a non-finite gradient"):
            if closure:
                self.opt.step(poisoned)
            else:
                poisoned()
                self.opt.step()
        self.assert_unchanged(before)

    @precondition(running)
    @rule(value=st.sampled_from([math.nan, 0.0, -0.5, 1.5, "0.5"]), which=st.booleans())
    def bad_schedule(self, value: Any, which: bool) -> None:
        train = self.opt.density_schedule if which else self.opt.beta_schedule
        x, y = batch(0)
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        before = self.snapshot()
        if which:
            self.opt.density_schedule = lambda t: value
        else:
            self.opt.beta_schedule = lambda t: value
        try:
            if not which and value == 1.5:
                self.opt.beta_schedule = lambda t: math.inf
            with pytest.raises((ValueError, TypeError), match="schedule gave"):
                self.opt.step()
        finally:
            if which:
                self.opt.density_schedule = train
            else:
                self.opt.beta_schedule = train
        self.assert_unchanged(before)

    @precondition(running)
    @rule(seed=st.integers(0, 2**16))
    def base_optimizer_overflows(self, seed: int) -> None:
        x, y = batch(seed)
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        for r in ts.find_masks(self.model):
            r.theta.grad.mul_(1e3)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.param_groups[0]["lr"] = 3e38
        masks = [r.mask for r in ts.find_masks(self.model)]
        hard = [m.hard_mask for m in masks]
        tau = [m.threshold.clone() for m in masks]
        step, record = self.opt._step, self.opt.last_record
        with pytest.raises(ValueError, match="became non-finite .* reload the last checkpoint"):
            self.opt.step()
        assert (self.opt._step, self.opt.last_record) == (step, record)
        for m, h, t in zip(masks, hard, tau, strict=True):
            assert m.hard_mask is h and torch.equal(m.threshold, t)
        self.opt.param_groups[0]["lr"] = lr
        self.reload(len(self.checkpoints) - 1)  # what the error tells the user to do
        event("overflow")

    @precondition(running)
    @rule(k=st.integers(0, len(DENSITIES) - 1))
    def change_density_schedule(self, k: int) -> None:
        self.events.append(("density", k))
        set_schedules(self.opt, self.defaults, self.events)

    @precondition(running)
    @rule(k=st.integers(0, len(BETAS) - 1))
    def change_beta_schedule(self, k: int) -> None:
        self.events.append(("beta", k))
        set_schedules(self.opt, self.defaults, self.events)

    @precondition(lambda self: not self.finished)
    @rule()
    def save(self) -> None:
        self.checkpoints.append((copy.deepcopy(self.model.state_dict()),
                                 copy.deepcopy(self.opt.state_dict()), list(self.events)))

    @precondition(lambda self: not self.finished and bool(self.checkpoints))
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        self.reload(data.draw(st.integers(0, len(self.checkpoints) - 1)))
        event("loaded")

    def reload(self, index: int) -> None:
        """A fresh model and optimizer from checkpoint ``index`` (-1: the start)."""
        self.model, self.opt = build(self.policy)
        if index < 0:
            self.events = []
        else:
            model_sd, opt_sd, events = self.checkpoints[index]
            self.model.load_state_dict(model_sd)
            # a copy: torch's optimizers keep the loaded state tensors themselves (as a
            # checkpoint read from disk is each time), and this one may be loaded again
            self.opt.load_state_dict(copy.deepcopy(opt_sd))
            self.events = list(events)
            del self.checkpoints[index + 1:]
        set_schedules(self.opt, self.defaults, self.events)

    @precondition(lambda self: not self.finished and self.opt._step == T)
    @rule()
    def finish(self) -> None:
        twin, _ = replay(self.policy, self.events)
        same_state(self.model, twin)
        ts.finalize(self.model)
        masked = [(m.in_features * m.out_features, m.weight) for m in self.model
                  if isinstance(m, nn.Linear)]
        if self.policy == "global":
            n = sum(k for k, _ in masked)
            want = math.floor((1 - SPARSITY) * n + 0.5)
            assert sum(int((w != 0).sum()) for _, w in masked) == want
        else:
            for k, w in masked:
                assert int((w != 0).sum()) == math.floor((1 - SPARSITY) * k + 0.5)
        rows = [r for r in ts.sparsity_report(self.model).rows if r.masked]
        assert len(rows) == 3
        with pytest.raises(RuntimeError, match="finalized"):
            self.opt.step()
        self.finished = True
        event("finished")

    @precondition(lambda self: self.finished)
    @rule()
    def after_the_end(self) -> None:
        with pytest.raises(ValueError, match="already finalized"):
            ts.finalize(self.model)
        with pytest.raises(RuntimeError, match="finalized"):
            self.opt.step()

    @invariant()
    def weights_are_finite(self) -> None:
        if not self.finished:
            assert all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def teardown(self) -> None:
        if not self.finished and hasattr(self, "model"):
            twin, twin_opt = replay(self.policy, self.events)
            same_state(self.model, twin)
            assert twin_opt.state_dict()["spartan"] == self.opt.state_dict()["spartan"]


Lifecycle.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLifecycle = Lifecycle.TestCase
