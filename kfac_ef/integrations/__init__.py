"""Callbacks that run ``KFACPreconditioner.step()`` inside other libraries' training loops.

- :mod:`kfac_ef.integrations.huggingface`: ``KFACCallback`` for transformers' ``Trainer``;
- :mod:`kfac_ef.integrations.lightning`: ``KFACCallback`` for Lightning's ``Trainer``.

Each module imports its library; this package imports neither (kfac_ef's own dependencies
stay torch, opt_einsum and triton). docs/integrations.md says where each callback calls
step() relative to unscaling, gradient clipping and gradient accumulation.
"""
