"""Finding and registering masks on a model: ``sparsify`` and ``find_masks``.

``sparsify`` is all or nothing: every chosen tensor is checked before the first mask is
registered, and a failure while registering removes the masks it had registered, so a refused
call leaves the model as it was.

A Parameter shared by several modules (tied weights, e.g. an embedding and the output head of a
language model) is one tensor: it gets one :class:`SpartanMask` instance, registered at every
place that holds it, so every use computes with the same masked weight, the budget counts it once
and :func:`~torchspartan.finalize` bakes it once.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan.distributed import ORDER, is_sharded
from torchspartan.mask import Method, SpartanMask

__all__ = ["MaskRef", "SparsifyResult", "find_masks", "input_dim", "sparsify"]

_log = logging.getLogger("torchspartan")


@dataclass(frozen=True)
class MaskRef:
    """Where one :class:`SpartanMask` sits in a model.

    Attributes:
        name: qualified name of the masked tensor, e.g. ``"fc.weight"``.
        module: the module owning the tensor.
        tensor_name: the tensor's name on ``module`` (``"weight"``, ``"in_proj_weight"``, ...).
        mask: the mask.
        position: its index in the tensor's parametrization list (0: applied first).
    """

    name: str
    module: nn.Module
    tensor_name: str
    mask: SpartanMask
    position: int

    @property
    def theta(self) -> torch.Tensor:
        """The dense Parameter under the mask."""
        return self.module.parametrizations[self.tensor_name].original  # type: ignore[index,union-attr]


def find_masks(model: nn.Module) -> list[MaskRef]:
    """Every :class:`SpartanMask` of ``model``, in ``named_modules()`` order.

    A mask registered at several places (tied weights) appears once per place, all with the same
    ``mask`` and ``theta``.
    """
    found = []
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for pos, p in enumerate(plist):
                if isinstance(p, SpartanMask):
                    qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
                    found.append(MaskRef(qual, module, tensor_name, p, pos))
    return found


# -- which layers, which tensors ------------------------------------------------------------
_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention,
)
# Third-party layers matched by class name (no import needed): transformers' ``Conv1D`` (GPT-2,
# weight stored ``in x out``).
_DEFAULT_NAMES: tuple[str, ...] = ("Conv1D",)
# Layers that store their weight ``in x out`` (input along dim 0), by class name.
_INPUT_DIM_0_NAMES = frozenset({"Conv1D"})
_INPUT_DIM_0_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def input_dim(module: nn.Module, tensor_name: str = "weight") -> int:
    """The input dimension of ``module``'s weight: 1 for ``Linear``/``Conv`` (``out x in``), 0 for
    transformers' ``Conv1D`` and transposed convolutions (``in x out``)."""
    if tensor_name == "weight" and (
        isinstance(module, _INPUT_DIM_0_TYPES) or _class_names(module) & _INPUT_DIM_0_NAMES
    ):
        return 0
    return 1


def _tensor_names(module: nn.Module) -> list[str]:
    """The tensors of a chosen module that get a mask."""
    if isinstance(module, nn.MultiheadAttention):
        if isinstance(getattr(module, "in_proj_weight", None), torch.Tensor):
            return ["in_proj_weight"]
        # kdim/vdim differ from embed_dim: separate projections
        return [n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
                if isinstance(getattr(module, n, None), torch.Tensor)]
    return ["weight"] if isinstance(getattr(module, "weight", None), torch.Tensor) else []


def _matches(module: nn.Module, types: tuple[type, ...], names: frozenset[str]) -> bool:
    return isinstance(module, types) or bool(names and _class_names(module) & names)


def _check_include(include: Any) -> tuple[tuple[type, ...], frozenset[str]]:
    items = [include] if isinstance(include, (type, str)) else include
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"include must be a module type, a class name, or a sequence of them (e.g. "
            f"include=(nn.Linear, nn.Conv2d)), got {include!r}"
        ) from None
    types, names = [], []
    for t in items:
        if isinstance(t, type) and issubclass(t, nn.Module):
            types.append(t)
        elif isinstance(t, str):
            names.append(t)
        else:
            raise TypeError(
                f"include must hold nn.Module subclasses or class names, got {t!r} in "
                f"{include!r}"
            )
    if not items:
        raise ValueError("include is empty; give the layer types to mask (e.g. (nn.Linear,))")
    return tuple(types), frozenset(names)


