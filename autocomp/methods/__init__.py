"""Compression methods, one module per family, each registering its config types and handlers
in ``registry`` when imported; ``plan`` says which layer takes which, ``apply`` applies it.

Importing any module of this package imports this one first, so every method is registered
before a plan is parsed.
"""

from autocomp.methods import lowrank, prune, quant, sparsity, substitute

__all__ = ["lowrank", "prune", "quant", "sparsity", "substitute"]
