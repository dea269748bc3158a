"""Distributed checkpoints of a sharded (FSDP2) Spartan run with ``torch.distributed.checkpoint``.

A run resumes from three parts: the model's state (the sharded weights and the masks' buffers,
which are replicated), the base optimizer's (sharded like the weights) and the ``"spartan"``
entry of :meth:`~torchspartan.DualAveraging.state_dict` (plain numbers: step, record, hints,
coupling slopes; stored as one JSON string). :func:`sharded_state_dict` collects them in the
form ``torch.distributed.checkpoint`` saves and loads in place, keyed by parameter names, so a
checkpoint written on one number of ranks loads on another::

    state = ts.sharded_state_dict(model, opt)
    dcp.save(state, checkpoint_id=path)
    ...                                    # later, any number of ranks, same build order
    state = ts.sharded_state_dict(model, opt)
    dcp.load(state, checkpoint_id=path)
    ts.load_sharded_state_dict(model, opt, state)
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

__all__ = ["load_sharded_state_dict", "sharded_state_dict"]


def sharded_state_dict(model: nn.Module, opt: Any) -> dict[str, Any]:
    """``{"model", "optim", "spartan"}`` of a run, for ``torch.distributed.checkpoint``.

    Args:
        model: the (sharded) model with its masks.
        opt: its :class:`~torchspartan.DualAveraging`.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt.optimizer)
    # one JSON string: its layout (lists of couplings and hints) changes during a run, and DCP
    # loads into the keys of the state it is given
    spartan = json.dumps(opt.state_dict()["spartan"])
    return {"model": model_sd, "optim": optim_sd, "spartan": spartan}


def load_sharded_state_dict(model: nn.Module, opt: Any, state: dict[str, Any]) -> None:
    """Apply a state loaded by ``dcp.load`` into :func:`sharded_state_dict`'s dict: the model
    (weights and masks) first, then the base optimizer, then the Spartan entry (checked whole
    by :meth:`~torchspartan.DualAveraging.load_state_dict` before it changes anything).

    Raises:
        KeyError: ``state`` lacks one of ``"model"``, ``"optim"``, ``"spartan"``.
        ValueError: as :meth:`~torchspartan.DualAveraging.load_state_dict`.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    missing = {"model", "optim", "spartan"} - set(state)
    if missing:
        raise KeyError(f"the checkpoint state lacks {sorted(missing)}; build it with "
                       f"ts.sharded_state_dict(model, opt) before dcp.load")
    set_state_dict(model, opt.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    base = opt.optimizer.state_dict()
    spartan = state["spartan"]
    base["spartan"] = json.loads(spartan) if isinstance(spartan, str) else spartan
    opt.load_state_dict(base)
