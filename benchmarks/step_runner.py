"""The two training steps that ``step_overhead.py`` compares: a dense model and its Spartan copy.

Same initial weights, same random batch, same base optimizer (SGD, momentum 0.9, weight decay
1e-4); the Spartan copy's ``ts.DualAveraging`` has the default schedule shapes shifted to start
mid-anneal (``start_step``), so the hard mask moves at every step. :class:`Runner` times one step
by phase: forward (with the loss), backward, the base optimizer's own step (timed by its step
hooks) and the mask update (the rest of ``DualAveraging.step()``). Timing by phase waits for the
device between phases; :meth:`Runner.pipelined` times steps back to back with one wait at the end,
as a training loop runs them on a GPU (the host queues work ahead of the device).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from machine import sync
from torch import nn

import torchspartan as ts

__all__ = ["PHASES", "SPECS", "ModelSpec", "Runner", "build_model", "make_dual", "make_runners",
           "masked_numel", "record_of", "sparsify_model", "sparsify_nm"]

PHASES = ("forward", "backward", "optimizer", "mask_update")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    image: int
    sparsity: float
    beta_target: float
    block: tuple[int, int] | None


SPECS = {
    # docs/design.md, "Paper anchors": 95% ResNet-50 with beta 10; 90% block-sparse ViT-B/16,
    # beta 20
    "resnet50": ModelSpec("resnet50", 224, 0.95, 10.0, None),
    "vit_b_16": ModelSpec("vit_b_16", 224, 0.90, 20.0, (16, 16)),
    # --quick stand-ins
    "resnet18": ModelSpec("resnet18", 64, 0.95, 10.0, None),
    "vit_tiny": ModelSpec("vit_tiny", 64, 0.90, 20.0, (16, 16)),
}


def build_model(name: str) -> nn.Module:
    import torchvision

    if name == "resnet50":
        return torchvision.models.resnet50()
    if name == "resnet18":
        return torchvision.models.resnet18()
    if name == "vit_b_16":
        return torchvision.models.vit_b_16()
    if name == "vit_tiny":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
                                 hidden_dim=256, mlp_dim=1024)
    raise ValueError(f"unknown model {name!r}; choose from {sorted(SPECS)}")


def sparsify_model(model: nn.Module, spec: ModelSpec,
                   min_density: float | None = None) -> list[str]:
    """The masks of ``spec`` (``min_density``: None keeps the library's default floors)."""
    if spec.name.startswith("vit"):
        # 16x16 blocks on the encoder's linear layers (MLP, attention out_proj) and the MHA
        # in_proj; the patch embedding (conv_proj) and the classifier (heads) stay dense.
        return ts.sparsify(model, include=(nn.Linear, nn.MultiheadAttention), names=r"^encoder\.",
                           exclude=[r"conv_proj", r"^heads"], block=spec.block,
                           min_density=min_density)
    return ts.sparsify(model, min_density=min_density)  # every Conv2d and the Linear classifier


class _Shifted:
    """``schedule(step + offset)``: starts the run in the middle of the annealing phase."""

    def __init__(self, schedule: Callable[[int], float], offset: int) -> None:
        self.schedule, self.offset = schedule, offset

    def __call__(self, step: int) -> float:
        return self.schedule(step + self.offset)


def make_dual(model: nn.Module, base: torch.optim.Optimizer, sparsity: float, beta_target: float,
              total_steps: int, start_step: int, policy: ts.AllocationPolicy | None = None
              ) -> ts.DualAveraging:
    """DualAveraging with the default schedule shapes, shifted to begin at ``start_step``
    (policy: ``ts.Global()`` unless given)."""
    density = ts.linear(1.0, 1.0 - sparsity, 0, round(0.2 * total_steps))
    beta = ts.linear(1.0, beta_target, 0, round(0.8 * total_steps))
    return ts.DualAveraging(base, model, sparsity=sparsity, total_steps=total_steps,
                            policy=policy if policy is not None else ts.Global(),
                            beta_target=beta_target,
                            density=_Shifted(density, start_step), beta=_Shifted(beta, start_step))


def masked_numel(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(".original"))


@dataclass
class Runner:
    """A model, its optimizer(s) and a step function timed by phase."""

    label: str
    model: nn.Module
    base: torch.optim.Optimizer
    opt: torch.optim.Optimizer  # the base optimizer (dense) or the DualAveraging wrapper
    device: torch.device
    amp: str
    x: torch.Tensor
    y: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # compiled model, if any
    scaler: torch.amp.GradScaler | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in (*PHASES,
                                                                                  "total")})
    _marks: dict[str, float] = field(default_factory=dict)
    _by_phase: bool = True  # the step hooks wait for the device (False while pipelined)

    def __post_init__(self) -> None:
        def pre(*_: Any) -> None:
            if self._by_phase:
                sync(self.device)
                self._marks["pre"] = time.perf_counter()

        def post(*_: Any) -> None:
            if self._by_phase:
                sync(self.device)
                self._marks["post"] = time.perf_counter()

        self.base.register_step_pre_hook(pre)
        self.base.register_step_post_hook(post)
        if self.amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.loss_fn = nn.CrossEntropyLoss()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self, mark: Callable[[], None]) -> torch.Tensor:
        """zero_grad, the forward with the loss, the backward, the optimizer step (through the
        GradScaler with fp16); ``mark()`` after the loss and after the backward. The loss."""
        fwd = self.forward if self.forward is not None else self.model
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(fwd(self.x), self.y)
        mark()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        mark()
        self._marks.clear()
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss

    def step(self, record: bool = True) -> float:
        """One step timed by phase (the device waited for between phases); the loss."""
        ticks: list[float] = []

        def mark() -> None:
            sync(self.device)
            ticks.append(time.perf_counter())

        mark()
        loss = self._train_step(mark)
        mark()
        t0, t1, t2, t3 = ticks
        optim = self._marks["post"] - self._marks["pre"] if "post" in self._marks else 0.0
        if record:
            for k, v in zip((*PHASES, "total"),
                            (t1 - t0, t2 - t1, optim, (t3 - t2) - optim, t3 - t0), strict=True):
                self.times[k].append(v)
        return float(loss.detach())

    def pipelined(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps run back to back: the device is waited for
        once, at the end, and the loss is not read (only the library's own syncs remain)."""
        self._by_phase = False
        try:
            sync(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                self._train_step(lambda: None)
            sync(self.device)
            return (time.perf_counter() - t0) / steps
        finally:
            self._by_phase = True

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items() if v}


def sparsify_nm(model: nn.Module) -> list[str]:
    """2:4 along dim 1 on every Conv2d and Linear whose dim 1 four divides (no floors)."""
    import re

    return ts.sparsify(model, exclude=[f"^{re.escape(n)}$" for n, m in model.named_modules()
                                       if isinstance(m, (nn.Conv2d, nn.Linear))
                                       and m.weight.shape[1] % 4], min_density=0.0)


def make_runners(name: str, batch: int, device: torch.device, amp: str, start_step: int,
                 channels_last: bool, seed: int = 0, policy: str = "global",
                 check_finite: bool = True, fused: bool = False
                 ) -> tuple[Runner, Runner, dict[str, Any]]:
    """The dense and Spartan runners of model ``name`` (``policy``: "global" with the model's
    spec, or "nm24": 2:4 at 50%; ``check_finite``: ``ts.DualAveraging``'s check before the
    base step; ``fused``: both base optimizers are ``SGD(fused=True)``, which skips a step on
    the device, so neither GradScaler nor the check waits for it)."""
    spec = SPECS[name]
    torch.manual_seed(seed)
    dense = build_model(name).to(device)
    spartan = copy.deepcopy(dense)
    names = sparsify_nm(spartan) if policy == "nm24" else sparsify_model(spartan, spec)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense = dense.to(memory_format=fmt)
    spartan = spartan.to(memory_format=fmt)
    x = torch.randn(batch, 3, spec.image, spec.image, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    runners = []
    for label, model in (("dense", dense), ("spartan", spartan)):
        model.train()
        base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
                               fused=fused)
        opt: torch.optim.Optimizer = base
        if label == "spartan":
            opt = make_dual(model, base, 0.5 if policy == "nm24" else spec.sparsity,
                            spec.beta_target, 1000, start_step,
                            ts.NM(2, 4) if policy == "nm24" else None)
            opt.check_finite = check_finite  # type: ignore[attr-defined]
        runners.append(Runner(label, model, base, opt, device, amp, x, y))
    info = {
        "model": name, "batch": batch, "image": spec.image, "policy": policy,
        "check_finite": check_finite, "fused": fused,
        "sparsity": 0.5 if policy == "nm24" else spec.sparsity,
        "beta_target": spec.beta_target, "block": spec.block, "masked_tensors": len(names),
        "masked_weights": masked_numel(spartan),
        "total_params": sum(p.numel() for p in spartan.parameters()),
    }
    return runners[0], runners[1], info


def record_of(opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    rec = getattr(opt, "last_record", None)
    if rec is None:
        return None
    return {"step": rec.step, "density": rec.density, "target_density": rec.target_density,
            "beta": rec.beta, "iterations": rec.iterations, "mask_change": rec.mask_change}


