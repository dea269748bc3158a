"""Reference experiments for torchspartan: Fashion-MNIST sparse training and the comparison.

Run ``python -m reference.fashion_mnist`` (``make demo``) for one training run and
``python -m reference.compare`` for the method/sparsity comparison (results in
``reference/results/``). Not part of the installed library.
"""
