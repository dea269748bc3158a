"""Spartan under DDP or FSDP2, launched by ``torchrun`` (the README's "Distributed" section).

A small MLP on synthetic data, 90% sparse with the global policy; ``--mode fsdp2`` shards every
block and the root with ``fully_shard`` and saves and reloads a distributed checkpoint
(``torch.distributed.checkpoint``) halfway. CPU (gloo) or one GPU per rank (nccl)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m reference.distributed_example \\
        --mode fsdp2
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m reference.distributed_example \\
        --mode ddp
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import torchspartan as ts


def build(width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32 if i == 0 else width, width), nn.ReLU())
              for i in range(3)]
    return nn.Sequential(*blocks, nn.Linear(width, 10)).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else (
        torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    model = build(args.width, device)
    ts.sparsify(model)                      # 1. the masks, on the unsharded model
    if args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model:                 # 2. shard the blocks, then the root
            fully_shard(block)
        fully_shard(model)
        net: nn.Module = model
    else:
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)  # 3. the base optimizer
    # 4. Spartan; beta multiplies |theta| (about 0.05 in these layers): a sharper target than
    # the paper's 10 for ResNet-50
    opt = ts.DualAveraging(base, model, sparsity=0.9, total_steps=args.steps, beta_target=300.0)
    g = torch.Generator().manual_seed(1 + rank)  # every rank its own data
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = [os.path.join(tmp, "ckpt")]
        dist.broadcast_object_list(ckpt)  # one path for all ranks (rank 0's)
        for step in range(args.steps):
            x = torch.randn(64, 32, generator=g).to(device)
            y = (x[:, :10] * 3).argmax(1)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            if args.mode == "fsdp2" and step == args.steps // 2:
                dcp.save(ts.sharded_state_dict(model, opt), checkpoint_id=ckpt[0])
                state = ts.sharded_state_dict(model, opt)
                dcp.load(state, checkpoint_id=ckpt[0])
                ts.load_sharded_state_dict(model, opt, state)
            if rank == 0 and (step % 25 == 0 or step == args.steps - 1):
                r = opt.last_record
                print(f"step {r.step}: loss {float(loss.detach()):.3f}, density {r.density:.3f}, "
                      f"mask change {r.mask_change:.4f}", flush=True)
        dist.barrier()
    if rank == 0:
        print(f"{args.mode} on {world} ranks: final density {opt.last_record.density:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
