"""ImageNet reference: Spartan ResNet-50 and ViT-B/16 training.

Run ``python -m reference.imagenet.train --help``; see ``reference/imagenet/README.md``.
"""
