"""torch.distributed.checkpoint of an FSDP2 run: saved on 2 ranks, resumed on 2 and on 4, it
continues as the uninterrupted run (one process, same global batch)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_helpers as fh  # noqa: E402

import torchspartan as ts  # noqa: E402

STEPS = 20
SAVE_AT = 6  # mid-anneal (density reaches its target at step 8): couplings bound


def _save(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    net = fh.shard(fh.model())
    opt = fh.optimizer(net, "global", STEPS)
    fh.run(net, opt, fh.data(STEPS)[:SAVE_AT], rank, world)
    dcp.save(ts.sharded_state_dict(net, opt), checkpoint_id=path)


def _resume(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp

    net = fh.shard(fh.model(seed=1))  # other weights: everything must come from the checkpoint
    opt = fh.optimizer(net, "global", STEPS)
    state = ts.sharded_state_dict(net, opt)
    dcp.load(state, checkpoint_id=path)
    ts.load_sharded_state_dict(net, opt, state)
    assert opt.last_record.step == SAVE_AT
    fh.run(net, opt, fh.data(STEPS)[SAVE_AT:], rank, world)
    full = fh.full_state(net)
    if rank == 0:
        torch.save(full, out)


def test_dcp_saved_on_two_ranks_resumes_on_two_and_four(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    fh.spawn(2, _save, ckpt)
    net = fh.model()
    opt = fh.optimizer(net, "global", STEPS)
    fh.run(net, opt, fh.data(STEPS))
    want = fh.full_state(net)
    for world in (2, 4):
        out = str(tmp_path / f"resumed{world}.pt")
        fh.spawn(world, _resume, ckpt, out)
        fh.assert_same(torch.load(out, weights_only=True), want, f"resumed on {world} ranks")


def test_bounded_global_budget_state_dict_round_trips() -> None:
    # one process: a density bound re-solves part of a shared budget; the superseded coupling
    # must not stay in the state (it made load_state_dict refuse the checkpoint)
    net = fh.model()
    opt = fh.optimizer(net, "global", STEPS)
    fh.run(net, opt, fh.data(STEPS)[:SAVE_AT])
    state = copy.deepcopy(opt.state_dict())  # as saved: the base state holds live tensors
    twin = fh.model(seed=1)
    twin_opt = fh.optimizer(twin, "global", STEPS)
    twin.load_state_dict(copy.deepcopy(net.state_dict()))
    twin_opt.load_state_dict(state)
    fh.run(net, opt, fh.data(STEPS)[SAVE_AT:])
    fh.run(twin, twin_opt, fh.data(STEPS)[SAVE_AT:])
    fh.assert_same(fh.full_state(twin), fh.full_state(net), "resumed")