def _patterns(name: str, value: Any) -> list[re.Pattern[str]]:
    items = [value] if isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{name} must be a regular expression or a sequence of them, got {value!r}"
        ) from None
    out = []
    for p in items:
        if not isinstance(p, str):
            raise TypeError(f"{name} must hold regular expressions (str), got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{name}: {p!r} is not a valid regular expression ({e})") from None
    return out


def _pruned(module: nn.Module, tensor_name: str) -> bool:
    """``torch.nn.utils.prune`` is applied to ``module.tensor_name``."""
    from torch.nn.utils.prune import BasePruningMethod

    if hasattr(module, tensor_name + "_orig") and hasattr(module, tensor_name + "_mask"):
        return True
    return any(isinstance(h, BasePruningMethod) and getattr(h, "_tensor_name", None) == tensor_name
               for h in module._forward_pre_hooks.values())


def check_place(module: nn.Module, tensor_name: str, qual: str) -> None:
    """Raise ``ValueError`` when a SpartanMask cannot be the first parametrization of
    ``module.tensor_name`` (named ``qual`` in the errors)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and getattr(module, "sparse", False):
        raise ValueError(
            f"{qual}: {type(module).__name__}(sparse=True) produces sparse gradients, which a "
            f"mask cannot be applied to; build it with sparse=False or exclude it"
        )
    if _pruned(module, tensor_name):
        raise ValueError(
            f"{qual} is pruned with torch.nn.utils.prune; a SpartanMask chooses its own zeros, so "
            f"the two cannot share a tensor: call torch.nn.utils.prune.remove(module, "
            f"{tensor_name!r}) first (it keeps the pruned zeros as the starting weights), or "
            f"exclude this layer"
        )


def _check_new_place(module: nn.Module, tensor_name: str, qual: str) -> torch.Tensor:
    """Checks before registering a new mask at ``module.tensor_name``; returns the tensor."""
    if parametrize.is_parametrized(module, tensor_name):
        plist = module.parametrizations[tensor_name]  # type: ignore[index]
        if any(isinstance(p, SpartanMask) for p in plist):
            raise ValueError(f"{qual} already has a SpartanMask; register it once")
        kinds = ", ".join(type(p).__name__ for p in plist)
        raise ValueError(
            f"{qual} already has parametrizations ({kinds}); the SpartanMask must be the first "
            f"on its tensor: register it before them, or exclude this layer"
        )
    check_place(module, tensor_name, qual)
    t = getattr(module, tensor_name)
    if isinstance(t, nn.parameter.UninitializedParameter):
        raise ValueError(f"{qual} is not initialized yet (a lazy module): run one forward pass "
                         f"before registering masks")
    if is_sharded(t):
        raise ValueError(f"{qual} is already sharded by FSDP2 (fully_shard); masks are registered "
                         f"on the unsharded model: {ORDER}")
    if not isinstance(t, nn.Parameter):
        raise ValueError(f"{qual} is not an nn.Parameter (a buffer?); only trained weights can "
                         f"be masked: exclude this layer")
    return t


def _places_of(model: nn.Module, params: Iterable[torch.Tensor]
               ) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (qualified name, module, tensor name) holding each of ``params`` directly."""
    wanted = {id(p) for p in params}
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                qual = f"{mod_name}.{pname}" if mod_name else pname
                out.setdefault(id(p), []).append((qual, module, pname))
    return out


# -- the result -----------------------------------------------------------------------------
class SparsifyResult(list[str]):
    """What :func:`sparsify` returns: the list of the masked tensors' qualified names (as in
    earlier releases), plus what the masks cover.

    Attributes:
        masked_numel: entries of the newly masked tensors (a tied tensor counted once).
        total_numel: entries of all the model's parameters (shared ones counted once).
        left: the model's parameters with at least 2 dims that carry no mask after this call
            (name -> numel): weights left dense.
        aliases: for a tied tensor, the other places that share its mask (name -> names).
    """

    def __init__(self, names: Iterable[str], masked_numel: int, total_numel: int,
                 left: dict[str, int], aliases: dict[str, list[str]]) -> None:
        super().__init__(names)
        self.masked_numel = masked_numel
        self.total_numel = total_numel
        self.left = left
        self.aliases = aliases

    @property
    def masked_fraction(self) -> float:
        """Share of the model's parameters under the masks registered by this call."""
        return self.masked_numel / self.total_numel if self.total_numel else 0.0

    def summary(self) -> str:
        left = sum(self.left.values())
        biggest = sorted(self.left.items(), key=lambda kv: -kv[1])[:3]
        text = (f"ts.sparsify: masked {len(self)} tensors, {self.masked_numel} of the model's "
                f"{self.total_numel} parameters ({self.masked_fraction:.1%}); {len(self.left)} "
                f"weights with >= 2 dims left dense ({left} parameters, "
                f"{left / max(1, self.total_numel):.1%})")
        if biggest:
            text += ": " + ", ".join(f"{n} ({k})" for n, k in biggest)
            text += ", ..." if len(self.left) > len(biggest) else ""
        return text


