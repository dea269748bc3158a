"""DDP on 2 gloo ranks: identical masks on both ranks, equal to one process with the same batch."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchspartan as ts

sys.path.insert(0, str(Path(__file__).parent))
from helpers import batches, convnet  # noqa: E402

STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build(fused: bool) -> tuple[nn.Module, ts.DualAveraging]:
    model = convnet(dtype=torch.float64)
    ts.sparsify(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    opt = ts.DualAveraging(base, model, sparsity=0.8, total_steps=STEPS)
    return model, opt


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: str, fused: bool) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, opt = _build(fused)
    ddp = nn.parallel.DistributedDataParallel(model)
    for x, y in batches(STEPS, (1, 7, 7), batch=8):
        sl = slice(4 * rank, 4 * rank + 4)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[sl]), y[sl]).backward()
        opt.step()
    torch.save(_state(model), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_ddp_two_ranks_match_single_process(tmp_path: Path, fused: bool) -> None:
    """``fused``: the base step skips on the device, the finite check is read with the mask
    update's values (``DualAveraging._gate``) on every rank."""
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), fused), nprocs=2,
                       start_method="spawn", join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model, opt = _build(fused)
    for x, y in batches(STEPS, (1, 7, 7), batch=8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    single = _state(model)
    masks = [k for k in single if k.endswith("hard_mask")]
    assert masks
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        if k in masks:
            assert torch.equal(r0[k], single[k]), f"DDP and one process differ in {k}"
        else:
            torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-12, msg=k)
