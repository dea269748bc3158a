"""torchspartan: train PyTorch models to a chosen sparsity with Spartan.

One flat namespace::

    ts.soft_topk, ts.hard_topk, ts.SoftTopK, ts.SoftTopKResult     # the mask operators
    ts.SpartanMask, ts.sparsify, ts.find_masks                      # masks as parametrizations
    ts.Global, ts.Uniform, ts.ERK, ts.NM, ts.AllocationPolicy       # allocation policies
    ts.Allocation, ts.MaskedTensor                                  # ... and what they speak
    ts.UnitCost, ts.FlopCost, ts.CostModel, ts.CostSensitive        # cost models
    ts.MaskUpdater, ts.StepRecord                                   # the mask update
    ts.DualAveraging                                                # the training step
    ts.TopKAST, ts.RigL                                             # ... of the baselines
    ts.linear, ts.cosine, ts.constant                               # schedules
    ts.finalize, ts.sparsity_report                                 # finishing
    ts.sharded_state_dict, ts.load_sharded_state_dict               # FSDP2 checkpoints (DCP)
    ts.to_sparse, ts.save_sparse, ts.load_sparse, ts.export_report  # deploying

docs/design.md in the repository explains the maths and who owns which state.
"""

from torchspartan.cost_report import ExportReport, export_report
from torchspartan.dcp import load_sharded_state_dict, sharded_state_dict
from torchspartan.export import ExportSummary, to_sparse
from torchspartan.mask import SpartanMask
from torchspartan.optim import DualAveraging
from torchspartan.policies import (
    ERK,
    NM,
    Allocation,
    AllocationPolicy,
    CostModel,
    CostSensitive,
    FlopCost,
    Global,
    MaskedTensor,
    Uniform,
    UnitCost,
)
from torchspartan.report import SparsityReport, finalize, sparsity_report
from torchspartan.rigl import RigL
from torchspartan.schedules import constant, cosine, linear
from torchspartan.sparse_checkpoint import CheckpointInfo, load_sparse, save_sparse
from torchspartan.sparse_layers import SparseConv2d, SparseLinear
from torchspartan.sparsify import MaskRef, find_masks, sparsify
from torchspartan.topk import SoftTopK, SoftTopKResult, hard_topk, soft_topk
from torchspartan.topkast import TopKAST
from torchspartan.update import MaskUpdater, StepRecord

__all__ = [
    "ERK",
    "CheckpointInfo",
    "ExportReport",
    "ExportSummary",
    "SparseConv2d",
    "SparseLinear",
    "export_report",
    "load_sparse",
    "save_sparse",
    "to_sparse",
    "NM",
    "RigL",
    "TopKAST",
    "Allocation",
    "AllocationPolicy",
    "CostModel",
    "CostSensitive",
    "DualAveraging",
    "FlopCost",
    "Global",
    "MaskRef",
    "MaskUpdater",
    "MaskedTensor",
    "SoftTopK",
    "SoftTopKResult",
    "SparsityReport",
    "SpartanMask",
    "StepRecord",
    "Uniform",
    "UnitCost",
    "constant",
    "cosine",
    "finalize",
    "find_masks",
    "hard_topk",
    "linear",
    "load_sharded_state_dict",
    "sharded_state_dict",
    "soft_topk",
    "sparsify",
    "sparsity_report",
]
__version__ = "0.2.0"
