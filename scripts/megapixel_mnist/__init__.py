"""Megapixel MNIST (Katharopoulos & Fleuret, ICML 2019) reproduced with `pipeline`.

`python -m scripts.megapixel_mnist --preset quick` from the repository root; see
docs/megapixel_mnist.md.
"""
