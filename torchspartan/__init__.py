"""torchspartan: train PyTorch models to a chosen sparsity with Spartan.

One flat namespace::

    import torchspartan as ts
    ts.soft_topk, ts.hard_topk, ts.SoftTopK                 # the mask operators
    ts.SpartanMask, ts.sparsify                             # masks as parametrizations
    ts.DualAveraging, ts.StepRecord                         # the training step
    ts.Global, ts.Uniform, ts.ERK, ts.CostSensitive         # allocation policies
    ts.linear, ts.cosine, ts.constant                       # schedules
    ts.finalize, ts.sparsity_report                         # finishing
"""

from torchspartan.mask import SpartanMask, sparsify
from torchspartan.optim import DualAveraging, StepRecord
from torchspartan.policies import ERK, AllocationPolicy, CostSensitive, Global, Uniform
from torchspartan.report import SparsityReport, finalize, sparsity_report
from torchspartan.schedules import constant, cosine, linear
from torchspartan.topk import SoftTopK, SoftTopKResult, hard_topk, soft_topk

__all__ = [
    "ERK",
    "AllocationPolicy",
    "CostSensitive",
    "DualAveraging",
    "Global",
    "SoftTopK",
    "SoftTopKResult",
    "SparsityReport",
    "SpartanMask",
    "StepRecord",
    "Uniform",
    "constant",
    "cosine",
    "finalize",
    "hard_topk",
    "linear",
    "soft_topk",
    "sparsify",
    "sparsity_report",
]
__version__ = "0.1.0"
