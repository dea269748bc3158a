"""Training-step time of the ImageNet models, dense vs Spartan, on random tensors (no data loading).

``python -m reference.imagenet.step_time`` (a CUDA GPU expected; bf16 autocast). For each
configuration: 15 warm-up steps, then the mean over 30 steps of forward+backward and of
``optimizer.step()`` (which for Spartan includes the mask update), each bracketed by
``torch.cuda.synchronize()``. The masks stay in the annealed, not yet frozen phase (the costly
one). Results quoted in reference/imagenet/RESULTS.md.
"""

from __future__ import annotations

import time

import torch
import torchvision
from torch import nn

import torchspartan as ts

CONV_LINEAR = (nn.Conv2d, nn.Linear)
VIT_LAYERS = (nn.Linear, nn.MultiheadAttention)
ENCODER = r"^encoder\.layers\."


def bench(
    name: str,
    method: str,
    block: tuple[int, int] | None,
    batch: int,
    sparsity: float,
    beta: float,
    warmup: int = 15,
    steps: int = 30,
) -> str:
    torch.manual_seed(0)
    resnet = name.startswith("resnet")
    model = torchvision.models.get_model(name, num_classes=1000)
    if method != "dense":
        types, names = (CONV_LINEAR, None) if resnet else (VIT_LAYERS, ENCODER)
        ts.sparsify(model, types, names=names, block=block, method=method)
    model.cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    if resnet:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        base: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True
        )
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt = base
    if method != "dense":
        opt = ts.DualAveraging(
            base, model, sparsity=sparsity, total_steps=100_000, beta_target=beta,
            sparsity_of="model", anneal_fraction=1e-4,
        )  # fmt: skip
    y = torch.randint(0, 1000, (batch,), device="cuda")
    fwd_bwd = step = 0.0
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd_bwd += t1 - t0
            step += t2 - t1
    ms = 1e3 / steps
    return (
        f"| {name} | {method} | {'x'.join(map(str, block)) if block else '-'} | {batch} | "
        f"{fwd_bwd * ms:.1f} | {step * ms:.1f} | {(fwd_bwd + step) * ms:.1f} | "
        f"{batch * steps / (fwd_bwd + step):.0f} |"
    )


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | method | block | batch | fwd+bwd ms | opt.step ms | step ms | img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(bench("resnet50", "dense", None, 256, 0.95, 10.0), flush=True)
    print(bench("resnet50", "spartan", None, 256, 0.95, 10.0), flush=True)
    print(bench("vit_b_16", "dense", None, 64, 0.9, 20.0), flush=True)
    print(bench("vit_b_16", "spartan", (16, 16), 64, 0.9, 20.0), flush=True)
    print(bench("vit_b_16", "spartan", None, 64, 0.9, 20.0), flush=True)


if __name__ == "__main__":
    main()
