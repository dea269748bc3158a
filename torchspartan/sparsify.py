"""Finding and registering masks on a model: ``sparsify`` and ``find_masks``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchspartan.mask import Method, SpartanMask

__all__ = ["MaskRef", "find_masks", "sparsify"]


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
    """Every :class:`SpartanMask` of ``model``, in ``named_modules()`` order."""
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
_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, nn.Embedding,
)


def sparsify(
    model: nn.Module,
    include: Iterable[type[nn.Module]] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d),
    *,
    names: str | None = None,
    exclude: Iterable[str] = (),
    method: Method = "spartan",
    block: Sequence[int] | None = None,
    min_density: float = 0.0,
    max_density: float = 1.0,
) -> list[str]:
    """Register a :class:`SpartanMask` on the weights of the chosen layers of ``model``.

    A layer is chosen when it is an instance of one of ``include``, its qualified name matches
    the regular expression ``names`` (if given, ``re.search``), and matches none of ``exclude``.
    For ``nn.MultiheadAttention`` the input projection ``in_proj_weight`` is masked (its output
    projection is an ``nn.Linear`` and chosen on its own). Layers whose weight a ``block`` does
    not divide raise an error naming the layer; exclude them explicitly.

    Returns:
        The qualified names of the masked tensors, e.g. ``["conv1.weight", "fc.weight"]``.

    Raises:
        ValueError: nothing matched, a bad pattern, or a block that does not divide a weight.

    Example:
        >>> import torch, torchspartan as ts
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 2))
        >>> ts.sparsify(model, exclude=[r"^2$"])
        ['0.weight']
    """
    include = tuple(include)
    excl = [re.compile(p) for p in exclude]
    pattern = re.compile(names) if names is not None else None
    chosen: list[tuple[str, nn.Module, str]] = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, include):
            continue
        if pattern is not None and not pattern.search(mod_name):
            continue
        if any(p.search(mod_name) for p in excl):
            continue
        if isinstance(module, nn.MultiheadAttention):
            if getattr(module, "in_proj_weight", None) is None:
                continue
            chosen.append((mod_name, module, "in_proj_weight"))
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            chosen.append((mod_name, module, "weight"))
    if not chosen:
        raise ValueError(
            f"sparsify matched no layer (include={[t.__name__ for t in include]}, "
            f"names={names!r}, exclude={list(exclude)!r}); check the types and patterns against "
            f"[name for name, _ in model.named_modules()]"
        )
    out = []
    for mod_name, module, tensor_name in chosen:
        qual = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
        if parametrize.is_parametrized(module, tensor_name) and any(
            isinstance(p, SpartanMask)
            for p in module.parametrizations[tensor_name]  # type: ignore[index]
        ):
            raise ValueError(f"{qual} already has a SpartanMask; register it once")
        try:
            mask = SpartanMask(method, block, min_density=min_density, max_density=max_density)
            parametrize.register_parametrization(module, tensor_name, mask)
        except ValueError as e:
            raise ValueError(f"{qual}: {e}") from None
        out.append(qual)
    return out
