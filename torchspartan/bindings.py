"""Which masks an updater serves, checked once, and whether they are still where they were.

:func:`checked_refs` turns the :class:`~torchspartan.SpartanMask` s of a model into one entry per
masked tensor (a tied Parameter is one tensor), refusing what cannot compose: a mask that is not
the first parametrization of its tensor, parametrizations after it that undo it, one mask on two
tensors, two masks on one tensor, a tied tensor used unmasked. :class:`Places` remembers where
every mask sat, so a training step can refuse to run on a model whose masks were removed.
"""

from __future__ import annotations

from torch import nn

from torchspartan.distributed import ORDER, is_sharded
from torchspartan.sparsify import MaskRef, allow_pickle, check_place, find_masks

__all__ = ["Places", "checked_refs"]

_NOT_AFTER = {
    "_Orthogonal": "orthogonal makes the weight dense again (it maps the masked weight to an "
                   "orthogonal matrix), which defeats the mask",
    "_WeightNorm": "weight_norm splits the weight in two (magnitude and direction), which only "
                   "the first parametrization of a tensor may do",
}


def checked_refs(model: nn.Module) -> list[MaskRef]:
    """The masks of ``model``, one entry per masked tensor (tied places: the first), checked.

    Raises:
        ValueError: see :class:`~torchspartan.MaskUpdater` (every refusal names the tensor).
    """
    found = find_masks(model)
    if not found:
        raise ValueError(
            "model has no SpartanMask; register one first, e.g. ts.sparsify(model) or "
            "parametrize.register_parametrization(layer, 'weight', ts.SpartanMask())"
        )
    by_mask: dict[int, MaskRef] = {}
    by_theta: dict[int, MaskRef] = {}
    refs = []
    for r in found:
        _check_order(r)
        check_place(r.module, r.tensor_name, r.name)
        first = by_mask.get(id(r.mask))
        if first is not None:  # a tied tensor: the same mask at another place
            _check_tied(first, r)
            continue
        twin = by_theta.get(id(r.theta))
        if twin is not None:
            raise ValueError(
                f"{twin.name} and {r.name} are one Parameter (tied weights) with two different "
                f"SpartanMasks; a tensor takes one mask: register the same SpartanMask instance "
                f"at both places (ts.sparsify does this for tied weights)"
            )
        by_mask[id(r.mask)] = by_theta[id(r.theta)] = r
        refs.append(r)
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied = by_theta.get(id(p))
        if tied is not None and not pname.endswith(".original") and pname != "original":
            raise ValueError(
                f"{tied.name} is tied to {pname} (one Parameter), which is used without its mask; "
                f"register the same SpartanMask at both places (ts.sparsify does this for tied "
                f"weights) or untie them"
            )
    return refs


def _check_order(r: MaskRef) -> None:
    if r.position != 0:
        raise ValueError(
            f"{r.name}: the SpartanMask is parametrization number {r.position} on this "
            f"tensor; it must be registered first (register other parametrizations after it)"
        )
    for p in list(_plist(r))[1:]:
        why = _NOT_AFTER.get(type(p).__name__)
        if why is not None or isinstance(p, type(r.mask)):
            raise ValueError(
                f"{r.name}: {type(p).__name__} after the SpartanMask does not compose "
                f"({why or 'a second mask'}); remove it "
                f"(parametrize.remove_parametrizations) or exclude this tensor from the masks"
            )


def _check_tied(first: MaskRef, r: MaskRef) -> None:
    if first.theta is not r.theta:
        raise ValueError(f"{r.name}: one SpartanMask instance is registered on two different "
                         f"tensors ({first.name} and {r.name}); give each tensor its own")
    if [id(p) for p in _plist(first)] != [id(p) for p in _plist(r)]:
        raise ValueError(f"{r.name} and {first.name} share one weight (tied) but carry "
                         f"different parametrizations; give both places the same ones")


def _plist(r: MaskRef) -> nn.ModuleList:
    return r.module.parametrizations[r.tensor_name]  # type: ignore[index,return-value]


class Places:
    """Where every mask of ``model`` sat when it was found (tied tensors: every place)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.places = [(r.module, r.tensor_name, r.mask, r.theta) for r in find_masks(model)]
        for place in self.places:
            allow_pickle(place[0])

    def check(self) -> None:
        """Raise ``RuntimeError`` when a mask is no longer where it was: removed
        (``parametrize.remove_parametrizations``, ``ts.finalize``), replaced, or over another
        Parameter. Cheap (no device work)."""
        gone = []
        for module, name, mask, theta in self.places:
            plist = getattr(module, "parametrizations", None)
            plist = plist[name] if plist is not None and name in plist else None
            if plist is None or len(plist) == 0 or plist[0] is not mask or (
                    getattr(plist, "original", None) is not theta):
                gone.append((module, name))
        if not gone:
            return
        for module, name in gone:  # sharded after the optimizer was built
            plist = getattr(module, "parametrizations", None)
            now = getattr(plist[name], "original", None) if plist and name in plist else None
            if is_sharded(now) and not any(is_sharded(p[3]) for p in self.places):
                raise RuntimeError(f"the model was sharded (fully_shard) after the optimizer was "
                                   f"built, so the masks hold the unsharded weights; build in the "
                                   f"order {ORDER}")
        if not find_masks(self.model):
            raise RuntimeError(
                "the model was finalized (ts.finalize); its masks are gone, so the masks cannot "
                "be updated any more. Use a plain optimizer to keep training the sparse model."
            )
        where = {id(m): q for q, m in self.model.named_modules()}
        shown = [f"{where[id(m)]}.{n}" if where.get(id(m)) else n for m, n in gone][:3]
        raise RuntimeError(
            f"{', '.join(shown)} lost its SpartanMask (or its Parameter) since the optimizer was "
            f"built (parametrize.remove_parametrizations?); nothing was updated. Register the "
            f"masks as they were, or build a new ts.DualAveraging/ts.MaskUpdater for the masks "
            f"the model has now"
        )
