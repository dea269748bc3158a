"""Builders shared by the FSDP2 tests: a small block model, its sharding, spawning gloo ranks."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchspartan as ts

IN = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model(block: bool = True, seed: int = 0) -> nn.Module:
    """Three blocks (one with 4x4 block masks) and a head of 5 rows (uneven and empty shards);
    with ``block``, density bounds on the block layer and the head."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Sequential(nn.Linear(IN, 16), nn.Tanh()),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
        nn.Sequential(nn.Linear(16, 12), nn.Tanh()),
        nn.Linear(12, 5),
    ).to(torch.float64)
    if block:
        # density bounds that bind under the global policy: two tensors held at once
        ts.sparsify(net, names=r"^1\.0$", block=(4, 4), min_density=0.25)
        ts.sparsify(net, names=r"^3$", min_density=0.5)
        ts.sparsify(net, exclude=r"^(1\.0|3)$")
    else:
        ts.sparsify(net)
    return net


def cpu_mesh() -> Any:
    """A 1-D CPU mesh over all ranks (fully_shard's default mesh is on CUDA when there is one)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def shard(net: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = cpu_mesh()
    for blk in list(net)[:3]:
        fully_shard(blk, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def shard_all(net: nn.Module) -> nn.Module:
    """fully_shard on every child and the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = cpu_mesh()
    for child in net.children():
        fully_shard(child, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def optimizer(net: nn.Module, policy: str, steps: int) -> ts.DualAveraging:
    pol = {"global": ts.Global(), "erk": ts.ERK(), "nm": ts.NM(2, 4)}[policy]
    base = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    return ts.DualAveraging(base, net, sparsity=0.5 if policy == "nm" else 0.8,
                            total_steps=steps, policy=pol, anneal_fraction=0.4,
                            finetune_fraction=0.2)


def data(steps: int, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, IN, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (batch,), generator=g)) for _ in range(steps)]


def run(net: nn.Module, opt: ts.DualAveraging, batches: list[Any], rank: int = 0,
        world: int = 1) -> None:
    for x, y in batches:
        per = x.shape[0] // world
        sl = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[sl]), y[sl]).backward()
        opt.step()


def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of the state dict as a full tensor (DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in net.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        out[k] = v.detach().clone()
    return out


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
           ) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks.

    The ranks are forked from a fork server that has imported torch and the library once (a
    fork of the test process itself is refused by autograd once it has run a backward with
    worker threads, as on a machine with a GPU; spawning imports torch anew every time)."""
    mp.set_forkserver_preload(["torch", "torch.distributed.fsdp", "torchspartan"])
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world,
                       start_method="forkserver", join=True)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str,
                rtol: float = 1e-7, atol: float = 1e-10) -> None:
    """Masks equal, the rest close (N:M rows are solved in batches of a rank's rows, whose
    Newton iteration stops at the solver's tolerance, 1e-6 of the budget: pass a looser one)."""
    assert got.keys() == want.keys()
    masks = [k for k in want if k.endswith("hard_mask")]
    assert masks
    for k, v in want.items():
        if v.dtype == torch.bool:
            assert torch.equal(got[k], v), f"{what}: {k} differs"
        else:
            torch.testing.assert_close(got[k], v, rtol=rtol, atol=atol, msg=f"{what}: {k}")
