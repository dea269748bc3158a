"""torchspartan: train PyTorch models to a chosen sparsity with Spartan.

One flat namespace::

    import torchspartan as ts
    ts.soft_topk, ts.hard_topk, ts.SoftTopK          # the mask operators
"""

from torchspartan.topk import SoftTopK, SoftTopKResult, hard_topk, soft_topk

__all__ = ["SoftTopK", "SoftTopKResult", "hard_topk", "soft_topk"]
__version__ = "0.1.0"
