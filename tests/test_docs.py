"""Run the docstring examples of the public modules (topk.py's run in test_topk.py)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

torch.set_flush_denormal(True)

MODULES = ["torchspartan.mask", "torchspartan.optim", "torchspartan.report",
           "torchspartan.schedules", "torchspartan.topkast", "torchspartan.rigl"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"no examples found in {name}"
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
