"""What ``refimpl`` and ``torch_port`` share, in plain Python (no NumPy, torch or autograd).

- :mod:`softmax_common.checks`: argument and hyperparameter checks, so that both packages reject the
  same bad input with the same message;
- :mod:`softmax_common.closed_forms`: functions of hyperparameters alone (the NormFace and CosFace
  bounds, the cosine gaps of the ArcFace and combined-margin fallbacks).

Importing this package loads nothing but the standard library, so ``import torch_port`` needs neither
``refimpl`` nor ``autograd``. The reference computes the fallback gaps by its own formulas
(``refimpl/normalized.py``), so the agreement tests compare two routes to them.
"""
