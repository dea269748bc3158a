"""The Spartan state in checkpoints: step records and the layouts of the state dicts.

``MaskUpdater.state_dict()`` and the ``"spartan"`` entry of ``DualAveraging.state_dict()`` hold
plain numbers, strings and lists (the masks themselves are buffers in ``model.state_dict()``).
This module defines their layouts and versions, reads the entries of release 0.1 (version 1),
and checks a loaded entry whole, naming what is wrong, before anything is changed
(docs/design.md, "Checkpoints").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from torchspartan._checks import finite_number

__all__ = [
    "OPTIMIZER_STATE_VERSION",
    "UPDATER_STATE_VERSION",
    "OptimizerEntry",
    "StepRecord",
    "UpdaterState",
    "check_base_state",
    "check_masks_match",
    "check_record",
    "parse_optimizer_entry",
    "parse_updater_state",
    "updater_entry",
]

# The layout of MaskUpdater.state_dict(); entries without a version (release 0.2.0) read as 1;
# version 3 added the offsets (earlier entries read with none: the next start has no drift).
UPDATER_STATE_VERSION = 3
# The layout of DualAveraging.state_dict()["spartan"]; release 0.1 wrote version 1.
OPTIMIZER_STATE_VERSION = 2


@dataclass(frozen=True)
class StepRecord:
    """What one mask update did, for logging (``DualAveraging.last_record``).

    Attributes:
        step: optimizer steps taken so far.
        density: kept fraction of the masked weights after this update (hard masks).
        target_density: the density asked of the allocatable masked tensors (cost-weighted).
        beta: sharpness of the soft top-k at this step (before per-layer block scaling).
        iterations: Newton evaluations of the budget equation, summed over problems.
        budget_error: largest relative error of the soft budget over the problems.
        mask_change: fraction of masked weights whose hard mask changed at this update.
        frozen: whether the mask is frozen (fine-tuning phase).
    """

    step: int
    density: float
    target_density: float
    beta: float
    iterations: int
    budget_error: float
    mask_change: float
    frozen: bool


def check_record(record: Any) -> StepRecord:
    """A :class:`StepRecord` from its dict, every field checked (``ValueError`` naming it)."""
    if isinstance(record, StepRecord):
        record = asdict(record)
    if not isinstance(record, Mapping):
        raise ValueError(f"malformed step record {record!r}: expected a dict of StepRecord "
                         f"fields")
    names = [f.name for f in fields(StepRecord)]
    if set(record) != set(names):
        raise ValueError(f"malformed step record: fields {sorted(record)}, expected {names}")
    out: dict[str, Any] = {}
    for f in fields(StepRecord):
        v = record[f.name]
        if f.name == "frozen":
            ok = isinstance(v, (bool, numbers.Integral)) and v in (0, 1)
            v = bool(v)
        elif f.name in ("step", "iterations"):
            ok = isinstance(v, (int, numbers.Integral)) and not isinstance(v, bool) and int(v) >= 0
            v = int(v) if ok else v
        else:
            ok = isinstance(v, (int, float, numbers.Real)) and not isinstance(v, bool) and (
                math.isfinite(v))
            v = float(v) if ok else v
        if not ok:
            raise ValueError(f"malformed step record: {f.name}={record[f.name]!r}")
        out[f.name] = v
    return StepRecord(**out)


# -- the updater's entry -------------------------------------------------------------------
@dataclass(frozen=True)
class UpdaterState:
    """A checked :meth:`MaskUpdater.state_dict` entry.

    Attributes:
        couplings: ``(mask indices, slope)`` of every shared budget's coupling.
        hints: warm starts of the hard selection, by the mask indices of a problem.
        offsets: the soft thresholds' offsets from the hard ones (the Newton starts' drift), by
            the mask indices of a problem.
        collapsed: names of the masked tensors already warned about as collapsed.
        last_record: the record of the last update (None before the first).
    """

    couplings: list[tuple[list[int], float]]
    hints: dict[tuple[int, ...], list[float]]
    offsets: dict[tuple[int, ...], list[float]]
    collapsed: set[str]
    last_record: StepRecord | None


def updater_entry(fingerprint: list[list[Any]], couplings: list[tuple[list[int], float]],
                  hints: Mapping[tuple[int, ...], list[float]],
                  offsets: Mapping[tuple[int, ...], list[float]], collapsed: set[str],
                  last_record: StepRecord | None) -> dict[str, Any]:
    """A :meth:`MaskUpdater.state_dict` entry: plain numbers, strings and lists (what
    :func:`parse_updater_state` reads)."""
    return {
        "version": UPDATER_STATE_VERSION,
        "layers": fingerprint,
        "couplings": [{"layers": layers, "slope": slope} for layers, slope in couplings],
        "hints": [[list(k), list(v)] for k, v in hints.items()],
        "offsets": [[list(k), list(v)] for k, v in offsets.items()],
        "collapsed": sorted(collapsed),
        "last_record": asdict(last_record) if last_record else None,
    }


def parse_updater_state(state: Any, fingerprint: list[list[Any]]) -> UpdaterState:
    """Check a :meth:`MaskUpdater.state_dict` entry against the updater's masked tensors
    (``fingerprint``: ``[name, shape, method]`` each) and return it parsed.

    Raises:
        TypeError / ValueError: the entry comes from a model with other masked tensors, from a
            newer release, or is malformed.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"the updater state must be a dict (MaskUpdater.state_dict()), got "
                        f"{type(state).__name__}")
    version = state.get("version", 1)
    if version not in range(1, UPDATER_STATE_VERSION + 1):
        raise ValueError(
            f"the updater state has version {version!r}; this release reads versions 1 to "
            f"{UPDATER_STATE_VERSION}: load it with the torchspartan release that wrote it"
        )
    unknown = set(state) - {"version", "layers", "couplings", "hints", "offsets", "collapsed",
                            "last_record"}
    if unknown:
        raise ValueError(f"the updater state has unknown keys {sorted(unknown)}; is it a "
                         f"MaskUpdater.state_dict()?")
    try:
        theirs = [list(x) for x in state.get("layers", [])]
    except TypeError:
        raise ValueError(f"malformed updater state: 'layers' must be a list of [name, shape, "
                         f"method], got {state.get('layers')!r}") from None
    if theirs != fingerprint:
        diff = next(
            (f"{a} vs {b}" for a, b in zip(theirs, fingerprint, strict=False) if a != b),
            f"{len(theirs)} masked tensors vs {len(fingerprint)}",
        )
        raise ValueError(
            f"this state comes from a different model: its masked tensors differ ({diff}); "
            f"load it into the model it was saved from"
        )
    n = len(fingerprint)
    collapsed = _as_list("collapsed", state.get("collapsed", []))
    if any(c not in [f[0] for f in fingerprint] for c in collapsed):
        raise ValueError(f"malformed updater state: 'collapsed' must name masked tensors, "
                         f"got {collapsed!r}")
    record = state.get("last_record")
    return UpdaterState(_couplings(state.get("couplings", []), n),
                        _hints(state.get("hints", []), n),
                        _hints(state.get("offsets", []), n, "offset"), set(collapsed),
                        None if record is None else check_record(record))


