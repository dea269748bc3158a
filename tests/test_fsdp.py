"""FSDP2 (fully_shard) on 2 and 4 gloo ranks: the masks and weights of one process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_helpers as fh  # noqa: E402

from torchspartan.distributed import GATHER_BATCH  # noqa: E402

STEPS = 30
BLOCK = {"global": True, "erk": True, "nm": False}  # global/ERK: one 4x4 block layer


def _train(rank: int, world: int, out: str, policies: tuple[str, ...]) -> None:
    for policy in policies:
        net = fh.shard(fh.model(block=BLOCK[policy]))
        opt = fh.optimizer(net, policy, STEPS)
        fh.run(net, opt, fh.data(STEPS), rank, world)
        state = fh.full_state(net)
        if rank == 0:
            torch.save(state, f"{out}/{policy}.pt")


def _single(policy: str) -> dict[str, torch.Tensor]:
    net = fh.model(block=BLOCK[policy])
    opt = fh.optimizer(net, policy, STEPS)
    fh.run(net, opt, fh.data(STEPS))
    return fh.full_state(net)


def _check(world: int, policies: tuple[str, ...], tmp_path: Path) -> None:
    fh.spawn(world, _train, str(tmp_path), policies)
    for policy in policies:
        got = torch.load(tmp_path / f"{policy}.pt", weights_only=True)
        loose = policy == "nm"
        fh.assert_same(got, _single(policy), f"{policy} on {world} ranks",
                       rtol=1e-5 if loose else 1e-7, atol=1e-6 if loose else 1e-10)


def test_fsdp2_two_ranks_match_one_process(tmp_path: Path) -> None:
    # 30 steps: density anneals over 12, the masks freeze at step 24; global with a density
    # bound (the block layer's min_density), ERK, N:M
    _check(2, ("global", "erk", "nm"), tmp_path)


def test_fsdp2_four_ranks_match_one_process(tmp_path: Path) -> None:
    # 4 ranks: the head's 5 rows are shards of 2, 2, 1 and 0 rows
    _check(4, ("global",), tmp_path)


@pytest.mark.slow
def test_fsdp2_four_ranks_match_one_process_erk_nm(tmp_path: Path) -> None:
    _check(4, ("erk", "nm"), tmp_path)


class _Largest(TorchDispatchMode):
    """Records the largest tensor every op returns (a DTensor: its local shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.float = self.any = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                n = t.to_local().numel() if hasattr(t, "to_local") else t.numel()
                self.any = max(self.any, n)
                if t.is_floating_point():
                    self.float = max(self.float, n)
        return out


def _memory(rank: int, world: int) -> None:
    from torch import nn

    import torchspartan as ts

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(128, 128), nn.Tanh()) for _ in range(4)])
    ts.sparsify(net)
    fh.shard_all(net)
    opt = ts.DualAveraging(torch.optim.SGD(net.parameters(), lr=0.1), net, sparsity=0.9,
                           total_steps=10)
    scores = 4 * 128 * 128
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 128)).square().mean().backward()
        with _Largest() as seen:
            opt.step()  # the checks, the base step, the mask update
        # floats: the local rows of one tensor, or the histogram of the selection (2 x at most
        # 1/16 of the entries), never all scores; other tensors: at most the bool masks
        # gathered in one collective (one tensor's, or up to GATHER_BATCH entries of several:
        # the masks are whole on every rank, one byte per entry)
        assert seen.float <= max(128 * 128 // world, scores // 8) < scores, seen.float
        assert seen.any <= max(128 * 128, min(scores, GATHER_BATCH)), seen.any


def _wrong_order(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    import torchspartan as ts

    # masks after sharding
    plain = fh.shard_all(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="already sharded by FSDP2.*ts.sparsify\\(model\\), then"):
        ts.sparsify(plain)
    # base optimizer before sharding
    net = fh.model(block=False)
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    fh.shard(net)
    with pytest.raises(ValueError, match="not in the wrapped optimizer.*then fully_shard"):
        ts.DualAveraging(base, net, sparsity=0.5, total_steps=10)
    # DualAveraging before sharding
    net = fh.model(block=False)
    opt = ts.DualAveraging(torch.optim.SGD(net.parameters(), lr=0.1), net, sparsity=0.5,
                           total_steps=10)
    fully_shard(net, mesh=fh.cpu_mesh())
    with pytest.raises(RuntimeError, match="sharded \\(fully_shard\\) after the optimizer"):
        opt.step()


class _Poison(torch.optim.SGD):
    """SGD whose second step writes a NaN into rank 1's shard of the first weight."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        out = super().step(closure)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 2 and torch.distributed.get_rank() == 1:
            self.param_groups[0]["params"][1].to_local().view(-1)[0] = float("nan")
        return out


def _non_finite(rank: int, world: int) -> None:
    # a weight made non-finite on one rank: every rank raises the same error (no hang)
    import pytest

    import torchspartan as ts

    net = fh.shard(fh.model(block=False))
    params = list(net.parameters())
    assert params[1] is ts.find_masks(net)[0].theta
    opt = ts.DualAveraging(_Poison(params, lr=0.1), net, sparsity=0.8, total_steps=10)
    x, y = fh.data(1)[0]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        if opt.last_record.step == 1:
            with pytest.raises(ValueError, match="0.0.weight became non-finite.*step 2"):
                opt.step()
        else:
            opt.step()


def test_fsdp2_non_finite_weight_raises_on_every_rank() -> None:
    fh.spawn(2, _non_finite)


def test_fsdp2_update_allocates_local_sizes_only() -> None:
    fh.spawn(2, _memory)


def test_fsdp2_wrong_build_order_is_refused() -> None:
    fh.spawn(2, _wrong_order)