# -- sparsify -------------------------------------------------------------------------------
def sparsify(
    model: nn.Module,
    include: type[nn.Module] | str | Iterable[type[nn.Module] | str] | None = None,
    *,
    names: str | None = None,
    exclude: str | Iterable[str] = (),
    method: Method = "spartan",
    block: Sequence[int] | None = None,
    min_density: float | None = None,
    max_density: float = 1.0,
) -> SparsifyResult:
    """Register a :class:`SpartanMask` on the weights of the chosen layers of ``model``.

    A layer is chosen when it is an instance of one of ``include`` (types, or class names matched
    against the layer's class and its bases), its qualified name matches the regular expression
    ``names`` (if given, ``re.search``), and it matches none of ``exclude`` (a regular expression
    or a list of them). The default ``include`` is ``nn.Linear``, ``nn.Conv1d/2d/3d``,
    ``nn.MultiheadAttention`` and transformers' ``Conv1D`` (by class name, without importing
    transformers); ``nn.Embedding`` only when asked for. For ``nn.MultiheadAttention`` the input
    projection (``in_proj_weight``, or ``q/k/v_proj_weight``) is masked; its output projection is
    an ``nn.Linear`` chosen on its own. ``block`` is given in the ``(out, in, ...)`` order of
    ``nn.Linear``; for layers that store their weight ``in x out`` (``Conv1D``, transposed
    convolutions) it is transposed to their layout.

    A weight shared with other modules (tied weights) gets one mask, registered at every place
    that holds it. All or nothing: a refused layer leaves the model unchanged.

    ``method``, ``block``, ``min_density`` and ``max_density`` go to every
    :class:`SpartanMask`. The default ``min_density=None`` keeps at least one entry per output
    unit (block row) of every tensor that shares a budget (no layer is emptied);
    ``min_density=0.0`` allows empty layers.

    Returns:
        A :class:`SparsifyResult`: the list of the masked tensors' qualified names, e.g.
        ``["conv1.weight", "fc.weight"]``, with ``masked_numel``, ``masked_fraction`` and
        ``left`` (weights with >= 2 dims left dense). The summary is logged on the
        ``"torchspartan"`` logger (INFO); with the default arguments, a ``UserWarning`` says when
        dense weights left hold more than 5% of the model's parameters.

    Raises:
        TypeError: ``include``/``exclude``/``names`` of the wrong type.
        ValueError: nothing matched, a bad pattern, a block that does not divide a weight, a
            tensor that already has a mask or a parametrization, is pruned with
            ``torch.nn.utils.prune``, or belongs to a ``sparse=True`` embedding.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 2))
        >>> ts.sparsify(model, exclude=r"^2$")
        ['0.weight']
    """
    default = include is None and names is None and not exclude
    types, class_names = (_DEFAULT_TYPES, frozenset(_DEFAULT_NAMES)) if include is None else (
        _check_include(include))
    excl = _patterns("exclude", exclude)
    if names is not None and not isinstance(names, str):
        raise TypeError(f"names must be a regular expression (str) or None, got {names!r}")
    pattern = _patterns("names", names)[0] if names is not None else None
    mask_args: dict[str, Any] = {"min_density": min_density, "max_density": max_density}
    if method == "fixed":
        raise ValueError("sparsify cannot register method='fixed' masks (each needs its own "
                         "mask=); register them with parametrize.register_parametrization")
    SpartanMask(method, block, **mask_args)  # the arguments' checks, before anything else

    chosen: list[tuple[str, nn.Module, str]] = []
    for mod_name, module in model.named_modules():
        if not _matches(module, types, class_names):
            continue
        if pattern is not None and not pattern.search(mod_name):
            continue
        if any(p.search(mod_name) for p in excl):
            continue
        for tensor_name in _tensor_names(module):
            qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            chosen.append((qual, module, tensor_name))
    if not chosen:
        shown = [t.__name__ for t in types] + sorted(class_names)
        raise ValueError(
            f"sparsify matched no layer (include={shown}, names={names!r}, "
            f"exclude={[p.pattern for p in excl]!r}); check the types and patterns against "
            f"[name for name, _ in model.named_modules()]"
        )

    # -- every check before the first registration ---------------------------------------
    params = []
    for qual, module, tensor_name in chosen:
        params.append(_check_new_place(module, tensor_name, qual))
    places = _places_of(model, params)
    plan: list[tuple[str, SpartanMask, list[tuple[str, nn.Module, str]]]] = []
    planned: set[int] = set()
    for (qual, module, tensor_name), p in zip(chosen, params, strict=True):
        if id(p) in planned:
            continue  # a tied tensor chosen twice: one mask
        planned.add(id(p))
        where = places.get(id(p), [(qual, module, tensor_name)])
        for q, mod, tn in where:
            if mod is not module or tn != tensor_name:
                _check_new_place(mod, tn, q)
        layer_block = block
        if block is not None and input_dim(module, tensor_name) == 0 and len(block) >= 2:
            layer_block = (block[1], block[0], *block[2:])
        mask = SpartanMask(method, layer_block, **mask_args)
        try:
            mask.grid_shape(p.shape)
            mask.check_tensor(p)
        except ValueError as e:
            raise ValueError(f"{qual}: {e}") from None
        plan.append((where[0][0], mask, where))  # named after its first place, as find_masks

    position = {id(m): k for k, (_, m) in enumerate(model.named_modules())}
    plan.sort(key=lambda item: position[id(item[2][0][1])])  # find_masks' order
    done: list[tuple[nn.Module, str]] = []
    try:
        for qual, mask, where in plan:  # noqa: B007 (qual names the failure below)
            for _, mod, tn in where:
                parametrize.register_parametrization(mod, tn, mask)
                done.append((mod, tn))
                allow_pickle(mod)
    except Exception as e:
        for mod, tn in reversed(done):
            parametrize.remove_parametrizations(mod, tn, leave_parametrized=False)
        raise ValueError(f"{qual}: registering the mask failed ({e}); no mask was registered "
                         f"by this call") from e

    masked_ids = {id(p) for p in params}
    for r in find_masks(model):
        masked_ids.add(id(r.theta))
    total = 0
    left: dict[str, int] = {}
    for pname, p in model.named_parameters():
        total += p.numel()
        if id(p) not in masked_ids and p.dim() >= 2:
            left[re.sub(r"parametrizations\.(\w+)\.original$", r"\1", pname)] = p.numel()
    masked_numel = sum(math.prod(p.shape) for p in {id(p): p for p in params}.values())
    result = SparsifyResult(
        [q for q, _, _ in plan], masked_numel, total, left,
        {q: [w[0] for w in where[1:]] for q, _, where in plan if len(where) > 1},
    )
    _log.info(result.summary())
    if default and total and sum(left.values()) > 0.05 * total:
        warnings.warn(
            result.summary() + "; to mask them too, pass include= with their types (e.g. "
            "nn.Embedding), or silence this by passing include= explicitly",
            UserWarning, stacklevel=2,
        )
    return result