def _couplings(entries: Any, n: int) -> list[tuple[list[int], float]]:
    couplings: list[tuple[list[int], float]] = []
    used: set[int] = set()
    for entry in _as_list("couplings", entries):
        try:
            layers = [_index(i, n) for i in entry["layers"]]
            slope = finite_number("slope", entry["slope"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"malformed coupling entry {entry!r}: layer indices must be "
                             f"integers in [0, {n}), slope a finite number ({e})") from None
        if len(layers) < 2 or len(set(layers)) < len(layers) or used & set(layers) or slope < 0:
            raise ValueError(f"malformed coupling entry {entry!r}: a coupling joins 2 or more "
                             f"distinct masks, each in one coupling, with a slope >= 0")
        used.update(layers)
        couplings.append((layers, slope))
    return couplings


def _hints(items: Any, n: int, what: str = "hint") -> dict[tuple[int, ...], list[float]]:
    """The hints (or offsets): ``[mask indices, [1 or 2 finite numbers]]`` each."""
    hints: dict[tuple[int, ...], list[float]] = {}
    for item in _as_list(f"{what}s", items):
        try:
            k, v = item
            key = tuple(_index(i, n) for i in k)
            vals = [finite_number(what, x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed {what} {item!r}: [mask indices, [1 or 2 finite "
                             f"numbers]] ({e})") from None
        if not key or not 1 <= len(vals) <= 2:
            raise ValueError(f"malformed {what} {item!r}: [mask indices, [1 or 2 finite "
                             f"numbers]]")
        hints[key] = vals
    return hints


def _index(i: Any, n: int) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, numbers.Integral)) or not 0 <= int(i) < n:
        raise ValueError(f"index {i!r} not an integer in [0, {n})")
    return int(i)


def _as_list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"malformed updater state: {name!r} must be a list, got "
                         f"{type(value).__name__}")
    return list(value)


# -- the optimizer's entry -----------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerEntry:
    """A checked ``"spartan"`` entry of ``DualAveraging.state_dict()`` (version 1 converted).

    ``updater`` is still to be checked against the model's masks
    (:func:`parse_updater_state`).
    """

    version: int
    step: int
    frozen: bool
    last_record: StepRecord
    updater: Any


def parse_optimizer_entry(spartan: Any) -> OptimizerEntry:
    """Check the ``"spartan"`` entry of a ``DualAveraging`` state dict; convert version 1.

    Raises:
        ValueError: a newer release's entry, or a malformed one (naming the field).
    """
    if not isinstance(spartan, Mapping):
        raise ValueError(f"the 'spartan' entry must be a dict, got {type(spartan).__name__}")
    version = spartan.get("version")
    if version == 1:
        try:
            spartan = _from_version_1(dict(spartan))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed version-1 'spartan' entry (missing {e})") from None
    elif version != OPTIMIZER_STATE_VERSION:
        raise ValueError(
            f"the 'spartan' entry has state version {version!r}; this release reads versions "
            f"1 and {OPTIMIZER_STATE_VERSION}: load it with the torchspartan release that wrote it"
        )
    missing = {"step", "updater", "last_record"} - set(spartan)
    if missing:
        raise ValueError(f"malformed 'spartan' entry: missing {sorted(missing)}")
    step = spartan["step"]
    if isinstance(step, bool) or not isinstance(step, (int, numbers.Integral)) or step < 0:
        raise ValueError(f"malformed 'spartan' entry: step must be an integer >= 0, got "
                         f"{step!r}")
    record = check_record(spartan["last_record"])
    frozen = spartan.get("frozen", record.frozen)
    if not isinstance(frozen, bool):
        raise ValueError(f"malformed 'spartan' entry: frozen must be a bool, got {frozen!r}")
    return OptimizerEntry(int(version), int(step), frozen, record, spartan["updater"])


def _from_version_1(spartan: dict[str, Any]) -> dict[str, Any]:
    """A release-0.1 ``"spartan"`` entry in the current layout."""
    return {
        "step": spartan["step"],
        "frozen": spartan["frozen"],
        "last_record": spartan["last_record"],
        "updater": {
            "layers": spartan["layers"],
            "couplings": [{"layers": p["layers"], "slope": p["total_slope"]}
                          for p in spartan.get("problems", []) if len(p["layers"]) > 1],
            "hints": spartan.get("hints", []),
            "last_record": spartan["last_record"],
        },
    }


def check_base_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """The checks ``torch.optim.Optimizer.load_state_dict`` makes, before anything changes."""
    if set(state_dict) != {"state", "param_groups"}:
        raise ValueError(
            f"the base optimizer's state dict must have the keys 'state' and 'param_groups', got "
            f"{sorted(state_dict)}; pass DualAveraging.state_dict() (or the base optimizer's)"
        )
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        raise ValueError("malformed optimizer state dict: 'param_groups' must be a list and "
                         "'state' a dict")
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        raise ValueError(f"the state dict has {len(groups)} parameter groups, the optimizer "
                         f"{len(ours)}: it comes from another optimizer setup")
    ids = set()
    for k, (g, mine) in enumerate(zip(groups, ours, strict=True)):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), (list, tuple)):
            raise ValueError(f"malformed optimizer state dict: parameter group {k} has no "
                             f"'params' list")
        if len(g["params"]) != len(mine["params"]):
            raise ValueError(
                f"parameter group {k} of the state dict has {len(g['params'])} parameters, the "
                f"optimizer's {len(mine['params'])}: it comes from another model or optimizer"
            )
        ids.update(g["params"])
    unknown = [k for k in state if k not in ids]
    if unknown:
        raise ValueError(f"the state dict has state for parameters {unknown[:3]} that are in no "
                         f"parameter group")


def check_masks_match(kept_fraction: float, frozen_flags: Sequence[bool],
                      entry: OptimizerEntry) -> None:
    """The model's masks (their kept fraction and frozen flags) must be the checkpoint's."""
    flags = set(frozen_flags)
    if len(flags) > 1:
        raise ValueError("the model's masks are partly frozen (a partial model state dict?); "
                         "load model.state_dict() of the checkpoint first")
    if entry.version != 1 and flags != {entry.frozen}:
        raise ValueError(
            f"the checkpoint's masks are {'' if entry.frozen else 'not '}frozen but the model's "
            f"are{'' if flags == {True} else ' not'}: load model.state_dict() of the same "
            f"checkpoint before opt.load_state_dict()"
        )
    if abs(kept_fraction - entry.last_record.density) > 1e-9:
        raise ValueError(
            f"the model's masks keep a fraction {kept_fraction:.6g} of the masked weights, but "
            f"the checkpoint's last step kept {entry.last_record.density:.6g}: load "
            f"model.state_dict() of the same checkpoint before opt.load_state_dict()"
        )
