"""Which masks compute their weights in which batched node (docs/design.md, "One batched node
per step").

A batched coupling (``coupling.py``) computes the masked weights of its shared budget in one
autograd node. The masks with budgets of their own (held at a density bound in a shared budget;
every mask of ``ts.Uniform``/``ts.ERK``) join such a node too (:func:`attach`), each with its own
threshold and budget term. Who joins is decided from the masks' state alone, after every update
and after a checkpoint is loaded, so a resumed run computes in the same nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchspartan.allocation import AllocationSolver
from torchspartan.coupling import Batched, Coupling

__all__ = ["attach"]


def attach(solver: AllocationSolver, couplings: Sequence[Coupling],
           known: dict[int, tuple[float, float]] | None = None) -> list[Coupling]:
    """Every Spartan mask with a budget of its own (held at a density bound; Uniform, ERK)
    computed in the batched node of the first of ``couplings`` with its weights' dtype and
    device, when it can be (unstructured or blocks, one threshold, float32/float64): its
    forward and backward then take a few multi-tensor ops with the others instead of a few
    ops each. Where no such coupling exists, two or more such masks get a node of their own
    (a coupling that shares no threshold), returned for the caller to keep and release.
    ``known``: the ``(threshold, beta)`` of masks whose values the caller has read; the
    others' are read here, in one host read."""
    if not solver.batches:
        return []
    nodes = [c for c in couplings if c.batched is not None and c.thetas]
    by_kind: dict[tuple[torch.dtype, torch.device], Coupling] = {}
    for c in reversed(nodes):
        by_kind[(c.thetas[0].dtype, c.thetas[0].device)] = c
    joining: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, r in enumerate(solver.refs):
        m = r.mask
        if m.method == "spartan" and m.scope == "local" and m.soft_active and (
                m.threshold.dim() == 0 and m.coupling is None
                and r.theta.dtype in (torch.float32, torch.float64)):
            joining.setdefault((r.theta.dtype, r.theta.device), []).append(i)
    made = []
    for kind, ids in joining.items():
        if kind not in by_kind and len(ids) >= 2:
            own = Coupling([], [], torch.zeros((), dtype=torch.float64, device=kind[1]),
                           batched=Batched([], [], [], [], 0), views=solver.views)
            by_kind[kind] = own
            nodes.append(own)
            made.append(own)
    joining = {kind: ids for kind, ids in joining.items() if kind in by_kind}
    known = known or {}
    unknown = [i for ids in joining.values() for i in ids if i not in known]
    if unknown:
        read = torch.stack([torch.stack([solver.refs[i].mask.threshold.double(),
                                         solver.refs[i].mask.beta.double()])
                            for i in unknown]).tolist()
        known = {**known, **{i: (t, b) for i, (t, b) in zip(unknown, read, strict=True)}}
    for kind, ids in joining.items():
        c = by_kind[kind]
        if ids:
            refs = [solver.refs[i] for i in ids]
            c.attach([r.mask for r in refs], [r.theta for r in refs],
                     [known[i][1] for i in ids],
                     [solver.unit_costs[i] * r.mask.block_numel for i, r in zip(ids, refs,
                                                                              strict=True)],
                     [known[i][0] for i in ids], [r.mask.sizes for r in refs])
    return made