# -- pickling parametrized modules -----------------------------------------------------------
def allow_pickle(module: nn.Module) -> None:
    """Let ``pickle``/``torch.save`` serialize ``module`` although it is parametrized.

    ``torch.nn.utils.parametrize`` gives a parametrized module a class made at run time and
    refuses to pickle it. For modules carrying a :class:`SpartanMask` this installs a reduction
    that rebuilds that class on load (same parametrizations, same Parameter objects within one
    pickle). ``model.state_dict()`` stays the recommended checkpoint format.
    """
    if parametrize.is_parametrized(module):
        _allow_pickle_class(type(module))


def _reduce_parametrized(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
    base = type(self).__bases__[0]
    names = tuple(self.parametrizations.keys())  # type: ignore[union-attr,operator]
    return (_rebuild_parametrized, (base, names), self.__dict__)


def _rebuild_parametrized(base: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    obj = base.__new__(base)
    parametrize._inject_new_class(obj)
    for name in names:
        parametrize._inject_property(obj, name)
    _allow_pickle_class(type(obj))
    return obj


def _allow_pickle_class(cls: type) -> None:
    if "_spartan_pickle" not in cls.__dict__:
        cls._spartan_pickle = True  # type: ignore[attr-defined]
        cls.__reduce_ex__ = _reduce_parametrized  # type: ignore[method-assign,assignment]
